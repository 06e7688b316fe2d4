"""The measured-against-predicted report's arithmetic, on known answers."""
from __future__ import annotations

import dataclasses

import pytest

from autopart.core.costmodel import CostModel
from autopart.core.planner import simulate_plan
from autopart.core.search import plan_partition
from autopart.core.simulate import Event
from autopart.formats.profile import Profile
from autopart.run.report import Measured, fit_overhead_ms, measured_timeline
from tests.conftest import ROOT


@pytest.mark.parametrize("schedule", ["GPipe", "1F1B", "ZBVZeroBubble"])
def test_the_fitted_overhead_is_the_one_that_made_the_step(schedule: str) -> None:
    profile = Profile.from_json(str(ROOT / "profiles" / "gpt2-small-cpu-mb1.json"))
    plan = plan_partition(profile, 2, CostModel(schedule=schedule, microbatches=4,
                                                stages_per_rank=2 if schedule == "ZBVZeroBubble" else 1))
    with_overhead = dataclasses.replace(plan, stages=tuple(
        dataclasses.replace(st, cost=dataclasses.replace(st.cost, overhead_ms=2.5)) for st in plan.stages))
    step = simulate_plan(with_overhead).step_ms
    assert step > plan.predicted.step_ms + 8 * 2.5  # at least the 2M actions of one rank pay it
    assert fit_overhead_ms(plan, step) == pytest.approx(2.5, abs=2e-3)
    assert fit_overhead_ms(plan, plan.predicted.step_ms * 0.9) == 0.0  # faster than predicted: nothing to add


def test_the_measured_step_is_the_slowest_rank_of_the_median_step() -> None:
    steps = ((100.0, 130.0), (90.0, 95.0), (120.0, 110.0), (200.0, 150.0), (100.0, 121.0))
    events = tuple((Event(0, "0F0", "F", 0.0, 10.0), Event(1, "OPT", "OPT", 5.0, 6.0 + i)) for i in range(5))
    measured = Measured(step_ms=steps, events=events)
    assert measured.slowest_ms == [130.0, 95.0, 120.0, 200.0, 121.0]
    assert measured.steady() == [2, 3, 4]  # the first quarter (rounded up) is warm-up
    profile = Profile.from_json(str(ROOT / "profiles" / "gpt2-small-cpu-mb1.json"))
    timeline = measured_timeline(plan_partition(profile, 2), measured)
    assert timeline.step_ms == 121.0 and timeline.events == events[4]  # median of 120, 200, 121


def test_the_report_is_rendered_without_printing_or_torch() -> None:
    """render.report turns a Report into two tables and the step lines; a run whose micro-batch differs from
    the plan's says so instead of an error it cannot compute."""
    from rich.table import Table

    from autopart.formats.report import RankRow, Report, StageRow
    from autopart.render.report import report_lines

    report = Report(plan="p.json", model="m", schedule="1F1B", microbatches=4, microbatch_size=2, global_batch=8,
                    ranks=2, steps=5, losses=[1.0], step_ms=[20.0], measured_step_ms=21.5,
                    measured_step_spread_ms=(20.0, 30.0), steady_steps=4, slowest_rank=1, predicted_step_ms=None,
                    predicted_bubble_fraction=0.25, step_error=None, simulated_with_measured_stages_ms=19.0,
                    measured_speed=None, fitted_overhead_ms=0.123, throughput_per_s=1234.5, throughput_unit="tokens",
                    stages=[StageRow(0, 0, 3, None, None, 1.7, 3.2, None)],
                    ranks_detail=[RankRow(0, None, None, 10.0, 2.0, 3.0, 20.0)])
    stages, ranks, *lines = report_lines(report, 4)
    assert isinstance(stages, Table) and isinstance(ranks, Table) and stages.row_count == ranks.row_count == 1
    assert lines == ["step (slowest rank, rank 1): measured 21.5 ms (median of 4 steps, 20 ms-30 ms) (the plan is for "
                     "micro-batches of 4, this run used 2); simulated with the measured stage times 19 ms",
                     "runtime overhead: 123 µs per forward or backward action (what the measured stage times leave "
                     "unexplained; plan with --overhead 0.123ms)",
                     "throughput 1,234 tokens/s"]

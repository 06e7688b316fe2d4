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
                    measured_speed=None, fitted_overhead_ms=0.2, unexplained_ms=0.123, action_ms=0.1,
                    throughput_per_s=1234.5, throughput_unit="tokens",
                    memory_method="by a known method",
                    stages=[StageRow(0, 0, 3, None, None, 1.7, 3.2, None)],
                    ranks_detail=[RankRow(0, None, None, 10.0, 2.0, 3.0, 20.0, memory_planned_bytes=100 * 2**20,
                                          memory_measured_bytes=112 * 2**20, memory_reserved_bytes=None,
                                          memory_ratio=1.12, build_peak_bytes=65 * 2**20),
                                  RankRow(1, None, None, 10.0, 2.0, 3.0, 20.0, memory_planned_bytes=2**30,
                                          memory_measured_bytes=None, memory_reserved_bytes=None, memory_ratio=None)])
    stages, ranks, memory, *lines = report_lines(report, 4)
    assert isinstance(stages, Table) and isinstance(ranks, Table) and isinstance(memory, Table)
    assert stages.row_count == 1 and ranks.row_count == memory.row_count == 2
    assert [c.header for c in memory.columns] == ["rank", "measured", "(planned)", "measured/planned",  # no CUDA
                                                  "build peak"]
    assert [list(c.cells) for c in memory.columns] == [["0", "1"], ["112 MiB", "-"], ["100 MiB", "1 GiB"],
                                                        ["1.12x", "-"], ["65 MiB", "-"]]
    assert lines == ["step (slowest rank, rank 1): measured 21.5 ms (median of 4 steps, 20 ms-30 ms) (the plan is for "
                     "micro-batches of 4, this run used 2); simulated with the measured stage times 19 ms",
                     "unexplained: 123 µs per forward or backward action (what the measured terms leave; the plan's "
                     "action cost is 100 µs: plan with --overhead 0.223ms to predict this machine as it ran)",
                     "throughput 1,234 tokens/s",
                     "memory per rank: by a known method"]
    fast = dataclasses.replace(report, measured_speed=0.46)
    assert "(plan with --devices 2xMEMORY@0.46 to predict this machine as it ran)" in report_lines(fast, 4)[4]
    replicated = dataclasses.replace(fast, data_parallel=2)  # a cluster plan's devices are per node
    assert "(plan with --devices-per-node NxMEMORY@0.46 to predict this" in report_lines(replicated, 4)[4]
    cuda = dataclasses.replace(report, ranks_detail=[dataclasses.replace(report.ranks_detail[0],
                                                                         memory_reserved_bytes=128 * 2**20)])
    memory = report_lines(cuda, 4)[2]
    assert isinstance(memory, Table) and [list(c.cells) for c in memory.columns][-2] == ["128 MiB"]


def test_each_ranks_planned_memory_is_its_stages_and_the_ratio_its_measured_peak() -> None:
    """Interleaved1F1B: rank r holds stages r and r + 2, so its planned memory is theirs added; the measured
    peaks gathered from the ranks are set beside them."""
    from autopart.measure.memory import MemoryPeak
    from autopart.run.report import _rank_rows

    profile = Profile.from_json(str(ROOT / "profiles" / "gpt2-small-cpu-mb1.json"))
    plan = plan_partition(profile, 2, CostModel(schedule="Interleaved1F1B", microbatches=4, stages_per_rank=2))
    assert plan.num_ranks == 2 and plan.stages_of(0) == [0, 2]
    peaks = (MemoryPeak(peak_bytes=300 * 2**20, reserved_bytes=None), MemoryPeak(peak_bytes=None, reserved_bytes=None))
    events = ((Event(0, "0F0", "F", 0.0, 1.0), Event(1, "1F0", "F", 1.0, 2.0)),)
    rows = _rank_rows(plan, Measured(step_ms=((2.0, 2.0),), events=events, memory=peaks), None)
    memory = [st.cost.memory_bytes for st in plan.stages]
    assert [r.memory_planned_bytes for r in rows] == [memory[0] + memory[2], memory[1] + memory[3]]
    assert rows[0].memory_measured_bytes == 300 * 2**20 and rows[1].memory_measured_bytes is None
    assert rows[0].memory_ratio == pytest.approx(300 * 2**20 / (memory[0] + memory[2]), rel=1e-12)
    assert rows[1].memory_ratio is None and rows[0].memory_reserved_bytes is None


def test_the_measured_speed_leaves_out_the_plans_action_cost() -> None:
    """Stage 0 ran F and B (2 actions per micro-batch), stage 1 F, I and W (3); the plan prices 0.5 ms per action
    apart, so the measured compute is 30 - 2 x 0.5 and 40 - 3 x 0.5 ms: the speed is the plan's compute over 67.5,
    not over the 70 ms the actions took (a plan at that speed would pay the action cost twice)."""
    from autopart.run.report import _actions_per_microbatch, _speed

    profile = Profile.from_json(str(ROOT / "profiles" / "gpt2-small-cpu-mb1.json"))
    plan = plan_partition(profile, 2, CostModel(schedule="1F1B", microbatches=4))
    plan = dataclasses.replace(plan, stages=tuple(
        dataclasses.replace(st, cost=dataclasses.replace(st.cost, overhead_ms=0.5)) for st in plan.stages))
    events = ((Event(0, "0F0", "F", 0.0, 10.0), Event(0, "0B0", "B", 10.0, 30.0), Event(1, "1F0", "F", 10.0, 25.0),
               Event(1, "1I0", "I", 25.0, 40.0), Event(1, "1W0", "W", 40.0, 50.0)),)
    actions = _actions_per_microbatch(Measured(step_ms=((50.0, 50.0),), events=events), 2)
    assert actions == {0: 2, 1: 3}
    compute = sum(st.cost.compute_ms * st.device.speed for st in plan.stages)
    stage_ms = {0: (10.0, 20.0, None), 1: (15.0, 25.0, (15.0, 10.0))}
    assert _speed(plan, stage_ms, actions) == pytest.approx(compute / 67.5)
    assert _speed(plan, {0: (0.5, 0.5, None)}, {0: 2}) is None  # nothing left after the action cost
    # a plan that priced stage 1's I and W as torch runs them compares the measured halves with those
    last = plan.stages[1].cost
    second = dataclasses.replace(plan.stages[1], cost=dataclasses.replace(
        last, input_grad_ms=last.backward_ms * 0.6, weight_grad_ms=last.backward_ms * 0.7))
    halves = dataclasses.replace(plan, stages=(plan.stages[0], second))
    split = compute + 0.3 * last.backward_ms * plan.stages[1].device.speed
    assert _speed(halves, stage_ms, actions) == pytest.approx(split / 67.5)
    assert _speed(halves, {0: (10.0, 20.0, None), 1: (15.0, 25.0, None)}, actions) == pytest.approx(compute / 67.5)


def test_a_measured_all_reduce_is_drawn() -> None:
    """The replicas' all-reduce (AR events, timed by the run) has a colour and a legend entry in the SVG."""
    from autopart.core.simulate import Timeline
    from autopart.render.timeline import COLOURS, render_svg

    events = (Event(0, "0F0", "F", 0.0, 1.0), Event(0, "AR", "AR", 1.0, 2.0))
    svg = render_svg([("measured", Timeline(schedule="GPipe", num_ranks=1, microbatches=1, step_ms=2.0,
                                            events=events))])
    assert COLOURS["AR"] in svg and ">all-reduce<" in svg

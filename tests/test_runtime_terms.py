"""The runtime's measured terms (issue 21, part A): the loss timed alone, the runtime's cost per action, the tied
gradients' sum (simulated on hand-computed timelines, timed in a real two-rank run), the report's terms."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from autopart.core.costmodel import CostModel, Problem
from autopart.core.schedules import build_schedule
from autopart.core.simulate import simulate
from autopart.formats.devices import Device
from autopart.formats.plan import Plan
from autopart.formats.profile import LayerProfile, Profile, Tie
from autopart.formats.stage import StageCost
from tests.conftest import ROOT, run_cli

TINY_TIED_GPT2 = ("hf:gpt2:n_layer=2,n_embd=32,n_head=2,n_positions=32,vocab_size=256,resid_pdrop=0,embd_pdrop=0,"
                  "attn_pdrop=0")


def _layer(name: str, forward_ms: float, backward_ms: float, **more: float) -> LayerProfile:
    return LayerProfile(name=name, forward_ms=forward_ms, backward_ms=backward_ms, param_bytes=1000,
                        activation_bytes=100, output_bytes=10, **more)  # type: ignore[arg-type]


def _profile(*, loss_in_last_block: bool, action_ms: float = 0.0, ties: tuple[Tie, ...] = ()) -> Profile:
    layers = (_layer("b0", 1.0, 2.0), _layer("b1", 3.0, 4.0),
              _layer("b2", 5.0, 6.0, loss_forward_ms=0.5, loss_backward_ms=0.25))
    return Profile(model="hand", device="cpu", dtype="float32", microbatch_size=1, sample_shape=(1, 4), torch="2.13",
                   layers=layers, loss_in_last_block=loss_in_last_block, action_ms=action_ms, ties=ties)


def test_the_loss_in_the_last_block_is_shown_apart_on_the_last_stage() -> None:
    """A profile whose last block's times hold the loss: the last stage's times are the blocks' as measured, and its
    ``loss_ms`` is the loss's forward and backward (at the stage's speed); the other stages have none."""
    stages = Problem.from_profile(_profile(loss_in_last_block=True), [Device("a"), Device("b", speed=2.0)],
                                  CostModel()).stages([2, 1])
    assert [s.loss_ms for s in stages] == [0.0, 0.75 / 2]
    assert (stages[1].forward_ms, stages[1].backward_ms) == (5.0 / 2, 6.0 / 2)


def test_a_loss_timed_apart_from_the_last_block_is_added_to_it() -> None:
    """A profile whose last block was timed without the loss (``loss_in_last_block`` false) but which timed the loss:
    the last stage pays it, forward in the forward, backward in the backward and in the input-gradient half."""
    profile = _profile(loss_in_last_block=False)
    profile = dataclasses.replace(profile, layers=tuple(dataclasses.replace(x, input_grad_ms=x.backward_ms / 2)
                                                        for x in profile.layers))
    stages = Problem.from_profile(profile, [Device("a")] * 2, CostModel()).stages([2, 1])
    assert (stages[1].forward_ms, stages[1].backward_ms, stages[1].input_grad_ms) == (5.5, 6.25, 3.25)
    assert stages[1].loss_ms == 0.75 and stages[0].loss_ms == 0.0
    assert (stages[0].forward_ms, stages[0].backward_ms) == (4.0, 6.0)


def test_the_profiles_action_cost_is_every_stages_overhead_unless_given() -> None:
    profile = _profile(loss_in_last_block=True, action_ms=0.3)
    measured = Problem.from_profile(profile, [Device("a")] * 2, CostModel()).stages([1, 2])
    assert [s.overhead_ms for s in measured] == [0.3, 0.3]
    given = Problem.from_profile(profile, [Device("a")] * 2, CostModel(overhead_ms=1.5)).stages([1, 2])
    assert [s.overhead_ms for s in given] == [1.5, 1.5]


def test_older_profiles_load_and_plan_as_before() -> None:
    """A profile from before the terms (no loss times, no action cost): every new field reads as 0 or empty, the
    stages cost what the blocks add up to, and the plan's stages write none of the new keys."""
    from autopart.core.search import plan_partition

    raw = json.loads((ROOT / "profiles" / "gpt2-small-cpu-mb1.json").read_text())
    assert "action_ms" not in raw and not any("loss_forward_ms" in layer for layer in raw["layers"])
    profile = Profile.from_dict(raw)
    assert profile.action_ms == 0.0 and profile.layers[-1].loss_forward_ms == 0.0
    plan = plan_partition(profile, 2, CostModel(schedule="1F1B", microbatches=4))
    first = 0
    for stage in plan.stages:
        blocks = profile.layers[first: first + len(stage.blocks)]
        assert stage.cost.forward_ms == pytest.approx(sum(x.forward_ms for x in blocks), rel=1e-12)
        assert stage.cost.overhead_ms == 0.0 and stage.cost.loss_ms == 0.0 and stage.cost.tie_ms == ()
        saved = stage.cost.to_dict()
        assert "loss_ms" not in saved and "tie_ms" not in saved
        first += len(stage.blocks)
    assert "action_ms" not in profile.to_dict()


def _tied(schedule: str, per_rank: int = 1) -> list[StageCost]:
    """Blocks b0 and b2 share a parameter of 1e6 bytes, over a link of 1e6 bytes/ms with 0.1 ms latency."""
    profile = _profile(loss_in_last_block=True, ties=(Tie(params=("b0.w", "b2.w"), owner="b0", blocks=("b0", "b2"),
                                                          bytes=1_000_000),))
    model = CostModel(schedule=schedule, microbatches=2, bandwidth_bytes_per_ms=1e6, latency_ms=0.1,
                      stages_per_rank=per_rank)
    return Problem.from_profile(profile, [Device("a")] * 2, model).stages([1, 2])


def test_a_tie_across_ranks_costs_a_ring_all_reduce_among_its_holders() -> None:
    """Two holders: the ring sends 2(2-1)/2 of the bytes (1 ms) in 2 steps of 0.1 ms latency; a V puts both holders
    on one rank (ZBVZeroBubble on 1 rank), so no sum crosses ranks."""
    stages = _tied("1F1B")
    assert [s.tie_ms for s in stages] == [(("b0,b2", pytest.approx(1.2)),)] * 2
    assert [s.tie_ms for s in _tied("ZBVZeroBubble", per_rank=2)] == [(), ()]


@pytest.mark.parametrize("schedule", ["GPipe", "1F1B"])
def test_the_tie_sum_waits_for_the_last_holder_and_delays_the_optimizer(schedule: str) -> None:
    """Hand-computed, 2 ranks, 2 micro-batches, stage 0: F 1, B 1; stage 1: F 2, B 2; each optimizer 0.5 ms.
    GPipe: rank 1 runs F0 1-3, F1 3-5, B 5-7, 7-9; rank 0 F 0-1, 1-2 and its backwards after rank 1's, 7-8 and
    9-10. 1F1B: rank 1 F0 1-3, B0 3-5, F1 5-7, B1 7-9; rank 0 B0 5-6, B1 9-10. Either way rank 1 is done at 9 and
    rank 0 at 10: both sum the tie (3 ms) from 10 to 13, then step their optimizers, 13-13.5."""
    stage = StageCost(forward_ms=1.0, backward_ms=1.0, optimizer_ms=0.5, memory_bytes=0, tie_ms=(("t", 3.0),))
    costs = [stage, dataclasses.replace(stage, forward_ms=2.0, backward_ms=2.0)]
    sim = simulate(build_schedule(schedule, 2, 2), costs)
    assert [(e.rank, e.kind, e.start_ms, e.end_ms) for e in sim.events if e.kind in ("TIE", "OPT")] == [
        (0, "TIE", 10.0, 13.0), (0, "OPT", 13.0, 13.5), (1, "TIE", 10.0, 13.0), (1, "OPT", 13.0, 13.5)]
    assert sim.step_ms == 13.5 and sim.tie_ms == (3.0, 3.0)
    untied = simulate(build_schedule(schedule, 2, 2), [dataclasses.replace(c, tie_ms=()) for c in costs])
    assert untied.step_ms == 10.5 and untied.tie_ms == (0.0, 0.0)


def test_the_reports_predicted_terms_add_up_to_the_step() -> None:
    """The hand-made tied profile under 1F1B, 2 micro-batches, split [1, 2], 0.1 ms per action: on each rank the
    compute is its blocks' less the loss (0.75 ms per micro-batch, apart), 4 actions pay 0.1 ms, the tie sum is the
    ring's 1.2 ms, and with the sends, the optimizer and the idle rest the terms are the step."""
    from autopart.core.planner import make_plan, simulate_plan
    from autopart.core.partition import split_given
    from autopart.run.report import _predicted_terms

    profile = _profile(loss_in_last_block=True, action_ms=0.1, ties=(Tie(params=("b0.w", "b2.w"), owner="b0",
                                                                         blocks=("b0", "b2"), bytes=1_000_000),))
    model = CostModel(schedule="1F1B", microbatches=2, bandwidth_bytes_per_ms=1e6, latency_ms=0.1)
    problem = Problem.from_profile(profile, [Device("a")] * 2, model)
    plan = make_plan(split_given(problem, [1, 2]), problem, model, [Device("a")] * 2)
    sim = simulate_plan(plan)
    first, last = (_predicted_terms(plan, sim, r) for r in (0, 1))
    assert first["compute"] == pytest.approx(2 * 3.0) and last["compute"] == pytest.approx(2 * (7.0 + 11.0 - 0.75))
    assert (first["loss"], last["loss"]) == (0.0, pytest.approx(2 * 0.75))
    assert (first["action cost"], last["action cost"]) == (pytest.approx(4 * 0.1), pytest.approx(4 * 0.1))
    assert (first["tie sum"], last["tie sum"]) == (pytest.approx(1.2), pytest.approx(1.2))
    assert (first["sends"], last["sends"]) == (pytest.approx(2 * (10 / 1e6 + 0.1)), pytest.approx(2 * (10 / 1e6 + 0.1)))
    for terms in (first, last):
        assert sum(terms.values()) == pytest.approx(sim.step_ms) and terms["rest"] >= 0


@pytest.mark.slow
def test_the_profiler_times_the_loss_and_the_runtimes_action_cost() -> None:
    """A real profile with a loss: the last block records the loss's own forward and backward (> 0; timed alone, so
    noise may put them above the block's own, which hold them), no other block does; the runtime's cost per action is measured (> 0) and becomes the plan's
    ``overhead_ms``."""
    import torch
    from torch import nn

    from autopart.core.search import plan_partition
    from autopart.measure.profiler import profile_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 512))
    from autopart.run.stages import one_stage_world

    x, target = torch.randn(8, 32), torch.randint(0, 512, (8,))
    rng = torch.get_rng_state()
    profile = profile_model(model, x, loss_fn=nn.functional.cross_entropy, target=target, warmup=1, repeats=5,
                            runtime=one_stage_world)
    assert torch.equal(torch.get_rng_state(), rng)  # the tiny stage's weights drew from a forked generator
    assert profile_model(model, x).action_ms == 0.0  # no runtime given: not measured
    last = profile.layers[-1]
    assert profile.loss_in_last_block and last.loss_forward_ms > 0 and last.loss_backward_ms > 0
    assert all(x.loss_forward_ms == x.loss_backward_ms == 0.0 for x in profile.layers[:-1])
    assert profile.action_ms > 0
    again = Profile.from_dict(json.loads(json.dumps(profile.to_dict())))
    assert (again.action_ms, again.layers[-1].loss_backward_ms) == (profile.action_ms, last.loss_backward_ms)
    plan = plan_partition(profile, 2, CostModel(schedule="1F1B", microbatches=2))
    assert [st.cost.overhead_ms for st in plan.stages] == [profile.action_ms] * 2
    assert plan.stages[-1].cost.loss_ms == pytest.approx(last.loss_forward_ms + last.loss_backward_ms)


@pytest.mark.slow
def test_a_tied_model_on_two_ranks_times_its_tie_sum_and_predicts_it(tmp_path: Path) -> None:
    """GPT-2 with its LM head tied to the embedding, on 2 gloo ranks: the plan's prediction holds the tie sum between
    the first and the last rank, the run times it (TIE), and the report gives both, with every term's share."""
    from autopart.core.planner import simulate_plan
    from autopart.formats.plan import Plan

    profile, plan_path, report = tmp_path / "p.json", tmp_path / "plan.json", tmp_path / "r.json"
    made = run_cli("profile", TINY_TIED_GPT2, "--input-shape", "2,16", "--repeats", "2", "--threads", "1",
                   "-o", str(profile))
    assert made.returncode == 0, made.stderr[-2000:]
    assert Profile.from_json(profile).ties  # the embedding and the head share their matrix
    made = run_cli("partition", str(profile), "--stages", "2", "--schedule", "1F1B", "--microbatches", "2",
                   "--bandwidth", "100MB/s", "-o", str(plan_path))
    assert made.returncode == 0, made.stderr[-2000:]
    plan = Plan.from_json(plan_path)
    assert all(st.cost.tie_ms for st in plan.stages)
    sim = simulate_plan(plan)
    untied = dataclasses.replace(plan, stages=tuple(dataclasses.replace(st, cost=dataclasses.replace(
        st.cost, tie_ms=())) for st in plan.stages))
    assert plan.predicted.step_ms == pytest.approx(sim.step_ms)
    assert sim.step_ms > simulate_plan(untied).step_ms and min(sim.tie_ms) > 0
    ran = run_cli("train", str(plan_path), "--model", TINY_TIED_GPT2, "--steps", "3", "--threads", "1",
                  "--report", str(report))
    assert ran.returncode == 0, ran.stderr[-2000:]
    data = json.loads(report.read_text())
    terms = {row["term"]: row for row in data["terms"]}
    assert list(terms) == ["compute", "loss", "action cost", "sends", "tie sum", "optimizer", "rest"]
    assert terms["tie sum"]["measured_ms"] > 0 and terms["tie sum"]["predicted_ms"] == pytest.approx(max(sim.tie_ms))
    assert data["predicted_step_ms"] == pytest.approx(sim.step_ms)
    assert sum(row["predicted_ms"] for row in data["terms"]) == pytest.approx(sim.step_ms)
    assert sum(row["measured_ms"] or 0.0 for row in data["terms"]) == pytest.approx(data["measured_step_ms"], rel=0.3)
    assert "unexplained_ms" in data and "fitted_overhead_ms" in data
    assert "per term, one step of the slowest rank" in ran.stdout


def test_the_loss_after_the_last_stages_forward_is_timed_with_that_forward() -> None:
    """torch's schedule computes the loss right after the last stage's forward action: the clock extends that F
    over it (as the profile and the plan count the last stage's forward), and times the tie sum as its own event."""
    import time

    import torch

    from autopart.run.timeline import ActionClock

    clock = ActionClock(1, torch.device("cpu"))
    clock.begin_step()
    clock.timed("F", "1F0", time.sleep, 0.01)
    clock.timed("LOSS", "LOSS", time.sleep, 0.02)
    clock.timed("TIE", "TIE", time.sleep, 0.005)
    forward, tie = clock.end_step()
    assert (forward.action, forward.kind, tie.kind) == ("1F0", "F", "TIE")
    assert forward.end_ms - forward.start_ms >= 30.0 and tie.start_ms >= forward.end_ms


def _two_rank_plan(data_parallel: int, allreduce_ms: float) -> Plan:
    """The hand-made tied plan of the test above, as ``data_parallel`` replicas whose exposed all-reduce is
    ``allreduce_ms``."""
    from autopart.core.partition import split_given
    from autopart.core.planner import make_plan

    profile = _profile(loss_in_last_block=True, action_ms=0.1, ties=(Tie(params=("b0.w", "b2.w"), owner="b0",
                                                                         blocks=("b0", "b2"), bytes=1_000_000),))
    model = CostModel(schedule="1F1B", microbatches=2, bandwidth_bytes_per_ms=1e6, latency_ms=0.1)
    problem = Problem.from_profile(profile, [Device("a")] * 2, model)
    plan = make_plan(split_given(problem, [1, 2]), problem, model, [Device("a")] * 2)
    return dataclasses.replace(plan, data_parallel=data_parallel,
                               predicted=dataclasses.replace(plan.predicted, allreduce_ms=allreduce_ms))


def test_with_replicas_the_terms_add_up_to_the_predicted_step_with_its_all_reduce() -> None:
    """Two replicas, the plan's exposed all-reduce 2.5 ms: the predicted terms hold it as ``all-reduce`` and add up
    to the report's predicted step (the simulated step + 2.5 ms), their shares to 1; the measured all-reduce is the
    AR event the run timed (3 ms), out of ``rest``. One replica: no all-reduce row, the terms the simulated step."""
    from autopart.core.planner import simulate_plan
    from autopart.core.simulate import Event
    from autopart.run.report import Measured, _term_rows

    plan = _two_rank_plan(2, 2.5)
    sim = simulate_plan(plan)
    events = (Event(1, "1F0", "F", 0.0, 4.0), Event(1, "1B0", "B", 4.0, 10.0), Event(1, "AR", "AR", 10.0, 13.0),
              Event(1, "OPT", "OPT", 13.0, 14.0))
    measured = Measured(step_ms=((15.0, 15.0),), events=(events,))
    rows = {row.term: row for row in _term_rows(plan, measured, sim, 1, 15.0)}
    assert list(rows) == ["compute", "loss", "action cost", "sends", "tie sum", "all-reduce", "optimizer", "rest"]
    assert rows["all-reduce"].predicted_ms == 2.5 and rows["all-reduce"].measured_ms == pytest.approx(3.0)
    assert sum(row.predicted_ms or 0.0 for row in rows.values()) == pytest.approx(sim.step_ms + 2.5)
    assert sum(row.predicted_share or 0.0 for row in rows.values()) == pytest.approx(1.0)
    assert rows["rest"].predicted_ms >= 0
    assert (rows["compute"].measured_ms, rows["optimizer"].measured_ms) == (pytest.approx(10.0), pytest.approx(1.0))
    assert rows["rest"].measured_ms == pytest.approx(15.0 - 10.0 - 3.0 - 1.0)
    single = _two_rank_plan(1, 0.0)
    rows_1 = _term_rows(single, measured, simulate_plan(single), 1, 15.0)
    assert "all-reduce" not in [row.term for row in rows_1]
    assert sum(row.predicted_ms or 0.0 for row in rows_1) == pytest.approx(simulate_plan(single).step_ms)


def test_the_loss_is_fitted_across_micro_batch_sizes_as_the_times_are() -> None:
    """Measured at sizes 1 and 2 (loss 0.5 and 1 ms forward, 0.25 and 0.5 backward; the block 5 and 10, 6 and 12):
    at size 4 the least-squares line gives 2 and 1 ms, not size 1's."""
    from autopart.core.scaling import scale_profile

    profile = _profile(loss_in_last_block=True)
    doubled = tuple(dataclasses.replace(x, forward_ms=2 * x.forward_ms, backward_ms=2 * x.backward_ms,
                                        loss_forward_ms=2 * x.loss_forward_ms, loss_backward_ms=2 * x.loss_backward_ms)
                    for x in profile.layers)
    profile = dataclasses.replace(profile, by_microbatch_size=((2, doubled),))
    scaled, _ = scale_profile(profile, 4)
    last = scaled.layers[-1]
    assert (last.forward_ms, last.loss_forward_ms) == (pytest.approx(20.0), pytest.approx(2.0))
    assert (last.backward_ms, last.loss_backward_ms) == (pytest.approx(24.0), pytest.approx(1.0))
    assert scaled.layers[0].loss_forward_ms == 0.0


@pytest.mark.parametrize("value, fragment", [(1e12, "action_ms 1e+12 is not a plausible time (> 1e9 ms = 11.6 days)"),
                                             (-1.0, "action_ms")])
def test_an_implausible_action_cost_is_refused_on_reading(value: float, fragment: str) -> None:
    from autopart.errors import AutopartError

    data = {**_profile(loss_in_last_block=True).to_dict(), "action_ms": value}
    with pytest.raises(AutopartError) as caught:
        Profile.from_dict(data)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.slow
def test_two_replicas_time_their_all_reduce_as_a_term(tmp_path: Path) -> None:
    """One stage, 2 data-parallel replicas on 2 gloo ranks: each times its gradients' all-reduce (AR), and the
    report's terms hold it beside the plan's exposed all-reduce (1.5 ms here), the predicted terms adding up to the
    predicted step."""
    plan_path, report = tmp_path / "plan.json", tmp_path / "r.json"
    made = run_cli("partition", str(ROOT / "profiles" / "gpt2-tiny-cpu-mb4.json"), "--stages", "1", "--microbatches",
                   "2", "-o", str(plan_path))
    assert made.returncode == 0, made.stderr[-2000:]
    plan = Plan.from_json(plan_path)
    dataclasses.replace(plan, data_parallel=2, predicted=dataclasses.replace(
        plan.predicted, allreduce_ms=1.5, step_ms=plan.predicted.step_ms + 1.5)).to_json(plan_path)
    ran = run_cli("train", str(plan_path), "--model", "gpt2-tiny", "--steps", "3", "--report", str(report))
    assert ran.returncode == 0, ran.stderr[-3000:]
    data = json.loads(report.read_text())
    terms = {row["term"]: row for row in data["terms"]}
    assert list(terms) == ["compute", "loss", "action cost", "sends", "tie sum", "all-reduce", "optimizer", "rest"]
    assert terms["all-reduce"]["predicted_ms"] == 1.5 and terms["all-reduce"]["measured_ms"] > 0
    assert sum(row["predicted_ms"] for row in data["terms"]) == pytest.approx(data["predicted_step_ms"])
    assert sum(row["predicted_share"] for row in data["terms"]) == pytest.approx(1.0)

"""What a stage runs on, with real torchrun/gloo ranks through ``autopart train``: each block's own random
stream (dropout), shapes worked out without running on garbage (an embedding on a later stage), and a stage
without parameters; each compared with one process running the same blocks."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from autopart.formats.plan import Plan
from autopart.measure.blocks import chain_of
from autopart.measure.optimizers import make_optimizer
from autopart.measure.spec import load_model
from autopart.run.build import build_model
from autopart.run.checkpoint import merge_checkpoint
from autopart.run.streams import BlockStreams
from tests.conftest import ROOT, assert_one_line_error, run_cli, run_cli_here
from tests.helpers import plan_for

HELPERS = str(ROOT / "tests" / "helpers.py")


def _reference(spec: str, plan: Plan, steps: int, seed: int, lr: float) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process: the model built as every rank builds it, each micro-batch through all blocks with the
    same per-block streams, the mean loss's gradients, the plan's optimizer. Losses per step, final weights."""
    bundle = build_model(spec, seed)
    assert bundle.loss_fn is not None and bundle.data is not None and bundle.example is not None
    data = list(bundle.data)
    m = plan.microbatches
    first = data[0][0] if isinstance(data[0][0], tuple) else (data[0][0],)
    chain = chain_of(bundle.module, tuple(x.tensor_split(m)[0] for x in first), spec)
    streams = BlockStreams(seed, torch.device("cpu"))
    whole = chain.stage_module(0, len(chain.blocks) - 1, enter=streams.enter)
    streams.keep_caller_state(whole)
    loss_fn = chain.model_loss(bundle.loss_fn)  # a captured graph returns its outputs flattened
    optimizer = make_optimizer(plan.optimizer, list(bundle.module.parameters()), lr=lr)
    losses = []
    for step in range(steps):
        inputs, target = data[step]
        parts = [x.tensor_split(m) for x in (inputs if isinstance(inputs, tuple) else (inputs,))]
        optimizer.zero_grad()
        streams.step = step
        per_mb = []
        for k in range(m):
            streams.microbatch = k
            per_mb.append(loss_fn(whole(*[p[k] for p in parts]), target.tensor_split(m)[k]))
        loss = torch.stack(per_mb).mean()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses, bundle.module.state_dict()


def _train(plan: Path, spec: str, tmp_path: Path, steps: int, *extra: str) -> list[float]:
    report = tmp_path / "report.json"
    result = run_cli("train", str(plan), "--model", spec, "--steps", str(steps), "--lr", "0.05", "--seed", "3",
                     "--checkpoint", str(tmp_path / "ckpt"), "--report", str(report), *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    return [float(v) for v in json.loads(report.read_text())["losses"]]


def _assert_same(got_losses: list[float], got: dict[str, torch.Tensor], losses: list[float],
                 state: dict[str, torch.Tensor]) -> None:
    assert got_losses == pytest.approx(losses, rel=1e-6, abs=1e-7)
    assert set(got) == set(state)
    for name, value in state.items():
        torch.testing.assert_close(got[name], value, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("factory, balance, schedule", [
    ("dropout_mlp_spec", [3, 4], "GPipe"),  # a Dropout on each stage
    ("dropout_mlp_spec", [3, 4], "1F1B"),
    ("skip_dropout_spec", [1, 2], "1F1B"),  # captured as a graph: the blocks' streams are entered inside it
])
@pytest.mark.slow
def test_dropout_on_both_stages_equals_one_process_with_the_same_block_streams(factory: str, balance: list[int],
                                                                               schedule: str, tmp_path: Path) -> None:
    spec = f"{HELPERS}:{factory}"
    plan = plan_for(spec, balance, schedule, 2, tmp_path / "plan.json")
    losses = _train(tmp_path / "plan.json", spec, tmp_path, 2)
    expected, state = _reference(spec, plan, 2, seed=3, lr=0.05)
    _assert_same(losses, merge_checkpoint(tmp_path / "ckpt"), expected, state)


@pytest.mark.slow
def test_dropout_masks_differ_between_stages(tmp_path: Path) -> None:
    """Two Dropout(0.5) on all-ones input, one per stage: mean 1.0 (independent masks), not 2.0 (the same
    mask twice, as when every rank drew from one seed)."""
    spec = f"{HELPERS}:two_dropouts_spec"
    plan_for(spec, [2, 1], "GPipe", 2, tmp_path / "plan.json")
    losses = _train(tmp_path / "plan.json", spec, tmp_path, 1)
    assert abs(losses[0] - 1.0) < 0.25, losses  # 2048 draws: one standard deviation is 0.04


@pytest.mark.slow
def test_an_embedding_on_stage_1_reads_the_ids_stage_0_sent(tmp_path: Path) -> None:
    """Token ids cross the cut to the embedding: shapes come from the example, never from a run on
    uninitialised memory (which gave ids out of range: IndexError on rank 1)."""
    spec = f"{HELPERS}:late_embedding_spec"
    plan = plan_for(spec, [1, 2], "1F1B", 2, tmp_path / "plan.json")
    losses = _train(tmp_path / "plan.json", spec, tmp_path, 2)
    expected, state = _reference(spec, plan, 2, seed=3, lr=0.05)
    _assert_same(losses, merge_checkpoint(tmp_path / "ckpt"), expected, state)


@pytest.mark.slow
def test_a_stage_without_parameters_trains_checkpoints_and_resumes(tmp_path: Path) -> None:
    """Sequential(Linear, Linear, ReLU) on 3 ranks: the ReLU alone on the last stage has an optimizer with
    nothing to update, an empty stage file, and the run resumes and merges like any other."""
    spec = f"{HELPERS}:linear_relu_spec"
    plan = plan_for(spec, [1, 1, 1], "GPipe", 2, tmp_path / "plan.json")
    assert plan.num_ranks == 3
    first = _train(tmp_path / "plan.json", spec, tmp_path, 2)
    resumed = _train(tmp_path / "plan.json", spec, tmp_path, 3)
    expected, state = _reference(spec, plan, 3, seed=3, lr=0.05)
    _assert_same(first + resumed, merge_checkpoint(tmp_path / "ckpt"), expected, state)


def test_a_model_without_parameters_is_refused_before_anything_runs(tmp_path: Path) -> None:
    spec = f"{HELPERS}:no_parameters_spec"
    assert_one_line_error(run_cli_here("profile", spec, "-o", str(tmp_path / "p.json")),
                          "has no parameters", "nothing to train")
    assert not (tmp_path / "p.json").exists()
    plan = plan_for(f"{HELPERS}:linear_relu_spec", [1, 1, 1], "GPipe", 2, tmp_path / "plan.json")
    assert plan.num_stages == 3
    assert_one_line_error(run_cli_here("train", str(tmp_path / "plan.json"), "--model", spec),
                          "has no parameters", "nothing to train")


def test_stage_shapes_come_from_the_example_and_leave_the_model_as_it_was() -> None:
    """Ids cross the cut as int64 without a gradient, features as float32 with one; nothing in the model,
    nor the random state, changes."""
    from autopart.run.shapes import stage_signatures

    bundle = load_model(f"{HELPERS}:late_embedding_spec")
    assert bundle.example is not None
    chain = chain_of(bundle.module, bundle.example, "late")
    before, rng = {k: v.clone() for k, v in bundle.module.state_dict().items()}, torch.get_rng_state()
    first, second = stage_signatures(chain, [1, 2], torch.device("cpu"))
    described = [(tuple(t.shape), t.dtype, t.requires_grad, t.is_meta) for t in first.outputs]
    assert described == [((4, 6), torch.int64, False, True), ((4, 6, 4), torch.float32, True, True)]
    assert [(t.shape, t.dtype, t.requires_grad) for t in second.inputs] == [
        (t.shape, t.dtype, t.requires_grad) for t in first.outputs]
    assert [tuple(t.shape) for t in second.outputs] == [(4, 6, 3)]
    assert [(t.dtype, t.requires_grad) for t in first.inputs] == [(torch.int64, False), (torch.float32, False)]
    assert torch.equal(rng, torch.get_rng_state())
    for name, value in bundle.module.state_dict().items():
        assert torch.equal(value, before[name]), name


def test_a_block_that_reads_a_value_is_sized_on_the_examples_real_values() -> None:
    """BatchNorm with momentum=None reads num_batches_tracked: no fake run; the real one leaves the running
    statistics as they were. Built on the meta device there are no values: one line."""
    from autopart.errors import AutopartError
    from autopart.run.shapes import stage_signatures

    def make() -> torch.nn.Sequential:
        return torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6, momentum=None),
                                   torch.nn.Linear(6, 2))

    model = make()
    chain = chain_of(model, (torch.randn(3, 4),), "bn")
    first, second = stage_signatures(chain, [2, 1], torch.device("cpu"))
    assert [(tuple(t.shape), t.requires_grad) for t in first.outputs] == [((3, 6), True)]
    assert int(model[1].num_batches_tracked) == 0 and float(model[1].running_mean.abs().max()) == 0.0
    with torch.device("meta"):
        meta = make()
    with pytest.raises(AutopartError, match=r"block 1 \(1\) cannot run on shapes alone.*built on the meta device"):
        stage_signatures(chain_of(meta, (torch.empty(3, 4, device="meta"),), "bn"), [2, 1], torch.device("cpu"))

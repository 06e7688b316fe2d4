"""Recomputation runs where the plan puts it: real torchrun/gloo ranks, one step with the plan's stages recomputed
and the same step without, compared (tests/recompute_check.py runs both in each rank)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from autopart.measure.batchnorm import defer_batchnorm, deferred_layers
from autopart.measure.blocks import children_chain
from autopart.measure.spec import load_model
from autopart.run.stages import recompute_forward
from autopart.run.streams import BlockStreams
from tests.conftest import ROOT, run_cli
from tests.helpers import plan_for

HELPERS = ROOT / "tests" / "helpers.py"
MODELS = ROOT / "tests" / "graph_models.py"


def _batch(spec: str, microbatches: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """Two samples per micro-batch of the spec's example's kind, and a target of its output's shape."""
    torch.manual_seed(0)
    bundle = load_model(spec)
    assert bundle.example is not None
    g = torch.Generator().manual_seed(1)
    n = microbatches * 2
    inputs = tuple(torch.randint(0, 256, (n, *x.shape[1:]), generator=g) if not x.is_floating_point()
                   else torch.randn(n, *x.shape[1:], generator=g) for x in bundle.example)
    with torch.no_grad():
        out = bundle.module.eval()(*inputs)
    if not isinstance(out, torch.Tensor):  # a language model: next tokens
        return inputs, torch.randint(0, 256, inputs[0].shape, generator=g)
    return inputs, torch.randn(out.shape, generator=g)


def _run(spec: str, balance: list[int], schedule: str, microbatches: int, recompute: list[int], tmp_path: Path,
         per_rank: int = 1) -> list[dict[str, Any]]:
    plan = plan_for(spec, balance, schedule, microbatches, tmp_path / "plan.json", per_rank)
    torch.save(_batch(spec, microbatches), tmp_path / "batch.pt")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                             str(plan.num_ranks), str(ROOT / "tests" / "recompute_check.py"), str(tmp_path / "plan.json"),
                             spec, str(tmp_path), str(tmp_path / "batch.pt"), ",".join(map(str, recompute))],
                            cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(plan.num_ranks)]


def _assert_same_step(ranks: list[dict[str, Any]]) -> None:
    """Losses, gradients and every state (BatchNorm's running statistics included) of the recomputed run equal
    the plain run's, 1e-6."""
    for r in ranks:
        got, want = r["recompute"], r["plain"]
        assert (got["losses"] is None) == (want["losses"] is None)
        if want["losses"] is not None:
            torch.testing.assert_close(got["losses"], want["losses"], rtol=1e-6, atol=1e-6)
        assert set(got["grads"]) == set(want["grads"]) and want["grads"]
        for name, grad in want["grads"].items():
            torch.testing.assert_close(got["grads"][name], grad, rtol=1e-6, atol=1e-6, msg=name)
        for s, state in want["states"].items():
            for key, value in state.items():
                torch.testing.assert_close(got["states"][s][key], value, rtol=1e-6, atol=1e-6, msg=f"{s} {key}")


def _assert_recomputed(ranks: list[dict[str, Any]], recompute: list[int], microbatches: int, runs: int = 2) -> None:
    """A recomputed stage saves for backward only its inputs, once per micro-batch, and enters each of its blocks
    twice per micro-batch (``runs`` 2: a forward and a recomputation; else at least twice: a zero-bubble schedule's
    input and weight halves are separate backward calls that each recompute, up to the last tensor they need); a
    plain stage saves more and enters each block once."""
    for r in ranks:
        got, plain = r["recompute"], r["plain"]
        for s, (first, last) in got["spans"].items():
            assert got["input_bytes"][s] == plain["input_bytes"][s] > 0
            entered = [got["entered"][b] for b in range(first, last + 1)]
            if s in recompute:
                if runs == 2:
                    assert entered == [2 * microbatches] * (last - first + 1), (s, entered)
                else:  # early stop: a recomputation ends at the last tensor the backward needs
                    assert entered[0] >= 2 * microbatches and min(entered) >= microbatches, (s, entered)
            else:
                assert entered == [microbatches] * (last - first + 1)
            assert [plain["entered"][b] for b in range(first, last + 1)] == [microbatches] * (last - first + 1)
            if s in recompute:
                assert got["saved_bytes"].get(s, 0) == got["input_bytes"][s], (s, got["saved_bytes"])
                assert plain["saved_bytes"][s] > got["input_bytes"][s], (s, plain["saved_bytes"])
            else:
                assert got["saved_bytes"][s] == plain["saved_bytes"][s]


@pytest.mark.parametrize("schedule, recompute", [("GPipe", [0, 1]), ("1F1B", [0, 1]), ("1F1B", [1])])
@pytest.mark.slow
def test_recomputed_chain_with_dropout_equals_plain(schedule: str, recompute: list[int], tmp_path: Path) -> None:
    """Dropout in both stages: the recomputed forward draws the masks the forward drew."""
    balance, microbatches = [4, 3], 4
    ranks = _run(f"{HELPERS}:dropout_mlp_spec", balance, schedule, microbatches, recompute, tmp_path)
    _assert_same_step(ranks)
    _assert_recomputed(ranks, recompute, microbatches)


@pytest.mark.slow
def test_recomputed_graph_with_skip_equals_plain(tmp_path: Path) -> None:
    """A captured graph whose skip crosses the cut, dropout on both sides."""
    balance, microbatches = [2, 1], 2
    ranks = _run(f"{HELPERS}:skip_dropout_spec", balance, "GPipe", microbatches, [0, 1], tmp_path)
    _assert_same_step(ranks)
    _assert_recomputed(ranks, [0, 1], microbatches)


@pytest.mark.slow
def test_recomputed_deferred_batchnorm_merges_each_microbatch_once(tmp_path: Path) -> None:
    """Running mean and variance (and ``num_batches_tracked``) after a step with recomputation equal those
    without: the recomputed forward's statistics are not merged again."""
    ranks = _run(f"{HELPERS}:batchnorm_spec", [9, 9], "GPipe", 2, [0, 1], tmp_path)
    _assert_same_step(ranks)
    _assert_recomputed(ranks, [0, 1], 2)
    assert any("running_var" in key for r in ranks for state in r["plain"]["states"].values() for key in state)


@pytest.mark.parametrize("spec, balance, schedule, runs", [
    (f"{MODELS}:hf_gpt2", [2, 1, 1, 2], "Interleaved1F1B", 2),     # tied embedding on the first and last stage
    (f"{HELPERS}:batchnorm_spec", [5, 4, 5, 4], "ZBVZeroBubble", 0),  # input and weight halves each recompute
])
@pytest.mark.slow
def test_recompute_with_several_stages_per_rank(spec: str, balance: list[int], schedule: str, runs: int,
                                                tmp_path: Path) -> None:
    if "hf_gpt2" in spec:
        pytest.importorskip("transformers")
    ranks = _run(spec, balance, schedule, 4, [0, 1, 2, 3], tmp_path, per_rank=2)
    _assert_same_step(ranks)
    _assert_recomputed(ranks, [0, 1, 2, 3], 4, runs)


@pytest.mark.slow
def test_train_says_which_stages_recompute_and_runs_them(tmp_path: Path) -> None:
    """``autopart train`` on a plan with stage 1 recomputed: its start line says so, and it trains."""
    spec = f"{HELPERS}:dropout_mlp_spec"
    plan_for(spec, [4, 3], "1F1B", 2, tmp_path / "plan.json")
    raw = json.loads((tmp_path / "plan.json").read_text())
    raw["stages"][1]["recompute"] = True
    (tmp_path / "plan.json").write_text(json.dumps(raw))
    ran = run_cli("train", str(tmp_path / "plan.json"), "--model", spec, "--steps", "2", cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-3000:]
    said = " ".join(ran.stderr.split())  # progress goes to stderr, the line wrapped at the console's width
    assert "(8 per step), stage 1 recomputed in the backward, adamw" in said, ran.stderr


def _one_process_step(recompute: bool) -> tuple[nn.Module, list[int], Counter[int]]:
    """Two micro-batches through a stage of Linear, Dropout, deferred BatchNorm, Linear, each backward after
    both forwards (GPipe's order), the stream told the micro-batch before each action as ``TimedStage`` does:
    the model after the step, the bytes autograd saved per forward, how often each block was entered."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    defer_batchnorm(model)
    streams = BlockStreams(seed=3, device=torch.device("cpu"))
    entered: Counter[int] = Counter()

    def enter(block: int) -> None:
        entered[block] += 1
        streams.enter(block)

    stage = children_chain(model, (torch.randn(4, 6),), "m").stage_module(0, 4, enter=enter)
    if recompute:
        recompute_forward(stage)
    streams.keep_caller_state(stage)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=g)
    saved: list[int] = []
    outs = []
    for m, part in enumerate(x.tensor_split(2)):
        streams.microbatch = m
        saved.append(0)

        def pack(t: torch.Tensor) -> torch.Tensor:
            saved[-1] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            outs.append(stage(part.requires_grad_()))
    for m, out in enumerate(outs):
        streams.microbatch = m
        out.square().mean().backward()
    for layer in deferred_layers(model):
        layer.commit()
    return model, saved, entered


def test_recompute_forward_in_one_process() -> None:
    """The same gradients, dropout masks and BatchNorm statistics with recomputation as without; autograd saves
    only the stage's input per micro-batch, and each block runs once more per micro-batch."""
    got, saved, entered = _one_process_step(recompute=True)
    want, saved_plain, entered_plain = _one_process_step(recompute=False)
    for (name, a), b in zip(got.named_parameters(), want.parameters()):
        assert a.grad is not None and b.grad is not None
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-7, msg=name)
    for (name, buffer), expected in zip(got.named_buffers(), want.buffers()):
        torch.testing.assert_close(buffer, expected, rtol=1e-6, atol=1e-7, msg=name)
    assert saved == [4 * 6 * 4, 4 * 6 * 4] and all(s > 4 * 6 * 4 for s in saved_plain)
    assert dict(entered) == {b: 4 for b in range(5)} and dict(entered_plain) == {b: 2 for b in range(5)}

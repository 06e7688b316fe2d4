"""The memory model: one table of terms (autopart/core/memory.py) that every memory price derives from."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import autopart.core.costmodel as costmodel
from autopart.core.blocks import BlockCosts
from autopart.core.costmodel import Problem
from autopart.core.memory import MEMORY_TERMS, PART_SCALE, MemoryTerm
from autopart.core.training import CostModel
from autopart.formats.devices import Device


def _blocks(n: int, seed: int, skips: bool = True, ties: bool = True) -> BlockCosts:
    rng = np.random.default_rng(seed)
    ints = lambda lo, hi: rng.integers(lo, hi, n).astype(float).tolist()  # noqa: E731
    acts = ints(0, 5000)
    return BlockCosts.of(ints(1, 9), forward_ms=ints(0, 1), param_bytes=ints(0, 1000),
                         activation_bytes=acts, output_bytes=ints(1, 300), input_bytes=77, model_output_bytes=999,
                         loss_activation_bytes=[0.0] * (n - 1) + [acts[-1] // 2],
                         skip_bytes=ints(0, 50) if skips else None,
                         ties=[(64.0, (0, n - 1))] if ties and n > 2 else ())


def _by_hand(p: Problem, s: int, i: int, j: int, recompute: bool) -> float:
    """Stage s's bytes from the definitions in docs/cost-model.md, written out term by term."""
    b, opt, m, n = p.blocks, p.model.optimizer_states, p.model.microbatches, p.blocks.n
    in_flight = p.model.in_flight(s, p.k)
    skips = b.skip_bytes if b.skip_bytes is not None else np.zeros(n)
    loss = b.loss_activation_bytes if b.loss_activation_bytes is not None else np.zeros(n)
    received = b.input_bytes if i == 0 else b.output_bytes[i - 1] + skips[i - 1]
    sent = b.model_output_bytes if j == n - 1 else b.output_bytes[j] + skips[j]
    weights = float(b.param_bytes[i:j + 1].sum()) * (2 + opt)
    weights += sum(size * (2 + opt) for size, users in b.ties
                   if any(i <= u <= j for u in users) and not i <= users[0] <= j)
    acts, loss_acts = float(b.activation_bytes[i:j + 1].sum()), float(loss[i:j + 1].sum())
    gradients = sent + (received if i > 0 else 0.0) + (b.model_output_bytes if j == n - 1 else 0.0)
    buffers = (m - in_flight) * received + (0.0 if j == n - 1 else m * sent)
    if recompute:
        return weights + in_flight * (received + sent + loss_acts) + (acts - loss_acts) + gradients + buffers
    return weights + in_flight * (acts + (skips[i - 1] if i > 0 else 0.0) + sent) + gradients + buffers


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 8), k=st.integers(1, 4), m=st.integers(1, 6), seed=st.integers(0, 10**6),
       schedule=st.sampled_from(["GPipe", "1F1B"]))
def test_every_stage_memory_is_the_sum_of_the_documented_terms(n: int, k: int, m: int, seed: int,
                                                                schedule: str) -> None:
    k = min(k, n)
    p = Problem(_blocks(n, seed), [Device("d")] * k, CostModel(schedule=schedule, microbatches=m))
    for s in range(k):
        for i in range(n):
            for j in range(i, n):
                plain, rc = p.memories(s, np.array([i]), np.array([j]))
                assert plain[0] == _by_hand(p, s, i, j, False)
                assert rc[0] == _by_hand(p, s, i, j, True)
                for recompute in (False, True):
                    cost = p.stage(s, i, j, recompute)
                    in_flight = p.model.in_flight(s, k)
                    assert cost.memory_bytes == (cost.static_bytes + in_flight * cost.activation_bytes
                                                 + cost.backward_extra_bytes + cost.runtime_bytes)
                    assert cost.memory_bytes == _by_hand(p, s, i, j, recompute)


def test_a_new_term_is_one_entry_of_the_table(monkeypatch: pytest.MonkeyPatch) -> None:
    """An extra term (a buffer of 1000 bytes per block, held per in-flight micro-batch) appears in every
    price: the memories, the partitioner's prefix sums, the plan's breakdown and so the split."""
    blocks = _blocks(6, 1, skips=False, ties=False)
    model = CostModel(schedule="GPipe", microbatches=4)
    devices = [Device("d")] * 2
    before = Problem(blocks, devices, model)
    extra = MemoryTerm("test buffer", "1000 bytes per block per micro-batch", "activation_bytes", "always", "in_flight",
                       per_block=lambda b, m: np.full(b.n, 1000.0))
    monkeypatch.setattr(costmodel, "MEMORY_TERMS", MEMORY_TERMS + (extra,))
    after = Problem(blocks, devices, model)
    i, j = np.array([1]), np.array([3])
    for rc in (0, 1):
        assert after.memories(0, i, j)[rc][0] - before.memories(0, i, j)[rc][0] == 4 * 3 * 1000
    assert after.plain_prefix(1)[-1] - before.plain_prefix(1)[-1] == 4 * 6 * 1000
    assert after.rc_prefix(1)[-1] - before.rc_prefix(1)[-1] == 4 * 6 * 1000
    cost, old = after.stage(0, 1, 3), before.stage(0, 1, 3)
    assert cost.activation_bytes - old.activation_bytes == 3 * 1000
    assert cost.memory_bytes - old.memory_bytes == 4 * 3 * 1000


def test_the_table_names_each_term_once_and_scales_by_its_field() -> None:
    names = [t.name for t in MEMORY_TERMS]
    assert len(set(names)) == len(names)
    assert {t.part for t in MEMORY_TERMS} <= set(PART_SCALE)
    assert all(t.doc for t in MEMORY_TERMS)


def test_a_problem_is_read_only() -> None:
    p = Problem(_blocks(5, 2), [Device("d")] * 2, CostModel())
    with pytest.raises(AttributeError, match="read-only"):
        p.k = 3
    for array in (p.limit, p.speed, p.compute_prefix(), p.plain_prefix(0), p.rc_prefix(1), p.blocks.param_bytes):
        with pytest.raises(ValueError):
            array[0] = 1.0
    source = np.array([1.0, 2.0])
    BlockCosts.of(source)
    source[0] = 5.0  # the caller's own array stays writable


def test_the_profile_measures_what_the_loss_saves_apart() -> None:
    """Cross-entropy saves its log-softmax (batch x classes float32), the target (int64) and its total weight
    (one float): the last block's ``loss_activation_bytes``, inside its ``activation_bytes``."""
    import torch
    from torch import nn

    from autopart.measure.profiler import profile_model

    torch.manual_seed(0)
    batch, classes = 4, 32
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, classes))
    profile = profile_model(model, torch.randn(batch, 8), warmup=0, repeats=1,
                            loss_fn=nn.functional.cross_entropy, target=torch.randint(0, classes, (batch,)))
    last = profile.layers[-1]
    assert last.loss_activation_bytes == batch * classes * 4 + batch * 8 + 4
    assert last.activation_bytes == batch * 16 * 4 + last.loss_activation_bytes  # the Linear saves its input
    assert profile.layers[0].loss_activation_bytes is None
    blocks = BlockCosts.from_profile(profile)
    assert blocks.loss_activation_bytes is not None and blocks.loss_activation_bytes.tolist() == [
        0.0, float(last.loss_activation_bytes)]


def test_a_model_built_on_meta_measures_the_same_loss_bytes() -> None:
    """Profiling block by block (meta build) counts what the loss saves as the whole-model profile does."""
    import torch
    from torch import nn

    from autopart.measure.models.gpt2 import GPT2, GPT2Config
    from autopart.measure.profiler import profile_model

    def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(out.flatten(0, 1), target.flatten())

    cfg = GPT2Config(vocab_size=300, context=32, n_layer=2, n_embd=32, n_head=2)
    x, target = torch.randint(0, 300, (2, 16)), torch.randint(0, 300, (2, 16))
    whole = profile_model(GPT2(cfg), x, name="g", warmup=0, repeats=1, loss_fn=loss, target=target)
    with torch.device("meta"):
        meta = GPT2(cfg)
    parts = profile_model(meta, x, name="g", warmup=0, repeats=1, loss_fn=loss, target=target)
    logits = 2 * 16 * 300 * 4
    for profile in (whole, parts):
        last = profile.layers[-1]
        assert last.loss_activation_bytes == logits + 2 * 16 * 8 + 4  # log-softmax, target, total weight
        assert last.output_bytes == logits
    assert [(x.activation_bytes, x.loss_activation_bytes) for x in parts.layers] == [
        (x.activation_bytes, x.loss_activation_bytes) for x in whole.layers]


@pytest.mark.slow
def test_what_torch_pipelining_holds_is_what_the_terms_count(tmp_path: Path) -> None:
    """2 real ranks (gloo), gpt2-tiny, 1F1B, 4 micro-batches: the runtime's forward cache holds the stage's
    output for in_flight micro-batches (``held output``), and it keeps a receive buffer for every
    micro-batch (``receive buffers`` for those not in flight, the in-flight ones inside ``activations``)
    and a gradient buffer for every micro-batch (``gradient receive buffers``)."""
    import json
    import os
    import subprocess
    import sys

    from autopart.formats.plan import Plan
    from autopart.measure.profiler import profile_model
    from autopart.measure.spec import load_model
    from tests.helpers import plan_for

    root = Path(__file__).resolve().parent.parent
    m = 4
    plan_for("gpt2-tiny", [3, 3], "1F1B", m, tmp_path / "plan.json")
    plan = Plan.from_json(tmp_path / "plan.json")
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(root / "tests" / "memory_terms_check.py"), str(tmp_path / "plan.json"), "gpt2-tiny",
                             str(tmp_path)], cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    bundle = load_model("gpt2-tiny")
    assert bundle.example is not None
    profile = profile_model(bundle.module, bundle.example, name="gpt2-tiny", warmup=0, repeats=1)
    layers = profile.layers
    boundary, logits = layers[2].output_bytes, layers[-1].output_bytes  # per micro-batch
    model = CostModel(schedule="1F1B", microbatches=m)
    in_flight = [model.in_flight(s, 2) for s in range(2)]
    assert [g["in_flight"] for g in got] == in_flight == [2, 1]
    assert got[0]["held_output_bytes"] == in_flight[0] * boundary  # the hidden state sent on
    assert got[1]["held_output_bytes"] == in_flight[1] * logits  # the last stage's: the logits
    assert got[1]["receive_buffers"] == m and got[1]["receive_buffer_bytes"] == m * boundary
    assert got[0]["gradient_buffer_bytes"] == m * boundary and got[1]["gradient_buffer_bytes"] == 0
    # the plan's runtime_bytes: the buffers not in flight (the in-flight inputs are the first block's saved
    # input, inside activation_bytes) and every gradient buffer; on stage 0 the step's batch of token ids
    # (the schedule's split of it, not a buffer of torch's) stands in for the receive buffers
    assert plan.stages[0].cost.runtime_bytes == m * boundary + (m - in_flight[0]) * profile.input_bytes
    assert plan.stages[1].cost.runtime_bytes == (m - in_flight[1]) * boundary

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


def _blocks(n: int, seed: int, skips: bool = True, ties: bool = True, foreach: bool = False,
            acts_bytes: int = 5000) -> BlockCosts:
    rng = np.random.default_rng(seed)
    ints = lambda lo, hi: rng.integers(lo, hi, n).astype(float).tolist()  # noqa: E731
    acts, params, outputs = ints(0, acts_bytes), ints(0, 1000), ints(1, 300)
    # the part of a block's output it saved itself (a ReLU's): none, some or all of it
    output_saved = [float(int(o * f)) for o, f in zip(outputs, rng.choice([0.0, 0.5, 1.0], n).tolist())]
    return BlockCosts.of(ints(1, 9), forward_ms=ints(0, 1), param_bytes=params,
                         largest_param_bytes=[float(int(x * f)) for x, f in zip(params, rng.uniform(0, 1, n).tolist())],
                         foreach_optimizer=foreach,
                         activation_bytes=acts, output_bytes=outputs, input_bytes=77,
                         output_saved_bytes=output_saved, model_output_bytes=999,
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
    # a block that saved its own output (a ReLU's) was charged for it: the stage ending there holds it in its
    # activations, not again as its held output; the stage after it holds its receive buffer besides
    saved_out = b.output_saved_bytes if b.output_saved_bytes is not None else np.zeros(n)
    held = sent - (b.model_output_saved_bytes if j == n - 1 else saved_out[j])
    received_saved = saved_out[i - 1] if i > 0 else 0.0
    weights = float(b.param_bytes[i:j + 1].sum()) * (2 + opt)
    weights += sum(size * (2 + opt) for size, users in b.ties
                   if any(i <= u <= j for u in users) and not i <= users[0] <= j)
    acts, loss_acts = float(b.activation_bytes[i:j + 1].sum()), float(loss[i:j + 1].sum())
    loss_gradient = b.model_output_bytes if b.loss_activation_bytes is None else \
        max(b.model_output_bytes, 2 * float(loss.sum()) - b.model_output_bytes)  # the loss's dtype (fp32 under autocast)
    gradients = sent + (received if i > 0 else 0.0) + (loss_gradient if j == n - 1 else 0.0)
    buffers = (m - in_flight) * received + (0.0 if j == n - 1 else m * sent)
    largest = float(b.largest_param_bytes[i:j + 1].max()) if b.largest_param_bytes is not None else 0.0
    gradients += largest  # one parameter's gradient before it is added into .grad
    # the optimizer step, after the last backward: AdamW's sqrt and quotient of one tensor at a time (CPU),
    # or one copy of every parameter (foreach, CUDA)
    step = float(b.param_bytes[i:j + 1].sum()) if b.foreach_optimizer else 2 * largest
    if recompute:
        busy = in_flight * (received + sent + loss_acts) + (acts - loss_acts) + gradients
    else:
        busy = in_flight * (acts + (skips[i - 1] if i > 0 else 0.0) + held + received_saved) + gradients
    return weights + buffers + max(busy, step)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(2, 8), k=st.integers(1, 4), m=st.integers(1, 6), seed=st.integers(0, 10**6),
       schedule=st.sampled_from(["GPipe", "1F1B"]), foreach=st.booleans())
def test_every_stage_memory_is_the_sum_of_the_documented_terms(n: int, k: int, m: int, seed: int,
                                                                schedule: str, foreach: bool) -> None:
    k = min(k, n)
    p = Problem(_blocks(n, seed, foreach=foreach), [Device("d")] * k, CostModel(schedule=schedule, microbatches=m))
    for s in range(k):
        for i in range(n):
            for j in range(i, n):
                plain, rc = p.memories(s, np.array([i]), np.array([j]))
                assert plain[0] == _by_hand(p, s, i, j, False)
                assert rc[0] == _by_hand(p, s, i, j, True)
                for recompute in (False, True):
                    cost = p.stage(s, i, j, recompute)
                    in_flight = p.model.in_flight(s, k)
                    assert cost.memory_bytes == (cost.static_bytes + cost.runtime_bytes + max(
                        in_flight * cost.activation_bytes + cost.backward_extra_bytes, cost.optimizer_step_bytes))
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


TRANSIENTS = """
import torch
from torch import nn
from autopart.measure.memory import MemoryMeter, lower_mmap_threshold
assert lower_mmap_threshold()
torch.manual_seed(0)
layer = nn.Linear(2048, 2048)          # a 16 MiB weight
x = torch.randn(64, 2048)
opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
layer(x).sum().backward()
opt.step()                             # state made; gradients kept, as train keeps them (zeroed in place)
meter = MemoryMeter(torch.device("cpu"))
meter.start()
out = layer(x)                         # saves x (already held): nothing new but the output
meter.reset_peak()
out.sum().backward()                   # the weight's gradient is made, then added into .grad
backward = meter.peak_bytes()
del out
meter.reset_peak()
opt.step()                             # per-tensor AdamW (CPU): sqrt and quotient of each tensor
step = meter.peak_bytes()
print(backward, step)
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc")
def test_the_transient_terms_are_what_one_process_holds() -> None:
    """A 2048 x 2048 Linear (16 MiB weight) with its gradient kept, measured in a fresh process (as a rank
    is): its backward peaks at one weight gradient (plus the 0.5 MiB gradient of its output), the
    ``parameter gradient`` term; AdamW's step on CPU at two copies of the weight, the ``optimizer
    temporaries (per tensor)`` term. The profile records the weight as the block's largest tensor."""
    import os
    import subprocess
    import sys

    import torch
    from torch import nn

    from autopart.measure.profiler import profile_model

    root = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", TRANSIENTS], capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1"), timeout=120)
    assert result.returncode == 0, result.stderr
    backward, step = (int(v) for v in result.stdout.split())
    profile = profile_model(nn.Linear(2048, 2048), torch.randn(64, 2048), warmup=0, repeats=1)
    weight = 2048 * 2048 * 4
    assert profile.layers[0].largest_param_bytes == weight
    cost = Problem.from_profile(profile, [Device("cpu")], CostModel(schedule="GPipe", microbatches=1)).stage(0, 0, 0)
    output_grad = 64 * 2048 * 4
    # the parameter's gradient; the output's; on a last stage the loss's working set (no loss here)
    assert cost.backward_extra_bytes == weight + output_grad + output_grad
    assert cost.optimizer_step_bytes == 2 * weight
    MiB = 2**20
    assert abs(backward - (weight + output_grad)) < 2 * MiB, backward / MiB
    assert abs(step - cost.optimizer_step_bytes) < 2 * MiB, (step / MiB, cost.optimizer_step_bytes / MiB)


def test_a_tied_parameter_is_the_largest_tensor_of_every_block_that_uses_it() -> None:
    """An embedding tied to the LM head: the head's block owns no parameter of that size, yet makes its
    gradient; the profile records the tie as both blocks' largest tensor. A profile from before the field
    plans with an upper bound: the block's own parameter bytes, or a larger tie it uses."""
    import dataclasses

    import torch
    from torch import nn

    from autopart.measure.profiler import profile_model

    emb, head = nn.Embedding(100, 16), nn.Linear(16, 100, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, nn.Linear(16, 16), head)
    profile = profile_model(model, torch.randint(0, 100, (2, 4)), warmup=0, repeats=1)
    assert [x.largest_param_bytes for x in profile.layers] == [100 * 16 * 4, 16 * 16 * 4, 100 * 16 * 4]
    old = dataclasses.replace(profile, layers=tuple(dataclasses.replace(x, largest_param_bytes=None)
                                                    for x in profile.layers))
    blocks = BlockCosts.from_profile(old)
    assert blocks.largest_param_bytes is not None
    assert blocks.largest_param_bytes.tolist() == [100 * 16 * 4, 16 * 16 * 4 + 16 * 4, 100 * 16 * 4]


def test_the_optimizer_step_is_its_own_phase() -> None:
    """The optimizer step runs after the last backward: its temporaries count only where they exceed what
    the backward holds (activations, gradients in flight), never on top of them. Per tensor (CPU) they are
    two copies of the stage's largest parameter tensor, foreach (CUDA) one copy of all its parameters;
    SGD updates in place."""
    def stage(acts: float, foreach: bool, optimizer: str = "adamw") -> tuple[int, int]:
        blocks = BlockCosts.of([1.0, 1.0], param_bytes=[1000.0, 3000.0], largest_param_bytes=[600.0, 2000.0],
                               activation_bytes=[acts, acts], foreach_optimizer=foreach)
        cost = Problem(blocks, [Device("d")], CostModel(schedule="GPipe", microbatches=1,
                                                         optimizer=optimizer)).stage(0, 0, 1)
        return cost.optimizer_step_bytes, cost.memory_bytes

    static = 4000 * 4  # parameters, gradients, AdamW's two states
    assert stage(10.0, False) == (4000, static + 4000)  # the step's 2 x 2000 over the backward's 20 + 2000
    assert stage(10.0, True) == (4000, static + 4000)  # 1 x (1000 + 3000)
    assert stage(5000.0, False) == (4000, static + 10000 + 2000)  # the backward holds more: the step is inside
    assert stage(10.0, False, "sgd") == (0, 4000 * 2 + 20 + 2000)


def test_the_loss_gradients_are_counted_in_the_losss_dtype() -> None:
    """Cross-entropy under autocast works in float32 on bfloat16 logits: it saves float32 log-probabilities
    (twice the logits' bytes) and its backward makes two float32 gradients of them, one cast back to the
    logits' dtype. Measured (4096 x 8192 logits, CPU): fp32 254.4 MiB in the backward, bf16-mixed 255.1 MiB;
    the last stage's backward-only bytes must say 2 x 128 MiB in both."""
    mib = float(2**20)

    def backward_extra(logits: float, loss_saved: float) -> int:
        blocks = BlockCosts.of([1.0], model_output_bytes=logits, activation_bytes=[loss_saved],  # the loss's are
                               loss_activation_bytes=[loss_saved])                           # the block's too
        return Problem(blocks, [Device("d")], CostModel(schedule="GPipe", microbatches=1)).stage(0, 0, 0) \
            .backward_extra_bytes

    assert backward_extra(128 * mib, 128 * mib) == 256 * mib  # fp32: the output's gradient and the loss's
    assert backward_extra(64 * mib, 128 * mib) == 256 * mib  # bf16-mixed: the same float32 working set
    assert backward_extra(64 * mib, 16 * mib) == 128 * mib  # a loss that saves little: two of the output's


def test_a_gpu_profile_steps_its_optimizer_foreach() -> None:
    """A CUDA profile names its GPU ("NVIDIA H200"), not "cuda": the foreach step (one copy of every
    parameter, torch's default on CUDA) is chosen for any device but the CPU."""
    import dataclasses

    from autopart.formats.profile import Profile

    profile = Profile.from_json(Path(__file__).resolve().parent.parent / "profiles" / "gpt2-tiny-cpu-mb4.json")
    assert not BlockCosts.from_profile(profile).foreach_optimizer
    assert BlockCosts.from_profile(dataclasses.replace(profile, device="NVIDIA H200")).foreach_optimizer


@pytest.mark.slow
def test_a_limit_bound_plans_ranks_stay_under_their_limit(tmp_path: Path) -> None:
    """2 real ranks (gloo), gpt2-tiny (with its loss), GPipe, 4 micro-batches, every device limited to 3%
    above what the model prices the [5, 1] split at (the head alone on the last stage, its logits the
    largest part): the partitioner's plan fits, and each rank's measured peak over the training steps is
    under the limit. Without the transient terms the limit falls below what the head's rank holds: its
    weight's 24.5 MiB gradient, made while every micro-batch's logits are still held."""
    import json
    import math

    from autopart.formats.plan import Plan
    from autopart.formats.profile import Profile
    from tests.conftest import run_cli

    profiled = run_cli("profile", "gpt2-tiny", "--threads", "1", "--warmup", "0", "--repeats", "1",
                       "-o", str(tmp_path / "profile.json"))
    assert profiled.returncode == 0, profiled.stderr
    profile = Profile.from_json(tmp_path / "profile.json")
    problem = Problem.from_profile(profile, [Device("cpu")] * 2, CostModel(schedule="GPipe", microbatches=4))
    MiB = 2**20
    limit_mib = math.ceil(1.03 * max(st.memory_bytes for st in problem.stages([5, 1])) / MiB)
    made = run_cli("partition", str(tmp_path / "profile.json"), "--stages", "2", "--schedule", "GPipe",
                   "--microbatches", "4", "--memory-limit", f"{limit_mib}MiB", "-o", str(tmp_path / "plan.json"))
    assert made.returncode == 0, made.stderr
    plan = Plan.from_json(tmp_path / "plan.json")
    assert plan.fits
    ran = run_cli("train", str(tmp_path / "plan.json"), "--model", "gpt2-tiny", "--steps", "2", "--threads", "1",
                  "--report", str(tmp_path / "r.json"))
    assert ran.returncode == 0, ran.stderr[-3000:]
    rows = json.loads((tmp_path / "r.json").read_text())["ranks_detail"]
    for row in rows:
        measured = row["memory_measured_bytes"]
        assert measured <= limit_mib * MiB, (plan.balance, measured / MiB, limit_mib)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 6), m=st.integers(2, 6), seed=st.integers(0, 10**6), foreach=st.booleans(),
       schedule=st.sampled_from(["GPipe", "1F1B"]), acts_bytes=st.sampled_from([1, 50, 5000]))
def test_the_simulator_holds_the_optimizer_step_as_the_plan_counts_it(n: int, m: int, seed: int, foreach: bool,
                                                                      schedule: str, acts_bytes: int) -> None:
    """One stage per rank: the simulator's peak per rank (activations allocated by F and freed by B, the
    backward's extra during B, the step's temporaries in the rank's optimizer step) is the plan's count,
    whichever phase is the larger (small activations: the step)."""
    from autopart.core.schedules import build_schedule
    from autopart.core.simulate import simulate

    blocks = _blocks(n, seed, skips=False, ties=False, foreach=foreach, acts_bytes=acts_bytes)
    p = Problem(blocks, [Device("d")] * 2, CostModel(schedule=schedule, microbatches=m))
    costs = p.stages([n // 2, n - n // 2])
    sim = simulate(build_schedule(schedule, 2, m), costs)
    assert list(sim.peak_memory_bytes) == [c.memory_bytes for c in costs]


def _relu_mlp() -> torch.nn.Module:
    """The reviewer's model: ``Sequential(Linear(512, 512), ReLU) x 3``; each ReLU saves its own output."""
    from torch import nn

    return nn.Sequential(*[nn.Sequential(nn.Linear(512, 512), nn.ReLU()) for _ in range(3)])


def _held_per_microbatch(stage: torch.nn.Module, x: torch.Tensor) -> int:
    """Brute force: the bytes one micro-batch keeps on a stage until its backward, run as the stage runs
    (its input a fresh receive buffer): every distinct storage autograd saves (parameters aside) and the
    output the runtime's forward cache holds."""
    import torch

    params = {t.untyped_storage().data_ptr() for t in stage.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    received = x.detach().clone().requires_grad_(True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = stage(received)
    kept[out.untyped_storage().data_ptr()] = out.untyped_storage().nbytes()
    return sum(kept.values())


def test_a_block_that_saves_its_output_is_counted_once_and_the_next_stage_holds_its_input() -> None:
    """The reviewer's example, profiled in one process (both profile paths): a ReLU's output is charged to
    the ReLU, so a stage ending in it holds its output once (not again as ``held output``), and the stage after
    it holds its receive buffer (no block of it is charged for it). Split [2, 4] under GPipe: stage 0 holds
    the input and the first ReLU's output (262144 B per micro-batch, not 393216), stage 1 its receive buffer
    and two ReLU outputs (393216 B), as running each stage on its own counts."""
    import dataclasses

    import torch

    from autopart.measure.profiler import profile_model

    torch.manual_seed(0)
    x = torch.randn(64, 512)
    size = 64 * 512 * 4  # 131072 B: the input, and every block's output
    model = _relu_mlp()
    whole = profile_model(model, x, name="relu-mlp", warmup=0, repeats=1)
    with torch.device("meta"):
        meta = _relu_mlp()
    parts = profile_model(meta, x, name="relu-mlp", warmup=0, repeats=1)
    for profile in (whole, parts):
        assert list(profile.names) == ["0.0", "0.1", "1.0", "1.1", "2.0", "2.1"]
        assert [b.activation_bytes for b in profile.layers] == [size, size, 0, size, 0, size]
        assert [b.output_saved_bytes for b in profile.layers] == [0, size, 0, size, 0, size]
    p = Problem.from_profile(whole, [Device("d")] * 2, CostModel(schedule="GPipe", microbatches=4))
    plain = p.stages([2, 4], recompute=[False, False])
    assert [c.activation_bytes for c in plain] == [2 * size, 3 * size]
    assert [c.activation_bytes for c in plain] == [_held_per_microbatch(model[:1], x),
                                                  _held_per_microbatch(model[1:], model[:1](x).detach())]
    # a recomputing stage keeps its input and its output (the forward cache's), whoever saved it
    assert [c.activation_bytes for c in p.stages([2, 4], recompute=[True, True])] == [2 * size, 2 * size]
    # a profile from before the field: today's arithmetic (the ReLU's output counted twice on stage 0)
    old = dataclasses.replace(whole, layers=tuple(dataclasses.replace(b, output_saved_bytes=None)
                                                  for b in whole.layers))
    before = Problem.from_profile(old, [Device("d")] * 2, CostModel(schedule="GPipe", microbatches=4))
    assert [c.activation_bytes for c in before.stages([2, 4], recompute=[False, False])] == [3 * size, 3 * size]


@pytest.mark.slow
def test_two_ranks_hold_a_relu_output_once_and_the_next_stage_its_input(tmp_path: Path) -> None:
    """2 real ranks (gloo), the reviewer's ReLU model split [2, 4], GPipe, 2 micro-batches: at each stage's
    first backward the distinct storages kept for the backward (saved tensors and the forward cache's
    outputs) are the plan's ``activation_bytes`` per in-flight micro-batch: 262144 B on stage 0 (not the
    393216 B that counts the ReLU's output twice) and 393216 B on stage 1 (its receive buffer included)."""
    import json
    import os
    import subprocess
    import sys

    from autopart.formats.plan import Plan
    from tests.helpers import plan_for

    root = Path(__file__).resolve().parent.parent
    m, size = 2, 64 * 512 * 4
    plan_for(f"{root}/tests/held_output_check.py:relu_mlp", [2, 4], "GPipe", m, tmp_path / "plan.json")
    plan = Plan.from_json(tmp_path / "plan.json")
    assert [s.cost.activation_bytes for s in plan.stages] == [2 * size, 3 * size]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(root / "tests" / "held_output_check.py"), str(tmp_path / "plan.json"),
                             str(tmp_path)], cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [g["in_flight"] for g in got] == [m, m]
    assert [g["held_bytes"] for g in got] == [m * s.cost.activation_bytes for s in plan.stages]


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 7), k=st.integers(1, 4), m=st.integers(1, 5), seed=st.integers(0, 10**6),
       schedule=st.sampled_from(["GPipe", "1F1B"]))
def test_the_mirror_image_prices_a_saved_output_where_the_original_does(n: int, k: int, m: int, seed: int,
                                                                         schedule: str) -> None:
    """Blocks that save their own output (``output_saved_bytes``): stage (s, i, j) and stage (K-1-s, n-1-j,
    n-1-i) of the mirror image (the partitioner's backward sweep) hold the same bytes, with and without
    recomputation."""
    k = min(k, n)
    p = Problem(_blocks(n, seed), [Device("d")] * k, CostModel(schedule=schedule, microbatches=m))
    mirror = p.reversed()
    for s in range(k):
        for i in range(n):
            for j in range(i, n):
                for recompute in (False, True):
                    here, there = p.stage(s, i, j, recompute), mirror.stage(k - 1 - s, n - 1 - j, n - 1 - i, recompute)
                    assert (there.memory_bytes, there.activation_bytes) == (here.memory_bytes, here.activation_bytes)

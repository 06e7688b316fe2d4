from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
from torch import nn

from autopart.core.costmodel import BlockCosts, CostModel, Problem
from autopart.core.search import plan_partition
from autopart.errors import AutopartError
from autopart.formats.devices import Device
from autopart.formats.optimizers import OPTIMIZER_STATES
from autopart.formats.profile import Profile
from autopart.measure.models.gpt2 import GPT2, GPT2Config
from autopart.measure.models.resnet import ResNet
from autopart.measure.optimizers import make_optimizer
from autopart.measure.profiler import profile_model
from autopart.measure.timing import Clock, time_chain
from tests.helpers import SplitSleep, sleep_model


@pytest.mark.slow
def test_sleeping_blocks_get_their_sleep_times() -> None:
    """Each block's median time is its sleep plus at most 10% and 1 ms (a busy machine wakes sleepers late):
    a clock 25% off, another block's work, or the input-gradient half counted twice shows (the old bound, +30%
    and 2 ms on sleeps of 4-20 ms, let 80% through)."""
    forward_ms = [10.0, 40.0, 20.0]
    backward_ms = [30.0, 10.0, 50.0]
    profile = profile_model(sleep_model(forward_ms, backward_ms), torch.randn(2, 3), warmup=1, repeats=5)
    got_f = [layer.forward_ms for layer in profile.layers]
    got_b = [layer.backward_ms for layer in profile.layers]
    assert sorted(range(3), key=got_f.__getitem__) == [0, 2, 1]
    assert sorted(range(3), key=got_b.__getitem__) == [1, 0, 2]
    for want, got in zip(forward_ms + backward_ms, got_f + got_b):
        assert want <= got <= want * 1.1 + 1.0, (want, got)  # time.sleep never wakes early


def test_the_input_gradient_half_of_the_backward_is_timed_on_its_own() -> None:
    """What ZBVZeroBubble's I action runs: the backward to the block's input, without its weights'."""
    model = nn.Sequential(SplitSleep(10.0, 20.0), SplitSleep(5.0, 30.0))
    prof = profile_model(model, torch.randn(2, 4), warmup=1, repeats=3)
    for layer, (input_ms, weight_ms) in zip(prof.layers, [(10.0, 20.0), (5.0, 30.0)]):
        assert layer.input_grad_ms is not None
        assert input_ms <= layer.input_grad_ms < input_ms + 4
        assert input_ms + weight_ms <= layer.backward_ms < input_ms + weight_ms + 6


def test_the_runtimes_own_halves_of_the_backward_are_timed() -> None:
    """With the runtime's split (torch's ``stage_backward_input`` and ``stage_backward_weight``, what
    ZBVZeroBubble's I and W run), each half is timed on its own: I sleeps the input branch only, W the weight
    branch only; the backward in one call both. Without it, W is not measured (None)."""
    from autopart.run.stages import split_backward

    model = nn.Sequential(SplitSleep(10.0, 20.0), SplitSleep(5.0, 30.0))
    prof = profile_model(model, torch.randn(2, 4), warmup=1, repeats=3, split_backward=split_backward)
    for layer, (input_ms, weight_ms) in zip(prof.layers, [(10.0, 20.0), (5.0, 30.0)]):
        assert layer.input_grad_ms is not None and layer.weight_grad_ms is not None
        assert input_ms <= layer.input_grad_ms < input_ms + 4
        assert weight_ms <= layer.weight_grad_ms < weight_ms + 4
        assert input_ms + weight_ms <= layer.backward_ms < input_ms + weight_ms + 6
    again = Profile.from_dict(json.loads(json.dumps(prof.to_dict())))
    assert [x.weight_grad_ms for x in again.layers] == [x.weight_grad_ms for x in prof.layers]
    costs = BlockCosts.from_profile(again)
    assert costs.weight_grad_ms is not None and costs.weight_grad_ms.tolist() == [x.weight_grad_ms for x in prof.layers]
    assert again.features == ("split_backward",)  # an older autopart would take W as the rest of the backward
    plain = profile_model(model, torch.randn(2, 4), warmup=0, repeats=1)
    assert all(x.weight_grad_ms is None for x in plain.layers) and BlockCosts.from_profile(plain).weight_grad_ms is None
    assert plain.features == ()
    plan = plan_partition(again, 2, CostModel(schedule="1F1B", microbatches=2))
    assert plan.features == ("split_backward",) and plan_partition(plain, 2).features == ()


def test_a_first_block_runs_its_whole_backward_as_its_weight_half() -> None:
    """Tokens need no gradient: torch skips the I of such a stage and its W is the whole backward."""
    from autopart.run.stages import split_backward

    model = nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 16))
    prof = profile_model(model, torch.randint(0, 50, (2, 4)), warmup=1, repeats=3, split_backward=split_backward)
    first = prof.layers[0]
    assert first.input_grad_ms is not None and first.input_grad_ms < 0.5 and first.weight_grad_ms == first.backward_ms


class _Logged(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, log: list[str], label: str) -> torch.Tensor:
        ctx.log, ctx.label = log, label
        return x * 1.0

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        ctx.log.append(ctx.label)
        return grad, None, None


class _Recorder(nn.Module):
    """Logs its forward (``F0``), its input's gradient (``I0``) and its weight's (``W0``): separate branches."""

    def __init__(self, index: int, log: list[str]) -> None:
        super().__init__()
        self.index, self.log = index, log
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.log.append(f"F{self.index}")
        return _Logged.apply(x, self.log, f"I{self.index}") + _Logged.apply(self.weight, self.log, f"W{self.index}")


def test_blocks_are_timed_in_the_order_a_stage_runs_them() -> None:
    """On a CPU a block's time depends on what ran before it (its weights left the caches), so the profile times
    the blocks as a stage runs them: forwards from the first block, backwards from the last; the runtime's
    halves as ZBVZeroBubble runs a stage's: every I from the last block back, then every W."""
    from autopart.run.stages import split_backward

    log: list[str] = []
    blocks = [_Recorder(k, log) for k in range(3)]
    inputs = [torch.randn(2, 4) for _ in blocks]
    clock = Clock(torch.device("cpu"))
    log.clear()
    times = time_chain(blocks, inputs, clock, 0, 1, torch.device("cpu"), split=split_backward)
    log_probes = 3  # each block's output gradients are shaped on one forward first
    forward, fused, again, halves = log[log_probes:6], log[6:12], log[12:15], log[15:]
    assert forward == again == ["F0", "F1", "F2"]
    assert [sorted(fused[i:i + 2]) for i in (0, 2, 4)] == [["I2", "W2"], ["I1", "W1"], ["I0", "W0"]]
    assert halves == ["I2", "I1", "I0", "W2", "W1", "W0"]
    assert len(times) == 3 and all(t.weight_grad_ms is not None and t.cuda_peak_bytes is None for t in times)


def test_every_optimizer_a_plan_can_name_is_timed_and_planned_with() -> None:
    model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))
    prof = profile_model(model, torch.randn(4, 256), warmup=1, repeats=3)
    linear = dict(prof.layers[0].optimizer_ms_by_name)
    assert set(linear) == {"adamw", "adam", "sgd-momentum", "sgd"} and linear["adamw"] == prof.layers[0].optimizer_ms
    assert dict(prof.layers[1].optimizer_ms_by_name) == dict.fromkeys(linear, 0.0)  # ReLU has no parameters
    again = Profile.from_dict(json.loads(json.dumps(prof.to_dict())))
    assert again.layers[0].optimizer_ms_by_name == prof.layers[0].optimizer_ms_by_name
    for name in linear:
        costs = BlockCosts.from_profile(prof, name)
        assert costs.optimizer_ms[0] == linear[name]
        problem = Problem.from_profile(prof, [Device("cpu")], CostModel(optimizer=name))
        last = dict(prof.layers[2].optimizer_ms_by_name)[name]
        assert problem.stage(0, 0, 2).optimizer_ms == pytest.approx(linear[name] + last)


@pytest.mark.parametrize("name", list(OPTIMIZER_STATES))
def test_each_optimizer_keeps_the_copies_of_state_the_table_prices(name: str) -> None:
    """The table the cost model prices memory with says what torch's optimizer really keeps per parameter."""
    layer = nn.Linear(8, 4)
    optimizer = make_optimizer(name, layer.parameters(), lr=1e-3)
    layer(torch.randn(2, 8)).sum().backward()
    optimizer.step()
    for p in layer.parameters():
        copies = [v for v in optimizer.state[p].values() if isinstance(v, torch.Tensor) and v.shape == p.shape]
        assert len(copies) == OPTIMIZER_STATES[name], (name, list(optimizer.state[p]))
    with pytest.raises(AutopartError, match="'adagrad'; known: adam, adamw, sgd-momentum, sgd"):
        make_optimizer("adagrad", layer.parameters(), lr=1e-3)


def test_param_bytes_add_up_to_the_module() -> None:
    model = GPT2(GPT2Config(vocab_size=100, context=16, n_layer=2, n_embd=32, n_head=2))
    profile = profile_model(model, torch.randint(0, 100, (2, 8)), warmup=0, repeats=1)
    assert profile.names == ["embed", "h.0", "h.1", "head"]
    want = [sum(p.numel() * 4 for p in model.get_submodule(n).parameters()) for n in profile.names]
    assert [layer.param_bytes for layer in profile.layers] == want
    assert profile.param_bytes == sum(p.numel() * 4 for p in model.parameters())


def test_tied_weight_counts_once_in_its_first_block() -> None:
    embed = nn.Embedding(50, 16)
    head = nn.Linear(16, 50, bias=False)
    head.weight = embed.weight
    model = nn.Sequential(embed, nn.Linear(16, 16), head)
    profile = profile_model(model, torch.randint(0, 50, (2, 4)), warmup=0, repeats=1)
    assert [layer.param_bytes for layer in profile.layers] == [50 * 16 * 4, (16 * 16 + 16) * 4, 0]
    assert len(profile.ties) == 1
    tie = profile.ties[0]
    assert tie.owner == "0" and set(tie.params) == {"0.weight", "2.weight"} and tie.bytes == 50 * 16 * 4


def test_activation_bytes_of_linear_relu_chain_are_analytic() -> None:
    batch, n_in, n_hidden, n_out = 4, 16, 32, 8
    model = nn.Sequential(nn.Linear(n_in, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_out))
    profile = profile_model(model, torch.randn(batch, n_in), warmup=0, repeats=1)
    # Linear saves its input (weights excluded); ReLU saves its output; the second
    # Linear saves that same output again, which is charged to the ReLU only.
    assert [layer.activation_bytes for layer in profile.layers] == [batch * n_in * 4, batch * n_hidden * 4, 0]
    assert [layer.output_bytes for layer in profile.layers] == [batch * n_hidden * 4, batch * n_hidden * 4,
                                                                batch * n_out * 4]


def _state(model: nn.Module) -> dict[str, object]:
    return {
        "tensors": {k: v.clone() for k, v in model.state_dict().items()},
        "modes": [m.training for m in model.modules()],
        "flags": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
    }


def test_profiling_leaves_the_model_unchanged() -> None:
    model = ResNet(widths=(16, 32, 32, 64), depths=(1, 1, 1, 1), stem_width=8)
    model.eval()
    model.layer2.train()  # a mix of modes must survive
    model.stem.conv.weight.requires_grad_(False)
    model.head.fc.weight.grad = torch.full_like(model.head.fc.weight, 3.0)
    before = _state(model)
    images = torch.randn(4, 1, 16, 16)
    rng = torch.get_rng_state()
    profile_model(model, images, warmup=1, repeats=2)
    after = _state(model)
    assert before["modes"] == after["modes"] and before["flags"] == after["flags"]
    for key, value in before["tensors"].items():  # type: ignore[union-attr]
        assert torch.equal(value, after["tensors"][key]), key  # type: ignore[index]
    for g0, g1 in zip(before["grads"], after["grads"]):  # type: ignore[arg-type]
        assert (g0 is None and g1 is None) or torch.equal(g0, g1)
    assert torch.equal(rng, torch.get_rng_state())


class _Chain(nn.Module):
    """Not a Sequential, but its children run in order."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Tanh()
        self.c = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x)))


class _Skip(_Chain):
    """Children do not run in order: a skip connection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x)) + self.a(x))


def test_module_whose_children_run_in_order_is_profiled() -> None:
    profile = profile_model(_Chain(), torch.randn(3, 4), warmup=0, repeats=1)
    assert profile.names == ["a", "b", "c"]


def test_module_with_a_skip_is_captured_as_a_graph() -> None:
    # Until graph capture (issue #9) this was refused ("do not reproduce its forward"); now the skip is counted:
    # the input x crosses the cut after the first call of `a` (with tanh, which has no parameters, joined to it)
    # because the second call of `a` needs it, and `a`'s weights are shared by both calls.
    profile = profile_model(_Skip(), torch.randn(3, 4), warmup=0, repeats=1)
    assert profile.names == ["a", "a#2", "c"]
    assert [(x.output_bytes, x.skip_bytes) for x in profile.layers[:2]] == [(3 * 8 * 4, 3 * 4 * 4), (3 * 8 * 4, 0)]
    assert {tie.owner for tie in profile.ties} == {"a"} and all(tie.blocks == ("a", "a#2") for tie in profile.ties)


def test_shape_that_does_not_fit_is_a_clear_error() -> None:
    with pytest.raises(AutopartError, match=r"cannot run input of shape \[3, 5\]"):
        profile_model(nn.Sequential(nn.Linear(4, 2)), torch.randn(3, 5), warmup=0, repeats=1)


def test_low_precision_on_cpu() -> None:
    """A bfloat16 model is profiled as bf16-true; float16 parameters are no precision autopart trains."""
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4)).to(torch.bfloat16)
    profile = profile_model(model, torch.randn(2, 8, dtype=torch.bfloat16), warmup=0, repeats=1)
    assert (profile.dtype, profile.precision) == ("bfloat16", "bf16-true")
    assert profile.layers[0].param_bytes == (8 * 16 + 16) * 2
    assert profile.layers[0].activation_bytes == 2 * 8 * 2
    with pytest.raises(AutopartError, match="float16 is not offered .* use precision fp16-mixed"):
        profile_model(model.to(torch.float16), torch.randn(2, 8, dtype=torch.float16), warmup=0, repeats=1)


def test_profile_records_its_conditions() -> None:
    model = copy.deepcopy(nn.Sequential(nn.Linear(8, 8)))
    profile = profile_model(model, torch.randn(5, 8), name="lin", warmup=1, repeats=2)
    assert (profile.model, profile.microbatch_size, profile.sample_shape) == ("lin", 5, (5, 8))
    assert profile.threads == torch.get_num_threads() and profile.repeats == 2 and profile.warmup == 1


@pytest.mark.cuda
def test_cuda_profile_records_allocator_peak() -> None:
    model = nn.Sequential(nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 256)).cuda()
    profile = profile_model(model, torch.randn(64, 256, device="cuda"), warmup=1, repeats=3)
    assert profile.device != "cpu" and all(layer.cuda_peak_bytes is not None for layer in profile.layers)
    assert profile.layers[0].activation_bytes == 64 * 256 * 4

"""Small real models with known answers, shared by the tests."""
from __future__ import annotations

import time
from typing import Any

import torch
from torch import nn


class _SleepFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, forward_s: float, backward_s: float) -> torch.Tensor:
        time.sleep(forward_s)
        ctx.backward_s = backward_s
        return x * 1.0

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        time.sleep(ctx.backward_s)
        return grad, None, None


class Sleep(nn.Module):
    """A block that takes a known time: sleeps ``forward_ms`` forward and ``backward_ms`` backward."""

    def __init__(self, forward_ms: float, backward_ms: float) -> None:
        super().__init__()
        self.forward_ms, self.backward_ms = forward_ms, backward_ms
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # through the parameter first, so the backward sleeps even where the input needs no gradient
        return _SleepFn.apply(x * self.scale, self.forward_ms / 1e3, self.backward_ms / 1e3)


def sleep_model(forward_ms: list[float], backward_ms: list[float]) -> nn.Sequential:
    return nn.Sequential(*[Sleep(f, b) for f, b in zip(forward_ms, backward_ms)])


def sleep_spec() -> dict[str, Any]:
    """A model spec (``tests/helpers.py:sleep_spec``) of four blocks of 8 ms forward, 16 ms backward."""
    return {"module": sleep_model([8.0] * 4, [16.0] * 4), "example": torch.randn(1, 8),
            "loss_fn": nn.functional.mse_loss}


class SplitSleep(nn.Module):
    """A block whose backward takes ``input_ms`` for its input's gradient and ``weight_ms`` more for its
    weight's: the two are separate branches, so a backward for the input alone skips the second sleep."""

    def __init__(self, input_ms: float, weight_ms: float) -> None:
        super().__init__()
        self.input_ms, self.weight_ms = input_ms, weight_ms
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _SleepFn.apply(x, 0.0, self.input_ms / 1e3) + _SleepFn.apply(self.weight, 0.0, self.weight_ms / 1e3)


class Reshape(nn.Module):
    def __init__(self, *shape: int) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


def batchnorm_model() -> nn.Sequential:
    """BatchNorm1d (on 2-d and 3-d input), BatchNorm2d with ``momentum=None`` (the cumulative average) and
    BatchNorm3d with momentum 0.3, between layers that train; input (N, 12), output (N, 4)."""
    return nn.Sequential(
        nn.Sequential(nn.Linear(12, 16), nn.BatchNorm1d(16), nn.ReLU()),
        nn.Sequential(nn.Linear(16, 24), Reshape(4, 6), nn.BatchNorm1d(4), nn.Tanh()),
        nn.Sequential(nn.Flatten(), nn.Linear(24, 32), Reshape(2, 4, 4), nn.BatchNorm2d(2, momentum=None), nn.ReLU()),
        nn.Sequential(nn.Flatten(), nn.Linear(32, 24), Reshape(3, 2, 2, 2), nn.BatchNorm3d(3, momentum=0.3),
                      nn.Flatten(), nn.Linear(24, 4)),
    )


def batchnorm_spec() -> dict[str, Any]:
    """``batchnorm_model`` on synthetic data (random inputs, MSE to a fixed target), micro-batches of 4."""
    return {"module": batchnorm_model(), "example": torch.randn(4, 12)}


def restart_spec() -> dict[str, Any]:
    """Layers that learn (with BatchNorm) between blocks that sleep 30 ms each way, so a step takes long enough
    to stop a rank in the middle of a run; synthetic data, micro-batches of 4."""
    model = nn.Sequential(nn.Linear(12, 32), nn.Tanh(), Sleep(30.0, 30.0), nn.Linear(32, 32), nn.BatchNorm1d(32),
                          nn.Tanh(), Sleep(30.0, 30.0), nn.Linear(32, 4))
    return {"module": model, "example": torch.randn(4, 12)}


class Hang(nn.Module):
    """Hangs (sleeps ten minutes) in its forward from the ``after``-th call on, in a distributed run only."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.after, self.calls = after, 0
        self.linear = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        self.calls += 1
        if dist.is_initialized() and self.calls >= self.after:
            time.sleep(600)
        return self.linear(x)


def hang_spec() -> dict[str, Any]:
    """Two blocks; the second hangs in the second micro-batch of step 2: its 6th forward in a distributed run
    (before step 1's two, the data's output-shape check and working out the stages' shapes, on fake tensors,
    run it once each)."""
    return {"module": nn.Sequential(nn.Linear(8, 8), Hang(after=6)), "example": torch.randn(2, 8),
            "loss_fn": nn.functional.mse_loss}


def _batches(make_input: Any, out_features: int, steps: int = 3, batch: int = 8) -> list[tuple[Any, torch.Tensor]]:
    """``steps`` fixed (input, target) mini-batches of ``batch`` samples, the same in every process."""
    g = torch.Generator().manual_seed(5)
    return [(make_input(g, batch), torch.randn(batch, out_features, generator=g)) for _ in range(steps)]


class Scale(nn.Module):
    """``x * w`` with one learnable scalar ``w``, starting at 1."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def mean_output(out: torch.Tensor, _target: torch.Tensor) -> torch.Tensor:
    return out.mean()


def two_dropouts_spec() -> dict[str, Any]:
    """The issue's check: all-ones input through two Dropout(0.5) layers has mean 1 when their masks are
    independent, 2 when they are the same; the loss is that mean."""
    ones = [(torch.ones(8, 256), torch.zeros(8, 1)) for _ in range(3)]
    return {"module": nn.Sequential(Scale(), nn.Dropout(0.5), nn.Dropout(0.5)), "example": torch.ones(4, 256),
            "loss_fn": mean_output, "data": ones}


def dropout_mlp_spec() -> dict[str, Any]:
    """Seven blocks with a Dropout in each half, on fixed data."""
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 16), nn.Tanh(), nn.Dropout(0.3),
                          nn.Linear(16, 4))
    return {"module": model, "example": torch.randn(4, 8), "loss_fn": nn.functional.mse_loss,
            "data": _batches(lambda g, n: torch.randn(n, 8, generator=g), 4)}


class CarryIds(nn.Module):
    """Block 0: features through a layer; the token ids pass through untouched, to the next stage."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ids, torch.tanh(self.linear(x))


class EmbedAdd(nn.Module):
    """Block 1: an embedding of the ids (10 of them) added to the features."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)

    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.embed(ids) + x


class LateEmbedding(nn.Module):
    """Token ids (N, 6) and features (N, 6, 4) in; the embedding is the second block, so on a later stage
    it reads ids that crossed a cut."""

    def __init__(self) -> None:
        super().__init__()
        self.carry = CarryIds()
        self.embed = EmbedAdd()
        self.head = nn.Linear(4, 3)

    def forward(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(*self.carry(ids, x)))


def late_embedding_spec() -> dict[str, Any]:
    def inputs(g: torch.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.randint(0, 10, (n, 6), generator=g), torch.randn(n, 6, 4, generator=g)

    data = [((ids, x), y.repeat(1, 18).reshape(-1, 6, 3)) for (ids, x), y in _batches(inputs, 1)]
    return {"module": LateEmbedding(), "example": inputs(torch.Generator().manual_seed(0), 4),
            "loss_fn": nn.functional.mse_loss, "data": data}


def linear_relu_spec() -> dict[str, Any]:
    """The issue's plan that could not run: three blocks on three stages puts the ReLU alone on the last."""
    return {"module": nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 4), nn.ReLU()), "example": torch.randn(4, 4),
            "loss_fn": nn.functional.mse_loss, "data": _batches(lambda g, n: torch.randn(n, 4, generator=g), 4)}


def no_parameters_spec() -> dict[str, Any]:
    return {"module": nn.Sequential(nn.ReLU(), nn.Tanh()), "example": torch.randn(4, 4),
            "loss_fn": nn.functional.mse_loss}


def plan_for(spec: str, balance: list[int], schedule: str, microbatches: int, path: Any, per_rank: int = 1,
             precision: str | None = None) -> Any:
    """A plan of ``spec`` with the given blocks per stage, written to ``path`` (profiled once, in-process, under
    ``precision``: None is the model's own dtype's)."""
    from autopart.core.costmodel import CostModel, Problem
    from autopart.core.partition import split_given
    from autopart.core.planner import make_plan
    from autopart.formats.devices import Device
    from autopart.measure.profiler import profile_model
    from autopart.measure.spec import load_model

    torch.manual_seed(0)
    bundle = load_model(spec)
    assert bundle.example is not None
    example = dict(zip(bundle.input_names, bundle.example)) if bundle.input_names else bundle.example
    if precision == "bf16-true":  # a true precision is measured on the model cast, as train runs it
        bundle.module.to(torch.bfloat16)
        example = tuple(x.bfloat16() if x.is_floating_point() else x for x in bundle.example)
    profile = profile_model(bundle.module, example, name=spec, warmup=0, repeats=1, precision=precision)
    model = CostModel(schedule=schedule, microbatches=microbatches, stages_per_rank=per_rank)
    devices = [Device("cpu")] * len(balance)  # as tests/test_graph_pipeline.py does
    problem = Problem.from_profile(profile, devices, model)
    plan = make_plan(split_given(problem, balance), problem, model, devices, model_name=spec,
                     precision=profile.precision)
    plan.to_json(path)
    return plan


class SkipDropout(nn.Module):
    """Not a chain (the first layer's output skips past the second), so it is captured as a graph; a
    Dropout in each half."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(8, 16)
        self.body = nn.Linear(16, 16)
        self.head = nn.Linear(16, 4)
        self.drop = nn.Dropout(0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.drop(torch.tanh(self.enc(x)))
        g = self.drop(torch.tanh(self.body(h))) + h
        return self.head(g)


def skip_dropout_spec() -> dict[str, Any]:
    return {"module": SkipDropout(), "example": torch.randn(4, 8), "loss_fn": nn.functional.mse_loss,
            "data": _batches(lambda g, n: torch.randn(n, 8, generator=g), 4)}



CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 1, 2  # linux/capability.h: what lets root ignore permission bits


def _drop_permission_override() -> None:
    """Clear this process's capabilities to bypass file permission bits (capset(2), via libc)."""
    import ctypes

    class Header(ctypes.Structure):
        _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

    class Data(ctypes.Structure):
        _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]

    libc = ctypes.CDLL(None, use_errno=True)
    header, data = Header(0x20080522, 0), (Data * 2)()  # _LINUX_CAPABILITY_VERSION_3: two 32-bit words
    if libc.capget(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capget")
    keep = ~((1 << CAP_DAC_OVERRIDE) | (1 << CAP_DAC_READ_SEARCH)) & 0xFFFFFFFF
    data[0].effective &= keep
    data[0].permitted &= keep
    data[0].inheritable &= keep
    if libc.capset(ctypes.byref(header), data) != 0:
        raise OSError(ctypes.get_errno(), "capset")


def bound_by_permissions(fn: Any) -> Any:
    """``fn()``'s result, computed where file permission bits bind: in this process when it is not root;
    otherwise in a forked child that first drops root's power to override them (root writes anywhere, and
    CI runs as root). It stays root otherwise, so it still reads root's own files (the interpreter, say).

    The child's result, or the exception it raised, comes back pickled."""
    import os
    import pickle

    if os.geteuid() != 0:
        return fn()
    import ctypes  # noqa: F401 -- loaded before the fork, as the child drops its rights

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(read_end)
            _drop_permission_override()
            try:
                outcome: tuple[bool, Any] = (True, fn())
            except BaseException as exc:  # noqa: BLE001 -- carried to the parent
                outcome = (False, exc)
            with os.fdopen(write_end, "wb") as pipe:
                pickle.dump(outcome, pipe)
        except BaseException:  # noqa: BLE001
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, "the child that gave up root's override failed"
    ok, value = pickle.loads(data)
    if not ok:
        raise value
    return value


def tanh_mlp_spec() -> dict[str, Any]:
    """Five blocks, no dropout, on fixed data: what a precision changes is all that differs between runs."""
    model = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 4))
    return {"module": model, "example": torch.randn(4, 16), "loss_fn": nn.functional.mse_loss,
            "data": _batches(lambda g, n: torch.randn(n, 16, generator=g), 4)}


class FiniteOnly(nn.Module):
    """``x * w`` (one weight per feature) where finite, 0 elsewhere: an inf in the input gives a finite output
    but a nan gradient for ``w``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x * self.w
        return torch.where(torch.isfinite(z), z, torch.zeros_like(z))


def inf_first_step_spec() -> dict[str, Any]:
    """Two blocks; the first step's input holds an inf, so (block 0 alone on stage 0) only the first stage's
    gradients are not finite in that step: a gradient scaler must skip the step on every rank."""
    data = _batches(lambda g, n: torch.randn(n, 4, generator=g), 4)
    first = data[0][0].clone()
    first[0, 0] = float("inf")
    data[0] = (first, data[0][1])
    return {"module": nn.Sequential(FiniteOnly(), nn.Linear(4, 4)), "example": torch.randn(4, 4),
            "loss_fn": nn.functional.mse_loss, "data": data}


def join_rank(plan_path: str, model: str) -> tuple[int, Any, Any]:
    """What every rank script of the tests does first: one thread, join gloo, read the plan, build the model
    from seed 0. Returns (rank, plan, bundle)."""
    import torch.distributed as dist

    from autopart.formats.plan import Plan
    from autopart.measure.spec import load_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    plan = Plan.from_json(plan_path)
    torch.manual_seed(0)
    return dist.get_rank(), plan, load_model(model)

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
    (before step 1's two, the data's output-shape check and the runtime's shape inference run it once each)."""
    return {"module": nn.Sequential(nn.Linear(8, 8), Hang(after=6)), "example": torch.randn(2, 8),
            "loss_fn": nn.functional.mse_loss}

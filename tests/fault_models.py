"""Small models for the fault tests (issue #16): outputs and data the pipelining runtime meets only in a run."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

GLOBAL_BATCH = 4
"""Samples per step of the factories' data: 2 micro-batches of 2."""


class DictHead(nn.Module):
    """A last block that returns a dict, as Hugging Face heads return a ModelOutput: the logits, a nested
    tuple with a tensor and a None, and a number the loss uses (not a tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> dict[str, Any]:
        return {"logits": self.linear(x), "extra": (x.sum(dim=1), None), "scale": 0.5}


def dict_loss(out: dict[str, Any], target: torch.Tensor) -> torch.Tensor:
    return out["scale"] * nn.functional.mse_loss(out["logits"], target)


def _batches(count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(123)
    return [(torch.randn(GLOBAL_BATCH, 8, generator=g), torch.randn(GLOBAL_BATCH, 4, generator=g))
            for _ in range(count)]


def dict_spec() -> dict[str, Any]:
    """Three blocks, the last returning a dict; 6 batches of the factory's own data."""
    return {"module": nn.Sequential(nn.Linear(8, 8), nn.Tanh(), DictHead()), "example": torch.randn(2, 8),
            "loss_fn": dict_loss, "data": _batches(6)}


def short_data_spec() -> dict[str, Any]:
    """Three blocks and only 2 batches of data: a run of more steps cycles them."""
    return {"module": nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4)), "example": torch.randn(2, 8),
            "loss_fn": nn.functional.mse_loss, "data": _batches(2)}


def big_spec() -> dict[str, Any]:
    """Two blocks of 512x512 weights (1 MiB each; 3 MiB a stage with AdamW's state): a checkpoint that does
    not fit a 1 MiB disk."""
    return {"module": nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 4)), "example": torch.randn(2, 512),
            "loss_fn": nn.functional.mse_loss,
            "data": [(torch.randn(GLOBAL_BATCH, 512), torch.randn(GLOBAL_BATCH, 4)) for _ in range(2)]}


class Pair(nn.Module):
    """Returns a tuple for the next block's two arguments: ``(linear(x), 2 * x)``, or ``(linear(x), 2.0)``
    with ``number``."""

    def __init__(self, number: bool = False) -> None:
        super().__init__()
        self.linear, self.number = nn.Linear(8, 8), number

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]:
        return self.linear(x), 2.0 if self.number else 2 * x


class Two(nn.Module):
    """A block of two arguments."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 4)

    def forward(self, a: torch.Tensor, b: Any) -> torch.Tensor:
        return self.linear(a * b)


def tuple_spec() -> dict[str, Any]:
    """Two blocks, the first passing a tuple of tensors to the second's two arguments."""
    return {"module": nn.Sequential(Pair(), Two()), "example": torch.randn(2, 8),
            "loss_fn": nn.functional.mse_loss, "data": _batches(3)}


def number_spec() -> dict[str, Any]:
    """As :func:`tuple_spec`, but the tuple holds a number, which no pipeline can send between stages."""
    return {"module": nn.Sequential(Pair(number=True), Two()), "example": torch.randn(2, 8),
            "loss_fn": nn.functional.mse_loss, "data": _batches(3)}

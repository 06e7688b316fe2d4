"""Models with in-place ops where a cut may fall: right after one (a stage starts with it) or on the model input."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def relu_chain() -> dict[str, Any]:
    """A chain of children whose middle block is ``ReLU(inplace=True)``: a cut before it starts a stage with it."""
    module = nn.Sequential(nn.Linear(8, 16), nn.ReLU(inplace=True), nn.Linear(16, 4))
    return {"module": module, "example": torch.randn(4, 8), "loss_fn": F.mse_loss}


def dropout_chain() -> dict[str, Any]:
    module = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5, inplace=True), nn.Linear(16, 4))
    return {"module": module, "example": torch.randn(4, 8), "loss_fn": F.mse_loss}


class _Scale(nn.Module):
    """Doubles its input in place, then a linear layer: the model's first block changes the model input."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mul_(2))


def inplace_on_input() -> dict[str, Any]:
    return {"module": nn.Sequential(_Scale(), nn.Linear(8, 4)), "example": torch.randn(4, 8), "loss_fn": F.mse_loss}


def relu_first() -> dict[str, Any]:
    module = nn.Sequential(nn.ReLU(inplace=True), nn.Linear(8, 8), nn.Linear(8, 4))
    return {"module": module, "example": torch.randn(4, 8), "loss_fn": F.mse_loss}


class _Head(nn.Module):
    """EfficientNet's classifier: an in-place op first (dropout, then an activation), then the linear layer."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(p, inplace=True)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.drop(x)))


class Classified(nn.Module):
    """Not a chain (a skip from the input to the head), so it is captured: the head's block starts with the
    in-place ops."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16))
        self.classifier = _Head(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x) + x.sum(-1, keepdim=True))


def classified() -> dict[str, Any]:
    """Dropout with p=0 (runs compare exactly; the in-place ReLU after it is the op under test)."""
    return {"module": Classified(0.0), "example": torch.randn(4, 8), "loss_fn": F.mse_loss}


def classified_dropout() -> dict[str, Any]:
    return {"module": Classified(0.2), "example": torch.randn(4, 8), "loss_fn": F.mse_loss}


class _Branch(nn.Module):
    """A data-dependent ``if``: fine run for real, impossible on the meta device or under capture."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x


def branchy_chain() -> tuple[nn.Module, torch.Tensor]:
    return nn.Sequential(nn.Linear(8, 8), _Branch(), nn.Linear(8, 4)), torch.randn(4, 8)


def on_meta() -> tuple[nn.Module, torch.Tensor]:
    """``relu_chain`` built by its factory on the meta device: no weights to profile or train."""
    module = nn.Sequential(nn.Linear(8, 16, device="meta"), nn.ReLU(inplace=True), nn.Linear(16, 4, device="meta"))
    return module, torch.randn(4, 8)


def huge_branchy_chain() -> tuple[nn.Module, torch.Tensor]:
    """``branchy_chain`` with 4 TB of weights: only the meta device can hold it, and there the ``if`` cannot run."""
    return nn.Sequential(nn.Linear(10**6, 10**6), _Branch(), nn.Linear(10**6, 4)), torch.randn(4, 10**6)


class ScaledPair(nn.Module):
    """Not a Sequential, but its children run in order; the first changes the model input in place."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = _Scale()
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.scale(x))

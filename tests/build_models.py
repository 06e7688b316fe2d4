"""Models for tests/test_build.py: a buffer computed in ``__init__``, a parameter nothing initialises, and two
stages of very different sizes (to measure each rank's build)."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Sinusoidal(nn.Module):
    """Adds a sinusoidal position table, a buffer computed in ``__init__`` (never by ``reset_parameters``)."""

    def __init__(self, seq: int, width: int) -> None:
        super().__init__()
        pos = torch.arange(seq, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
        table = torch.zeros(seq, width)
        table[:, 0::2], table[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
        self.register_buffer("table", table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.table[: x.shape[1]]


def sinusoidal() -> dict[str, Any]:
    """Byte embedding -> position table -> two layers -> head: the table is on the first stage's rank."""
    module = nn.Sequential(nn.Embedding(256, 16), Sinusoidal(8, 16), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 256))
    return {"module": module, "example": torch.randint(0, 256, (4, 8)),
            "loss_fn": lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten()), "data_kind": "text"}


class Scale(nn.Module):
    """A module with its own parameter and no ``reset_parameters``: nothing autopart can run initialises it."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.rand(width) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain


def uncovered() -> dict[str, Any]:
    module = nn.Sequential(nn.Linear(8, 8), Scale(8), nn.Linear(8, 4))
    return {"module": module, "example": torch.randn(4, 8), "loss_fn": F.mse_loss}


def lopsided() -> dict[str, Any]:
    """Stage 0 (one block) holds 64 MiB of parameters, stage 1 (one block) 1 MiB."""
    module = nn.Sequential(nn.Linear(4096, 4096, bias=False), nn.Linear(4096, 64, bias=False))
    return {"module": module, "example": torch.randn(2, 4096), "loss_fn": F.mse_loss}


class Net(nn.Module):
    """A body and a head; ``__init__`` zeroes the head's bias and ``reset_parameters`` fills ``gain`` (writes in
    place that are the model's own construction)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 4)
        nn.init.zeros_(self.head.bias)
        self.gain = nn.Parameter(torch.empty(8))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.gain.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.body(x)) * self.gain)


def _net(module: nn.Module) -> dict[str, Any]:
    return {"module": module, "example": torch.randn(4, 8), "loss_fn": F.mse_loss}


def own_init() -> dict[str, Any]:
    """Writes in place only while it is constructed: built per stage."""
    return _net(Net())


def loads_state_dict() -> dict[str, Any]:
    """Loads a state dict saved beside this file, as torchvision's and timm's pretrained builders do."""
    import os

    model = Net()
    model.load_state_dict(torch.load(os.environ["AUTOPART_TEST_STATE"], weights_only=True))
    return _net(model)


def zeroes_head() -> dict[str, Any]:
    model = Net()
    nn.init.zeros_(model.head.weight)
    return _net(model)


def copies_under_no_grad() -> dict[str, Any]:
    model = Net()
    with torch.no_grad():
        model.body.weight.copy_(torch.eye(8))
    return _net(model)


def fills_data() -> dict[str, Any]:
    model = Net()
    model.body.bias.data.fill_(0.5)
    return _net(model)


def assigns() -> dict[str, Any]:
    model = Net()
    model.load_state_dict({"head.weight": torch.full((4, 8), 0.25)}, strict=False, assign=True)
    return _net(model)


def sets_data() -> dict[str, Any]:
    model = Net()
    model.head.weight.data = torch.ones(4, 8)
    return _net(model)


def helper_loads() -> dict[str, Any]:
    """Loads through a helper of its own (as a pretrained builder does): the note names the factory's line."""
    return _net(_pretrained())


def _pretrained() -> Net:
    model = Net()
    model.load_state_dict({k: torch.zeros_like(v) for k, v in Net().state_dict().items()})
    return model

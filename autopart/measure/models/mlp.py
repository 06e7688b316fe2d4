"""A deliberately heterogeneous MLP: neighbouring widths differ by 10x.

Equal block counts per stage are badly unbalanced on it, which makes it a
good test of a partitioner. Takes 64 features (scikit-learn's 8x8 digits,
flattened) and gives 10 class scores.
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

__all__: list[str] = []

WIDTHS = (64, 256, 2560, 256, 2560, 256, 256, 2560, 128, 10)


class Dense(nn.Module):
    def __init__(self, n_in: int, n_out: int, activation: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        return F.relu(y) if self.activation else y


class HeteroMLP(nn.Sequential):
    def __init__(self, widths: tuple[int, ...] = WIDTHS) -> None:
        n = len(widths) - 1
        super().__init__(OrderedDict(
            (f"fc{i}", Dense(widths[i], widths[i + 1], activation=i < n - 1)) for i in range(n)
        ))

"""A model whose memory is known: four Linear(1024, 1024) blocks, 4 MiB of weights each (tests/test_memory_meter.py)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

WIDTH = 1024


def wide_linear_spec() -> dict[str, Any]:
    """Under AdamW each block holds 4 MiB of weights, 4 MiB of gradients and 8 MiB of optimizer state; its
    activations (8 samples of 1024 floats) are small beside them."""
    return {"module": nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(4)]), "example": torch.randn(8, WIDTH),
            "loss_fn": nn.functional.mse_loss}

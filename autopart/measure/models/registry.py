"""The built-in models' factories, by name.

Each factory returns the mapping of the model-spec contract (docs/formats.md):
``module``, ``example`` (one micro-batch) and ``loss_fn``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from autopart.measure.models.gpt2 import GPT2, SIZES, lm_loss
from autopart.measure.models.mlp import HeteroMLP
from autopart.measure.models.resnet import ResNet

__all__ = ["BUILTINS"]


def _gpt2(name: str) -> Callable[[], dict[str, Any]]:
    cfg = SIZES[name]
    seq = {"gpt2-tiny": 64, "gpt2-mini": 64}.get(name, 128)
    batch = {"gpt2-tiny": 4, "gpt2-mini": 8}.get(name, 1)

    def factory() -> dict[str, Any]:
        return {
            "module": GPT2(cfg),
            "example": torch.randint(0, cfg.vocab_size, (batch, seq)),
            "loss_fn": lm_loss,
            "data_kind": "text",
        }

    factory.__doc__ = (f"GPT-2 {name.split('-')[1]}: {cfg.n_layer} layers, width {cfg.n_embd}, "
                       f"{cfg.n_head} heads, vocab {cfg.vocab_size}; input ({batch}, {seq}) token ids")
    return factory


def _resnet() -> dict[str, Any]:
    """ResNet of 8 bottleneck blocks with BatchNorm; input (16, 1, 32, 32) images, 10 classes."""
    return {
        "module": ResNet(),
        "example": torch.randn(16, 1, 32, 32),
        "loss_fn": torch.nn.functional.cross_entropy,
        "data_kind": "digits",
    }


def _mlp() -> dict[str, Any]:
    """MLP whose widths differ 10x between layers (64 -> 2560 -> ... -> 10); input (32, 64)."""
    return {
        "module": HeteroMLP(),
        "example": torch.randn(32, 64),
        "loss_fn": torch.nn.functional.cross_entropy,
        "data_kind": "digits",
    }


BUILTINS: dict[str, Callable[[], dict[str, Any]]] = {name: _gpt2(name) for name in SIZES}
BUILTINS["resnet-mini"] = _resnet
BUILTINS["mlp-hetero"] = _mlp

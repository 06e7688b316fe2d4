"""What a stage puts where blocks begin: a hook at each block's first operation, and inputs autograd may
change in place.

    BlockEntry(enter, 3)            # a graph node that calls enter(3) where block 3's operations begin
    contiguous_grad(x)              # x, no copy, its gradient made contiguous backward

Below both ways of cutting a model (:mod:`autopart.measure.blocks`, :mod:`autopart.measure.cutpoints`),
which use these and import neither the other for them.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["EnterBlock", "BlockEntry", "contiguous_grad"]

EnterBlock = Callable[[int], None]
"""Called with a block's index in the chain just before the block runs (to give it its own random stream)."""


class _ContiguousGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        # A detached alias: the same storage, but to autograd a new tensor made by this function, not a view
        # of the input (returning ``x`` or a view of it would be one: an in-place op after it is then refused).
        return x.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def contiguous_grad(x: torch.Tensor) -> torch.Tensor:
    """``x``'s values (its storage, no copy) as a tensor autograd made, neither a leaf nor a view, so an
    in-place op may follow; its gradient is made contiguous backward (gloo sends only contiguous tensors,
    and a ``cat`` backward gives strided ones)."""
    return _ContiguousGrad.apply(x)  # type: ignore[no-any-return]


class BlockEntry(nn.Module):
    """A graph node that calls ``enter(block)`` where a block's operations begin (a stage of a captured graph
    runs its blocks as one graph, not as modules); no parameters, no buffers, nothing in ``state_dict``."""

    def __init__(self, enter: EnterBlock, block: int) -> None:
        super().__init__()
        self.enter, self.block = enter, block

    def forward(self) -> None:
        self.enter(self.block)

"""``autopart profile`` with each block's optimizer step timed on a slice of its parameters, for models whose
single blocks are too big for this machine's memory with their optimizer state.

    python profiles/profile_lowmem.py hf:llama:hidden_size=8192,... --input-shape 1,1024 -o p.json

Takes exactly ``autopart profile``'s arguments and runs it, with one change: the profiler's
``optimizer_times`` (an AdamW, Adam and SGD step on copies of the whole block's parameters, with their
gradients and state: six times the block's weights besides the block itself) is run on copies of at most
:data:`SLICE_ELEMENTS` elements of the block's parameters (the first ones, in order) and scaled by the block's
element count over the slice's. An optimizer step is elementwise, so its time grows with the elements; the
per-tensor overhead of the few large tensors a transformer block has is left out. The block's own gradients
are freed before (the forward and backward timing used them; nothing else does). Llama-3-70B's LM head
(1.05 B parameters, 4.2 GB in float32) needs 25 GB for the profiler's own optimizer timing; with this,
its peak stays at its weights, their gradient and the activations of one micro-batch.
"""
from __future__ import annotations

import sys
from typing import Any, Sequence

import torch
from torch import nn

import autopart.measure.stream as stream
from autopart.cli import main
from autopart.measure.timing import optimizer_times

SLICE_ELEMENTS = 64 * 2**20
"""The most parameter elements an optimizer step is timed on (256 MiB in float32)."""


def parameter_slice(params: Sequence[torch.Tensor], elements: int) -> list[nn.Parameter]:
    """Copies of the first ``elements`` elements of ``params`` (flattened, in order), one piece per tensor."""
    pieces, taken = [], 0
    for p in params:
        if taken >= elements:
            break
        take = min(p.numel(), elements - taken)
        pieces.append(nn.Parameter(p.detach().reshape(-1)[:take].clone()))
        taken += take
    return pieces


def sliced_optimizer_times(block: nn.Module, clock: Any, repeats: int = 3) -> tuple[float, tuple[tuple[str, float], ...]]:
    """:func:`optimizer_times` of ``block``, timed on at most :data:`SLICE_ELEMENTS` of its parameter elements and
    scaled to all of them."""
    params = [p for p in block.parameters() if p.requires_grad]
    total = sum(p.numel() for p in params)
    if total <= SLICE_ELEMENTS:
        return optimizer_times(block, clock, repeats)
    for p in params:
        p.grad = None
    pieces = parameter_slice(params, SLICE_ELEMENTS)
    holder = nn.Module()
    holder.pieces = nn.ParameterList(pieces)
    ms, by_name = optimizer_times(holder, clock, repeats)
    scale = total / sum(p.numel() for p in pieces)
    return ms * scale, tuple((name, t * scale) for name, t in by_name)


if __name__ == "__main__":
    setattr(stream, "optimizer_times", sliced_optimizer_times)  # the name profile_by_block calls
    sys.exit(main(["profile", *sys.argv[1:]]))

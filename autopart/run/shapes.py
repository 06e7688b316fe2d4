"""What every stage receives and returns, worked out without running on real memory.

torch's pipelining runtime, left to itself, learns a stage's input shapes by
running it once on uninitialised tensors (``torch.empty``): garbage values,
which an embedding on a later stage reads as token ids out of range. Here the
chain's blocks run instead under a :class:`FakeTensorMode` on the micro-batch
example's shapes and dtypes, with fake parameters and buffers, so nothing is
computed and nothing real is read or written. Every rank works out every stage
from the same chain, so the metadata that neighbours exchange agrees.

A block that reads a value in Python (BatchNorm with ``momentum=None`` reads
``num_batches_tracked``) cannot run on fakes: then the chain runs on the
example's real values instead (never on uninitialised memory), its
statistics and the random state put back after.

A float value crossing a cut requires grad when the stage that makes it gives
it a gradient path (a parameter or a grad-requiring input), exactly as the
runtime's own inference would find; the next stage receives it as such.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.func import functional_call

from autopart.errors import AutopartError
from autopart.measure.batchnorm import statistics_kept
from autopart.measure.blocks import Chain, call_block, check_sendable, stage_inputs, tensors_of
from autopart.torch_compat import FakeTensorMode

__all__ = ["NeedsValues", "StageSignature", "stage_signatures"]


@dataclass(frozen=True)
class StageSignature:
    """One stage's inputs and outputs as tensors on the meta device (shape, stride, dtype, requires_grad):
    what ``PipelineStage(input_args=..., output_args=...)`` takes."""

    inputs: tuple[torch.Tensor, ...]
    outputs: tuple[torch.Tensor, ...]


def stage_signatures(chain: Chain, balance: Sequence[int], device: torch.device) -> list[StageSignature]:
    """Each stage's inputs and outputs, for stages of ``balance[s]`` consecutive blocks of ``chain``, fed the
    chain's micro-batch example: on fake tensors (its shapes and dtypes only; the example may be on the meta
    device), or, for a block that reads a value in Python (``float(num_batches_tracked)`` in a BatchNorm
    with ``momentum=None``), on the example's real values where the model has them (call before moving
    the stages to their device: every block must be where the model was built)."""
    if not chain.example:
        raise AutopartError("the model's chain has no example micro-batch to work out the stages' shapes")
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), statistics_kept(chain.root), torch.enable_grad():
            fakes = tuple(torch.empty(t.shape, dtype=t.dtype, device=device) for t in chain.example)
            return _signatures(chain, balance, fakes, lambda b, values: _run_fake(chain, b, values, device))
    except _NeedsValues as exc:
        real = [*chain.example, *chain.root.parameters(), *chain.root.buffers()]
        if any(not isinstance(t, torch.Tensor) or t.is_meta for t in real):
            raise NeedsValues(f"{exc}, and the model was built on the meta device: nothing to run it on") from None
    with torch.random.fork_rng(devices=[]), statistics_kept(chain.root), torch.enable_grad():
        return _signatures(chain, balance, tuple(t.detach().clone() for t in chain.example),
                           lambda b, values: call_block(chain.blocks[b][1], values))


class NeedsValues(AutopartError):
    """A block needs real values to size the stages, and the model has none (built on the meta device)."""


class _NeedsValues(Exception):
    """A block that cannot run on fake tensors (its message says which and why)."""


def _signatures(chain: Chain, balance: Sequence[int], example: tuple[torch.Tensor, ...],
                run: Callable[[int, Any], Any]) -> list[StageSignature]:
    signatures = []
    values: Any = example
    first = 0
    for s, count in enumerate(balance):
        inputs = values if isinstance(values, tuple) else (values,)
        if s > 0:  # a received activation is a leaf of this stage's graph
            inputs = tuple(t.detach().requires_grad_(t.requires_grad) for t in inputs)
        values = stage_inputs(inputs if len(inputs) > 1 else inputs[0])  # as the stage module gets them
        for b in range(first, first + count):
            values = run(b, values)
        # the last stage's output goes to the loss, not to a stage: any structure of tensors will do
        if s < len(balance) - 1:
            check_sendable(values, *chain.blocks[first + count - 1])
        outputs = tuple(tensors_of(values)) if s == len(balance) - 1 else \
            values if isinstance(values, tuple) else (values,)
        signatures.append(StageSignature(_on_meta(inputs, s, "receives"), _on_meta(outputs, s, "returns")))
        first += count
    return signatures


def _run_fake(chain: Chain, index: int, values: Any, device: torch.device) -> Any:
    """Block ``index`` on fake values, its parameters and buffers swapped for fake ones on ``device``."""
    name, block = chain.blocks[index]
    state = {n: torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device).requires_grad_(t.requires_grad)
             for n, t in [*block.named_parameters(), *block.named_buffers()]}
    try:
        return functional_call(block, state, values if isinstance(values, tuple) else (values,), strict=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise _NeedsValues(f"block {index} ({name}) cannot run on shapes alone to size the stages "
                           f"({type(exc).__name__}: {first})") from None


def _on_meta(values: tuple[Any, ...], stage: int, verb: str) -> tuple[torch.Tensor, ...]:
    """Fake values as meta tensors of the same shape, stride, dtype and requires_grad."""
    if not all(isinstance(v, torch.Tensor) for v in values):
        raise AutopartError(f"stage {stage} {verb} {[type(v).__name__ for v in values]}: a pipeline stage passes "
                            f"tensors only")
    return tuple(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta").requires_grad_(t.requires_grad)
                 for t in values)

"""Every term of a stage's memory, in one table: :data:`MEMORY_TERMS` (docs/cost-model.md, "Memory").

A stage's bytes are the sum of the terms that apply to it, each read from the
blocks one of three ways (its ``source``):

- ``blocks``: per-block bytes, summed over the stage's blocks (prefix sums);
- ``received``: what crosses into the stage per micro-batch (the boundary
  before its first block, or the model's input on the first stage);
- ``shared``: tied parameters, a copy on every stage that uses one but does
  not hold its owner.

and counted where the term's ``when`` says (``always``, ``plain``: only
without recomputation, ``recompute``: only when recomputing), times the
factor of the :class:`StageCost` field it adds to (its ``part``, see
:data:`PART_SCALE`): once, or once per in-flight micro-batch.
:class:`~autopart.core.costmodel.Problem` builds every memory price
(``memories``, the partitioner's prefix sums, ``StageCost``'s breakdown)
from this table alone, so a new term is one entry here and its line in
docs/cost-model.md.

Byte amounts are integers held in float64 (exact below 2**53), so the sums
are the same whatever the order.

Pure numpy (no torch).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Literal, Mapping

import numpy as np
import numpy.typing as npt

from autopart.core.blocks import BlockCosts
from autopart.core.training import CostModel
from autopart.errors import AutopartError

__all__ = ["MemoryTerm", "MEMORY_TERMS", "PART_SCALE", "Part", "When", "Ties"]

Floats = npt.NDArray[np.float64]
Part = Literal["static_bytes", "activation_bytes", "backward_extra_bytes"]
"""The :class:`~autopart.formats.stage.StageCost` field a term adds to."""
When = Literal["always", "plain", "recompute"]
Ties = tuple[tuple[float, tuple[int, ...]], ...]
"""Shared parameters: (bytes of each copy, the blocks that use it, owner first)."""

PART_SCALE: Mapping[str, Literal["once", "in_flight"]] = MappingProxyType({
    "static_bytes": "once",             # always resident
    "activation_bytes": "in_flight",    # held per in-flight micro-batch until its backward
    "backward_extra_bytes": "once",     # held during one backward
})
"""How each ``StageCost`` memory field scales into ``memory_bytes``:
``memory = static + in_flight × activation + backward_extra``."""


@dataclass(frozen=True)
class MemoryTerm:
    """One named term of a stage's memory. Exactly one of ``per_block``, ``received``, ``shared`` is set."""

    name: str
    doc: str
    """What the bytes are (one line, as docs/cost-model.md lists it)."""
    part: Part
    when: When
    per_block: Callable[[BlockCosts, CostModel], Floats] | None = None
    """Bytes of each block, summed over the stage's blocks."""
    received: Callable[[BlockCosts], tuple[Floats, float]] | None = None
    """(bytes crossing the boundary after each block, bytes of the model's input): what a stage receives."""
    shared: Callable[[BlockCosts, CostModel], Ties] | None = None
    """Tied parameters: a copy on every stage that uses one but not its owner."""

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.per_block, self.received, self.shared)) != 1:
            raise AutopartError(f"memory term {self.name!r} needs exactly one of per_block, received, shared")
        if self.part not in PART_SCALE or self.when not in ("always", "plain", "recompute"):
            raise AutopartError(f"memory term {self.name!r}: unknown part {self.part!r} or when {self.when!r}")

    @property
    def scale(self) -> Literal["once", "in_flight"]:
        """Once per stage, or once per in-flight micro-batch."""
        return PART_SCALE[self.part]

    def applies(self, recompute: bool) -> bool:
        """Is the term counted on a stage that does (or does not) recompute?"""
        return self.when == "always" or self.when == ("recompute" if recompute else "plain")


def _weights(b: BlockCosts, m: CostModel) -> Floats:
    out: Floats = b.param_bytes * (2 + m.optimizer_states)
    return out


def _activations(b: BlockCosts, m: CostModel) -> Floats:
    return b.activation_bytes


def _skips(b: BlockCosts) -> tuple[Floats, float]:
    return (b.skip_bytes if b.skip_bytes is not None else np.zeros(b.n)), 0.0


def _crossing(b: BlockCosts) -> tuple[Floats, float]:
    out: Floats = b.output_bytes + _skips(b)[0]
    return out, b.input_bytes


def _tied_copies(b: BlockCosts, m: CostModel) -> Ties:
    return tuple((size * (2 + m.optimizer_states), users) for size, users in b.ties)


MEMORY_TERMS: tuple[MemoryTerm, ...] = (
    MemoryTerm("weights", "parameters, their gradients and the optimizer's state: param_bytes × (2 + optimizer_states)",
               "static_bytes", "always", per_block=_weights),
    MemoryTerm("tied copies", "a copy of each shared parameter (with gradient and optimizer state) on every "
               "stage that uses it but does not hold its owner", "static_bytes", "always", shared=_tied_copies),
    MemoryTerm("activations", "what autograd saves for one micro-batch's backward", "activation_bytes", "plain",
               per_block=_activations),
    MemoryTerm("received skips", "skips crossing into the stage (graph models), held until the micro-batch's "
               "backward", "activation_bytes", "plain", received=_skips),
    MemoryTerm("kept input", "a recomputing stage's whole input (output and skips received, or the model's "
               "input on stage 0)", "activation_bytes", "recompute", received=_crossing),
    MemoryTerm("recomputed activations", "one micro-batch's activations, recomputed during its backward",
               "backward_extra_bytes", "recompute", per_block=_activations),
)
"""The terms, in the order they are summed."""

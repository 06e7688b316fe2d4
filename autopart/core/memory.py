"""Every term of a stage's memory, in one table: :data:`MEMORY_TERMS` (docs/cost-model.md, "Memory").

A stage's bytes are the terms that apply to it, each read from the blocks one
of five ways:

- ``per_block``: per-block bytes, summed over the stage's blocks (prefix sums);
- ``received``: what crosses into the stage per micro-batch (the boundary
  before its first block, or the model's input on the first stage);
- ``sent``: what leaves the stage per micro-batch (the boundary after its
  last block, or the model's output on the last stage);
- ``shared``: tied parameters, a copy on every stage that uses one but does
  not hold its owner;
- ``largest``: per-block bytes, the largest over the stage's blocks (a
  transient that holds one tensor at a time: one parameter's gradient).

and counted where the term's ``when`` says (``always``, ``plain``: only
without recomputation, ``recompute``: only when recomputing), times its
``scale`` (once, per in-flight micro-batch, per micro-batch of the step, per
micro-batch not in flight), into the :class:`StageCost` field its ``part``
names (:data:`PART_SCALE`). The fields add up as :data:`PHASE` says: what is held
throughout, plus the larger of what the backward phase holds and what the
optimizer step does (the step runs after the last backward freed the
activations).
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

__all__ = ["MemoryTerm", "MEMORY_TERMS", "PART_SCALE", "PHASE", "Part", "When", "Scale", "Ties",
           "optimizer_step_copies"]

Floats = npt.NDArray[np.float64]
Part = Literal["static_bytes", "activation_bytes", "backward_extra_bytes", "runtime_bytes", "optimizer_step_bytes"]
"""The :class:`~autopart.formats.stage.StageCost` field a term adds to."""
When = Literal["always", "plain", "recompute"]
Scale = Literal["once", "in_flight", "microbatches", "not_in_flight"]
"""How often a stage holds a term's bytes: once, per in-flight micro-batch (the schedule's peak), per
micro-batch of the step (M), or per micro-batch not in flight at the peak (M − in-flight)."""
Ties = tuple[tuple[float, tuple[int, ...]], ...]
"""Shared parameters: (bytes of each copy, the blocks that use it, owner first)."""

PART_SCALE: Mapping[str, Literal["once", "in_flight"]] = MappingProxyType({
    "static_bytes": "once",             # always resident
    "activation_bytes": "in_flight",    # held per in-flight micro-batch until its backward
    "backward_extra_bytes": "once",     # held during one backward
    "runtime_bytes": "once",            # the pipelining runtime's buffers for the step, all micro-batches
    "optimizer_step_bytes": "once",     # held during the optimizer step
})
"""How each ``StageCost`` memory field adds into ``memory_bytes``:
``memory = static + in_flight × activation + backward_extra + runtime``. A field added once holds its
terms already scaled (``runtime_bytes``: M × a receive buffer); ``activation_bytes`` holds one
micro-batch's."""

PHASE: Mapping[str, Literal["held", "backward", "step"]] = MappingProxyType({
    "static_bytes": "held", "runtime_bytes": "held",
    "activation_bytes": "backward", "backward_extra_bytes": "backward",
    "optimizer_step_bytes": "step",
})
"""When each field's bytes are live: ``held`` throughout the step; ``backward`` while micro-batches are in
flight; ``step`` during the optimizer step, after the last backward. A stage's peak:
``memory = static + runtime + max(in_flight × activation + backward_extra, optimizer_step)``."""


@dataclass(frozen=True)
class MemoryTerm:
    """One named term of a stage's memory. Exactly one of ``per_block``, ``received``, ``sent``, ``shared``
    is set."""

    name: str
    doc: str
    """What the bytes are (one line, as docs/cost-model.md lists it)."""
    part: Part
    when: When
    scale: Scale = "once"
    per_block: Callable[[BlockCosts, CostModel], Floats] | None = None
    """Bytes of each block, summed over the stage's blocks."""
    received: Callable[[BlockCosts], tuple[Floats, float]] | None = None
    """(bytes crossing the boundary after each block, bytes at the model's input): what a stage receives."""
    sent: Callable[[BlockCosts], tuple[Floats, float]] | None = None
    """(bytes crossing the boundary after each block, bytes at the model's output): what a stage sends on
    (or, on the last stage, its output)."""
    shared: Callable[[BlockCosts, CostModel], Ties] | None = None
    """Tied parameters: a copy on every stage that uses one but not its owner."""
    largest: Callable[[BlockCosts, CostModel], Floats] | None = None
    """Bytes of each block, the largest over the stage's blocks (one tensor at a time)."""

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.per_block, self.received, self.sent, self.shared, self.largest)) != 1:
            raise AutopartError(f"memory term {self.name!r} needs exactly one of per_block, received, sent, "
                                "shared, largest")
        if self.part not in PART_SCALE or self.when not in ("always", "plain", "recompute"):
            raise AutopartError(f"memory term {self.name!r}: unknown part {self.part!r} or when {self.when!r}")
        if (self.scale == "in_flight") != (PART_SCALE[self.part] == "in_flight"):
            raise AutopartError(f"memory term {self.name!r}: {self.part} terms scale "
                                f"{'per in-flight micro-batch' if PART_SCALE[self.part] == 'in_flight' else 'otherwise'}")

    def applies(self, recompute: bool) -> bool:
        """Is the term counted on a stage that does (or does not) recompute?"""
        return self.when == "always" or self.when == ("recompute" if recompute else "plain")


def _weights(b: BlockCosts, m: CostModel) -> Floats:
    out: Floats = b.param_bytes * (2 + m.optimizer_states)
    return out


def _activations(b: BlockCosts, m: CostModel) -> Floats:
    return b.activation_bytes


def _recomputed(b: BlockCosts, m: CostModel) -> Floats:
    if b.loss_activation_bytes is None:
        return b.activation_bytes
    out: Floats = b.activation_bytes - b.loss_activation_bytes
    return out


def _loss_activations(b: BlockCosts, m: CostModel) -> Floats:
    return b.loss_activation_bytes if b.loss_activation_bytes is not None else np.zeros(b.n)


def _skips(b: BlockCosts) -> tuple[Floats, float]:
    return (b.skip_bytes if b.skip_bytes is not None else np.zeros(b.n)), 0.0


def _crossing_in(b: BlockCosts) -> tuple[Floats, float]:
    out: Floats = b.output_bytes + _skips(b)[0]
    return out, b.input_bytes


def _crossing_grad(b: BlockCosts) -> tuple[Floats, float]:
    """The gradient of what crosses a cut, in either direction; none at the model's ends (its input needs no
    gradient, and the last stage receives none)."""
    return _crossing_in(b)[0], 0.0


def _crossing_out(b: BlockCosts) -> tuple[Floats, float]:
    return _crossing_in(b)[0], b.model_output_bytes


def _output_saved(b: BlockCosts) -> tuple[Floats, float]:
    """(the part of each block's output it saved itself, the same of the model's output): 0 when not recorded."""
    if b.output_saved_bytes is None:
        return np.zeros(b.n), 0.0
    return b.output_saved_bytes, b.model_output_saved_bytes


def _held_output(b: BlockCosts) -> tuple[Floats, float]:
    """The stage's output less what its last block saved itself (in the activations, or ``saved output``)."""
    crossing, model_output = _crossing_out(b)
    saved, model_saved = _output_saved(b)
    out: Floats = crossing - saved
    return out, model_output - model_saved


def _received_saved(b: BlockCosts) -> tuple[Floats, float]:
    """What a stage receives that the block before it saved itself (the model's input: none before it)."""
    return _output_saved(b)[0], 0.0


def _loss_gradient(b: BlockCosts) -> tuple[Floats, float]:
    """The loss's gradient of its own input beside the model output's gradient: the size of the model's output
    when the loss works in its dtype (fp32); when the loss works in a wider one (cross-entropy under autocast
    keeps float32 log-probabilities of bfloat16 logits), two of the loss's saved tensors less the output's
    gradient counted beside it (``output gradient``): 2 x 128 - 64 MiB for 64 MiB of bfloat16 logits."""
    if b.loss_activation_bytes is None:
        return np.zeros(b.n), b.model_output_bytes
    loss_bytes = float(b.loss_activation_bytes.sum())  # one block holds the loss: any order of the blocks
    return np.zeros(b.n), max(b.model_output_bytes, 2.0 * loss_bytes - b.model_output_bytes)


def _tied_copies(b: BlockCosts, m: CostModel) -> Ties:
    return tuple((size * (2 + m.optimizer_states), users) for size, users in b.ties)


OPTIMIZER_STEP_COPIES: Mapping[str, tuple[float, float]] = MappingProxyType({
    "adamw": (2.0, 1.0), "adam": (2.0, 1.0), "sgd-momentum": (0.0, 0.0), "sgd": (0.0, 0.0),
})
"""Per optimizer: (copies of the largest parameter tensor a per-tensor step holds, copies of all the stage's
parameters a foreach step holds). torch/optim/adam.py: ``_single_tensor_adam`` makes
``exp_avg_sq.sqrt()`` and its quotient by the bias correction (two tensors of the parameter's size, one
parameter at a time); ``_multi_tensor_adam`` makes ``_foreach_mul(grads, 1 - beta2)``, frees it, then
``_foreach_sqrt(exp_avg_sqs)`` (one copy of every parameter at once). SGD (momentum or not, no weight
decay) updates in place."""


def optimizer_step_copies(m: CostModel, foreach: bool) -> float:
    """How many copies the optimizer step's temporaries hold: of the largest parameter tensor (per-tensor
    step, torch's default on CPU) or of all the stage's parameters (``foreach``, its default on CUDA)."""
    per_tensor, all_params = OPTIMIZER_STEP_COPIES.get(m.optimizer, OPTIMIZER_STEP_COPIES["adamw"])
    return all_params if foreach else per_tensor


def _largest_param(b: BlockCosts, m: CostModel) -> Floats:
    return b.largest_param_bytes if b.largest_param_bytes is not None else np.zeros(b.n)


def _step_per_tensor(b: BlockCosts, m: CostModel) -> Floats:
    copies = 0.0 if b.foreach_optimizer else optimizer_step_copies(m, False)
    out: Floats = copies * _largest_param(b, m)
    return out


def _step_foreach(b: BlockCosts, m: CostModel) -> Floats:
    out: Floats = (optimizer_step_copies(m, True) if b.foreach_optimizer else 0.0) * b.param_bytes
    return out


MEMORY_TERMS: tuple[MemoryTerm, ...] = (
    MemoryTerm("weights", "parameters, their gradients and the optimizer's state: param_bytes × (2 + optimizer_states)",
               "static_bytes", "always", per_block=_weights),
    MemoryTerm("tied copies", "a copy of each shared parameter (with gradient and optimizer state) on every "
               "stage that uses it but does not hold its owner", "static_bytes", "always", shared=_tied_copies),
    MemoryTerm("activations", "what autograd saves for one micro-batch's backward (the first block's saved "
               "input is the micro-batch's receive buffer)", "activation_bytes", "plain", "in_flight",
               per_block=_activations),
    MemoryTerm("received skips", "skips crossing into the stage (graph models), held until the micro-batch's "
               "backward", "activation_bytes", "plain", "in_flight", received=_skips),
    MemoryTerm("kept input", "a recomputing stage's whole input (output and skips received, or the model's "
               "input on stage 0): the micro-batch's receive buffer", "activation_bytes", "recompute", "in_flight",
               received=_crossing_in),
    MemoryTerm("held output", "the stage's output, kept by the runtime's forward cache until the micro-batch's "
               "backward (on the last stage the model's output: an LM's logits), less what its last block saved "
               "itself (in the activations)", "activation_bytes", "always", "in_flight", sent=_held_output),
    MemoryTerm("saved output", "on a recomputing stage, the part of its output its last block saves itself "
               "(a ReLU's): held by the forward cache, as the checkpoint saves no activation",
               "activation_bytes", "recompute", "in_flight", sent=_output_saved),
    MemoryTerm("received saved input", "the receive buffer of an input the block before saved itself (a "
               "ReLU's output): the profile charged it to that block, not to the stage's first",
               "activation_bytes", "plain", "in_flight", received=_received_saved),
    MemoryTerm("loss activations", "what the loss saves (cross-entropy: its log-softmax): the loss runs "
               "outside a recomputed stage, so it is held per in-flight micro-batch", "activation_bytes",
               "recompute", "in_flight", per_block=_loss_activations),
    MemoryTerm("recomputed activations", "one micro-batch's activations, recomputed during its backward "
               "(the loss's aside)", "backward_extra_bytes", "recompute", per_block=_recomputed),
    MemoryTerm("output gradient", "the gradient of the stage's output during one backward (on the last "
               "stage the loss's gradient of the model's output)", "backward_extra_bytes", "always",
               sent=_crossing_out),
    MemoryTerm("input gradient", "the gradient of the stage's input, made by one backward and sent back",
               "backward_extra_bytes", "always", received=_crossing_grad),
    MemoryTerm("loss working set", "the loss's own gradient of the model's output (cross-entropy: the "
               "log-softmax's), beside the output's, on the last stage, in the loss's dtype (float32 under "
               "autocast)", "backward_extra_bytes", "always",
               sent=_loss_gradient),
    MemoryTerm("receive buffers", "the runtime's receive buffer of every micro-batch of the step not in flight "
               "at the peak (those in flight are the saved or kept input); on stage 0 the step's batch",
               "runtime_bytes", "always", "not_in_flight", received=_crossing_in),
    MemoryTerm("gradient receive buffers", "the runtime's buffer for the gradient of the stage's output, one "
               "per micro-batch of the step (none on the last stage)", "runtime_bytes", "always", "microbatches",
               sent=_crossing_grad),
    MemoryTerm("parameter gradient", "one parameter's gradient, made in full by the backward before it is "
               "added into the kept .grad: the stage's largest parameter tensor", "backward_extra_bytes", "always",
               largest=_largest_param),
    MemoryTerm("optimizer temporaries (per tensor)", "a per-tensor optimizer step (torch's default on CPU): "
               "AdamW's sqrt and quotient of the largest parameter tensor, 2 copies", "optimizer_step_bytes",
               "always", largest=_step_per_tensor),
    MemoryTerm("optimizer temporaries (foreach)", "a foreach optimizer step (torch's default on CUDA): AdamW's "
               "one copy of every parameter of the stage", "optimizer_step_bytes", "always",
               per_block=_step_foreach),
)
"""The terms, in the order they are summed."""

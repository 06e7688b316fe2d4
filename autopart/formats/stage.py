"""What one pipeline stage costs: the one type the cost model answers, a plan saves and the simulator runs.

    cost = problem.stage(s, first, last)      # the cost model's answer (autopart.core.costmodel)
    plan.stages[s].cost                       # the same object, saved in the plan
    simulate(schedule, [st.cost for st in plan.stages])

Pure data (standard library only).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from autopart.formats.jsonfields import Fields
from autopart.formats.record import read_record, saved, write_record

__all__ = ["StageCost"]


@dataclass(frozen=True)
class StageCost:
    """One (virtual) stage on its device, per micro-batch unless a field says otherwise."""

    forward_ms: float = field(metadata=saved(absent=0.0))
    """Forward of one micro-batch on this stage's device."""
    backward_ms: float = field(metadata=saved(absent=0.0))
    """Full backward (input and weight gradients) of one micro-batch, the recomputed forward included."""
    send_forward_ms: float = 0.0
    """Sending the output to the next stage (charged when that stage is on another rank)."""
    send_backward_ms: float = 0.0
    """Sending the input's gradient to the previous stage (charged when it is on another rank)."""
    activation_bytes: int = 0
    """Kept per in-flight micro-batch (only the stage's input when recomputing)."""
    static_bytes: int = 0
    """Parameters, gradients and optimizer state: always resident."""
    backward_extra_bytes: int = 0
    """Held during a backward only: the recomputed activations, the gradients of the stage's input and
    output (and the loss's, on the last stage), one parameter's gradient before it is added into ``.grad``."""
    runtime_bytes: int = field(default=0, metadata=saved(omit=(0,)))
    """Held by the pipelining runtime for the whole step, all micro-batches together: receive buffers of
    the micro-batches not in flight, gradient receive buffers (0 in plans from before it was counted)."""
    optimizer_step_bytes: int = field(default=0, metadata=saved(omit=(0,)))
    """Held during the optimizer step only, after the step's last backward has freed the activations: the
    step's temporaries (0 in plans from before they were counted). ``memory_bytes`` counts the larger of
    this and the backward's ``in_flight × activation_bytes + backward_extra_bytes``."""
    optimizer_ms: float = 0.0
    """The optimizer step over the stage's parameters: once per training step, not per micro-batch."""
    overhead_ms: float = 0.0
    """The runtime's own time around each forward or backward action here: its sends' and receives' calls
    and its bookkeeping, which no block profile holds: the profile's measured ``action_ms``, or ``--overhead``
    (the report's ``unexplained_ms`` of a training run)."""
    loss_ms: float = field(default=0.0, metadata=saved(omit=(0.0,)))
    """Last stage: the loss's forward and backward per micro-batch, already in ``forward_ms`` and
    ``backward_ms`` (shown apart; 0 on the other stages and in plans from before it was measured)."""
    tie_ms: tuple[tuple[str, float], ...] = field(default=(), metadata=saved(omit=((),)))
    """Tied parameters this stage holds a copy of, by the blocks that share them (``"wte,lm_head"``): the ring
    all-reduce of its gradient among the ranks holding copies, once per step after their last backwards
    (0 when one rank holds every copy), written as a JSON object; empty: no tie crosses ranks."""
    memory_bytes: int = field(default=0, metadata=saved(required=True))
    """Peak bytes under the schedule's in-flight micro-batches, as the cost model counts them."""
    recompute: bool = False
    """Activation recomputation on: the only way this stage fits its memory."""
    input_grad_ms: float | None = field(default=None, metadata=saved(omit=(None,)))
    """The input's gradient alone: a zero-bubble schedule's ``I``. None: not measured, the simulator assumes
    half of ``backward_ms``."""
    weight_grad_ms: float | None = field(default=None, metadata=saved(omit=(None,)))
    """The weights' gradients after it: a zero-bubble schedule's ``W``, as torch runs it (``I`` and ``W``
    together take longer than ``backward_ms``, the backward in one call). None: not measured (plans from
    before it was), the simulator takes the rest of ``backward_ms``."""

    @property
    def compute_ms(self) -> float:
        """Forward plus backward of one micro-batch (recomputation included)."""
        return self.forward_ms + self.backward_ms

    @property
    def send_ms(self) -> float:
        """Both sends of one micro-batch."""
        return self.send_forward_ms + self.send_backward_ms

    @property
    def time_ms(self) -> float:
        """What the stage costs per micro-batch: compute and sends (the partitioner's objective)."""
        return self.compute_ms + self.send_ms

    def to_dict(self) -> dict[str, Any]:
        """The saved fields, plus ``time_ms``, ``compute_ms`` and ``send_ms`` for readers of the file."""
        data: dict[str, Any] = {"time_ms": self.time_ms, "compute_ms": self.compute_ms, "send_ms": self.send_ms}
        data.update(write_record(self))
        return data

    @staticmethod
    def from_fields(f: Fields) -> "StageCost":
        """Read the fields :meth:`to_dict` writes (``time_ms`` and ``memory_bytes`` required, the rest optional)."""
        f.number("time_ms")  # derived on reading, but a plan without it is not one autopart wrote
        return read_record(StageCost, f)

"""How training runs, as the cost model sees it: schedule, micro-batches, optimizer, sends, recomputation.

    CostModel(schedule="GPipe", microbatches=8, optimizer="adamw")

Pure (no numpy arrays, no torch). Everything about training that changes a
stage's time or memory except the blocks (:mod:`autopart.core.blocks`);
:mod:`autopart.core.costmodel` prices a stage from both.
"""
from __future__ import annotations

from dataclasses import dataclass

from autopart.core.schedules import peak_in_flight
from autopart.errors import AutopartError
from autopart.formats.optimizers import DEFAULT_OPTIMIZER, OPTIMIZER_STATES, check_optimizer
from autopart.formats.schedule_kinds import canonical_schedule, check_microbatches

__all__ = ["CostModel"]


@dataclass(frozen=True)
class CostModel:
    """Everything about training that changes a stage's time or memory, except the blocks."""

    schedule: str = "1F1B"
    """A torch.distributed.pipelining schedule name (GPipe, 1F1B, Interleaved1F1B,
    ZBVZeroBubble; any case): how many micro-batches a stage holds activations for."""
    microbatches: int = 1
    optimizer: str = DEFAULT_OPTIMIZER
    """Whose step time each rank pays after its last backward, and whose state each parameter carries
    (a key of :data:`~autopart.formats.optimizers.OPTIMIZER_STATES`)."""
    bandwidth_bytes_per_ms: float | None = None
    """Link bandwidth between neighbouring stages; None with latency 0 means free sends."""
    latency_ms: float = 0.0
    recompute: bool = True
    """Allow activation recomputation on stages that do not fit otherwise."""
    stages_per_rank: int = 1
    """Virtual stages per rank (Interleaved1F1B: any, ZBVZeroBubble: 2)."""
    overhead_ms: float | None = None
    """The runtime's own time around each forward or backward action (:attr:`StageCost.overhead_ms`); None: the
    profile's measured ``action_ms`` (:meth:`Problem.from_profile`; 0 without a profile). A number, even 0, is used
    as given."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", canonical_schedule(self.schedule))
        check_microbatches(self.microbatches)
        check_optimizer(self.optimizer)
        if self.bandwidth_bytes_per_ms is not None and not self.bandwidth_bytes_per_ms > 0:
            raise AutopartError(f"bandwidth must be > 0, got {self.bandwidth_bytes_per_ms}")
        if not self.latency_ms >= 0:
            raise AutopartError(f"latency must be >= 0, got {self.latency_ms}")
        if self.overhead_ms is not None and not 0 <= self.overhead_ms < 1e9:
            raise AutopartError(f"overhead must be >= 0 ms (and finite), got {self.overhead_ms}")

    @property
    def optimizer_states(self) -> int:
        """Copies of the parameters the optimizer keeps: 2 for Adam, 1 SGD+momentum, 0 SGD (from the table)."""
        return OPTIMIZER_STATES[self.optimizer]

    @property
    def sends(self) -> bool:
        return self.bandwidth_bytes_per_ms is not None or self.latency_ms > 0

    def in_flight(self, stage: int, num_stages: int) -> int:
        """Micro-batches whose activations stage ``stage`` holds at its peak.

        M under GPipe, min(M, K - s) under 1F1B; for the interleaved and
        zero-bubble schedules, what the simulator counts on equal stages.
        """
        if self.schedule == "GPipe":
            return self.microbatches
        if self.schedule == "1F1B":
            return min(self.microbatches, num_stages - stage)
        if num_stages % self.stages_per_rank:
            raise AutopartError(f"{num_stages} stages do not divide into {self.stages_per_rank} per rank")
        return peak_in_flight(self.schedule, num_stages // self.stages_per_rank, self.microbatches,
                              self.stages_per_rank)[stage]



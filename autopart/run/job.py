"""One rank's training job, once set up: what the loop, checkpoints and the report share."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from autopart.core.simulate import Event
from autopart.formats.plan import Plan
from autopart.run.config import TrainConfig
from autopart.run.data import TrainingData
from autopart.run.replicas import Replicas
from autopart.run.stages import Pipeline

__all__ = ["Job", "StepLog"]


@dataclass(frozen=True)
class Job:
    cfg: TrainConfig
    plan: Plan
    rank: int
    """This rank's place in its replica's pipeline (the global rank with one replica)."""
    world: int
    """Processes in the run: every replica's ranks."""
    device: torch.device
    pipe: Pipeline
    """This rank's stages and the schedule that drives them."""
    optimizer: torch.optim.Optimizer
    data: TrainingData
    global_batch: int
    """Samples per step, every replica's together."""
    microbatch_size: int
    start_step: int
    """Steps a resumed run had already done (0 for a fresh one)."""
    replicas: Replicas
    """Where this rank is in the data-parallel x pipeline grid (one replica: replica 0, no groups)."""

    @property
    def has_last(self) -> bool:
        """This rank holds the last stage: it has its replica's losses."""
        return self.plan.num_stages - 1 in self.plan.stages_of(self.rank)

    @property
    def reporter(self) -> bool:
        """Replica 0's rank that holds the last stage: it has the losses (averaged over replicas), and it prints."""
        return self.has_last and self.replicas.leader


@dataclass
class StepLog:
    """What the loop measured, one entry per step run here."""

    step_ms: list[float] = field(default_factory=list)
    """Wall time of each step on this rank, from a barrier to its optimizer step's end."""
    losses: list[float] = field(default_factory=list)
    """Mean loss over the step's micro-batches (on the reporting rank only)."""
    timelines: list[tuple[Event, ...]] = field(default_factory=list)
    """Each step's actions on this rank, timed where they ran (:mod:`autopart.run.timeline`)."""
    eval_losses: list[dict[str, float]] = field(default_factory=list)
    """``--eval-every``: ``{"step": N, "loss": L}`` after each evaluation (on the reporting rank only)."""

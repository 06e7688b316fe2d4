"""What ``autopart train`` measured against what its plan predicted: the ``--report`` JSON (pure data).

:func:`autopart.run.report.make_report` fills it in on the rank holding the
last stage; :func:`autopart.render.report.report_lines` shows it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

__all__ = ["Report", "StageRow", "RankRow", "TermRow", "TERMS"]

TERMS = ("compute", "loss", "action cost", "sends", "tie sum", "all-reduce", "optimizer", "rest")
"""The terms of a step on one rank, in the report's order (docs/train.md, "The terms of the step")."""


@dataclass(frozen=True)
class StageRow:
    stage: int
    rank: int
    blocks: int
    predicted_forward_ms: float | None
    """None when the run's micro-batch size differs from the plan's."""
    predicted_backward_ms: float | None
    measured_forward_ms: float
    """Median over the steady steps' micro-batches, timed inside the pipeline."""
    measured_backward_ms: float
    """Full backward, or its input- and weight-gradient halves added."""
    error: float | None
    """Measured forward + backward over predicted, minus 1."""


@dataclass(frozen=True)
class RankRow:
    rank: int
    predicted_busy_ms: float | None
    predicted_idle_ms: float | None
    measured_compute_ms: float
    """Forwards and backwards in one step (median over the steady steps)."""
    measured_optimizer_ms: float
    measured_wait_ms: float
    """The rest of the slowest rank's step: waiting for sends and receives, the runtime's own work, idle."""
    measured_finish_ms: float
    """When this rank's optimizer step ended."""
    memory_planned_bytes: int
    """The plan's ``memory_bytes`` summed over this rank's stages."""
    memory_measured_bytes: int | None
    """The most this rank held at once in the training steps (from the first on), over what it held before
    the model was built (docs/train.md, Memory); None where it could not be measured."""
    memory_reserved_bytes: int | None
    """CUDA: the caching allocator's reserved peak over the same baseline; None on CPU."""
    memory_ratio: float | None
    """Measured over planned (None when either is missing or nothing was planned)."""
    build_peak_bytes: int | None = None
    """The most this rank held at once while it built its stages, over the same baseline (each rank builds only
    its own stages: about their bytes, not the model's); None where it could not be measured."""


@dataclass(frozen=True)
class TermRow:
    """One term of the step on the slowest rank: predicted and measured time and share of the step."""

    term: str
    """One of :data:`TERMS`: compute (the blocks' forwards and backwards), loss (its forward and backward on the
    last stage), action cost (the runtime's per action), sends, tie sum (tied gradients summed between the ranks
    holding copies), all-reduce (the gradients' average over the data-parallel replicas: the plan's exposed
    ``allreduce_ms`` and the timed ``AR``; a row only with several replicas), optimizer, rest (idle: the bubble and
    waiting)."""
    predicted_ms: float | None
    """In the plan's simulated step on that rank (None when the run's micro-batch size is not the plan's)."""
    measured_ms: float | None
    """Median over the steady steps; None where the run does not time the term apart: the loss (the last stage's
    forward action is timed with it, its backward action holds the loss's backward) and the runtime's work inside
    an action are in ``compute`` (the actions as timed), the sends and the runtime's work between actions in
    ``rest``."""
    predicted_share: float | None
    """Of the predicted step (the simulated step plus the exposed all-reduce: ``Report.predicted_step_ms``)."""
    measured_share: float | None
    """Of the measured step."""


@dataclass(frozen=True)
class Report:
    plan: str
    model: str
    schedule: str
    microbatches: int
    microbatch_size: int
    global_batch: int
    ranks: int
    steps: int
    losses: list[float]
    step_ms: list[float]
    """Each step's slowest rank."""
    measured_step_ms: float
    """Median over the steady steps of the slowest rank's step."""
    measured_step_spread_ms: tuple[float, float]
    """The fastest and slowest of those steps."""
    steady_steps: int
    slowest_rank: int
    """The rank that finished last most often."""
    predicted_step_ms: float | None
    predicted_bubble_fraction: float
    step_error: float | None
    simulated_with_measured_stages_ms: float
    """The plan's schedule replayed with the stage times measured in the pipeline."""
    measured_speed: float | None
    """The profile's compute over the compute measured in the pipeline (the actions as timed, less the plan's
    ``overhead_ms`` for each of them, which the plan prices apart), summed over the stages: the device speed that
    makes the plan's compute match this run's (``--devices 2xcpu@SPEED``); None when the run's micro-batch size
    differs from the plan's."""
    fitted_overhead_ms: float
    """The runtime's own time per forward or backward action that makes that replay, without the tie sums, take
    the measured step (0 when the replay is already slower): what reports before the measured terms gave (see
    ``unexplained_ms``)."""
    throughput_per_s: float | None
    throughput_unit: str
    memory_method: str
    """How each rank's memory was measured (or why it was not)."""
    stages: list[StageRow]
    ranks_detail: list[RankRow]
    eval_losses: list[dict[str, float]] = dataclasses.field(default_factory=list)
    """``--eval-every``: the held-out loss after each evaluation, ``{"step": N, "loss": L}``."""
    data_parallel: int = 1
    """Replicas of the pipeline: ``ranks`` and every ``rank`` field are one replica's pipeline ranks (replica 0's
    times; memory the most any replica's rank at that pipeline rank used), the losses the mean over replicas."""
    terms: list[TermRow] = dataclasses.field(default_factory=list)
    """The step's terms on ``slowest_rank``, predicted and measured (:class:`TermRow`)."""
    action_ms: float = 0.0
    """The plan's runtime cost per forward or backward action (``overhead_ms``: the profile's measured
    ``action_ms`` or ``--overhead``)."""
    unexplained_ms: float = 0.0
    """What the measured terms leave unexplained, per forward or backward action: the time per action that makes
    the replay with the measured stage times and the predicted tie sums take the measured step (0 when the
    replay is already slower). ``--overhead`` of ``action_ms`` + this predicts this machine as it ran."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

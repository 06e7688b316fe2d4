"""What ``autopart train`` was asked to do: one frozen record, passed from the command line to every rank."""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    plan: str
    """Plan JSON written by ``autopart partition``."""
    model: str
    """Model spec: built-in name, pkg.mod:factory or file.py:factory."""
    steps: int = 10
    """Training steps in all, counting those a resumed run already did."""
    global_batch: int | None = None
    """Samples per step; default: the plan's micro-batch size x its micro-batches."""
    lr: float = 1e-3
    """Learning rate of the optimizer the plan names (AdamW unless partition said otherwise); 0: a check run
    that leaves the weights as they are."""
    data: str | None = None
    """Text file or folder for the GPT built-ins (default: the Python standard library's sources)."""
    checkpoint: str | None = None
    """Folder for per-stage checkpoints; a run resumes from its latest complete step."""
    checkpoint_every: int = 0
    """Save every N steps (0: only at the end, when ``checkpoint`` is given)."""
    seed: int = 0
    """Seed for the weights and the data order."""
    threads: int | None = None
    """CPU threads per rank (default: cores / ranks)."""
    report: str | None = None
    """Where to write measured-against-predicted as JSON."""
    trace: str | None = None
    """Where to write the measured and predicted step as Chrome trace JSON."""
    svg: str | None = None
    """Where to draw the predicted step above the measured one."""
    replan: str | None = None
    """Where to write the plan that re-profiling the blocks where they ran suggests."""
    device: str = "auto"
    """auto, cpu or cuda."""
    timeout_s: float = 300.0
    """How long a rank waits for a peer before giving up."""
    max_restarts: int = 0
    """Times autopart's launcher starts the group again after a rank fails (resuming from ``checkpoint``)."""
    weights: str | None = None
    """Weights to start from (:mod:`autopart.run.weights`: safetensors file or folder, torch.save state dict,
    autopart checkpoint); an ``hf:PATH`` model's folder unless given; None: the model's own initialisation."""
    batchnorm: str | None = None
    """deferred or micro (:mod:`autopart.measure.batchnorm`); None: the plan's, else deferred."""
    eval_every: int = 0
    """Every N steps (and after the last), the loss on held-out data, forward only (0: never)."""
    eval_batches: int = 2
    """Global batches of the held-out split each evaluation runs."""

"""A pipeline's state into a checkpoint and back: this rank's stages and its optimizer.

The files and their layout are :mod:`autopart.run.checkpoint`'s; this module
knows which stages a rank holds and when the optimizer state can come along
(only when the plan, and so each rank's parameters, is the same).
"""
from __future__ import annotations

import torch

from autopart.errors import AutopartError
from autopart.run.checkpoint import StageFile, latest_complete_step, save_stage
from autopart.run.log import say
from autopart.run.stages import Pipeline

__all__ = ["save_pipeline", "restore_pipeline", "run_complete"]


def run_complete(checkpoint: str | None, steps: int) -> str | None:
    """Why there is nothing to train: the latest complete checkpoint is at or past ``steps`` (a rerun of a
    finished job, or a restart after its final checkpoint); None when there are steps left."""
    done = latest_complete_step(checkpoint) if checkpoint else None
    if done is None or done < steps:
        return None
    return (f"the run is complete: checkpoint {checkpoint} has step {done}, --steps {steps}; nothing to train "
            f"(raise --steps to continue)")


def save_pipeline(pipe: Pipeline, optimizer: torch.optim.Optimizer, root: str, step: int, rank: int) -> None:
    """Write this rank's stage files for ``step`` (the optimizer state, and fp16-mixed's scaler, go with its first
    stage)."""
    ours = [s for s, _ in pipe.modules]
    scaler = pipe.scaler.state_dict() if pipe.scaler is not None else None
    for i, (s, module) in enumerate(pipe.modules):
        save_stage(root, step, s, module.state_dict(), optimizer.state_dict() if i == 0 else None, rank, ours,
                   pipe.shared.aliases, scaler if i == 0 else None)


def restore_pipeline(pipe: Pipeline, optimizer: torch.optim.Optimizer, stages: list[StageFile],
                     reporter: bool) -> None:
    """Load weights by name from every saved stage (so a different plan can resume), and the optimizer
    state when this rank held the same stages."""
    merged: dict[str, torch.Tensor] = {}
    for stage in stages:
        for k, v in stage["model"].items():
            merged.setdefault(k, v)
    for s, module in pipe.modules:
        wanted = module.state_dict().keys()
        missing = [k for k in wanted if k not in merged]
        if missing:
            raise AutopartError(f"checkpoint lacks {missing[0]} (and {len(missing) - 1} more) for stage {s}")
        module.load_state_dict({k: merged[k] for k in wanted})
    ours = [s for s, _ in pipe.modules]
    first = stages[ours[0]] if ours[0] < len(stages) else None
    same_plan = first is not None and first["local_stages"] == ours and len(stages) == pipe.plan.num_stages
    scalers = [state for stage in stages if (state := stage.get("scaler"))]
    if pipe.scaler is not None and scalers:  # every rank saved the same scale: any stage's will do
        pipe.scaler.load_state_dict(scalers[0])
    if same_plan and first is not None and first["optimizer"] is not None:
        optimizer.load_state_dict(first["optimizer"])
    elif reporter:
        say("warning: the plan changed since the checkpoint; weights restored, optimizer state starts fresh")

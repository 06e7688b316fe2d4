"""Checkpoints of a pipelined run: one file per stage, written atomically, merged back by name.

Layout: ``DIR/step-000010/stage-3.pt`` holds stage 3's parameters and buffers
under the unpartitioned model's own names, its optimizer state and the step;
``DIR/step-000010/COMPLETE`` is written last, by rank 0, once every rank has
written its stages, so a step folder without it is ignored (a run that died
while saving leaves the previous checkpoint in charge).

    state = merge_checkpoint("ckpt")        # the latest complete step
    model.load_state_dict(state)            # the original, unpartitioned model
"""
from __future__ import annotations

import io
import json
import re
import time
from pathlib import Path
from typing import Any, TypedDict

import torch

from autopart.errors import AutopartError
from autopart.formats.atomic import write_atomic, write_json_atomic

__all__ = ["StageFile", "save_stage", "mark_complete", "latest_complete", "load_stages", "merge_checkpoint"]

_STEP = re.compile(r"step-(\d+)$")


class StageFile(TypedDict):
    """What ``stage-N.pt`` holds."""

    step: int
    stage: int
    model: dict[str, torch.Tensor]
    """The stage's parameters and buffers under the unpartitioned model's names."""
    optimizer: dict[str, Any] | None
    """The optimizer state of the rank that held the stage (with its first stage only)."""
    rank: int
    local_stages: list[int]
    """Every stage that rank held: the optimizer state fits a rank holding the same."""
    aliases: dict[str, str]
    """Names in ``model`` that are another name of a tied parameter -> its first name (absent in old files)."""


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def save_stage(root: str | Path, step: int, stage: int, model_state: dict[str, torch.Tensor],
               optimizer_state: dict[str, Any] | None, rank: int, local_stages: list[int],
               aliases: dict[str, str] | None = None) -> Path:
    """Write one stage's file for ``step``, atomically."""
    folder = step_dir(root, step)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    content = StageFile(step=step, stage=stage, model={k: v.detach().cpu() for k, v in model_state.items()},
                        optimizer=optimizer_state, rank=rank, local_stages=local_stages, aliases=aliases or {})
    torch.save(content, buffer)
    return write_atomic(folder / f"stage-{stage}.pt", lambda handle: handle.write(buffer.getvalue()))


def mark_complete(root: str | Path, step: int, num_stages: int) -> None:
    """Declare ``step`` complete (after every rank saved); called by one rank."""
    folder = step_dir(root, step)
    missing = [s for s in range(num_stages) if not (folder / f"stage-{s}.pt").exists()]
    if missing:
        raise AutopartError(f"checkpoint {folder} lacks stages {missing}")
    write_json_atomic(folder / "COMPLETE", {"step": step, "num_stages": num_stages, "time": time.time()})


def latest_complete(root: str | Path) -> Path | None:
    """The newest step folder that has its COMPLETE marker, or None."""
    base = Path(root)
    if not base.is_dir():
        return None
    found = []
    for child in base.iterdir():
        match = _STEP.match(child.name)
        if match and (child / "COMPLETE").exists():
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def _complete(folder: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((folder / "COMPLETE").read_text()))
    except (OSError, ValueError) as exc:
        raise AutopartError(f"checkpoint {folder} has no readable COMPLETE marker: {exc}") from None


def load_stages(folder: str | Path) -> list[StageFile]:
    """Every stage file of one complete step folder, in stage order."""
    path = Path(folder)
    meta = _complete(path)
    out = []
    for s in range(int(meta["num_stages"])):
        file = path / f"stage-{s}.pt"
        try:
            out.append(torch.load(file, map_location="cpu", weights_only=False))
        except (OSError, RuntimeError) as exc:
            raise AutopartError(f"cannot read checkpoint file {file}: {exc}") from None
    return out


def merge_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """One state_dict with the original model's names from a checkpoint folder (or its latest step)."""
    base = Path(path)
    if not base.exists():
        raise AutopartError(f"checkpoint {str(base)!r} does not exist")
    folder = base if (base / "COMPLETE").exists() else latest_complete(base)
    if folder is None:
        raise AutopartError(f"no complete checkpoint under {str(base)!r}")
    merged: dict[str, torch.Tensor] = {}
    copies: dict[str, list[tuple[str, int, torch.Tensor]]] = {}
    for content in load_stages(folder):
        aliases = content.get("aliases", {})
        for name, tensor in content["model"].items():
            merged.setdefault(name, tensor)
            copies.setdefault(aliases.get(name, name), []).append((name, content["stage"], tensor))
    for first, found in copies.items():  # a tied weight (or any name two stages hold) must agree everywhere
        name, stage, reference = found[0]
        for other, other_stage, tensor in found[1:]:
            if tensor.shape != reference.shape or not torch.equal(tensor, reference):
                diff = float((tensor.float() - reference.float()).abs().max()) if tensor.shape == reference.shape \
                    else float("nan")
                raise AutopartError(f"checkpoint {folder}: the copies of {first!r} differ ({name!r} in stage {stage}, "
                                    f"{other!r} in stage {other_stage}: max difference {diff:.3g})")
    return merged

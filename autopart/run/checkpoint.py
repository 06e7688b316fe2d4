"""Checkpoints of a pipelined run: one file per stage, written atomically, merged back by name.

Layout: ``DIR/step-000010/stage-3.pt`` holds stage 3's parameters and buffers
under the unpartitioned model's own names, its optimizer state and the step;
``DIR/step-000010/COMPLETE`` is written last, by rank 0, once every rank has
written its stages, so a step folder without it is ignored (a run that died
while saving leaves the previous checkpoint in charge). It is JSON: the step,
the stage count, and the model spec and precision the run trained
(``model``, ``model_folder``, ``precision``; absent from older checkpoints).

    state = merge_checkpoint("ckpt")        # the latest complete step
    model.load_state_dict(state)            # the original, unpartitioned model
"""
from __future__ import annotations

import io
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, TypedDict

import torch

from autopart.errors import AutopartError
from autopart.formats.atomic import remove_temporaries, write_atomic, write_json_atomic

__all__ = ["StageFile", "save_stage", "mark_complete", "latest_complete", "latest_complete_step", "load_stages",
           "MergedCheckpoint", "read_checkpoint", "merge_checkpoint", "remove_stale_temporaries"]

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
    """Every other name of a tied parameter the rank holds -> its first name, whether a stage uses that name or
    not (older files: only the names in ``model``; absent in the oldest)."""
    scaler: NotRequired[dict[str, Any] | None]
    """fp16-mixed: the gradient scaler's state (its scale), the same on every rank, with the rank's first stage;
    None or absent under the other precisions (and in older files). The parameters themselves are saved in
    their training dtype: float32 under fp32 and the mixed precisions, bfloat16 under bf16-true."""


def step_dir(root: str | Path, step: int) -> Path:
    return Path(root) / f"step-{step:06d}"


def save_stage(root: str | Path, step: int, stage: int, model_state: dict[str, torch.Tensor],
               optimizer_state: dict[str, Any] | None, rank: int, local_stages: list[int],
               aliases: dict[str, str] | None = None, scaler_state: dict[str, Any] | None = None) -> Path:
    """Write one stage's file for ``step``, atomically (``scaler_state``: fp16-mixed's gradient scaler's)."""
    folder = step_dir(root, step)
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    content = StageFile(step=step, stage=stage, model={k: v.detach().cpu() for k, v in model_state.items()},
                        optimizer=optimizer_state, rank=rank, local_stages=local_stages, aliases=aliases or {},
                        scaler=scaler_state)
    torch.save(content, buffer)
    remove_temporaries(folder, re.escape(f"stage-{stage}.pt"))  # this stage's writer killed in an earlier attempt
    return write_atomic(folder / f"stage-{stage}.pt", buffer.getvalue())


def remove_stale_temporaries(root: str | Path) -> list[Path]:
    """Delete the temporary files that writers killed mid-write left in ``root`` and its step folders (only
    names of our own stage files' and markers' temporaries); call it before any rank writes. The files
    removed."""
    base = Path(root)
    removed = remove_temporaries(base, "COMPLETE") if base.is_dir() else []
    for child in sorted(base.iterdir()) if base.is_dir() else []:
        if _STEP.match(child.name) and child.is_dir():
            removed += remove_temporaries(child, r"stage-\d+\.pt|COMPLETE")
    return removed


def mark_complete(root: str | Path, step: int, num_stages: int, model: str | None = None,
                  precision: str | None = None) -> None:
    """Declare ``step`` complete (after every rank saved); called by one rank. ``model``: the spec the run
    trained (``hf:PATH``'s folder is also recorded as an absolute path, so a merge from elsewhere finds its
    config); ``precision``: the run's (the dtype its stage files hold)."""
    folder = step_dir(root, step)
    missing = [s for s in range(num_stages) if not (folder / f"stage-{s}.pt").exists()]
    if missing:
        raise AutopartError(f"checkpoint {folder} lacks stages {missing}")
    meta: dict[str, Any] = {"step": step, "num_stages": num_stages, "time": time.time()}
    if model is not None:
        from autopart.measure.hf import hf_folder

        local = hf_folder(model)
        meta.update(model=model, model_folder=str(local.resolve()) if local is not None else None)
    if precision is not None:
        meta["precision"] = precision
    write_json_atomic(folder / "COMPLETE", meta)


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


def latest_complete_step(root: str | Path) -> int | None:
    """The step of the newest complete checkpoint under ``root`` (the step a run resumes after), or None."""
    folder = latest_complete(root)
    match = _STEP.match(folder.name) if folder is not None else None
    return int(match.group(1)) if match else None


def _complete(folder: Path) -> dict[str, Any]:
    marker = folder / "COMPLETE"
    try:
        meta = json.loads(marker.read_text())
    except (OSError, ValueError) as exc:
        raise AutopartError(f"checkpoint {folder} has no readable COMPLETE marker: {exc}") from None
    stages = meta.get("num_stages") if isinstance(meta, dict) else None
    if isinstance(stages, bool) or not isinstance(stages, int) or stages < 1:
        raise AutopartError(f"checkpoint marker {str(marker)!r} is damaged: num_stages is {stages!r}, not a count")
    return meta


def _first_sentence(exc: BaseException) -> str:
    """``Type: first sentence`` of an error (torch's zip errors go on for lines)."""
    text = (str(exc).strip().splitlines() or [""])[0]
    text = text.split(". ")[0].rstrip(".")
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _not_a_stage(content: Any, stage: int) -> str:
    """Why ``content`` is not the :class:`StageFile` of ``stage``; empty when it is."""
    if not isinstance(content, dict):
        return f"it holds a {type(content).__name__}, not a stage's dict"
    missing = [key for key in ("step", "stage", "model", "optimizer", "rank", "local_stages") if key not in content]
    if missing:
        return f"it lacks {', '.join(map(repr, missing))}"
    if content["stage"] != stage:
        return f"it holds stage {content['stage']!r}, not {stage}"
    if not isinstance(content["step"], int) or not isinstance(content["local_stages"], list):
        return f"its step {content['step']!r} or local_stages {content['local_stages']!r} is malformed"
    model = content["model"]
    if not isinstance(model, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                              for k, v in model.items()):
        return "its 'model' is not a dict of names to tensors"
    if content["optimizer"] is not None and not isinstance(content["optimizer"], dict):
        return f"its 'optimizer' is a {type(content['optimizer']).__name__}, not a state_dict"
    return ""


def load_stages(folder: str | Path, mmap: bool = False) -> list[StageFile]:
    """Every stage file of one complete step folder, in stage order; a file that cannot be read or is not
    a stage file is an :class:`AutopartError` naming it. ``mmap``: map the tensors instead of reading them
    (to check the files cheaply)."""
    path = Path(folder)
    meta = _complete(path)
    out = []
    for s in range(meta["num_stages"]):
        file = path / f"stage-{s}.pt"
        if not file.is_file():
            raise AutopartError(f"checkpoint {str(path)!r} is marked complete but lacks {file.name}")
        try:
            with open(file, "rb") as handle:
                magic = handle.read(4)
            if magic != b"PK\x03\x04":  # every torch.save since 1.6 is a zip archive
                raise AutopartError(f"checkpoint file {str(file)!r} is damaged: not a torch.save archive")
            content = torch.load(file, map_location="cpu", weights_only=False, mmap=mmap)
        except AutopartError:
            raise
        except Exception as exc:  # a damaged file raises whatever the unpickler or the zip reader meets
            raise AutopartError(f"checkpoint file {str(file)!r} is damaged: {_first_sentence(exc)}") from None
        problem = _not_a_stage(content, s)
        if problem:
            raise AutopartError(f"checkpoint file {str(file)!r} is not a stage file autopart wrote: {problem}")
        out.append(content)
    return out


@dataclass
class MergedCheckpoint:
    """A complete step's stage files read as the unpartitioned model (tensors mapped, not read, when ``mmap``)."""

    folder: Path
    """The step folder."""
    meta: dict[str, Any]
    """Its COMPLETE marker: the step, the stage count, and (since autopart recorded them) the model spec, its
    local folder and the precision."""
    state: dict[str, torch.Tensor]
    """Every name of the model's state dict: a tied weight's names share one tensor."""
    stage_of: dict[str, int]
    """Name -> the stage whose file holds its tensor."""
    tied: list[tuple[str, ...]]
    """The names of each tied weight, the first name (the one the stage files' aliases point to) first."""


def read_checkpoint(path: str | Path, mmap: bool = False) -> MergedCheckpoint:
    """The latest complete step under ``path`` (or the step folder ``path``), with every tied weight's copies
    checked equal; ``mmap``: map the stage files (a tensor's pages are read when it is, and the optimizer state
    never is)."""
    base = Path(path)
    if not base.exists():
        raise AutopartError(f"checkpoint {str(base)!r} does not exist")
    folder = base if (base / "COMPLETE").exists() else latest_complete(base)
    if folder is None:
        raise AutopartError(f"no complete checkpoint under {str(base)!r}")
    merged: dict[str, torch.Tensor] = {}
    stage_of: dict[str, int] = {}
    copies: dict[str, list[tuple[str, int, torch.Tensor]]] = {}
    tied: dict[str, set[str]] = {}  # first name -> every name of a tied parameter
    for content in load_stages(folder, mmap=mmap):
        aliases = content.get("aliases", {})
        for name, first in aliases.items():
            tied.setdefault(first, {first}).add(name)
        for name, tensor in content["model"].items():
            merged.setdefault(name, tensor)
            stage_of.setdefault(name, content["stage"])
            copies.setdefault(aliases.get(name, name), []).append((name, content["stage"], tensor))
    for first, found in copies.items():  # a tied weight (or any name two stages hold) must agree everywhere
        name, stage, reference = found[0]
        for other, other_stage, tensor in found[1:]:
            if tensor.shape != reference.shape or not torch.equal(tensor, reference):
                diff = float((tensor.float() - reference.float()).abs().max()) if tensor.shape == reference.shape \
                    else float("nan")
                raise AutopartError(f"checkpoint {folder}: the copies of {first!r} differ ({name!r} in stage {stage}, "
                                    f"{other!r} in stage {other_stage}: max difference {diff:.3g})")
    del copies
    groups = []
    for first, names in tied.items():  # the names of a tied weight that no stage uses (T5's shared.weight) too
        held = next((n for n in sorted(names) if n in merged), None)
        if held is not None:
            for n in names - merged.keys():
                merged[n], stage_of[n] = merged[held], stage_of[held]
            groups.append((first, *sorted(names - {first})))
    return MergedCheckpoint(folder, _complete(folder), merged, stage_of, groups)


def merge_checkpoint(path: str | Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """One state_dict with the original model's names from a checkpoint folder (or its latest step); ``mmap``:
    its tensors map the stage files (``torch.save`` it to stream them out)."""
    return read_checkpoint(path, mmap).state

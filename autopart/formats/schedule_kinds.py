"""The schedules autopart knows by name, and what a name implies: stages per rank and which rank holds a stage.

    canonical_schedule("zbv")              -> "ZBVZeroBubble"
    stages_per_rank("ZBVZeroBubble")       -> 2
    stage_ranks("ZBVZeroBubble", 2, 2)     -> (0, 1, 1, 0)

The one place these rules live; the action orders themselves are in
:mod:`autopart.core.schedules`. Pure standard library.
"""
from __future__ import annotations

from autopart.errors import AutopartError

__all__ = ["SCHEDULE_NAMES", "AUTO_SCHEDULES", "MAX_MICROBATCHES_PER_STEP", "canonical_schedule", "check_microbatches",
           "stages_per_rank", "stage_ranks"]

# torch.distributed.pipelining's class names without "Schedule"; keys are what users may type
SCHEDULE_NAMES = {"gpipe": "GPipe", "1f1b": "1F1B", "interleaved1f1b": "Interleaved1F1B",
                  "zbvzerobubble": "ZBVZeroBubble"}
_ALIASES = {"interleaved": "interleaved1f1b", "interleaved-1f1b": "interleaved1f1b", "zbv": "zbvzerobubble",
            "zero-bubble": "zbvzerobubble"}
AUTO_SCHEDULES = tuple(SCHEDULE_NAMES.values())
"""What ``--schedule auto`` tries."""

MAX_MICROBATCHES_PER_STEP = 4096
"""The most micro-batches per step autopart plans, simulates or trains. Pipelines run tens to hundreds
(GPipe, Megatron-LM); simulating a step costs time and memory in proportion to them (4096 on 8 stages:
seconds), where a million ran for minutes at gigabytes."""


def check_microbatches(microbatches: int) -> None:
    """Refuse a micro-batch count below 1 or above :data:`MAX_MICROBATCHES_PER_STEP`."""
    if microbatches < 1:
        raise AutopartError(f"micro-batches must be >= 1, got {microbatches}")
    if microbatches > MAX_MICROBATCHES_PER_STEP:
        raise AutopartError(f"{microbatches} micro-batches per step > {MAX_MICROBATCHES_PER_STEP}, the most autopart "
                            f"plans, simulates or trains")


def canonical_schedule(name: str) -> str:
    """``"gpipe"`` -> ``"GPipe"``; raises with the known names otherwise."""
    key = name.lower().removeprefix("schedule")
    key = _ALIASES.get(key, key)
    if key not in SCHEDULE_NAMES:
        known = ", ".join(SCHEDULE_NAMES.values())
        raise AutopartError(f"unknown schedule {name!r}; known: {known}")
    return SCHEDULE_NAMES[key]


def stages_per_rank(schedule: str, interleaved: int = 2) -> int:
    """How many (virtual) stages a rank holds: GPipe and 1F1B one, ZBVZeroBubble two (a V),
    Interleaved1F1B ``interleaved``."""
    name = canonical_schedule(schedule)
    if name == "ZBVZeroBubble":
        return 2
    return interleaved if name == "Interleaved1F1B" else 1


def stage_ranks(schedule: str, num_ranks: int, per_rank: int) -> tuple[int, ...]:
    """Rank of each stage: stage s on rank s mod K (looped), or a V (rank r holds r and 2K-1-r)."""
    if canonical_schedule(schedule) == "ZBVZeroBubble":
        return tuple(s if s < num_ranks else 2 * num_ranks - 1 - s for s in range(2 * num_ranks))
    return tuple(s % num_ranks for s in range(num_ranks * per_rank))

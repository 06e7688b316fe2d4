"""What a rank gets from its machine, set and checked against the plan: CPU threads and device memory.

Pure arithmetic and messages; the rank (:mod:`autopart.run.loop`) reads the
numbers from torch and its environment and applies them.
"""
from __future__ import annotations

from autopart.errors import AutopartError
from autopart.formats.plan import Plan
from autopart.formats.units import format_bytes, plural

__all__ = ["rank_threads", "threads_note", "planned_rank_bytes", "check_device_memory"]


def rank_threads(requested: int | None, plan_threads: int | None, cores: int, ranks_here: int) -> int:
    """CPU threads for each of the ``ranks_here`` ranks sharing ``cores``: ``requested`` (``--threads``), else
    the profile's (the plan's times assume them) where the cores allow, else an even share of the cores."""
    fair = max(1, cores // max(1, ranks_here))
    return requested or (plan_threads if plan_threads and plan_threads <= fair else fair)


def threads_note(plan: Plan, threads: int, cores: int) -> str | None:
    """What to say when the ranks get another thread count than the profile measured with; None when the same
    (or the plan does not say)."""
    if not plan.threads or threads == plan.threads:
        return None
    return (f"note: the plan's times were measured with {plan.threads} CPU threads; each of its "
            f"{plural(plan.world_size, 'rank')} gets {threads} ({plural(cores, 'core')} here), so expect the measured "
            f"step to differ from the prediction (profile with --threads {threads} to match)")


def planned_rank_bytes(plan: Plan, rank: int) -> int:
    """The plan's peak memory of ``rank``: its stages' ``memory_bytes`` together (they share its device)."""
    return sum(plan.stages[s].cost.memory_bytes for s in plan.stages_of(rank))


def check_device_memory(plan: Plan, rank: int, device: str, total_bytes: int, free_bytes: int) -> None:
    """Refuse (one line, both numbers) a rank whose device has less memory free than its stages' planned peak;
    ``free_bytes``: what the device has left now (its total less what other processes use)."""
    need = planned_rank_bytes(plan, rank)
    if need <= free_bytes:
        return
    stages = plan.stages_of(rank)
    which = f"stage {stages[0]} needs" if len(stages) == 1 else f"stages {', '.join(map(str, stages))} need"
    used = total_bytes - free_bytes
    in_use = f", {format_bytes(used)} of it in use already" if used > 0 else ""
    raise AutopartError(f"rank {rank}: the plan's {which} {format_bytes(need)} on {device}, which has "
                        f"{format_bytes(free_bytes)} free ({format_bytes(total_bytes)} in all{in_use}): re-plan with "
                        f"--memory-limit {format_bytes(free_bytes).replace(' ', '')} or a smaller micro-batch")

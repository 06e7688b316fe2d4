"""What a rank gets from its machine, set and checked against the plan: CPU threads and device memory.

Pure arithmetic and messages; the rank (:mod:`autopart.run.loop`) reads the
numbers from torch and its environment and applies them. A plan whose ranks get
fewer threads than its profile's is re-priced from the profile's times at
that count (:func:`plan_at_threads`).
"""
from __future__ import annotations

import dataclasses

from autopart.errors import AutopartError
from autopart.formats.plan import Plan
from autopart.formats.profile import Profile
from autopart.formats.units import format_bytes, format_ms, plural

__all__ = ["rank_threads", "threads_note", "plan_at_threads", "planned_rank_bytes", "check_device_memory"]


def rank_threads(requested: int | None, plan_threads: int | None, cores: int, ranks_here: int) -> int:
    """CPU threads for each of the ``ranks_here`` ranks sharing ``cores``: ``requested`` (``--threads``), else
    the profile's (the plan's times assume them) where the cores allow, else an even share of the cores."""
    fair = max(1, cores // max(1, ranks_here))
    return requested or (plan_threads if plan_threads and plan_threads <= fair else fair)


def threads_note(plan: Plan, threads: int, cores: int, repriced: Plan | None = None, profile: str = "",
                 why_not: str = "") -> str | None:
    """What to say when the ranks get another thread count than the profile measured with; None when the same
    (or the plan does not say). ``repriced``: the plan at ``threads`` (:func:`plan_at_threads`) from its profile
    ``profile``, which the run's report then predicts with; ``why_not``: why it could not be re-priced (the
    plan's prediction is kept)."""
    if not plan.threads or threads == plan.threads:
        return None
    start = (f"note: the plan's times were measured with {plan.threads} CPU threads; each of its "
             f"{plural(plan.world_size, 'rank')} gets {threads} ({plural(cores, 'core')} here)")
    if repriced is not None:
        at = plural(threads, 'thread')
        if repriced.threads and repriced.threads != threads:
            at = f"{plural(repriced.threads, 'thread')} (the nearest count it timed to {threads})"
        return (f"{start}: the prediction is re-simulated from its profile {profile} at "
                f"{at}: {format_ms(repriced.predicted.step_ms)} a step (the plan says "
                f"{format_ms(plan.predicted.step_ms)})")
    kept = f"; the plan's prediction is kept: its profile cannot re-price it ({why_not})" if why_not else ""
    return (f"{start}{kept}, so expect the measured step to differ from the prediction (profile with --threads "
            f"{threads} to match)")


def plan_at_threads(plan: Plan, profile: Profile, threads: int) -> Plan | None:
    """``plan``'s split, schedule and recomputation priced from ``profile`` at ``threads`` CPU threads per rank
    (:meth:`Profile.at_threads`), as a run whose ranks get that many runs it; None when the profile timed one
    thread count only (nothing to re-price from) or not the plan's micro-batch size. The result's ``threads`` is
    the count its times are for: the nearest timed count when ``threads`` is beyond the timed range."""
    from autopart.core.resize import plan_at_microbatch_size

    size = plan.microbatch_size or profile.microbatch_size
    if not profile.by_threads or size not in profile.sizes():
        return None
    at = profile.at_threads(threads)  # beyond the timed range: the nearest timed count, which it records
    repriced = plan_at_microbatch_size(plan, at, size)
    return dataclasses.replace(repriced, threads=at.threads, scaling=plan.scaling, runners_up=plan.runners_up)


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

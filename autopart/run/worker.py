"""The entry of each rank process (started by torchrun or by :mod:`autopart.run.launch`): run the rank,
and turn any failure into one line for the launcher and an exit code.

What a rank records for torchrun's agent (its error file) is that line, not a
traceback, so the failure summary torchrun prints under a user's own
``torchrun`` names the error without autopart's frames. What every rank finds
alike before joining the group (a plan for another number of processes, a
schedule the plan cannot run) is said once, by rank 0.
"""
from __future__ import annotations

import os

import torch.distributed as dist

from autopart.errors import AutopartError
from autopart.run.checkpoint import remove_stale_temporaries
from autopart.run.config import TrainConfig
from autopart.run.log import say
from autopart.run.loop import run_rank
from autopart.run.parent import die_with_parent
from autopart.run.resume import run_complete
from autopart.torch_compat import write_error_file

__all__ = ["worker_main", "RankFailure", "check_before_joining"]


class RankFailure(Exception):
    """What a failed rank records for the launcher: one line, the original error's type and message."""


def _summary(exc: BaseException) -> str:
    """``Type: message`` of the error that started it all (torch wraps a stage's error in its own)."""
    root: BaseException = exc
    while root.__cause__ is not None:
        root = root.__cause__
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    return f"{type(root).__name__}: {lines[0]}" if lines else type(root).__name__


def _record(line: str) -> None:
    """Leave ``line`` for torchrun's agent, in this rank's error file, where torch puts a traceback."""
    write_error_file(line)


def check_before_joining(cfg: TrainConfig, world: int) -> None:
    """What every rank can check alike before joining the group: the plan's rank count and schedule, and a
    micro-batch size (``--global-batch``) the plan is for or its profile measured."""
    from autopart.core.planner import simulate_plan
    from autopart.formats.plan import Plan
    from autopart.run.microbatch import plan_for_run
    from autopart.run.stages import check_world_size

    plan = Plan.from_json(cfg.plan)
    check_world_size(plan, world)
    simulate_plan(plan)  # a schedule the plan's ranks and micro-batches can run, as simulate checks
    plan_for_run(plan, cfg.plan, cfg.global_batch)


def worker_main(cfg: TrainConfig) -> int:
    """Run this process's rank. Returns the exit code; failures are one line on stderr."""
    die_with_parent()  # a launcher killed outright (SIGKILL) takes its ranks with it
    rank = int(os.environ.get("RANK", "0"))
    ours = bool(os.environ.get("AUTOPART_LAUNCHED"))  # our launcher prints the one line itself
    try:
        check_before_joining(cfg, int(os.environ.get("WORLD_SIZE", "1")))
    except AutopartError as exc:
        _record(str(exc))
        if not ours and rank == 0:
            say(f"autopart train: error: {exc}")
        return 2
    if cfg.checkpoint and rank == 0:  # before joining: no rank writes until every rank has joined
        remove_stale_temporaries(cfg.checkpoint)
    complete = run_complete(cfg.checkpoint, cfg.steps)
    if complete:  # every rank sees the same checkpoint, so every rank ends here, before joining the group
        if rank == 0:
            restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
            after = f"restart {restart} after a rank failed: " if restart else ""
            say(f"autopart train: {after}{complete}")
        return 0
    try:
        run_rank(cfg, rank)
        return 0
    except KeyboardInterrupt:  # Ctrl-C reaches every rank; the launcher says it once
        if not ours:
            say(f"autopart train: rank {rank}: interrupted")
        return 130
    except AutopartError as exc:
        _record(str(exc))
        if not ours:
            say(f"autopart train: rank {rank}: error: {exc}")
        return 2
    except Exception as exc:  # a rank that dies says which and why, in one line; the launcher stops the rest
        summary = _summary(exc)
        _record(summary)
        if not ours:
            say(f"autopart train: rank {rank} failed: {summary}")
        if os.environ.get("AUTOPART_TRACEBACK"):
            import traceback

            traceback.print_exc()
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

"""The entry of each rank process (started by torchrun or by :mod:`autopart.run.launch`): run the rank,
and turn any failure into one line for the launcher and an exit code.
"""
from __future__ import annotations

import os

import torch.distributed as dist

from autopart.errors import AutopartError
from autopart.run.config import TrainConfig
from autopart.run.log import say
from autopart.run.loop import run_rank

__all__ = ["worker_main", "RankFailure"]


class RankFailure(Exception):
    """What a failed rank records for the launcher: one line, the original error's type and message."""


def _summary(exc: BaseException) -> str:
    """``Type: message`` of the error that started it all (torch wraps a stage's error in its own)."""
    root: BaseException = exc
    while root.__cause__ is not None:
        root = root.__cause__
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    return f"{type(root).__name__}: {lines[0]}" if lines else type(root).__name__


def worker_main(cfg: TrainConfig) -> int:
    """Run this process's rank. Returns the exit code; failures are one line on stderr."""
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    rank = int(os.environ.get("RANK", "0"))
    handler = get_error_handler()
    handler.initialize()
    try:
        run_rank(cfg, rank)
        return 0
    except KeyboardInterrupt:  # Ctrl-C reaches every rank; the launcher says it once
        if not os.environ.get("AUTOPART_LAUNCHED"):
            say(f"autopart train: rank {rank}: interrupted")
        return 130
    except AutopartError as exc:
        handler.record_exception(RankFailure(str(exc)))
        if not os.environ.get("AUTOPART_LAUNCHED"):  # our launcher prints the one line itself
            say(f"autopart train: rank {rank}: error: {exc}")
        return 2
    except Exception as exc:  # a rank that dies says which and why, in one line; the launcher stops the rest
        summary = _summary(exc)
        handler.record_exception(RankFailure(summary))
        if not os.environ.get("AUTOPART_LAUNCHED"):
            say(f"autopart train: rank {rank} failed: {summary}")
        if os.environ.get("AUTOPART_TRACEBACK"):
            import traceback

            traceback.print_exc()
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

"""Start the ranks of ``autopart train`` on this machine through torchrun's own launcher API.

One process per rank (``torch.distributed.launcher.api.elastic_launch``, the
machinery behind ``torchrun --standalone``). If any rank fails, torchrun's
agent stops the others (no rank is left blocked in a collective), and the
failure comes back here as the first rank that failed, with its message.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from typing import Sequence

from autopart.errors import AutopartError
from autopart.run.parent import PARENT_PID_ENV
from autopart.torch_compat import failure_line

__all__ = ["launch", "inside_torchrun"]


def inside_torchrun() -> bool:
    """True in a process started by torchrun (or by :func:`launch`)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ)


_PEER_LOST = ("connection closed by peer", "connection reset by peer", "remote worker", "broken pipe",
              "connection refused")


def _signal(failure: object) -> signal.Signals | None:
    """The signal that ended the rank (a negative exit code), or None when it exited by itself."""
    code = int(getattr(failure, "exitcode", 1) or 1)
    if code >= 0:
        return None
    try:
        return signal.Signals(-code)
    except ValueError:
        return None


def _stopped_by_agent(failure: object) -> bool:
    """Ended by the signal torchrun's agent sends the ranks still running once one has failed (SIGTERM)."""
    return _signal(failure) == signal.SIGTERM


def _interrupted(exc: object) -> bool:
    """Every rank that failed was interrupted (Ctrl-C reaches the ranks too, and they exit with 130)."""
    failures = list(dict(getattr(exc, "failures", {})).values())
    return bool(failures) and all(int(getattr(f, "exitcode", 1) or 1) in (130, -2) for f in failures)


def _say_interrupted() -> int:
    sys.stderr.write("autopart train: interrupted; the ranks were stopped\n")
    return 130


def _root_cause(exc: object) -> tuple[int, object]:
    """The rank that failed first for a reason of its own, not because a peer vanished or the agent stopped it.

    Note: error files carry whole-second timestamps, and a rank ended by a signal has none (the agent
    stamps it when it notices), so the rank that failed and the ranks the agent then stopped with SIGTERM
    often tie. Prefer, in order: a rank whose message is not a lost connection; one that exited by itself
    over one killed by a signal; one killed by another signal (SIGKILL: the OOM killer, kill -9) over
    one stopped with the agent's SIGTERM; then the earliest, then the lowest rank.
    """
    failures: dict[int, object] = dict(getattr(exc, "failures", {}))
    own = [(_stopped_by_agent(f), _signal(f) is not None, getattr(f, "timestamp", 0), r, f)
           for r, f in failures.items() if not any(p in failure_line(f).lower() for p in _PEER_LOST)]
    if own:
        *_, rank, failure = min(own, key=lambda item: item[:4])
        return rank, failure
    rank, failure = exc.get_first_failure()  # type: ignore[attr-defined]
    return int(rank), failure


def launch(worker_args: Sequence[str], nproc: int, threads: int, max_restarts: int = 0) -> int:
    """Run ``python -m autopart train WORKER_ARGS`` as ``nproc`` ranks; the exit code of the job.

    With ``max_restarts``, torchrun's agent starts the whole group again (up to that many times) when a
    rank fails; the ranks resume from the last complete checkpoint.
    """
    for name in ("torch.distributed.elastic", "torch.distributed.launcher"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    marks = {"AUTOPART_LAUNCHED": "1", PARENT_PID_ENV: str(os.getpid())}  # the ranks' parent: autopart.run.parent
    before = {name: os.environ.get(name) for name in marks}
    os.environ.update(marks)  # the ranks inherit them; put back after, for whoever called this in-process
    try:
        return _launch(worker_args, nproc, max_restarts)
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _launch(worker_args: Sequence[str], nproc: int, max_restarts: int) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"autopart-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", rdzv_configs={"timeout": 120},
                          max_restarts=max_restarts, monitor_interval=0.1, start_method="spawn")
    try:
        elastic_launch(config, sys.executable)("-m", "autopart", "train", *worker_args)
    except (SignalException, KeyboardInterrupt) as exc:
        sigval = getattr(exc, "sigval", None)
        if sigval is not None and sigval.name != "SIGINT":
            sys.stderr.write(f"autopart train: error: stopped by {sigval.name}; the ranks were stopped\n")
            return 128 + int(sigval)
        return _say_interrupted()
    except ChildFailedError as exc:
        rank, failure = _root_cause(exc)
        if _interrupted(exc):
            return _say_interrupted()
        code = getattr(failure, "exitcode", 1)
        why, killed = failure_line(failure), _signal(failure)
        if killed is not None and (not why or why.startswith("Signal ")):  # torch's "Signal 9 (SIGKILL) received by"
            why = f"killed by {killed.name}"
        if code == 2 and why:
            raise AutopartError(f"rank {rank}: {why}") from None
        detail = f": {why}" if why else ""
        sys.stderr.write(f"autopart train: error: rank {rank} failed (exit code {code}){detail}; "
                         f"the other ranks were stopped\n")
        return 1
    return 0

"""A rank dies with the process that started it (autopart's launcher, or torchrun's agent).

torchrun starts each rank in a session of its own, so a launcher killed with
SIGKILL (which it cannot pass on) would leave its ranks training as orphans.
On Linux the kernel sends the rank SIGKILL when its parent dies
(``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon thread watches the parent's
pid once a second and kills the rank when it changes.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

__all__ = ["die_with_parent", "PARENT_PID_ENV"]

PARENT_PID_ENV = "AUTOPART_PARENT_PID"
"""Set by autopart's launcher to its own pid: the parent each rank checks it still has."""

_PR_SET_PDEATHSIG = 1
_WATCH_INTERVAL_S = 1.0


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _watch(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(_WATCH_INTERVAL_S)
    _kill_self()


def _prctl_pdeathsig() -> bool:
    """Ask the kernel for SIGKILL when the parent dies; False where prctl is not there."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def die_with_parent() -> None:
    """Make this process end when its parent does (see the module's note); if the parent is already gone
    (it died before the request took effect), end now.

    Only a rank started by an elastic agent (torchrun's or autopart's launcher: ``TORCHELASTIC_RUN_ID``)
    does this: a rank a user or a scheduler starts by hand (``RANK``/``WORLD_SIZE`` set, under ``nohup``, say)
    keeps the life its starter gave it. The launcher's pid (``AUTOPART_PARENT_PID``) counts only while that
    process is alive; otherwise a rank whose parent is another process took a stale value and keeps it.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    named = int(os.environ.get(PARENT_PID_ENV, "0") or 0)
    parent = named if named and (named == os.getppid() or not _alive(named)) else os.getppid()
    if not _prctl_pdeathsig():
        threading.Thread(target=_watch, args=(parent,), name="autopart-parent-watch", daemon=True).start()
    if os.getppid() != parent:  # the parent died between this process starting and the request
        _kill_self()

"""Write files so that a reader sees the old file or the whole new one, never half.

Every file autopart writes (profiles, plans, checkpoints, reports, traces,
pictures) goes through :func:`write_atomic`, and gets the mode the user's
umask gives a new file (0644 under umask 022), as ``open(path, "w")`` would.
Pure standard library.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

from autopart.errors import AutopartError

__all__ = ["write_atomic", "write_json_atomic", "check_writable", "current_umask"]


def check_writable(path: str | os.PathLike[str]) -> Path:
    """Fail early, before long work, if ``path`` cannot be written.

    Creates and removes a scratch file beside it, so permissions, a missing
    folder and a read-only file system are all caught.
    """
    target = Path(path)
    if target.is_dir():
        raise AutopartError(f"output path {str(target)!r} is a directory")
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise AutopartError(f"cannot write {str(target)!r}: folder {str(folder)!r} does not exist")
    try:
        fd, scratch = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".probe", dir=folder)
    except OSError as exc:
        raise AutopartError(f"cannot write {str(target)!r}: {exc.strerror or exc}") from None
    os.close(fd)
    os.unlink(scratch)
    return target


def current_umask() -> int:
    """This process's umask, read without changing it (``/proc/self/status`` on Linux).

    Note: elsewhere the only way is to set it and set it back, which a thread
    creating a file in between would see; that is the fallback.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it into place.

    The file gets ``0o666 & ~umask``, what a plain ``open`` would give it (``mkstemp`` alone gives 0600).
    """
    target = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~current_umask())
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    return write_atomic(path, lambda handle: handle.write(text.encode("utf-8")))

"""Write files so that a reader sees the old file or the whole new one, never half.

Pure standard library: used by the profile, the plan and the checkpoints.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

from autopart.errors import AutopartError

__all__ = ["write_atomic", "write_json_atomic", "check_writable"]


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


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it into place."""
    target = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
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

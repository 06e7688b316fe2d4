"""Write files so that a reader sees the old file or the whole new one, never half.

Every file autopart writes (profiles, plans, checkpoints, reports, traces,
pictures) goes through :func:`write_atomic`, and gets the mode the user's
umask gives a new file (0644 under umask 022), as ``open(path, "w")`` would.
Pure standard library.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

from autopart.errors import AutopartError
from autopart.formats.units import format_bytes

__all__ = ["write_atomic", "write_json_atomic", "check_writable", "current_umask", "remove_temporaries"]

_RANDOM = r"[a-z0-9_]{8}"
"""What ``tempfile.mkstemp`` puts between the prefix and the suffix."""

_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def remove_temporaries(folder: str | os.PathLike[str], name_pattern: str) -> list[Path]:
    """Delete the temporary files that :func:`write_atomic` (``.NAME.XXXXXXXX.tmp``) or :func:`check_writable`
    (``.NAME.XXXXXXXX.probe``) left in ``folder`` for targets whose NAME matches the regular expression
    ``name_pattern`` (a writer killed mid-write leaves one); nothing else is touched. The files removed.

    Only call this where no writer of those names can be running.
    """
    pattern = re.compile(rf"\.(?:{name_pattern})\.{_RANDOM}\.(?:tmp|probe)")
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    for entry in entries:
        if pattern.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(Path(entry.path))
    return removed


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


def write_atomic(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object] | bytes) -> Path:
    """Write ``write`` (the bytes, or a function that writes to the file it is given) to a temporary file
    beside ``path``, then rename it into place.

    The file gets ``0o666 & ~umask``, what a plain ``open`` would give it (``mkstemp`` alone gives 0600).
    A full disk is an ``OSError`` (ENOSPC) that names the folder and the size of the write.
    """
    target = check_writable(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~current_umask())
            if isinstance(write, bytes):
                handle.write(write)
            else:
                write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        written = os.stat(tmp).st_size if os.path.exists(tmp) else 0
        if os.path.exists(tmp):
            os.unlink(tmp)
        if exc.errno in _DISK_FULL:
            raise _disk_full(exc, target, write, written) from None
        raise
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def _disk_full(exc: OSError, target: Path, write: object, written: int) -> OSError:
    """The full disk's error, with the folder, the size of the write and the space left."""
    folder = target.parent
    size = f"{format_bytes(len(write))}, " if isinstance(write, bytes) else ""
    try:
        free = f"; {format_bytes(shutil.disk_usage(folder).free)} free there"
    except OSError:
        free = ""
    why = "no space left on the device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
    return OSError(exc.errno, f"{why} of folder {str(folder)!r}: writing {target.name!r} ({size}"
                              f"{format_bytes(written)} of it written before the disk filled){free}")


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    return write_atomic(path, text.encode("utf-8"))

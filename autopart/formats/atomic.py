"""Write files so that a reader sees the old file or the whole new one, never half.

Every file autopart writes (profiles, plans, checkpoints, reports, traces,
pictures) goes through :func:`write_atomic`, and gets the mode the user's
umask gives a new file (0644 under umask 022), as ``open(path, "w")`` would.
Only regular files are replaced: a device, a FIFO or a socket (``-o /dev/null``)
and a file descriptor's name (``--csv /dev/stdout``) are written into, as a
shell's ``>`` would; a symlink to a regular file keeps the link and has the file
it points to replaced. Pure standard library.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from pathlib import Path
from typing import IO, Any, Callable

from autopart.errors import AutopartError
from autopart.formats.units import format_bytes

__all__ = ["write_atomic", "write_json_atomic", "write_folder_atomic", "check_folder_writable", "check_writable",
           "current_umask", "remove_temporaries", "PROBE_BYTES"]

PROBE_BYTES = 4096
"""What :func:`check_writable` writes (and removes) beside the target: a full disk refuses even that."""


def _writes_into(target: Path) -> bool:
    """Whether ``target`` is to be written into rather than replaced: it exists (symlinks followed) and is
    not a regular file (a character or block device, a FIFO, a socket), or it is reached through /proc
    (``/dev/stdout``, ``/dev/fd/N``: an open file, which replacing would detach)."""
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise AutopartError(f"cannot write {str(target)!r}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(mode):
        return False
    return not stat.S_ISREG(mode) or any(step.startswith(("/proc/", "/dev/fd/")) for step in _link_chain(target))


def _link_chain(target: Path) -> list[str]:
    """``target`` and each path its symlinks lead to, one link at a time (``/dev/stdout``, ``/proc/self/fd/1``,
    and the file itself): ``realpath`` alone would hide the /proc step."""
    chain = [str(target)]
    while os.path.islink(chain[-1]) and len(chain) < 40:
        chain.append(os.path.normpath(os.path.join(os.path.dirname(chain[-1]), os.readlink(chain[-1]))))
    return chain


def _own_descriptor(target: Path) -> int | None:
    """The descriptor of this process that ``target`` names (``/dev/stdout`` is 1, ``/dev/fd/2`` is 2,
    ``/proc/self/fd/N`` is N), if it is open; None for any other path."""
    for step in _link_chain(target):
        for prefix in ("/dev/fd/", "/proc/self/fd/", f"/proc/{os.getpid()}/fd/"):
            number = step.removeprefix(prefix)
            if step.startswith(prefix) and number.isdigit():
                try:
                    os.fstat(int(number))
                except OSError:
                    return None
                return int(number)
    return None


def _replaced(target: Path) -> Path:
    """The file that replacing ``target`` replaces: the end of its symlinks (so the links stay), else itself."""
    return Path(os.path.realpath(target)) if target.is_symlink() else target


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

    Creates, fills with :data:`PROBE_BYTES` and removes a scratch file beside it, so permissions, a missing
    folder, a read-only file system and a full disk are all caught; a device, FIFO or socket must be
    writable itself.
    """
    if not os.fspath(path):
        raise AutopartError("an output needs a file name, got ''")
    given = Path(path)
    if given.is_dir():
        raise AutopartError(f"output path {str(given)!r} is a directory")
    if _writes_into(given):
        if not os.access(given, os.W_OK):
            raise AutopartError(f"cannot write {str(given)!r}: permission denied")
        return given
    target = _replaced(given)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise AutopartError(f"cannot write {str(given)!r}: folder {str(folder)!r} does not exist")
    try:
        fd, scratch = tempfile.mkstemp(prefix=f".{target.name[:40]}.", suffix=".probe", dir=folder)
    except OSError as exc:
        raise AutopartError(f"cannot write {str(given)!r}: {exc.strerror or exc}") from None
    try:
        os.write(fd, bytes(PROBE_BYTES))
    except OSError as exc:
        raise AutopartError(f"cannot write {str(given)!r}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)
        os.unlink(scratch)
    return given


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
    A target that is not a regular file is written into instead (see the module docstring). A failing
    write keeps the old file and is one :class:`AutopartError` naming the file; for a full disk it also names
    the folder, the size of the write and the space left.
    """
    given = check_writable(path)
    if _writes_into(given):
        try:
            descriptor = _own_descriptor(given)
            if descriptor is not None:
                # this process's own stdout or stderr, say redirected to a file: write through that very
                # descriptor (its offset, its O_APPEND), after what Python has buffered for it
                sys.stdout.flush()
                sys.stderr.flush()
                with os.fdopen(os.dup(descriptor), "wb") as handle:
                    _put(handle, write)
                return given
            with open(given, "ab" if stat.S_ISREG(os.stat(given).st_mode) else "wb") as handle:
                _put(handle, write)
        except BrokenPipeError:  # a pipe's reader went away (``--csv /dev/stdout | head -1``): the CLI ends quietly
            raise
        except OSError as exc:
            raise AutopartError(f"cannot write {str(given)!r}: {exc.strerror or exc}") from None
        return given
    target = _replaced(given)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name[:40]}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), 0o666 & ~current_umask())
            _put(handle, write)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        written = os.stat(tmp).st_size if os.path.exists(tmp) else 0
        _remove(tmp)
        kept = "; the old file is kept" if target.exists() else ""
        why = _disk_full(exc, target, write, written) if exc.errno in _DISK_FULL else (exc.strerror or str(exc))
        raise AutopartError(f"cannot write {str(given)!r}: {why}{kept}") from None
    except BaseException:
        _remove(tmp)
        raise
    return given


def _put(handle: IO[bytes], write: Callable[[IO[bytes]], object] | bytes) -> None:
    if isinstance(write, bytes):
        handle.write(write)
    else:
        write(handle)


def _remove(tmp: str) -> None:
    if os.path.exists(tmp):
        os.unlink(tmp)


def _disk_full(exc: OSError, target: Path, write: object, written: int) -> str:
    """What a full disk refused: the size of the write, how much of it went in, and the space left in the folder."""
    size = f"{format_bytes(len(write))} to write, " if isinstance(write, bytes) else ""
    try:
        free = f"; {format_bytes(shutil.disk_usage(target.parent).free)} free in {str(target.parent)!r}"
    except OSError:
        free = f" in {str(target.parent)!r}"
    why = "no space left on the device" if exc.errno == errno.ENOSPC else "disk quota exceeded"
    return f"{why} ({size}{format_bytes(written)} written before the disk filled){free}"


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> Path:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, allow_nan=False) + "\n"
    return write_atomic(path, text.encode("utf-8"))


def check_folder_writable(path: str | os.PathLike[str], replace: bool = False) -> Path:
    """Fail early, before long work, if :func:`write_folder_atomic` would refuse ``path``: a file there, a
    non-empty folder (unless ``replace``), a missing or unwritable parent folder. A missing ``path`` whose old
    copy an interrupted replace left aside (``.NAME.XXXXXXXX.old``) is first renamed back, with a one-line note.
    """
    if not os.fspath(path):
        raise AutopartError("an output needs a folder name, got ''")
    given = Path(path)
    if given.exists() and not given.is_dir():
        raise AutopartError(f"output {str(given)!r} is a file, not a folder")
    if given.is_dir() and any(given.iterdir()) and not replace:
        raise AutopartError(f"output folder {str(given)!r} exists and is not empty (--force replaces it)")
    parent = given.parent if str(given.parent) else Path(".")
    if not parent.is_dir():
        raise AutopartError(f"cannot write {str(given)!r}: folder {str(parent)!r} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise AutopartError(f"cannot write {str(given)!r}: permission denied in {str(parent)!r}")
    if not os.path.lexists(given) and _restore_interrupted(given):
        return check_folder_writable(given, replace)
    return given


def _put_back(old: Path, given: Path) -> None:
    """Rename the folder moved aside to ``old`` back to ``given`` (a replace that failed half-way); if even that
    fails, one :class:`AutopartError` says where the old folder is."""
    try:
        os.rename(old, given)
    except OSError as exc:
        raise AutopartError(f"cannot write {str(given)!r}, and the old folder could not be put back: it is "
                            f"{str(old)!r} ({exc.strerror or exc})") from None


def _restore_interrupted(given: Path) -> bool:
    """Put back the folder that a replace of the missing ``given`` moved aside (``.NAME.XXXXXXXX.old``) and did not
    finish (the process died between its two renames), with a one-line note on stderr; whether it did. More than one
    such folder, or a NAME past the 40 characters the aside name keeps (another folder's could match): a note naming
    them, and nothing moved."""
    parent = given.parent if str(given.parent) else Path(".")
    pattern = re.compile(rf"\.{re.escape(given.name[:40])}\.{_RANDOM}\.old")
    try:
        found = sorted(entry.name for entry in os.scandir(parent)
                       if pattern.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False))
    except OSError:
        return False
    if not found:
        return False
    if len(found) > 1 or len(given.name) > 40:
        sys.stderr.write(f"note: {str(given)!r} is missing and {', '.join(found)} in {str(parent)!r} may hold it (left "
                         f"by an interrupted --force replace): rename the right one to {given.name!r}\n")
        return False
    _put_back(parent / found[0], given)
    sys.stderr.write(f"note: restored {str(given)!r} from {found[0]}, where an interrupted --force replace had "
                     f"moved it\n")
    return True


def write_folder_atomic(path: str | os.PathLike[str], fill: Callable[[Path], object], replace: bool = False) -> Path:
    """Create the folder ``path`` whole or not at all: ``fill`` writes the files into a temporary sibling
    (``.NAME.XXXXXXXX.tmp``), each file and the folder are fsynced, and the folder is renamed into place.

    The folder gets ``0o777 & ~umask`` (``mkdtemp`` alone gives 0700), its files ``0o666 & ~umask``. An
    existing empty folder is replaced; a non-empty one is refused unless ``replace``, which moves it aside, renames
    the new one in and deletes the old one (if renaming the new one in fails, the old one is renamed back; a
    process that died between the two renames leaves it as ``.NAME.XXXXXXXX.old``, which the next write of
    ``path`` renames back, see :func:`check_folder_writable`); a file there is always refused. A failing write
    leaves ``path`` as it was and is one :class:`AutopartError` naming it (a full disk also names the space left).
    """
    given = check_folder_writable(path, replace)
    parent = given.parent
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{given.name[:40]}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise AutopartError(f"cannot write {str(given)!r}: {exc.strerror or exc}") from None
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
        fill(tmp)
        for entry in os.scandir(tmp):
            if entry.is_file(follow_symlinks=False):
                os.chmod(entry.path, 0o666 & ~current_umask())  # some writers (safetensors) create files 0600
                _fsync(entry.path)
        _fsync(tmp)
        if given.is_dir() and any(given.iterdir()):  # replace: rename(2) only replaces an empty folder
            old = Path(tempfile.mkdtemp(prefix=f".{given.name[:40]}.", suffix=".old", dir=parent))
            os.rename(given, old)
            try:
                os.rename(tmp, given)
            except BaseException:
                _put_back(old, given)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, given)
        _fsync(parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        why = "no space left on the device" if exc.errno in _DISK_FULL else (exc.strerror or str(exc))
        if exc.errno in _DISK_FULL:
            try:
                why += f"; {format_bytes(shutil.disk_usage(parent).free)} free in {str(parent)!r}"
            except OSError:
                pass
        raise AutopartError(f"cannot write {str(given)!r}: {why}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return given


def _fsync(path: str | os.PathLike[str]) -> None:
    """Flush a file's or a folder's contents to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
from pathlib import Path
from typing import IO, Iterator

import pytest

from autopart.formats.atomic import check_writable, current_umask, write_atomic, write_json_atomic
from autopart.errors import AutopartError
from tests.helpers import bound_by_permissions


def test_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "plan.json"
    write_json_atomic(target, {"v": 1})

    def half(handle: IO[bytes]) -> None:
        handle.write(b'{"v": 2')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_atomic(target, half)
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert os.listdir(tmp_path) == ["plan.json"]


def test_unwritable_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(AutopartError, match="does not exist"):
        check_writable(tmp_path / "no" / "such" / "x.json")
    with pytest.raises(AutopartError, match="is a directory"):
        check_writable(tmp_path)
    locked = tmp_path / "locked"  # a folder its owner may not write into; checked without root's override
    locked.mkdir(mode=0o555)
    target = locked / "x.json"
    with pytest.raises(AutopartError, match=f"cannot write '{target}': Permission denied"):
        bound_by_permissions(lambda: check_writable(target))
    assert os.listdir(locked) == []


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_umask_mode(tmp_path: Path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        written = write_json_atomic(tmp_path / "plan.json", {"v": 1})
        rewritten = write_atomic(written, lambda handle: handle.write(b"{}"))  # replacing a file: the same
    finally:
        os.umask(old)
    assert os.stat(written).st_mode & 0o777 == mode and os.stat(rewritten).st_mode & 0o777 == mode


# --- outputs that are not regular files: written into, never replaced (issue #16, item 10) -------------------------

def test_a_symlink_to_dev_null_is_written_through(tmp_path: Path) -> None:
    # through a link of our own: were the link replaced, the real /dev/null would be untouched
    link = tmp_path / "null"
    link.symlink_to(os.devnull)
    before = os.stat(os.devnull)
    write_json_atomic(link, {"v": 1})
    assert link.is_symlink() and os.readlink(link) == os.devnull
    after = os.stat(os.devnull)
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)
    assert os.listdir(tmp_path) == ["null"]


def test_a_fifo_is_written_into(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # a reader first, so opening it to write does not wait
    try:
        write_json_atomic(fifo, {"v": 1})
        received = os.read(reader, 1 << 16)
    except BlockingIOError:  # nothing came through the FIFO
        received = b""
    finally:
        os.close(reader)
    assert received == b'{\n  "v": 1\n}\n'
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert os.listdir(tmp_path) == ["pipe"]


def test_a_symlink_to_a_regular_file_keeps_the_link(tmp_path: Path) -> None:
    real = tmp_path / "real.json"
    write_json_atomic(real, {"v": 1})
    link = tmp_path / "link.json"
    link.symlink_to(real)
    old_inode = os.stat(real).st_ino
    write_json_atomic(link, {"v": 2})
    assert link.is_symlink() and os.readlink(link) == str(real)
    assert json.loads(real.read_text()) == {"v": 2}
    assert os.stat(real).st_ino != old_inode  # replaced atomically, not rewritten in place
    assert sorted(os.listdir(tmp_path)) == ["link.json", "real.json"]


def test_a_full_device_is_one_error_naming_the_file(tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.symlink_to("/dev/full")  # every write: ENOSPC
    with pytest.raises(AutopartError, match=f"cannot write '{full}': No space left on device"):
        write_json_atomic(full, {"v": 1})


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs filled up, holding an old ``plan.json``: needs root and mount (skipped elsewhere)."""
    folder = tmp_path / "disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (folder / "plan.json").write_text('{"v": 1}\n')
        filler = os.open(folder / "filler", os.O_WRONLY | os.O_CREAT)
        try:
            while True:
                os.write(filler, bytes(512))
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        finally:
            os.close(filler)
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_is_refused_before_work_and_keeps_the_old_file(full_disk: Path) -> None:
    target = full_disk / "plan.json"
    with pytest.raises(AutopartError, match=f"cannot write '{target}': No space left on device"):
        check_writable(target)
    with pytest.raises(AutopartError, match=f"cannot write '{target}': No space left on device"):
        write_json_atomic(target, {"v": 2})
    assert target.read_text() == '{"v": 1}\n'
    assert sorted(os.listdir(full_disk)) == ["filler", "plan.json"]


@pytest.mark.parametrize("redirect", ["truncate", "append"])
@pytest.mark.parametrize("name", ["/dev/stdout", "/dev/fd/1"])
def test_own_stdout_redirected_to_a_file_is_written_through_in_order(tmp_path: Path, redirect: str, name: str) -> None:
    """``--csv /dev/stdout > out.txt`` (or ``>>``): the CSV lands between what the command printed before and
    after it, in the file the shell opened; the file is not replaced (which would drop the rest)."""
    import sys

    out = tmp_path / "out.txt"
    out.write_text("old\n")
    code = ("from autopart.formats.atomic import write_atomic\n"
            f"print('before'); write_atomic({name!r}, b'CSV\\n'); print('after')\n")
    with open(out, "a" if redirect == "append" else "w") as handle:
        subprocess.run([sys.executable, "-c", code], stdout=handle, check=True,
                       env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))
    kept = "old\n" if redirect == "append" else ""
    assert out.read_text() == f"{kept}before\nCSV\nafter\n"


def _old_folder(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old weights")
    return out


def test_a_replace_whose_second_rename_fails_puts_the_old_folder_back(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The old folder is moved aside, the new one cannot be renamed in: the old one is back under its name."""
    from autopart.formats.atomic import write_folder_atomic

    out = _old_folder(tmp_path)
    real_rename = os.rename

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if str(src).endswith(".tmp") and Path(dst) == out:
            raise OSError(errno.EIO, "Input/output error")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(AutopartError, match=f"cannot write '{out}': Input/output error"):
        write_folder_atomic(out, lambda folder: (folder / "model.safetensors").write_bytes(b"new"), replace=True)
    assert (out / "model.safetensors").read_bytes() == b"old weights"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # nothing aside, no temporary folder


def test_a_folder_an_interrupted_replace_left_aside_is_restored_with_a_note(tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    """A process that died between the two renames left OUT missing and its old copy as .out.XXXXXXXX.old: the
    next write of OUT renames it back first (and refuses to overwrite it without --force, as for any folder)."""
    from autopart.formats.atomic import check_folder_writable, write_folder_atomic

    aside = _old_folder(tmp_path).rename(tmp_path / ".out.ab12cd_9.old")
    out = tmp_path / "out"
    with pytest.raises(AutopartError, match="exists and is not empty"):
        write_folder_atomic(out, lambda folder: (folder / "model.safetensors").write_bytes(b"new"))
    assert capsys.readouterr().err == f"note: restored '{out}' from {aside.name}, where an interrupted --force " \
                                      "replace had moved it\n"
    assert (out / "model.safetensors").read_bytes() == b"old weights" and sorted(os.listdir(tmp_path)) == ["out"]
    check_folder_writable(out, replace=True)
    assert capsys.readouterr().err == ""  # OUT is there: nothing to restore

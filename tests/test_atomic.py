from __future__ import annotations

import os
from pathlib import Path
from typing import IO

import pytest

from autopart.formats.atomic import check_writable, current_umask, write_atomic, write_json_atomic
from autopart.errors import AutopartError


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
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(AutopartError, match="cannot write"):
            check_writable(locked / "x.json")


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

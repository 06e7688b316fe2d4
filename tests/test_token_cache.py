"""Tokenize once, map everywhere: the token cache (autopart/run/token_cache.py) holds the stream a fresh
tokenization gives, is reused without the tokenizer, is rebuilt when its inputs change or its files are damaged."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from autopart.run.tokens import tokenize_for
from tests.conftest import ROOT
from tests.test_tokens import SENTENCES, _stream, save_tokenizer


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A model folder with a tokenizer (``</s>``, id 1, ends each document) and a JSON Lines corpus beside it."""
    model = tmp_path / "llama"
    save_tokenizer(model)
    (tmp_path / "d.jsonl").write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    return model


def _streams(cache: Path) -> list[Path]:
    return sorted((cache / "tokens").glob("*.tokens"))


def test_the_cached_stream_is_a_fresh_tokenization(folder: Path, token_cache: Path) -> None:
    from tokenizers import Tokenizer

    data = folder.parent / "d.jsonl"
    first = tokenize_for(folder / "tokenizer.json", str(data), None)
    expected = _stream(Tokenizer.from_file(str(folder / "tokenizer.json")), SENTENCES, eos=1)
    assert first.tokens.tolist() == expected and first.documents == 5 and first.eos_id == 1
    (path,) = _streams(token_cache)
    assert "tokenized in " in first.description and str(path) in first.description
    assert np.fromfile(path, dtype=np.uint16).tolist() == expected  # the file is the raw stream
    again = tokenize_for(folder / "tokenizer.json", str(data), None)
    assert isinstance(again.tokens, np.memmap) and not again.tokens.flags.writeable  # mapped read-only
    assert again.tokens.tolist() == expected and again.documents == 5 and again.mask_id == first.mask_id == 2
    assert f"cached {path}" in again.description


def test_a_cached_stream_is_read_without_the_tokenizer(folder: Path, token_cache: Path) -> None:
    """What a rank does when the launcher has tokenized: the stream, and the tokenizers library never imported."""
    data = folder.parent / "d.jsonl"
    count = len(tokenize_for(folder / "tokenizer.json", str(data), None).tokens)
    (path,) = _streams(token_cache)
    written = path.stat().st_mtime_ns
    code = ("import sys; from pathlib import Path; from autopart.run.tokens import tokenize_for; "
            f"t = tokenize_for(Path({str(folder / 'tokenizer.json')!r}), {str(data)!r}, 100); "
            "print(t.description); print(len(t.tokens), 'tokenizers' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, text=True, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr
    description, loaded = out.stdout.splitlines()
    assert f"cached {path}" in description and loaded == f"{count} False" and count == 40
    assert path.stat().st_mtime_ns == written and _streams(token_cache) == [path]


def test_a_changed_data_file_or_tokenizer_makes_a_new_stream(folder: Path, token_cache: Path) -> None:
    from tokenizers import Tokenizer

    data = folder.parent / "d.jsonl"
    tokenize_for(folder / "tokenizer.json", str(data), None)
    data.write_text(json.dumps({"text": "the cat sat"}) + "\n")  # new contents, size and time
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    changed = tokenize_for(folder / "tokenizer.json", str(data), None)
    assert "tokenized in" in changed.description and changed.tokens.tolist() == _stream(tokenizer, ["the cat sat"], 1)
    assert len(_streams(token_cache)) == 2
    os.utime(data, ns=(1, 1))  # the same contents, another modification time: tokenized again (not trusted)
    assert "tokenized in" in tokenize_for(folder / "tokenizer.json", str(data), None).description
    assert len(_streams(token_cache)) == 3
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<mask>"}))  # another end-of-text
    ended = tokenize_for(folder / "tokenizer.json", str(data), None)
    assert "tokenized in" in ended.description and ended.tokens.tolist()[-1] == 2
    other = Tokenizer.from_file(str(folder / "tokenizer.json"))  # the tokenizer file itself, changed
    other.add_tokens(["cat sat"])
    other.save(str(folder / "tokenizer.json"))
    retokenized = tokenize_for(folder / "tokenizer.json", str(data), None)
    assert "tokenized in" in retokenized.description and retokenized.tokens.tolist() == \
        _stream(other, ["the cat sat"], 2)
    assert len(_streams(token_cache)) == 5


@pytest.mark.parametrize("damage", ["truncated", "flipped", "facts", "missing"])
def test_a_damaged_cache_is_rebuilt_with_a_note(folder: Path, token_cache: Path, damage: str,
                                                 capsys: Any) -> None:
    data = folder.parent / "d.jsonl"
    fresh = tokenize_for(folder / "tokenizer.json", str(data), None).tokens.tolist()
    (path,) = _streams(token_cache)
    raw = path.read_bytes()
    if damage == "truncated":  # a copy cut short
        path.write_bytes(raw[:-2])
    elif damage == "flipped":  # the right size, a wrong token
        path.write_bytes(raw[:4] + bytes([raw[4] ^ 1]) + raw[5:])
    elif damage == "facts":
        path.with_suffix(".json").write_text("{not json")
    else:
        path.unlink()
    capsys.readouterr()
    again = tokenize_for(folder / "tokenizer.json", str(data), None)
    note = capsys.readouterr().err
    why = {"truncated": f"it is truncated ({len(raw) - 2} bytes, {len(raw)} expected)", "flipped": "do not match their SHA-256",
           "facts": "cannot be read", "missing": "it is missing"}[damage]
    assert note.count("\n") == 1 and note.startswith(f"note: token cache {path} is not usable: ") and why in note
    assert "tokenized in" in again.description and again.tokens.tolist() == fresh
    assert path.read_bytes() == raw  # rebuilt whole
    assert "cached" in tokenize_for(folder / "tokenizer.json", str(data), None).description


def test_a_writer_killed_mid_write_leaves_nothing_behind_the_rebuild(folder: Path, token_cache: Path) -> None:
    data = folder.parent / "d.jsonl"
    tokenize_for(folder / "tokenizer.json", str(data), None)
    (path,) = _streams(token_cache)
    left = path.parent / f".{path.name}.k1ll3d0x.tmp"  # what write_atomic leaves when killed mid-write
    left.write_bytes(b"\0" * 10)
    other = path.parent / ".0123abcd.tokens.k1ll3d0x.tmp"  # another stream's: not this writer's to remove
    other.write_bytes(b"")
    path.write_bytes(b"")  # the rebuild
    assert "tokenized in" in tokenize_for(folder / "tokenizer.json", str(data), None).description
    assert not left.exists() and other.exists()


def test_the_cache_folder_follows_autopart_cache_then_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from autopart.run.token_cache import cache_folder

    monkeypatch.setenv("AUTOPART_CACHE", str(tmp_path / "a"))
    assert cache_folder() == tmp_path / "a" / "tokens" and (tmp_path / "a" / "tokens").is_dir()
    monkeypatch.delenv("AUTOPART_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_folder() == tmp_path / "x" / "autopart" / "tokens"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_folder() == tmp_path / "home" / ".cache" / "autopart" / "tokens"
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("AUTOPART_CACHE", str(blocked))
    from autopart.errors import AutopartError

    with pytest.raises(AutopartError, match="cannot create the token cache folder .*set AUTOPART_CACHE"):
        cache_folder()


RANK_PEAK_LIMIT_BYTES = 150 * 2**20
"""A rank's measured peak (over its memory before the model) on the tiny Llama below, the default corpus mapped:
88 and 88 MiB measured with the launcher's cache; 426 and 431 MiB when every rank tokenized the corpus itself."""


@pytest.mark.slow
def test_ranks_map_the_launchers_tokens_and_hold_about_their_stage(tmp_path: Path, token_cache: Path) -> None:
    """2 real ranks on a saved Llama with its tokenizer and the default corpus (the standard library): the
    launcher tokenizes once, each rank's start line says it mapped the cached stream, and each rank's measured
    peak stays far below what tokenizing in the rank cost."""
    from tests.conftest import run_cli, run_cli_here
    from tests.test_eval import _saved_llama_with_tokenizer

    folder = tmp_path / "llama"
    _saved_llama_with_tokenizer(folder)
    spec = f"hf:{folder}"
    profile, plan, report = tmp_path / "p.json", tmp_path / "plan.json", tmp_path / "r.json"
    assert run_cli("profile", spec, "--microbatch-size", "2", "--repeats", "1", "--threads", "1",
                   "-o", str(profile)).returncode == 0
    assert run_cli_here("partition", str(profile), "--stages", "2", "--microbatches", "2",
                        "-o", str(plan)).returncode == 0
    result = run_cli("train", str(plan), "--model", spec, "--steps", "2", "--threads", "1", "--report", str(report))
    assert result.returncode == 0, result.stderr[-3000:]
    (stream,) = _streams(token_cache)
    said = [line for line in result.stderr.splitlines() if line.startswith("tokens: ")]
    assert len(said) == 1 and "tokenized in" in said[0] and str(stream) in said[0]
    assert f"cached {stream}" in result.stderr  # the ranks' start line: mapped, not tokenized
    peaks = [r["memory_measured_bytes"] for r in json.loads(report.read_text())["ranks_detail"]]
    print("rank peaks MiB", [round(p / 2**20) for p in peaks])
    assert len(peaks) == 2 and all(0 < p < RANK_PEAK_LIMIT_BYTES for p in peaks), peaks


def test_a_built_stream_is_read_under_a_shared_lock_and_built_under_an_exclusive_one(folder: Path,
                                                                                   token_cache: Path) -> None:
    """Another process's shared lock (a rank reading) does not hold a reader back, but does hold back a build."""
    import fcntl
    import threading

    data = folder.parent / "d.jsonl"
    first = tokenize_for(folder / "tokenizer.json", str(data), None).tokens.tolist()
    (lock,) = (token_cache / "tokens").glob("*.lock")
    got: list[Any] = []

    def read() -> None:
        got.append(tokenize_for(folder / "tokenizer.json", str(data), None))

    with open(lock, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH)
        reader = threading.Thread(target=read, daemon=True)
        try:
            reader.start()
            reader.join(timeout=20)
            assert not reader.is_alive(), "a reader waited for another reader's shared lock"
            assert got[0].tokens.tolist() == first and "cached " in got[0].description
            for path in (token_cache / "tokens").glob("*.json"):
                path.unlink()  # no stream now: this one must be built, under the exclusive lock
            builder = threading.Thread(target=read, daemon=True)
            builder.start()
            builder.join(timeout=1)
            assert builder.is_alive(), "a build did not wait for a reader's shared lock"
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
    builder.join(timeout=20)
    assert not builder.is_alive() and got[1].tokens.tolist() == first and "tokenized in " in got[1].description

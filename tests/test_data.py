"""The training data: the same batches as ever, held compactly (one byte a token, not eight)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from autopart.errors import AutopartError
from autopart.run.data import TextCorpus, default_corpus_files

MAX_BYTES = 32 * 2**20


def _old_batches(text: bytes, batch: int, seq_len: int, seed: int, start_step: int, steps: int
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The batches as autopart drew them before the corpus was kept compact: the whole text as int64 tokens,
    windows indexed out of it (the README's pinned losses were trained on these)."""
    tokens = torch.frombuffer(bytearray(text), dtype=torch.uint8).long()
    out = []
    for step in range(start_step, start_step + steps):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch,), generator=g)
        window = tokens[starts[:, None] + torch.arange(seq_len + 1)[None, :]]
        out.append((window[:, :-1].contiguous(), window[:, 1:].contiguous()))
    return out


def _new_batches(corpus: TextCorpus, batch: int, seq_len: int, seed: int, start_step: int, steps: int
                 ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    it = corpus.batches(batch, seq_len, seed, start_step)
    return [next(it) for _ in range(steps)]  # type: ignore[misc]


def _assert_same(old: list[tuple[torch.Tensor, torch.Tensor]], new: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    assert len(old) == len(new)
    for (x0, y0), (x1, y1) in zip(old, new):
        assert x1.dtype == y1.dtype == torch.int64
        assert torch.equal(x0, x1) and torch.equal(y0, y1)


def _held_bytes(corpus: TextCorpus) -> int:
    """Bytes of every array and tensor the corpus object holds."""
    return sum(int(v.nbytes) for v in vars(corpus).values() if isinstance(v, (np.ndarray, torch.Tensor)))


def _default_text() -> bytes:
    chunks, total = [], 0
    for f in default_corpus_files():
        try:
            data = f.read_bytes()
        except OSError:
            continue
        chunks.append(data)
        total += len(data)
        if total >= MAX_BYTES:
            break
    return b"\n".join(chunks)[:MAX_BYTES]


def test_default_corpus_draws_the_same_batches_at_one_byte_a_token() -> None:
    text = _default_text()
    corpus = TextCorpus()
    _assert_same(_old_batches(text, 2, 128, 0, 0, 3), _new_batches(corpus, 2, 128, 0, 0, 3))
    _assert_same(_old_batches(text, 4, 64, 7, 5, 2), _new_batches(corpus, 4, 64, 7, 5, 2))  # resumed at step 5
    assert corpus.nbytes == len(text) == _held_bytes(corpus)


def test_a_file_is_memory_mapped_and_draws_the_same_batches(tmp_path: Path) -> None:
    text = bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8))
    path = tmp_path / "corpus.txt"
    path.write_bytes(text)
    corpus = TextCorpus(str(path))
    assert isinstance(corpus.tokens, np.memmap)  # mapped from the file, not read into the process
    assert corpus.nbytes == len(text) == _held_bytes(corpus)
    _assert_same(_old_batches(text, 3, 100, 1, 2, 3), _new_batches(corpus, 3, 100, 1, 2, 3))


def test_a_folder_joins_its_files_the_same_way(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"a" * 700)
    (tmp_path / "b.txt").write_bytes(bytes(range(256)) * 3)
    corpus = TextCorpus(str(tmp_path))
    text = b"a" * 700 + b"\n" + bytes(range(256)) * 3
    assert corpus.nbytes == len(text) == _held_bytes(corpus)
    _assert_same(_old_batches(text, 2, 32, 3, 0, 3), _new_batches(corpus, 2, 32, 3, 0, 3))


def test_a_corpus_too_small_or_empty_is_refused(tmp_path: Path) -> None:
    for size in (0, 1023):
        path = tmp_path / f"small{size}.txt"
        path.write_bytes(b"x" * size)
        with pytest.raises(AutopartError, match=f"has only {size} bytes"):
            TextCorpus(str(path))

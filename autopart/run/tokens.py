"""Text as the model's own tokens: the ``tokenizer.json`` in an ``hf:PATH`` model's folder.

    found = tokenizer_file("hf:./my-llama")              # Path(".../tokenizer.json"), or None
    text = tokenize_for(found, "train.jsonl", vocab_size=32000)
    text.tokens                                           # one array: uint16 when the vocabulary fits, else int32

The file is read with the ``tokenizers`` library (``Tokenizer.from_file``): it is that file's own reader (what
``transformers``' fast tokenizers run), written in Rust (megabytes of text a second) and it never touches the
network, so a model folder trains offline exactly as it was tokenized when saved.

Documents: each line's ``text`` of a ``.jsonl`` file (JSON Lines); any other file is one document; a folder, each
of its files; without ``--data``, each of the Python standard library's sources. At most
:data:`~autopart.run.texts.MAX_TEXT_BYTES` of text is read, as for bytes (the document that passes it is the last).
Each document is encoded without the tokenizer's own special tokens (no BOS, no truncation, no padding) and
followed by the end-of-text token, and the documents make one stream that windows are cut from, with no padding
(GPT-2's packing). The end-of-text token is the one ``tokenizer_config.json`` names (``eos_token``), else
``config.json``'s ``eos_token_id``, else the first of the usual names the vocabulary has (``<|endoftext|>``,
``</s>``, ``<eos>``, ``[SEP]`` ...); without any, documents follow each other with nothing between (and the start
line says so).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import numpy.typing as npt

from autopart.errors import AutopartError
from autopart.formats.units import format_bytes
from autopart.measure.hf import hf_folder
from autopart.run.texts import MAX_TEXT_BYTES, default_corpus_files

__all__ = ["TOKENIZER_FILE", "TokenText", "tokenizer_file", "tokenize_for", "read_documents"]

TOKENIZER_FILE = "tokenizer.json"

_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>", "[SEP]")
"""End-of-text tokens by their usual names (GPT-2, Llama/T5/BART, Gemma, Llama 3, Qwen, BERT)."""

_MASK_NAMES = ("[MASK]", "<mask>")

_ENCODE_CHUNK_BYTES = 4 * 2**20
"""Text handed to the tokenizer at a time (``encode_batch`` runs a chunk's documents in parallel)."""


@dataclass(frozen=True)
class TokenText:
    """A text read as one model's tokens."""

    tokens: npt.NDArray[np.integer[Any]]
    """Every document's tokens, each followed by the end-of-text token, in one array."""
    documents: int
    eos_id: int | None
    """The end-of-text token (None: the tokenizer has none, and documents are joined with nothing)."""
    mask_id: int | None
    """The tokenizer's mask token, for masked LMs (None when it has none)."""
    description: str
    """Where the text came from and what it became, for the start line."""


def tokenizer_file(spec: str) -> Path | None:
    """The ``tokenizer.json`` of an ``hf:PATH`` model's folder; None for any other model or a folder without one
    (its text is then read as bytes)."""
    folder = hf_folder(spec)
    if folder is None:
        return None
    path = folder / TOKENIZER_FILE
    return path if path.is_file() else None


def tokenize_for(path: Path, data_path: str | None, vocab_size: int | None) -> TokenText:
    """``data_path``'s documents (default: the standard library's sources) as the tokens of the tokenizer in
    ``path``, checked against the model's ``vocab_size`` (None: not checked)."""
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust reader's own message: a broken or unknown file
        raise AutopartError(f"tokenizer {str(path)!r} cannot be read: {str(exc).splitlines()[0] if str(exc) else exc}"
                            ) from None
    tokenizer.no_truncation()
    tokenizer.no_padding()
    eos_id, eos_name = _special(tokenizer, path.parent, "eos", _EOS_NAMES)
    mask_id, _ = _special(tokenizer, path.parent, "mask", _MASK_NAMES)
    dtype = np.uint16 if tokenizer.get_vocab_size(with_added_tokens=True) <= 2**16 else np.int32
    source, documents = read_documents(data_path)
    chunks: list[npt.NDArray[np.integer[Any]]] = []
    count = 0
    end = [eos_id] if eos_id is not None else []
    for batch in _chunks(documents):
        encoded = tokenizer.encode_batch(batch, add_special_tokens=False)
        chunks.append(np.concatenate([np.asarray(e.ids + end, dtype=dtype) for e in encoded]))
        count += len(batch)
    tokens: npt.NDArray[np.integer[Any]] = np.concatenate(chunks) if chunks else np.zeros(0, dtype=dtype)
    if tokens.size == 0:
        raise AutopartError(f"--data {source}: no text to train on")
    _check_vocabulary(tokens, tokenizer, path, vocab_size)
    ended = f"each ended by {eos_name}" if eos_name else "joined with nothing: the tokenizer has no end-of-text token"
    description = (f"{source}: {count:,} documents, {tokens.size:,} tokens by {path} "
                   f"({np.dtype(dtype).name}, {format_bytes(tokens.nbytes)}; {ended})")
    return TokenText(tokens, count, eos_id, mask_id, description)


def _special(tokenizer: Any, folder: Path, kind: str, names: tuple[str, ...]) -> tuple[int | None, str | None]:
    """A special token's id and text: as ``tokenizer_config.json`` names it (``eos_token``, ``mask_token``), else
    ``config.json``'s id (``eos_token_id``), else the first of ``names`` in the vocabulary."""
    named = _json(folder / "tokenizer_config.json").get(f"{kind}_token")
    if isinstance(named, dict):
        named = named.get("content")
    if isinstance(named, str) and tokenizer.token_to_id(named) is not None:
        return int(tokenizer.token_to_id(named)), named
    given = _json(folder / "config.json").get(f"{kind}_token_id")
    if isinstance(given, list) and given:
        given = given[0]
    if isinstance(given, int) and not isinstance(given, bool) and 0 <= given < tokenizer.get_vocab_size():
        return given, tokenizer.id_to_token(given) or f"id {given}"
    for name in names:
        found = tokenizer.token_to_id(name)
        if found is not None:
            return int(found), name
    return None, None


def _json(path: Path) -> dict[str, Any]:
    """A JSON object file; empty when it is absent or not an object (the other sources are asked then)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _check_vocabulary(tokens: npt.NDArray[np.integer[Any]], tokenizer: Any, path: Path, vocab_size: int | None) -> None:
    """Refuse a token id the model's embedding has no row for (a tokenizer from another model)."""
    top = int(tokens.max())
    if vocab_size is not None and top >= vocab_size:
        raise AutopartError(f"tokenizer {str(path)!r} gives token id {top} ({tokenizer.id_to_token(top)!r}) but the "
                            f"model's vocab_size is {vocab_size}: the tokenizer is not this model's")


def read_documents(data_path: str | None) -> tuple[str, Iterator[str]]:
    """Where the text comes from (for messages) and its documents, read lazily, up to about
    :data:`~autopart.run.texts.MAX_TEXT_BYTES` of text."""
    if data_path is None:
        files = default_corpus_files()
        return f"Python standard library sources ({len(files)} files)", _capped(_files(files))
    path = Path(data_path)
    if not path.exists():
        raise AutopartError(f"--data {data_path!r} does not exist")
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    return str(path), _capped(_files(files))


def _files(files: list[Path]) -> Iterator[str]:
    for f in files:
        if f.suffix == ".jsonl":
            yield from _jsonl(f)
            continue
        try:
            yield f.read_bytes().decode("utf-8", errors="replace")
        except OSError:
            continue  # unreadable: skipped, as the byte corpus skips it


def _jsonl(path: Path) -> Iterator[str]:
    """The ``text`` of each line of a JSON Lines file (blank lines skipped); a line that is not JSON, or has no
    string ``text``: an error that names it."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as exc:
                raise AutopartError(f"--data {str(path)!r}: line {number} is not JSON "
                                    f"({getattr(exc, 'msg', exc)})") from None
            text = record.get("text") if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise AutopartError(f"--data {str(path)!r}: line {number} has no \"text\" string (JSON Lines are read "
                                    f"as one document per line, in the field \"text\")")
            yield text


def _capped(documents: Iterator[str]) -> Iterator[str]:
    """The documents until :data:`~autopart.run.texts.MAX_TEXT_BYTES` of text have passed."""
    total = 0
    for text in documents:
        yield text
        total += len(text)
        if total >= MAX_TEXT_BYTES:
            return


def _chunks(documents: Iterator[str]) -> Iterator[list[str]]:
    """The documents in lists of about :data:`_ENCODE_CHUNK_BYTES` of text."""
    batch: list[str] = []
    size = 0
    for text in documents:
        batch.append(text)
        size += len(text)
        if size >= _ENCODE_CHUNK_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch

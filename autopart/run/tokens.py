"""Text as the model's own tokens: the ``tokenizer.json`` in an ``hf:PATH`` model's folder.

    found = tokenizer_file("hf:./my-llama")              # Path(".../tokenizer.json"), or None
    text = tokenize_for(found, "train.jsonl", vocab_size=32000)
    text.tokens                                           # one array: uint16 when the vocabulary fits, else int32

The file is read with the ``tokenizers`` library (``Tokenizer.from_file``): it is that file's own reader (what
``transformers``' fast tokenizers run), written in Rust (megabytes of text a second) and it never touches the
network, so a model folder trains offline exactly as it was tokenized when saved.

Documents: each line's ``text`` of a ``.jsonl`` file (JSON Lines); any other file is one document; a folder, each
of its files; without ``--data``, each of the Python standard library's sources. At most
:data:`~autopart.run.texts.MAX_TEXT_BYTES` bytes of text are read, as for bytes: a text file is read and tokenized
about 1 MiB at a time, cut at a newline (the document's end-of-text token follows its last piece), and the budget
ends a file mid-way (that piece ends its document) or before the ``.jsonl`` line that would pass it.
Each document is encoded without the tokenizer's own special tokens (no BOS, no truncation, no padding) and
followed by the end-of-text token, and the documents make one stream that windows are cut from, with no padding
(GPT-2's packing). The end-of-text token is the one ``tokenizer_config.json`` names (``eos_token``), else
``config.json``'s ``eos_token_id``, else the first of the usual names the vocabulary has (``<|endoftext|>``,
``</s>``, ``<eos>``, ``[SEP]`` ...); without any, documents follow each other with nothing between (and the start
line says so).
"""
from __future__ import annotations

import codecs
import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import numpy.typing as npt

from autopart.errors import AutopartError
from autopart.formats.units import format_bytes
from autopart.measure.hf import hf_folder
from autopart.run.texts import MAX_TEXT_BYTES, default_corpus_files
from autopart.run.token_cache import StreamFacts, cache_folder, load_or_store, stream_path

__all__ = ["TOKENIZER_FILE", "TokenText", "tokenizer_file", "tokenize_for", "read_documents", "data_files"]

_CACHE_FORMAT = 2
"""The token cache's layout and packing; a change here makes every cached stream stale."""

TOKENIZER_FILE = "tokenizer.json"

_EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>", "[SEP]")
"""End-of-text tokens by their usual names (GPT-2, Llama/T5/BART, Gemma, Llama 3, Qwen, BERT)."""

_MASK_NAMES = ("[MASK]", "<mask>")

_PIECE_BYTES = 2**20
"""A text file is read this much at a time, cut at its last newline: a 20 GB file is never held whole."""

_ENCODE_CHUNK_BYTES = 2**20
"""Text handed to the tokenizer at a time (``encode_batch_fast`` runs a chunk's documents in parallel): the
tokenizer's memory while tokenizing is about a chunk's, whatever the corpus."""


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
    ``path``, checked against the model's ``vocab_size`` (None: not checked).

    Tokenized once into the token cache (:mod:`autopart.run.token_cache`) and memory-mapped from it: a later
    call with the same tokenizer files, data files (path, size, modification time) and packing options reads
    the cached stream and never loads the tokenizer (the launcher tokenizes, every rank maps its file)."""
    source, files = data_files(data_path)
    key = _cache_key(path, files)
    folder = cache_folder()
    started = time.perf_counter()
    tokens, facts, built = load_or_store(folder, key, lambda put: _tokenize_into(put, path, source, files))
    how = (f"tokenized in {time.perf_counter() - started:.1f} s into {stream_path(folder, key)}" if built
           else f"cached {stream_path(folder, key)}")
    if facts.tokens == 0:
        raise AutopartError(f"--data {facts.source}: no text to train on")
    if vocab_size is not None and facts.top_id >= vocab_size:
        raise AutopartError(f"tokenizer {str(path)!r} gives token id {facts.top_id} ({facts.top_name!r}) but the "
                            f"model's vocab_size is {vocab_size}: the tokenizer is not this model's")
    ended = (f"each ended by {facts.eos_name}" if facts.eos_name
             else "joined with nothing: the tokenizer has no end-of-text token")
    description = (f"{facts.source}: {facts.documents:,} documents, {facts.tokens:,} tokens by {path} "
                   f"({facts.dtype}, {format_bytes(tokens.nbytes)}; {ended}); {how}")
    return TokenText(tokens, facts.documents, facts.eos_id, facts.mask_id, description)


def _cache_key(path: Path, files: list[Path]) -> str:
    """What the stream depends on, hashed: the tokenizer's files' bytes (``tokenizer.json``, and the two configs
    that name the end-of-text token), the ``tokenizers`` library's version, each data file's path, size and
    modification time, and how documents are read and packed."""
    digest = hashlib.sha256()
    digest.update(json.dumps({"format": _CACHE_FORMAT, "max_text_bytes": MAX_TEXT_BYTES,
                              "tokenizers": _version("tokenizers")}).encode())
    for name in (path.name, "tokenizer_config.json", "config.json"):
        try:
            digest.update(name.encode() + b"\0" + (path.parent / name).read_bytes() + b"\0")
        except OSError:
            digest.update(name.encode() + b"\0absent\0")
    for f in files:
        try:
            st = f.stat()
        except OSError:
            digest.update(f"{f.resolve()}\0unreadable\0".encode())
            continue
        digest.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:32]


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "absent"


def _tokenize_into(put: Callable[[bytes], None], path: Path, source: str, files: list[Path]) -> StreamFacts:
    """Tokenize the documents of ``files`` with the tokenizer in ``path``, a chunk of documents at a time, each
    chunk's ids handed to ``put`` as bytes (so memory holds one chunk, never the corpus); the stream's facts
    (its SHA-256 left for the caller)."""
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
    tokens = documents = top = 0
    end = [eos_id] if eos_id is not None else []
    for batch in _chunks(_files(files, _Budget(MAX_TEXT_BYTES))):
        encodings = tokenizer.encode_batch_fast([text for text, _ in batch], add_special_tokens=False)
        for encoding, (_, ends) in zip(encodings, batch):
            ids = np.asarray(encoding.ids + (end if ends else []), dtype=dtype)
            if ids.size:
                put(ids.tobytes())
                tokens += int(ids.size)
                top = max(top, int(ids.max()))
            documents += int(ends)
    return StreamFacts(dtype=np.dtype(dtype).name, tokens=tokens, documents=documents, eos_id=eos_id,
                       eos_name=eos_name, mask_id=mask_id, top_id=top, top_name=tokenizer.id_to_token(top) or "",
                       sha256="", source=source)


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


def data_files(data_path: str | None) -> tuple[str, list[Path]]:
    """Where the text comes from (for messages) and the files it is read from, in order."""
    if data_path is None:
        files = default_corpus_files()
        return f"Python standard library sources ({len(files)} files)", files
    path = Path(data_path)
    if not path.exists():
        raise AutopartError(f"--data {data_path!r} does not exist")
    return str(path), [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())


def read_documents(data_path: str | None) -> tuple[str, Iterator[tuple[str, bool]]]:
    """Where the text comes from (for messages) and its text, read lazily, at most
    :data:`~autopart.run.texts.MAX_TEXT_BYTES` bytes of it: pieces of about :data:`_PIECE_BYTES`, each with
    whether a document ends with it (a text file is cut into pieces at newlines; its last piece ends it)."""
    source, files = data_files(data_path)
    return source, _files(files, _Budget(MAX_TEXT_BYTES))


class _Budget:
    """The bytes of text still to be read (shared by the files of one corpus)."""

    def __init__(self, left_bytes: int) -> None:
        self.left_bytes = left_bytes


def _files(files: list[Path], budget: _Budget) -> Iterator[tuple[str, bool]]:
    """The text of ``files`` as pieces, each with whether a document ends with it, until ``budget`` is spent."""
    for f in files:
        if budget.left_bytes <= 0:
            return
        try:
            if f.suffix == ".jsonl":
                yield from ((text, True) for text in _jsonl(f, budget))
            else:
                yield from _text_pieces(f, budget)
        except OSError:
            continue  # unreadable: skipped, as the byte corpus skips it


def _text_pieces(path: Path, budget: _Budget) -> Iterator[tuple[str, bool]]:
    """One file as one document, in pieces of at most :data:`_PIECE_BYTES` (never more than ``budget`` in
    all), each cut after its last newline, so a piece ends where a line does (memory holds a piece, not the file);
    the last piece, at the end of the file or of the budget, ends the document."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    carry = b""
    with open(path, "rb") as handle:
        while True:
            want = min(_PIECE_BYTES - len(carry), budget.left_bytes)  # the carry is after a newline: shorter
            block = handle.read(want) if want > 0 else b""
            if not block:
                yield decoder.decode(carry, final=True), True
                return
            budget.left_bytes -= len(block)
            data = carry + block
            cut = data.rfind(b"\n") + 1 or len(data)
            data, carry = data[:cut], data[cut:]
            yield decoder.decode(data), False


def _jsonl(path: Path, budget: _Budget) -> Iterator[str]:
    """The ``text`` of each line of a JSON Lines file (blank lines skipped), while the lines' bytes fit in
    ``budget`` (the line that would pass it is not read); a line that is not JSON, or has no string ``text``:
    an error that names it."""
    with open(path, "rb") as handle:
        number = 0
        while budget.left_bytes > 0:
            raw = handle.readline(budget.left_bytes + 1)
            if not raw or len(raw) > budget.left_bytes:
                return
            budget.left_bytes -= len(raw)
            number += 1
            line = raw.decode("utf-8", errors="replace")
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


def _chunks(pieces: Iterator[tuple[str, bool]]) -> Iterator[list[tuple[str, bool]]]:
    """The pieces in lists of about :data:`_ENCODE_CHUNK_BYTES` of text."""
    batch: list[tuple[str, bool]] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece[0])
        if size >= _ENCODE_CHUNK_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch

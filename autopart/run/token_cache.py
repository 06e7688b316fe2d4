"""A token stream tokenized once and memory-mapped by every rank: the token cache.

    folder = cache_folder()                    # $AUTOPART_CACHE, else $XDG_CACHE_HOME/autopart, else ~/.cache/autopart
    tokens, facts, built = load_or_store(folder, key, write_tokens)
    # checked under a shared lock (readers side by side); built under an exclusive one (one process builds, the
    # others wait and then read it), streamed into the file (memory bounded by a chunk); a truncated or corrupt
    # stream is rebuilt after a one-line note

A stream is two files under ``FOLDER/tokens/``: ``KEY.tokens``, the raw token ids (``uint16`` or ``int32``, native
byte order, no header), and ``KEY.json``, its facts (:class:`StreamFacts`: dtype, token and document counts, the
end-of-text token, the largest id, the SHA-256 of the ids' bytes). Both are written atomically
(:func:`autopart.formats.atomic.write_atomic`, the umask's file mode), the ids first: facts on disk always describe
a whole file. A stream is read only when its size and its SHA-256 match its facts (a killed writer, a truncated
copy, a flipped byte: rebuilt, never trusted). Pure standard library and numpy.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import json
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Iterator

import numpy as np
import numpy.typing as npt

from autopart.errors import AutopartError
from autopart.formats.atomic import remove_temporaries, write_atomic

__all__ = ["CACHE_ENV", "StreamFacts", "cache_folder", "locked", "load", "load_or_store", "store", "stream_path"]

CACHE_ENV = "AUTOPART_CACHE"
"""The environment variable naming the cache folder (tests set it to a temporary folder)."""

_READ_BYTES = 2**20
"""What is hashed at a time when a stream is checked (read, not mapped: no resident memory)."""


@dataclass(frozen=True)
class StreamFacts:
    """What a cached token stream holds, saved beside it as JSON."""

    dtype: str
    """``uint16`` or ``int32``."""
    tokens: int
    documents: int
    eos_id: int | None
    eos_name: str | None
    mask_id: int | None
    top_id: int
    """The largest token id in the stream (checked against a model's ``vocab_size`` without reading it)."""
    top_name: str
    sha256: str
    """Of the stream's bytes."""
    source: str
    """Where the text came from, for the start line."""


def cache_folder() -> Path:
    """The token cache's folder, created if absent: ``$AUTOPART_CACHE/tokens``, else
    ``$XDG_CACHE_HOME/autopart/tokens``, else ``~/.cache/autopart/tokens``."""
    given = os.environ.get(CACHE_ENV)
    if given:
        root = Path(given)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        root = (Path(xdg) if xdg else Path.home() / ".cache") / "autopart"
    folder = root / "tokens"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AutopartError(f"cannot create the token cache folder {str(folder)!r}: {exc.strerror or exc} (set "
                            f"{CACHE_ENV} to a writable folder)") from None
    return folder


def stream_path(folder: Path, key: str) -> Path:
    """The raw token ids of stream ``key``."""
    return folder / f"{key}.tokens"


def _facts_path(folder: Path, key: str) -> Path:
    return folder / f"{key}.json"


@contextmanager
def locked(folder: Path, key: str, shared: bool = False) -> Iterator[None]:
    """Hold stream ``key``'s lock (``flock`` on ``KEY.lock``): shared to read it (the ranks of a user's own
    ``torchrun`` check a built stream side by side), exclusive to build it (the others wait, then read it)."""
    try:
        handle = open(folder / f"{key}.lock", "a")
    except OSError as exc:
        raise AutopartError(f"cannot write the token cache folder {str(folder)!r}: {exc.strerror or exc} (set "
                            f"{CACHE_ENV} to a writable folder)") from None
    with handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def load_or_store(folder: Path, key: str, write: Callable[[Callable[[bytes], None]], StreamFacts]
                  ) -> tuple[npt.NDArray[np.integer[Any]], StreamFacts, bool]:
    """Stream ``key`` (see :func:`load`), built with ``write`` (see :func:`store`) when there is none usable;
    and whether it was built here. A usable stream is checked under the shared lock (readers do not wait for each
    other); only building takes the exclusive one, and re-checks after getting it (another process may have
    built it meanwhile)."""
    with locked(folder, key, shared=True):
        found = load(folder, key, note=False)
    if found is not None:
        return (*found, False)
    with locked(folder, key):
        found = load(folder, key)
        if found is not None:
            return (*found, False)
        return (*store(folder, key, write), True)


def load(folder: Path, key: str, note: bool = True) -> tuple[npt.NDArray[np.integer[Any]], StreamFacts] | None:
    """Stream ``key`` memory-mapped read-only, with its facts; None when there is none, or when it does not
    match its facts (then, if ``note``, a one-line note on stderr says so, and the caller rebuilds it)."""
    facts_path, path = _facts_path(folder, key), stream_path(folder, key)
    if not facts_path.exists():
        return None
    facts, why = _checked(facts_path, path)
    if facts is None:
        if note:
            sys.stderr.write(f"note: token cache {path} is not usable: {why}; tokenizing again\n")
        return None
    if facts.tokens == 0:
        return np.zeros(0, dtype=facts.dtype), facts
    return np.memmap(path, dtype=np.dtype(facts.dtype), mode="r", shape=(facts.tokens,)), facts


def _checked(facts_path: Path, path: Path) -> tuple[StreamFacts | None, str]:
    """The stream's facts when the stream matches them (its size, its SHA-256); else None and why not."""
    try:
        facts = StreamFacts(**json.loads(facts_path.read_text(encoding="utf-8")))
        itemsize = np.dtype(facts.dtype).itemsize
    except (OSError, ValueError, TypeError) as exc:
        return None, f"its facts {facts_path.name} cannot be read ({str(exc).splitlines()[0] if str(exc) else exc})"
    try:
        size = path.stat().st_size
    except OSError:
        return None, "it is missing"
    if size != facts.tokens * itemsize:
        return None, f"it is truncated ({size:,} bytes, {facts.tokens * itemsize:,} expected)"
    if _sha256(path) != facts.sha256:
        return None, "its contents do not match their SHA-256"
    return facts, ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(_READ_BYTES):
            digest.update(block)
    return digest.hexdigest()


class _Hashing:
    """A file handle that hashes and counts what is written through it."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.digest = hashlib.sha256()

    def write(self, data: bytes) -> None:
        self.digest.update(data)
        self.handle.write(data)


def store(folder: Path, key: str, write: Callable[[Callable[[bytes], None]], StreamFacts]
          ) -> tuple[npt.NDArray[np.integer[Any]], StreamFacts]:
    """Build stream ``key``: ``write`` is given a function that appends bytes of token ids to the stream, and
    returns its facts (the SHA-256 is filled in here); the ids, then the facts, are written atomically. The
    stream, memory-mapped, and its facts. Call it holding :func:`locked`: it first removes what a writer of this
    stream killed mid-write left (only the lock's holder writes it)."""
    remove_temporaries(folder, re.escape(key) + r"\.(?:tokens|json)")
    made: list[StreamFacts] = []

    def body(handle: IO[bytes]) -> None:
        hashing = _Hashing(handle)
        made.append(dataclasses.replace(write(hashing.write), sha256=hashing.digest.hexdigest()))

    write_atomic(stream_path(folder, key), body)
    facts = made[0]
    write_atomic(_facts_path(folder, key), (json.dumps(dataclasses.asdict(facts), indent=2) + "\n").encode("utf-8"))
    found = load(folder, key)
    if found is None:
        raise AutopartError(f"the token cache {str(stream_path(folder, key))!r} did not read back as written")
    return found

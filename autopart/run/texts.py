"""Where training text comes from when no ``--data`` is given, and how much of any text is read."""
from __future__ import annotations

import sysconfig
from pathlib import Path

from autopart.errors import AutopartError

__all__ = ["MAX_TEXT_BYTES", "default_corpus_files"]

MAX_TEXT_BYTES = 32 * 2**20
"""Read at most this much text: plenty for short runs, fast to load (and to tokenize)."""


def default_corpus_files() -> list[Path]:
    """The standard library's .py files: a text corpus present wherever Python is."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "test" not in p.parts and "site-packages" not in p.parts)
    if not files:
        raise AutopartError(f"no Python sources under {root} to use as the default text corpus; pass --data")
    return files

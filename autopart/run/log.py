"""A rank's progress and warnings: one flushed line on stderr (stdout is for results)."""
from __future__ import annotations

import sys

__all__ = ["say"]


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)

"""Typed readers for fields of our JSON documents, with errors that name the field.

Shared by the profile and the plan readers so that every malformed file gets
the same kind of one-line message: ``profile p.json: layers[3].forward_ms is -1.0, must be >= 0``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable, Mapping

from autopart.errors import AutopartError

__all__: list[str] = []


def load_json_file(path: str | Path, kind: str) -> Any:
    """Read a JSON file, turning every way it can fail into an :class:`AutopartError`."""
    p = Path(path)
    if not p.exists():
        raise AutopartError(f"{kind} file {str(p)!r} does not exist")
    if p.is_dir():
        raise AutopartError(f"{kind} file {str(p)!r} is a directory")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AutopartError(f"cannot read {kind} file {str(p)!r}: {exc}") from None
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise AutopartError(
            f"{kind} file {str(p)!r} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except ValueError as exc:
        raise AutopartError(f"{kind} file {str(p)!r}: {exc}") from None
    except RecursionError:  # [[[[...]]]] deeper than Python's stack: no file autopart wrote
        raise AutopartError(f"{kind} file {str(p)!r} is not a valid {kind}: nesting too deep") from None


MAX_BLOCK_MS = 1e9
"""No device takes longer than this for one block's pass over one micro-batch: 1e9 ms is 11.6 days."""
MAX_BLOCK_BYTES = 2**50
"""No device holds more than this for one block: 1 PiB."""


def check_plausible(where: str, values: Iterable[tuple[str, Any]], max_ms: float = MAX_BLOCK_MS,
                    max_bytes: int = MAX_BLOCK_BYTES) -> None:
    """Refuse a time (a key ending in ``_ms``) above ``max_ms`` or a size (``_bytes``) above ``max_bytes``:
    numbers no device can have come from a damaged or hand-edited file, and only overflow further on. A value
    that is a tuple of (name, number) pairs (a JSON object of name: number) has each number checked; other
    values that are not numbers are not checked."""
    for key, value in values:
        if isinstance(value, tuple):
            check_plausible(where, [(key, item[1]) for item in value if isinstance(item, tuple) and len(item) == 2],
                            max_ms, max_bytes)
            continue
        if not isinstance(value, (int, float)):
            continue
        if key.endswith("_ms") and value > max_ms:
            raise AutopartError(f"{where}: {key} {value:g} is not a plausible time (> {_ms_text(max_ms)})")
        if key.endswith("_bytes") and value > max_bytes:
            raise AutopartError(f"{where}: {key} {value:g} is not a plausible size (> {_bytes_text(max_bytes)})")


def _ms_text(ms: float) -> str:
    """``1e9`` -> ``"1e9 ms = 11.6 days"``."""
    days = ms / 864e5
    span = f"{days:.1f} days" if days < 365 else f"{days / 365.25:.1f} years"
    return f"1e{round(math.log10(ms))} ms = {span}" if ms == 10 ** round(math.log10(ms)) else f"{ms:g} ms = {span}"


def _bytes_text(n: int) -> str:
    """``2**50`` -> ``"2**50 bytes = 1 PiB"``."""
    power = n.bit_length() - 1
    if n != 2**power or not 10 <= power < 70:
        return f"{n} bytes"
    return f"2**{power} bytes = {2 ** (power % 10)} {('KiB', 'MiB', 'GiB', 'TiB', 'PiB', 'EiB')[power // 10 - 1]}"


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number autopart accepts")


class Fields:
    """Reads fields of one JSON object; ``where`` prefixes every error message."""

    def __init__(self, obj: Any, where: str) -> None:
        if not isinstance(obj, Mapping):
            raise AutopartError(f"{where} must be a JSON object, got {type(obj).__name__}")
        self.obj = obj
        self.where = where

    def at(self, key: str) -> str:
        """``profile 'p.json': layers[2].forward_ms`` or ``profile 'p.json': microbatch_size``."""
        return f"{self.where}.{key}" if self.where.endswith("]") else f"{self.where}: {key}"

    def _get(self, key: str, required: bool) -> Any:
        """The field's value; None when it is absent or null, which only an optional field may be."""
        if key not in self.obj:
            if required:
                raise AutopartError(f"{self.where}: missing field {key!r}")
            return None
        if required and self.obj[key] is None:
            raise AutopartError(f"{self.at(key)} is null; it is required")
        return self.obj[key]

    def string(self, key: str, required: bool = True, default: str | None = None) -> Any:
        value = self._get(key, required)
        if value is None:
            return default
        if not isinstance(value, str):
            raise AutopartError(f"{self.at(key)} must be a string, got {value!r}")
        return value

    def number(self, key: str, required: bool = True, default: float | None = None,
               minimum: float = 0.0) -> Any:
        value = self._get(key, required)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise AutopartError(f"{self.at(key)} must be a number, got {value!r}")
        if math.isnan(value) or math.isinf(value):
            raise AutopartError(f"{self.at(key)} is {value}, must be a finite number")
        if value < minimum:
            raise AutopartError(f"{self.at(key)} is {value}, must be >= {minimum:g}")
        return float(value)

    def integer(self, key: str, required: bool = True, default: int | None = None,
                minimum: int = 0) -> Any:
        value = self._get(key, required)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise AutopartError(f"{self.at(key)} must be an integer, got {value!r}")
        if value < minimum:
            raise AutopartError(f"{self.at(key)} is {value}, must be >= {minimum}")
        return value

    def choice(self, key: str, options: tuple[str, ...]) -> str | None:
        """An optional string that must be one of ``options``; None when absent."""
        value = self.string(key, required=False)
        if value is not None and value not in options:
            raise AutopartError(f"{self.at(key)} is {value!r}, expected one of {', '.join(options)}")
        return value  # type: ignore[no-any-return]

    def array(self, key: str, required: bool = True) -> Any:
        value = self._get(key, required)
        if value is None:
            return []
        if not isinstance(value, list):
            raise AutopartError(f"{self.at(key)} must be a list, got {type(value).__name__}")
        return value

    def int_list(self, key: str, required: bool = True, minimum: int = 0) -> list[int]:
        out = []
        for i, item in enumerate(self.array(key, required)):
            if isinstance(item, bool) or not isinstance(item, int) or item < minimum:
                raise AutopartError(f"{self.at(key)}[{i}] must be an integer >= {minimum}, got {item!r}")
            out.append(item)
        return out

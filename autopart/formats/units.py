"""Human units for bytes, bandwidth and time: parse what users type, print what they read.

Pure standard library.
"""
from __future__ import annotations

import math
import re

from autopart.errors import AutopartError

__all__ = ["format_bytes", "parse_bytes", "format_ms", "parse_bandwidth", "parse_duration_ms", "plural"]

_BINARY = {"": 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
           "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_DECIMAL = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def plural(n: int, one: str) -> str:
    """``plural(1, "stage")`` -> ``"1 stage"``, ``plural(2, "stage")`` -> ``"2 stages"``,
    ``plural(4, "micro-batch")`` -> ``"4 micro-batches"``: the words autopart counts take -s or -es."""
    if n == 1:
        return f"{n} {one}"
    return f"{n} {one}{'es' if one.endswith(('s', 'sh', 'ch', 'x')) else 's'}"


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            return f"{n:.3g} {unit}" if n < 100 else f"{n:.0f} {unit}"
    raise AssertionError("unreachable")


def parse_bytes(text: str, what: str = "size") -> int:
    """``"16GiB"``, ``"40GB"``, ``"1.5 TiB"``, ``"123"`` -> bytes. Bare letters (G, M) are binary."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not match:
        raise AutopartError(f"{what} {text!r} is not a size like 16GiB, 40GB or 123456789")
    value, unit = float(match.group(1)), match.group(2).lower()
    scale = _BINARY.get(unit) or _DECIMAL.get(unit)
    if scale is None:
        raise AutopartError(f"{what} {text!r}: unknown unit {match.group(2)!r} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")
    result = value * scale
    if not math.isfinite(result) or result <= 0:
        raise AutopartError(f"{what} {text!r} must be a positive size")
    return int(result)


def format_ms(ms: float) -> str:
    if ms >= 1000:
        return f"{ms / 1000:.3g} s"
    if ms >= 1:
        return f"{ms:.3g} ms"
    return f"{ms * 1000:.3g} µs"


_BW = {"b/s": 1, "kb/s": 1e3, "mb/s": 1e6, "gb/s": 1e9, "tb/s": 1e12,
       "kib/s": 2**10, "mib/s": 2**20, "gib/s": 2**30, "tib/s": 2**40,
       "bit/s": 1 / 8, "kbit/s": 1e3 / 8, "mbit/s": 1e6 / 8, "gbit/s": 1e9 / 8, "tbit/s": 1e12 / 8,
       "bps": 1 / 8, "kbps": 1e3 / 8, "mbps": 1e6 / 8, "gbps": 1e9 / 8, "tbps": 1e12 / 8}


def parse_bandwidth(text: str) -> float:
    """``"25GB/s"``, ``"100Gbit/s"``, ``"50GiB/s"`` -> bytes per second."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z/]+)\s*", text)
    if not match or match.group(2).lower() not in _BW:
        raise AutopartError(f"bandwidth {text!r} is not like 25GB/s, 50GiB/s or 100Gbit/s")
    value = float(match.group(1)) * _BW[match.group(2).lower()]
    if not value > 0 or not math.isfinite(value):
        raise AutopartError(f"bandwidth {text!r} must be positive")
    return value


_TIME = {"s": 1e3, "ms": 1.0, "us": 1e-3, "µs": 1e-3, "ns": 1e-6}


def parse_duration_ms(text: str, what: str = "latency") -> float:
    """``"10us"``, ``"0.5ms"``, ``"2s"`` -> milliseconds."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zµ]*)\s*", text)
    if not match or match.group(2) not in _TIME:
        raise AutopartError(f"{what} {text!r} is not like 10us, 0.5ms or 1s")
    value = float(match.group(1)) * _TIME[match.group(2)]
    if not math.isfinite(value) or value < 0:
        raise AutopartError(f"{what} {text!r} must be >= 0")
    return value

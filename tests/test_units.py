from __future__ import annotations

import pytest

from autopart.errors import AutopartError
from autopart.formats.units import parse_bandwidth, parse_bytes, parse_duration_ms


def test_units() -> None:
    assert parse_bytes("16GiB") == 16 * 2**30 and parse_bytes("40GB") == 40 * 10**9 and parse_bytes("123") == 123
    assert parse_bandwidth("25GB/s") == 25e9 and parse_bandwidth("100Gbit/s") == 12.5e9
    assert parse_duration_ms("10us") == pytest.approx(0.01) and parse_duration_ms("2s") == 2000
    for bad, fn in (("16 parsecs", parse_bytes), ("fast", parse_bandwidth), ("10 years", parse_duration_ms)):
        with pytest.raises(AutopartError):
            fn(bad)

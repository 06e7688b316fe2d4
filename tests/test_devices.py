from __future__ import annotations

import json
from pathlib import Path

import pytest

from autopart.errors import AutopartError
from autopart.formats.devices import parse_devices


def test_devices(tmp_path: Path) -> None:
    devices = parse_devices("2xA100-40GB,2xH100-80GB@2.0")
    assert [d.memory_bytes for d in devices] == [40e9, 40e9, 80e9, 80e9] and devices[3].speed == 2.0
    assert [d.memory_bytes for d in parse_devices("4x16GiB")] == [16 * 2**30] * 4
    spec = tmp_path / "d.json"
    spec.write_text(json.dumps({"devices": [{"count": 3, "memory": "24GB", "speed": 0.5, "name": "l4"}]}))
    assert [(d.name, d.speed) for d in parse_devices(str(spec))] == [("l4", 0.5)] * 3
    with pytest.raises(AutopartError, match="neither a memory size"):
        parse_devices("2xB300")

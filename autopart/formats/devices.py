"""Which device holds each stage: speed factor and memory limit, from a flag or a file.

    --devices 2xA100-40GB,2xH100-80GB@2.0      named devices (memory from the table)
    --devices 4x16GiB                           four devices with 16 GiB each
    --devices 2x40GB@1.0,2x80GB@2.1             count x memory @ speed
    --devices devices.json | devices.toml       {"devices": [{"count": 2, "memory": "40GB", "speed": 1.0, "name": "a100"}]}

Speed is relative to the device the profile was measured on (1.0, the default):
autopart does not guess how much faster one GPU is than another; give the
factor you measured (or profile on each kind). Pure standard library.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from autopart.errors import AutopartError
from autopart.formats.units import format_bytes, parse_bytes

__all__ = ["Device", "parse_devices", "KNOWN_MEMORY"]


@dataclass(frozen=True)
class Device:
    """One pipeline device."""

    name: str
    memory_bytes: int | None = None
    """Memory a stage may use on it; None means unlimited."""
    speed: float = 1.0
    """Compute speed relative to the profiled device: stage time is divided by it."""

    def describe(self) -> str:
        mem = format_bytes(self.memory_bytes) if self.memory_bytes else "unlimited"
        return f"{self.name} ({mem}, speed {self.speed:g})"


# Memory of common accelerators as sold (decimal GB, as vendors count).
KNOWN_MEMORY = {
    "V100-16GB": 16 * 10**9, "V100-32GB": 32 * 10**9, "T4-16GB": 16 * 10**9, "A10-24GB": 24 * 10**9,
    "L4-24GB": 24 * 10**9, "A100-40GB": 40 * 10**9, "A100-80GB": 80 * 10**9, "H100-80GB": 80 * 10**9,
    "H200-141GB": 141 * 10**9, "RTX4090-24GB": 24 * 10**9, "MI300X-192GB": 192 * 10**9,
}
_KNOWN_LOWER = {k.lower(): k for k in KNOWN_MEMORY}


def _entry(text: str) -> list[Device]:
    match = re.fullmatch(r"\s*(?:(\d+)\s*[x*]\s*)?([^@]+?)\s*(?:@\s*([0-9.]+))?\s*", text)
    if not match:
        raise AutopartError(f"device {text!r} is not like 2xA100-40GB, 4x16GiB or 2x80GB@1.5")
    count = int(match.group(1) or 1)
    what, speed_text = match.group(2), match.group(3)
    if count < 1:
        raise AutopartError(f"device {text!r}: count must be >= 1")
    try:
        speed = float(speed_text) if speed_text else 1.0
    except ValueError:
        raise AutopartError(f"device {text!r}: speed {speed_text!r} is not a number") from None
    if not speed > 0:
        raise AutopartError(f"device {text!r}: speed must be > 0")
    name = _KNOWN_LOWER.get(what.lower())
    if name is not None:
        memory = KNOWN_MEMORY[name]
    else:
        try:
            memory = parse_bytes(what, "device memory")
        except AutopartError:
            known = ", ".join(KNOWN_MEMORY)
            raise AutopartError(f"device {what!r} is neither a memory size (40GB, 16GiB) nor a known device "
                                f"({known})") from None
        name = format_bytes(memory)
    return [Device(name=name, memory_bytes=memory, speed=speed) for _ in range(count)]


def _from_file(path: Path) -> list[Device]:
    try:
        if path.suffix == ".toml":
            import tomllib

            data: Any = tomllib.loads(path.read_text())
        else:
            data = json.loads(path.read_text())
    except ImportError:
        raise AutopartError("TOML device files need Python 3.11+; use JSON") from None
    except (OSError, ValueError) as exc:
        raise AutopartError(f"cannot read devices file {str(path)!r}: {exc}") from None
    except RecursionError:
        raise AutopartError(f"devices file {str(path)!r} is not a valid devices file: nesting too deep") from None
    items = data.get("devices") if isinstance(data, dict) else data
    if not isinstance(items, list) or not items:
        raise AutopartError(f"devices file {str(path)!r} must hold a non-empty list 'devices'")
    devices: list[Device] = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise AutopartError(f"devices file {str(path)!r}: devices[{i}] must be an object")
        count = item.get("count", 1)
        memory = item.get("memory")
        speed = item.get("speed", 1.0)
        if not isinstance(count, int) or count < 1:
            raise AutopartError(f"devices file {str(path)!r}: devices[{i}].count must be an integer >= 1")
        if not isinstance(speed, (int, float)) or not speed > 0:
            raise AutopartError(f"devices file {str(path)!r}: devices[{i}].speed must be a number > 0")
        if memory is None:
            mem_bytes = None
        elif isinstance(memory, int):
            mem_bytes = memory
        else:
            mem_bytes = parse_bytes(str(memory), f"devices[{i}].memory")
        name = str(item.get("name") or (format_bytes(mem_bytes) if mem_bytes else "device"))
        devices += [Device(name=name, memory_bytes=mem_bytes, speed=float(speed)) for _ in range(count)]
    return devices


def parse_devices(text: str) -> list[Device]:
    """Devices from ``--devices``: a comma list of entries, or a .json/.toml file."""
    path = Path(text)
    if path.suffix in (".json", ".toml"):
        if not path.is_file():
            raise AutopartError(f"devices file {text!r} does not exist")
        return _from_file(path)
    devices = [d for part in text.split(",") if part.strip() for d in _entry(part)]
    if not devices:
        raise AutopartError(f"--devices {text!r} names no device")
    return devices

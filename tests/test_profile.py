"""The profile format: round trip and rejection of malformed files."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from autopart.errors import AutopartError
from autopart.formats.profile import LayerProfile, Profile


def _profile() -> Profile:
    layers = tuple(LayerProfile(name=f"b{i}", forward_ms=1.0 + i, backward_ms=2.0 + i, param_bytes=100 * i,
                                activation_bytes=10, output_bytes=20, forward_iqr_ms=0.1) for i in range(3))
    return Profile(model="m", device="cpu", dtype="float32", microbatch_size=2, sample_shape=(2, 8),
                   torch="2.13.0", layers=layers, threads=1, repeats=3, warmup=1)


def test_round_trip(tmp_path: Path) -> None:
    profile = _profile()
    path = profile.to_json(tmp_path / "p.json")
    assert Profile.from_json(path) == profile
    assert json.loads(path.read_text())["schema"] == "autopart.profile/1"


def test_the_pure_format_does_not_import_torch() -> None:
    code = "import sys, autopart.formats.profile, autopart; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def _broken(mutate: Any) -> dict[str, Any]:
    data = _profile().to_dict()
    mutate(data)
    return data


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(schema="autopart.formats.profile/0"), "schema is 'autopart.formats.profile/0'"),
    (lambda d: d.pop("layers"), "missing field 'layers'"),
    (lambda d: d.update(layers=[]), "'layers' is empty"),
    (lambda d: d["layers"][1].pop("forward_ms"), "layers[1]: missing field 'forward_ms'"),
    (lambda d: d["layers"][0].update(backward_ms=-1.0), "layers[0].backward_ms is -1.0, must be >= 0"),
    (lambda d: d["layers"][2].update(forward_ms=math.nan), "layers[2].forward_ms is nan"),
    (lambda d: d["layers"][0].update(param_bytes=1.5), "param_bytes must be an integer"),
    (lambda d: d["layers"][0].update(name=""), "layers[0].name is empty"),
    (lambda d: d["layers"][1].update(name="b0"), "repeats block names ['b0']"),
    (lambda d: d.update(microbatch_size=0), "microbatch_size is 0, must be >= 1"),
    (lambda d: d.update(layers="x"), "layers must be a list"),
])
def test_malformed_profiles_are_rejected(mutate: Any, message: str) -> None:
    with pytest.raises(AutopartError) as info:
        Profile.from_dict(_broken(mutate))
    assert message in str(info.value)


def test_unreadable_files_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(AutopartError, match="does not exist"):
        Profile.from_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": ')
    with pytest.raises(AutopartError, match="not valid JSON"):
        Profile.from_json(bad)
    nan = tmp_path / "nan.json"
    nan.write_text(json.dumps(_profile().to_dict()).replace('"forward_ms": 1.0', '"forward_ms": NaN'))
    with pytest.raises(AutopartError, match="NaN"):
        Profile.from_json(nan)
    with pytest.raises(AutopartError, match="must be a JSON object"):
        Profile.from_dict([1, 2])


def test_unknown_fields_are_tolerated() -> None:
    data = _profile().to_dict()
    data["flops"] = 123
    data["layers"][0]["flops"] = 5
    assert Profile.from_dict(data) == _profile()

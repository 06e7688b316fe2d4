from __future__ import annotations

import json
from pathlib import Path

import pytest

from autopart.core.costmodel import CostModel, Problem
from autopart.formats.devices import Device, parse_devices
from autopart.errors import AutopartError
from autopart.core.partition import split_exact
from autopart.core.planner import make_plan
from autopart.core.simulate import closed_form_step_ms
from autopart.formats.plan import Plan
from autopart.formats.units import parse_bandwidth, parse_bytes, parse_duration_ms


def _plan() -> Plan:
    devices = [Device("a", memory_bytes=10**6), Device("b", memory_bytes=10**6, speed=2.0)]
    model = CostModel(schedule="gpipe", microbatches=4, bandwidth_bytes_per_ms=1e3)
    problem = Problem([1.0, 2.0, 3.0, 4.0], devices, model, param_bytes=[10] * 4, output_bytes=[100] * 4,
                      names=["embed", "h.0", "h.1", "head"])
    return make_plan(split_exact(problem), problem, model, devices, profile_path="p.json", model_name="m")


def test_plan_round_trip(tmp_path: Path) -> None:
    plan = _plan()
    assert Plan.from_json(plan.to_json(tmp_path / "plan.json")) == plan
    assert plan.split_spec() == {plan.stages[1].blocks[0]: "SplitPoint.BEGINNING"}
    assert sum(plan.fqns(), []) == ["embed", "h.0", "h.1", "head"]


def test_plan_rejects_mismatched_balance() -> None:
    data = _plan().to_dict()
    data["balance"] = [1, 3] if data["balance"] != [1, 3] else [2, 2]
    with pytest.raises(AutopartError, match="does not match"):
        Plan.from_dict(data)
    data = _plan().to_dict()
    data["schema"] = "autopart.profile/1"
    with pytest.raises(AutopartError, match="expected 'autopart.plan/1'"):
        Plan.from_dict(data)


def test_closed_form_step_of_equal_stages() -> None:
    step, bubble = closed_form_step_ms([2.0] * 4, 8)
    assert step == (8 + 4 - 1) * 2.0 and bubble == pytest.approx(3 / 11)


def test_units() -> None:
    assert parse_bytes("16GiB") == 16 * 2**30 and parse_bytes("40GB") == 40 * 10**9 and parse_bytes("123") == 123
    assert parse_bandwidth("25GB/s") == 25e9 and parse_bandwidth("100Gbit/s") == 12.5e9
    assert parse_duration_ms("10us") == pytest.approx(0.01) and parse_duration_ms("2s") == 2000
    for bad, fn in (("16 parsecs", parse_bytes), ("fast", parse_bandwidth), ("10 years", parse_duration_ms)):
        with pytest.raises(AutopartError):
            fn(bad)


def test_devices(tmp_path: Path) -> None:
    devices = parse_devices("2xA100-40GB,2xH100-80GB@2.0")
    assert [d.memory_bytes for d in devices] == [40e9, 40e9, 80e9, 80e9] and devices[3].speed == 2.0
    assert [d.memory_bytes for d in parse_devices("4x16GiB")] == [16 * 2**30] * 4
    spec = tmp_path / "d.json"
    spec.write_text(json.dumps({"devices": [{"count": 3, "memory": "24GB", "speed": 0.5, "name": "l4"}]}))
    assert [(d.name, d.speed) for d in parse_devices(str(spec))] == [("l4", 0.5)] * 3
    with pytest.raises(AutopartError, match="neither a memory size"):
        parse_devices("2xB300")

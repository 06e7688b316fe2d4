from __future__ import annotations

from pathlib import Path

import pytest

from autopart.core.costmodel import CostModel, Problem
from autopart.formats.devices import Device
from autopart.errors import AutopartError
from autopart.core.partition import split_bottleneck
from autopart.core.planner import make_plan
from autopart.formats.plan import Plan


def _plan() -> Plan:
    devices = [Device("a", memory_bytes=10**6), Device("b", memory_bytes=10**6, speed=2.0)]
    model = CostModel(schedule="gpipe", microbatches=4, bandwidth_bytes_per_ms=1e3)
    problem = Problem([1.0, 2.0, 3.0, 4.0], devices, model, param_bytes=[10] * 4, output_bytes=[100] * 4,
                      names=["embed", "h.0", "h.1", "head"])
    return make_plan(split_bottleneck(problem), problem, model, devices, profile_path="p.json", model_name="m")


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

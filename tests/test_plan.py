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
    assert plan.split_points() == [plan.stages[1].blocks[0]]
    namespace: dict[str, object] = {}
    exec(plan.split_spec_code(), namespace)
    from torch.distributed.pipelining import SplitPoint
    assert namespace["split_spec"] == {plan.stages[1].blocks[0]: SplitPoint.BEGINNING}
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


@pytest.mark.parametrize("optimizer, states", [("adamw", 2), ("adam", 2), ("sgd-momentum", 1), ("sgd", 0)])
def test_plan_records_its_optimizers_states_from_the_one_table(optimizer: str, states: int) -> None:
    """A plan's optimizer_states is its optimizer's (written for readers); a file where they disagree is refused."""
    model = CostModel(schedule="gpipe", microbatches=1, optimizer=optimizer)
    problem = Problem([1.0, 2.0], [Device("a")] * 2, model, param_bytes=[10, 10])
    plan = make_plan(split_bottleneck(problem), problem, model, [Device("a")] * 2)
    data = plan.to_dict()
    assert (data["optimizer"], data["optimizer_states"]) == (optimizer, states)
    assert (plan.optimizer, plan.optimizer_states, model.optimizer_states) == (optimizer, states, states)
    assert plan.stages[0].cost.memory_bytes == 10 * (2 + states)  # weights, gradients, optimizer state
    assert Plan.from_dict(data) == plan
    data["optimizer_states"] = states + 1
    with pytest.raises(AutopartError, match=f"plan: optimizer_states is {states + 1}, but optimizer '{optimizer}' "
                                            f"keeps {states}"):
        Plan.from_dict(data)
    del data["optimizer"]  # a plan from before optimizers had names: the default, adamw, keeps 2
    data["optimizer_states"] = states
    if states == 2:
        assert Plan.from_dict(data).optimizer == "adamw"
    else:
        with pytest.raises(AutopartError, match=f"is {states}, but the default optimizer 'adamw' \\(the plan "
                                                f"names none\\) keeps 2"):
            Plan.from_dict(data)


def test_split_spec_keys_are_modules_pipeline_finds_in_nested_sequentials() -> None:
    """Blocks of a Sequential of Sequentials are named by their paths (``1.1.0``); ``pipeline()`` finds each
    by ``getattr`` one name at a time, so the printed split_spec cuts there."""
    import torch
    from torch import nn
    from torch.distributed.pipelining import pipeline

    from autopart.formats.plan import PlanStage, Predicted
    from autopart.formats.stage import StageCost
    from autopart.measure.blocks import split_blocks

    def model() -> nn.Module:
        return nn.Sequential(nn.Sequential(nn.Linear(4, 4), nn.ReLU()),
                             nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Tanh(), nn.Linear(4, 2))))

    names = [name for name, _ in split_blocks(model())]
    assert names == ["0.0", "0.1", "1.0", "1.1.0", "1.1.1"]
    stages = tuple(PlanStage(blocks=tuple(b), device=Device("cpu"), cost=StageCost(1.0, 2.0))
                   for b in (names[:1], names[1:3], names[3:]))
    plan = Plan(profile="", model="nested", method="uniform", schedule="GPipe", microbatches=3, balance=(1, 2, 2),
                stages=stages, predicted=Predicted(step_ms=1.0, bubble_fraction=0.0, bottleneck_ms=1.0,
                                                   lower_bound_ms=1.0))
    namespace: dict[str, object] = {}
    exec(plan.split_spec_code(), namespace)
    assert list(namespace["split_spec"]) == ["0.1", "1.1.0"]  # type: ignore[call-overload]
    pipe = pipeline(model(), mb_args=(torch.randn(2, 4),), split_spec=namespace["split_spec"])  # type: ignore[arg-type]
    assert pipe.num_stages == 3

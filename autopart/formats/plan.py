"""The plan: which blocks each stage holds, and what the cost model predicts (``schema: "autopart.plan/1"``).

Pure data, no torch. :func:`make_plan` turns a split into a plan;
``Plan.to_json`` / ``Plan.from_json`` save and validate it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from autopart.formats.atomic import write_json_atomic
from autopart.core.costmodel import CostModel, Problem
from autopart.formats.devices import Device
from autopart.errors import AutopartError
from autopart.formats.jsonfields import Fields, load_json_file
from autopart.core.partition import Split
from autopart.core.schedules import build_schedule, canonical_schedule
from autopart.core.simulate import Simulation, StageCosts, simulate

__all__ = ["PLAN_SCHEMA", "Plan", "PlanStage", "Predicted", "Candidate", "make_plan", "pipeline_step_ms",
           "simulate_plan"]

PLAN_SCHEMA = "autopart.plan/1"


@dataclass(frozen=True)
class PlanStage:
    blocks: tuple[str, ...]
    """Module names of the blocks, in order (``named_modules`` spelling)."""
    time_ms: float
    """Forward + backward of one micro-batch, plus recomputation and sends."""
    memory_bytes: int
    """Parameters with gradients and optimizer state, plus in-flight activations."""
    device: str
    recompute: bool = False
    """Activation recomputation on: the only way this stage fits its memory."""
    compute_ms: float = 0.0
    send_ms: float = 0.0
    memory_limit_bytes: int | None = None
    speed: float = 1.0
    forward_ms: float = 0.0
    backward_ms: float = 0.0
    """Recomputed forward included."""
    send_forward_ms: float = 0.0
    send_backward_ms: float = 0.0
    activation_bytes: int = 0
    """Kept per in-flight micro-batch (only the input when recomputing)."""
    static_bytes: int = 0
    """Parameters, gradients and optimizer state."""
    backward_extra_bytes: int = 0
    optimizer_ms: float = 0.0
    """The optimizer step over the stage's parameters, once per training step."""


_STAGE_NUMBERS = ("compute_ms", "send_ms", "forward_ms", "backward_ms", "send_forward_ms", "send_backward_ms",
                  "optimizer_ms")
_STAGE_INTS = ("activation_bytes", "static_bytes", "backward_extra_bytes")


@dataclass(frozen=True)
class Candidate:
    """A configuration the joint search tried."""

    schedule: str
    microbatches: int
    stages_per_rank: int
    step_ms: float
    balance: tuple[int, ...]


@dataclass(frozen=True)
class Predicted:
    step_ms: float
    """One training step of all micro-batches."""
    bubble_fraction: float
    """Share of device time spent idle in a step."""
    bottleneck_ms: float
    """The slowest stage's time per micro-batch."""
    lower_bound_ms: float
    """No split has a faster slowest stage than this."""
    source: str = "simulated"


@dataclass(frozen=True)
class Plan:
    profile: str
    model: str
    method: str
    schedule: str
    microbatches: int
    balance: tuple[int, ...]
    stages: tuple[PlanStage, ...]
    predicted: Predicted
    optimizer_states: int = 2
    bandwidth_bytes_per_s: float | None = None
    latency_ms: float = 0.0
    fits: bool = True
    stages_per_rank: int = 1
    microbatch_size: int | None = None
    """Rows per micro-batch the times are for (the profile's, or the search's choice)."""
    scaling: str = ""
    """How times were scaled to ``microbatch_size`` when it differs from the profile's."""
    runners_up: tuple[Candidate, ...] = ()
    """What the joint search beat, best first."""
    sample_shape: tuple[int, ...] = ()
    """Shape of one micro-batch's input (the profile's, at ``microbatch_size``)."""
    schema: str = field(default=PLAN_SCHEMA)

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_ranks(self) -> int:
        return len(self.stages) // self.stages_per_rank

    def split_spec(self) -> dict[str, str]:
        """torch.distributed.pipelining ``split_spec``: the first block of every stage but the first."""
        return {stage.blocks[0]: "SplitPoint.BEGINNING" for stage in self.stages[1:]}

    def fqns(self) -> list[list[str]]:
        """Module names per stage, as torchtitan's ``module_names_per_stage`` takes them."""
        return [list(stage.blocks) for stage in self.stages]

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema, "profile": self.profile, "model": self.model, "method": self.method,
            "schedule": self.schedule, "microbatches": self.microbatches, "balance": list(self.balance),
            "optimizer_states": self.optimizer_states, "bandwidth_bytes_per_s": self.bandwidth_bytes_per_s,
            "latency_ms": self.latency_ms, "fits": self.fits, "stages_per_rank": self.stages_per_rank,
            "microbatch_size": self.microbatch_size, "scaling": self.scaling,
            "sample_shape": list(self.sample_shape),
            "stages": [{"blocks": list(s.blocks), "time_ms": s.time_ms, "memory_bytes": s.memory_bytes,
                        "device": s.device, "recompute": s.recompute, "memory_limit_bytes": s.memory_limit_bytes,
                        "speed": s.speed, **{k: getattr(s, k) for k in _STAGE_NUMBERS + _STAGE_INTS}}
                       for s in self.stages],
            "runners_up": [{"schedule": c.schedule, "microbatches": c.microbatches,
                            "stages_per_rank": c.stages_per_rank, "step_ms": c.step_ms, "balance": list(c.balance)}
                           for c in self.runners_up],
            "predicted": {"step_ms": self.predicted.step_ms, "bubble_fraction": self.predicted.bubble_fraction,
                          "bottleneck_ms": self.predicted.bottleneck_ms,
                          "lower_bound_ms": self.predicted.lower_bound_ms, "source": self.predicted.source},
        }

    def to_json(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_dict())

    @staticmethod
    def from_dict(obj: Any, source: str = "plan") -> "Plan":
        f = Fields(obj, source)
        schema = f.string("schema")
        if schema != PLAN_SCHEMA:
            raise AutopartError(f"{source}: schema is {schema!r}, expected {PLAN_SCHEMA!r}")
        stages = []
        for k, raw in enumerate(f.array("stages")):
            sf = Fields(raw, f"{source}: stages[{k}]")
            blocks = sf.array("blocks")
            if not blocks or not all(isinstance(b, str) and b for b in blocks):
                raise AutopartError(f"{source}: stages[{k}].blocks must be a non-empty list of module names")
            limit = sf.integer("memory_limit_bytes", required=False)
            stages.append(PlanStage(
                blocks=tuple(blocks), time_ms=sf.number("time_ms"), memory_bytes=sf.integer("memory_bytes"),
                device=sf.string("device", required=False, default=""),
                recompute=bool(raw.get("recompute", False)), memory_limit_bytes=limit,
                speed=sf.number("speed", False, 1.0),
                **{k: sf.number(k, False, 0.0) for k in _STAGE_NUMBERS},
                **{k: sf.integer(k, False, 0) for k in _STAGE_INTS}))
        if not stages:
            raise AutopartError(f"{source}: 'stages' is empty")
        balance = tuple(f.int_list("balance", minimum=1))
        if list(balance) != [len(s.blocks) for s in stages]:
            raise AutopartError(f"{source}: balance {list(balance)} does not match the stages' block counts "
                                f"{[len(s.blocks) for s in stages]}")
        pf = Fields(f.obj.get("predicted"), f"{source}: predicted")
        predicted = Predicted(step_ms=pf.number("step_ms"), bubble_fraction=pf.number("bubble_fraction"),
                              bottleneck_ms=pf.number("bottleneck_ms"), lower_bound_ms=pf.number("lower_bound_ms"),
                              source=pf.string("source", required=False, default=""))
        bandwidth = f.number("bandwidth_bytes_per_s", required=False)
        runners = []
        for k, raw in enumerate(f.array("runners_up", required=False)):
            cf = Fields(raw, f"{source}: runners_up[{k}]")
            runners.append(Candidate(schedule=cf.string("schedule"), microbatches=cf.integer("microbatches", minimum=1),
                                     stages_per_rank=cf.integer("stages_per_rank", False, 1, minimum=1),
                                     step_ms=cf.number("step_ms"), balance=tuple(cf.int_list("balance", minimum=1))))
        stages_per_rank = f.integer("stages_per_rank", required=False, default=1, minimum=1)
        if len(stages) % stages_per_rank:
            raise AutopartError(f"{source}: {len(stages)} stages do not divide into {stages_per_rank} per rank")
        return Plan(profile=f.string("profile", required=False, default=""),
                    model=f.string("model", required=False, default=""), method=f.string("method"),
                    schedule=canonical_schedule(f.string("schedule")), microbatches=f.integer("microbatches", minimum=1),
                    balance=balance, stages=tuple(stages), predicted=predicted,
                    optimizer_states=f.integer("optimizer_states", required=False, default=2),
                    bandwidth_bytes_per_s=bandwidth, latency_ms=f.number("latency_ms", False, 0.0),
                    fits=bool(f.obj.get("fits", True)), stages_per_rank=stages_per_rank,
                    microbatch_size=f.integer("microbatch_size", required=False, minimum=1),
                    scaling=f.string("scaling", required=False, default=""), runners_up=tuple(runners),
                    sample_shape=tuple(f.int_list("sample_shape", required=False, minimum=1)),
                    schema=schema)

    @staticmethod
    def from_json(path: str | Path) -> "Plan":
        return Plan.from_dict(load_json_file(path, "plan"), source=f"plan {str(path)!r}")


def pipeline_step_ms(stage_ms: Sequence[float], microbatches: int) -> tuple[float, float]:
    """(step time, bubble fraction) of GPipe/1F1B with these per-micro-batch stage times.

    The first micro-batch passes every stage (fill and drain), the other M - 1
    follow at the pace of the slowest: ``Σ t_s + (M - 1) max t_s``. Exact for
    equal stages; the simulator refines it for unequal ones.
    """
    step = sum(stage_ms) + (microbatches - 1) * max(stage_ms)
    busy = microbatches * sum(stage_ms)
    bubble = 1 - busy / (len(stage_ms) * step) if step > 0 else 0.0
    return step, bubble


def simulate_plan(plan: Plan, microbatches: int | None = None, schedule: str | None = None,
                  stages_per_rank: int | None = None) -> Simulation:
    """Simulate ``plan``'s stages under its schedule, or another micro-batch count or schedule."""
    name = canonical_schedule(schedule or plan.schedule)
    per_rank = stages_per_rank or (plan.stages_per_rank if name == plan.schedule else 1)
    if name == "ZBVZeroBubble":
        per_rank = 2
    if plan.num_stages % per_rank:
        raise AutopartError(f"{name} with {per_rank} stages per rank cannot run the plan's {plan.num_stages} stages")
    sched = build_schedule(name, plan.num_stages // per_rank, microbatches or plan.microbatches, per_rank)
    return simulate(sched, stage_costs(plan.stages))


def stage_costs(stages: Sequence[PlanStage]) -> list[StageCosts]:
    return [StageCosts(forward_ms=st.forward_ms, backward_ms=st.backward_ms, send_forward_ms=st.send_forward_ms,
                       send_backward_ms=st.send_backward_ms, activation_bytes=st.activation_bytes,
                       static_bytes=st.static_bytes, backward_extra_bytes=st.backward_extra_bytes,
                       optimizer_ms=st.optimizer_ms)
            for st in stages]


def make_plan(split: Split, problem: Problem, model: CostModel, devices: Sequence[Device], *,
              profile_path: str = "", model_name: str = "", microbatch_size: int | None = None,
              scaling: str = "", runners_up: Sequence[Candidate] = (), sample_shape: Sequence[int] = ()) -> Plan:
    """A plan from a split of ``problem``'s blocks, with its step simulated under the model's schedule."""
    stages = []
    for cost, device in zip(split.stages, devices):
        stages.append(PlanStage(
            blocks=tuple(problem.names[cost.first: cost.last + 1]), time_ms=cost.time_ms,
            memory_bytes=cost.memory_bytes, device=device.name, recompute=cost.recompute,
            compute_ms=cost.compute_ms, send_ms=cost.send_ms, memory_limit_bytes=device.memory_bytes,
            speed=device.speed, forward_ms=cost.forward_ms, backward_ms=cost.backward_ms,
            send_forward_ms=cost.send_forward_ms, send_backward_ms=cost.send_backward_ms,
            activation_bytes=cost.activation_bytes, static_bytes=cost.static_bytes,
            backward_extra_bytes=cost.backward_extra_bytes, optimizer_ms=cost.optimizer_ms))
    sched = build_schedule(model.schedule, len(stages) // model.stages_per_rank, model.microbatches,
                           model.stages_per_rank)
    sim = simulate(sched, stage_costs(stages))
    predicted = Predicted(step_ms=sim.step_ms, bubble_fraction=sim.bubble_fraction,
                          bottleneck_ms=split.bottleneck_ms, lower_bound_ms=split.lower_bound_ms)
    bw = model.bandwidth_bytes_per_ms * 1e3 if model.bandwidth_bytes_per_ms else None
    return Plan(profile=profile_path, model=model_name, method=split.method, schedule=model.schedule,
                microbatches=model.microbatches, balance=split.balance, stages=tuple(stages),
                predicted=predicted, optimizer_states=model.optimizer_states, bandwidth_bytes_per_s=bw,
                latency_ms=model.latency_ms, fits=split.fits, stages_per_rank=model.stages_per_rank,
                microbatch_size=microbatch_size, scaling=scaling, runners_up=tuple(runners_up),
                sample_shape=tuple(sample_shape))

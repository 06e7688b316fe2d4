"""From a split to a plan, and a plan's step simulated.

    plan = make_plan(split_bottleneck(problem), problem, model, devices)
    sim = simulate_plan(plan)                               # step_ms, bubble_fraction, events

Pure (numpy, no torch). :mod:`autopart.core.costmodel` prices a split,
:mod:`autopart.core.partition` finds one, this module records it as the saved
:class:`~autopart.formats.plan.Plan`, and :mod:`autopart.core.search` (with
the one-call ``plan_partition``) tries schedules and micro-batch counts.
"""
from __future__ import annotations

from typing import Sequence

from autopart.core.costmodel import CostModel, Problem
from autopart.core.partition import Split
from autopart.core.schedules import build_schedule
from autopart.core.simulate import Simulation, simulate
from autopart.errors import AutopartError
from autopart.formats.devices import Device
from autopart.formats.plan import Candidate, Plan, PlanStage, Predicted
from autopart.formats.precision import DEFAULT_PRECISION
from autopart.formats.schedule_kinds import canonical_schedule, stages_per_rank

__all__ = ["make_plan", "simulate_plan", "cost_model_of"]


def make_plan(split: Split, problem: Problem, model: CostModel, devices: Sequence[Device], *,
              profile_path: str = "", model_name: str = "", microbatch_size: int | None = None,
              scaling: str = "", runners_up: Sequence[Candidate] = (), sample_shape: Sequence[int] = (),
              threads: int | None = None, batchnorm: str | None = None, precision: str = DEFAULT_PRECISION) -> Plan:
    """A plan from a split of ``problem``'s blocks, with its step simulated under the model's schedule;
    ``precision``: the profile's (:mod:`autopart.formats.precision`), which the plan records for ``train``."""
    stages, first = [], 0
    for count, cost, device in zip(split.balance, split.stages, devices):
        stages.append(PlanStage(blocks=tuple(problem.names[first: first + count]), device=device, cost=cost))
        first += count
    sched = build_schedule(model.schedule, len(stages) // model.stages_per_rank, model.microbatches,
                           model.stages_per_rank)
    sim = simulate(sched, split.stages)
    predicted = Predicted(step_ms=sim.step_ms, bubble_fraction=sim.bubble_fraction,
                          bottleneck_ms=split.bottleneck_ms, lower_bound_ms=split.lower_bound_ms)
    bw = model.bandwidth_bytes_per_ms * 1e3 if model.bandwidth_bytes_per_ms else None
    return Plan(profile=profile_path, model=model_name, method=split.method, schedule=model.schedule,
                microbatches=model.microbatches, balance=split.balance, stages=tuple(stages),
                predicted=predicted, optimizer=model.optimizer,
                bandwidth_bytes_per_s=bw,
                latency_ms=model.latency_ms, fits=split.fits, stages_per_rank=model.stages_per_rank,
                microbatch_size=microbatch_size, scaling=scaling, runners_up=tuple(runners_up),
                sample_shape=tuple(sample_shape), threads=threads,
                batchnorm=batchnorm, precision=precision)


def simulate_plan(plan: Plan, microbatches: int | None = None, schedule: str | None = None,
                  per_rank: int | None = None) -> Simulation:
    """Simulate ``plan``'s stages under its schedule, or another micro-batch count, schedule or interleaving.

    Without ``per_rank``, the plan's own stages per rank when the schedule is the
    plan's, else what the schedule implies (:func:`stages_per_rank`).
    """
    name = canonical_schedule(schedule or plan.schedule)
    if per_rank is None:
        per_rank = plan.stages_per_rank if name == plan.schedule else stages_per_rank(name)
    if per_rank < 1 or plan.num_stages % per_rank:
        raise AutopartError(f"{name} with {per_rank} stages per rank cannot hold the plan's {plan.num_stages} "
                            f"stages (must divide)")
    sched = build_schedule(name, plan.num_stages // per_rank, microbatches or plan.microbatches, per_rank)
    return simulate(sched, [st.cost for st in plan.stages])


def cost_model_of(plan: Plan, recompute: bool = True) -> CostModel:
    """The cost model a plan was made under (its schedule, micro-batches, optimizer state, sends and the
    runtime's overhead per action)."""
    bandwidth = plan.bandwidth_bytes_per_s / 1e3 if plan.bandwidth_bytes_per_s else None
    return CostModel(schedule=plan.schedule, microbatches=plan.microbatches, optimizer=plan.optimizer,
                     bandwidth_bytes_per_ms=bandwidth, latency_ms=plan.latency_ms,
                     stages_per_rank=plan.stages_per_rank, recompute=recompute,
                     overhead_ms=plan.stages[0].cost.overhead_ms if plan.stages else 0.0)

"""A plan's split re-priced at another micro-batch size its profile measured, and the ranks it no longer fits.

    resized = plan_at_microbatch_size(plan, profile, 4)   # same blocks, schedule and recomputation
    over = ranks_over_limit(resized)                       # [(rank, need, limit), ...] where it no longer fits

What ``autopart train --global-batch`` checks before it runs micro-batches of
another size than the plan's (:mod:`autopart.run.microbatch`). Pure (numpy,
no torch).
"""
from __future__ import annotations

import dataclasses

from autopart.core.costmodel import Problem
from autopart.core.planner import cost_model_of, simulate_plan
from autopart.core.scaling import scale_profile
from autopart.errors import AutopartError
from autopart.formats.plan import Plan, Predicted
from autopart.formats.profile import Profile

__all__ = ["plan_at_microbatch_size", "ranks_over_limit"]


def plan_at_microbatch_size(plan: Plan, profile: Profile, microbatch_size: int) -> Plan:
    """``plan``'s split, schedule, micro-batch count, devices and each stage's recomputation (as the run
    does them), priced by the same cost model from ``profile``'s blocks measured at ``microbatch_size``; the plan's
    exposed all-reduce over its replicas is carried over and added to the step (the gradients it sums are the same
    bytes at any micro-batch size)."""
    measured = profile.sizes()
    if microbatch_size not in measured:
        raise AutopartError(f"the profile measured micro-batch sizes {sorted(measured)}, not {microbatch_size}")
    blocks = [name for st in plan.stages for name in st.blocks]
    if profile.names != blocks:
        raise AutopartError(f"the profile's {len(profile.names)} blocks are not the plan's {len(blocks)} "
                            f"(profiled again since partition?)")
    scaled, _ = scale_profile(profile, microbatch_size)
    problem = Problem.from_profile(scaled, [st.device for st in plan.stages], cost_model_of(plan))
    costs = problem.stages(plan.balance, recompute=[st.cost.recompute for st in plan.stages])
    stages = tuple(dataclasses.replace(st, cost=cost) for st, cost in zip(plan.stages, costs))
    resized = dataclasses.replace(plan, stages=stages, microbatch_size=microbatch_size, scaling="",
                                  sample_shape=scaled.sample_shape, runners_up=())
    sim = simulate_plan(resized)
    allreduce_ms = plan.predicted.allreduce_ms  # the same gradients at any micro-batch size
    predicted = Predicted(step_ms=sim.step_ms + allreduce_ms, bubble_fraction=sim.bubble_fraction,
                          bottleneck_ms=max(c.time_ms for c in costs),
                          lower_bound_ms=problem.lower_bound_ms(), allreduce_ms=allreduce_ms)
    return dataclasses.replace(resized, predicted=predicted, fits=not ranks_over_limit(resized))


def ranks_over_limit(plan: Plan) -> list[tuple[int, int, int]]:
    """(rank, planned bytes, limit bytes) of every rank whose stages' planned peaks add up to more than their
    devices' limits (a rank of several stages shares its device: the planner splits its limit among them)."""
    out = []
    for rank in range(plan.num_ranks):
        stages = [plan.stages[s] for s in plan.stages_of(rank)]
        limits = [st.device.memory_bytes for st in stages]
        if any(limit is None for limit in limits):
            continue
        need, limit = sum(st.cost.memory_bytes for st in stages), sum(int(x or 0) for x in limits)
        if need > limit:
            out.append((rank, need, limit))
    return out

"""The choice among scored plans: the fastest predicted step, unless the profile's own spread cannot tell it
from a more balanced one.

    chosen = choose(plans, profile)       # a Plan, predicted.margin and predicted.noise set
    noise_band(plan, profile)             # 0.063: the busiest rank's blocks' IQRs over their medians

The exact search minimises the predicted step, so it lands where the cost
model errs most (a stage of one narrow block, a split that piles the work on
one rank and hides it behind the schedule). The profile records each
block's interquartile range: the **noise band** of a plan is the busiest
rank's (the largest compute and action cost per micro-batch) blocks' IQRs,
forward and backward, summed, over the same blocks' medians, summed, at the
measured micro-batch size nearest the plan's. Summed, not in quadrature:
on one machine the blocks slow down and speed up together (clock, memory
bandwidth shared with the other ranks), so their spreads add. The steady
part of a step is the busiest rank's compute, M times: its relative spread
is the step's.

The **choice**: the plans of the fastest's configuration (schedule,
micro-batches, stages per rank, replicas: only the split differs) whose
step is within the fastest's band (``step <= fastest x (1 + noise)``) are
ties; of them the one whose busiest rank is busy least per step (M x its
forward and backward per micro-batch, the loss included, plus the runtime's
cost of its actions: 2 per stage and micro-batch, 3 under ZBVZeroBubble,
whose backward runs as I and W) wins, then the
caller's order (the smaller step, then the search's own tie-breakers: less
memory, ...). Splits only: another micro-batch count or schedule within the
band is not a tie, since larger micro-batches compute a step in less time
and the rule would then pick the fewest micro-batches, the largest bubble
(the autotune sweep of 2026-12-01 chose ZBVZeroBubble M=1 that way, 24%
slower than the best measured point). The **margin** is how much slower the
fastest other plan is than the chosen one, relative (negative when the
chosen one is not the fastest). Pure (no torch): docs/partition.md, "The
choice and the noise band".
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from autopart.errors import AutopartError
from autopart.formats.plan import Plan
from autopart.formats.profile import LayerProfile, Profile

__all__ = ["noise_band", "busiest_compute_ms", "choose", "actions_per_microbatch", "TIE"]

TIE = 1e-9
"""Relative: steps and computes this close are equal (the simulator's rounding)."""


def _nearest_layers(profile: Profile, microbatch_size: int | None) -> tuple[LayerProfile, ...]:
    """The blocks measured at the micro-batch size nearest ``microbatch_size`` (the smaller on a tie)."""
    sizes = profile.sizes()
    if microbatch_size is None:
        return profile.layers
    size = min(sizes, key=lambda b: (abs(b - microbatch_size), b))
    return sizes[size]


def actions_per_microbatch(schedule: str) -> int:
    """The runtime actions a stage runs per micro-batch, each charged its ``overhead_ms`` by the simulator: a
    forward and a backward, or under ZBVZeroBubble a forward and the backward's two halves (I and W)."""
    return 3 if schedule == "ZBVZeroBubble" else 2


def _busy_per_rank_ms(plan: Plan) -> list[float]:
    """Per rank, its stages' time per micro-batch: forward and backward (the loss included) and the runtime's
    cost of their actions."""
    actions = actions_per_microbatch(plan.schedule)
    per_rank = [0.0] * plan.num_ranks
    for stage, rank in zip(plan.stages, plan.stage_ranks()):
        per_rank[rank] += stage.cost.compute_ms + actions * stage.cost.overhead_ms
    return per_rank


def _busiest_rank(plan: Plan) -> int:
    """The rank busiest per micro-batch (:func:`_busy_per_rank_ms`; the first such)."""
    per_rank = _busy_per_rank_ms(plan)
    return max(range(plan.num_ranks), key=lambda r: (per_rank[r], -r))


def busiest_compute_ms(plan: Plan) -> float:
    """The busiest rank's time per step: micro-batches x its stages' forward and backward per micro-batch (the
    loss included) plus the runtime's cost of their actions (:func:`actions_per_microbatch` x ``overhead_ms``)."""
    return plan.microbatches * max(_busy_per_rank_ms(plan))


def noise_band(plan: Plan, profile: Profile) -> float:
    """The relative band of ``plan``'s step from the profile's spread: the busiest rank's blocks' forward and
    backward interquartile ranges over their medians (sums of each), at the measured size nearest the plan's
    micro-batch size. 0 when the profile records no spread."""
    layers = {x.name: x for x in _nearest_layers(profile, plan.microbatch_size)}
    rank = _busiest_rank(plan)
    spread = median = 0.0
    for stage, r in zip(plan.stages, plan.stage_ranks()):
        if r != rank:
            continue
        for name in stage.blocks:
            x = layers.get(name)
            if x is None:
                raise AutopartError(f"plan block {name!r} is not in the profile of {profile.model!r}")
            spread += x.forward_iqr_ms + x.backward_iqr_ms
            median += x.forward_ms + x.backward_ms
    return spread / median if median > 0 else 0.0


def _configuration(plan: Plan) -> tuple[object, ...]:
    """What a plan runs apart from its split: the noise band ties splits of one configuration only."""
    return (plan.schedule, plan.microbatches, plan.stages_per_rank, plan.data_parallel, plan.num_ranks)


def _identity(plan: Plan) -> tuple[object, ...]:
    return (*_configuration(plan), plan.balance)


def choose(plans: Sequence[Plan], profile: Profile) -> tuple[Plan, list[Plan]]:
    """The chosen plan (``predicted.margin`` and ``predicted.noise`` set) and the others, fastest first, each
    configuration once. ``plans``: every scored plan that fits, fastest first, equal steps in the order the
    search prefers them."""
    if not plans:
        raise AutopartError("no plan to choose from")
    unique: list[Plan] = []
    seen: set[tuple[object, ...]] = set()
    for p in plans:
        if _identity(p) not in seen:
            seen.add(_identity(p))
            unique.append(p)
    order = {id(p): i for i, p in enumerate(unique)}
    by_step = sorted(unique, key=lambda p: (p.predicted.step_ms, order[id(p)]))
    first = by_step[0].predicted.step_ms  # of equal steps (to rounding), the caller's order: less memory, ...
    fastest = min((p for p in by_step if p.predicted.step_ms <= first * (1 + TIE)), key=lambda p: order[id(p)])
    noise = noise_band(fastest, profile)
    limit = fastest.predicted.step_ms * (1 + noise + TIE)
    ties = [p for p in by_step if p.predicted.step_ms <= limit and _configuration(p) == _configuration(fastest)]
    low = min(busiest_compute_ms(p) for p in ties)
    balanced = [p for p in ties if busiest_compute_ms(p) <= low * (1 + TIE)]
    chosen = min(balanced, key=lambda p: order[id(p)])  # the caller's order: step, then its tie-breakers
    others = [p for p in by_step if p is not chosen]
    margin = others[0].predicted.step_ms / chosen.predicted.step_ms - 1 if others and chosen.predicted.step_ms \
        else None
    if margin is not None and abs(margin) <= TIE:
        margin = 0.0  # the same step reached through different sums
    predicted = dataclasses.replace(chosen.predicted, margin=margin, noise=noise)
    return dataclasses.replace(chosen, predicted=predicted), others

"""Joint search: micro-batch count, schedule (and virtual stages) and boundaries together.

    plan = plan_partition(profile, 4)                       # 4 unlimited devices, 1F1B, 4 micro-batches
    plan = plan_search(profile, rank_devices, CostModel(optimizer="adamw"), global_batch=64,
                       search_microbatches=True, schedules=all_schedules())

For every schedule and every micro-batch count M that divides the global
batch (micro-batch size = global batch / M), the profile is scaled to that
micro-batch size (:mod:`autopart.core.scaling`), split exactly under that
schedule's in-flight memory, and its step simulated; with ``--method exact``
each configuration's bottleneck-optimal split is scored beside its
step-optimal one. Of the candidates that fit, the fastest wins unless another
is within the profile's noise band of it and more balanced
(:mod:`autopart.core.choice`); the plan lists the runners-up. Pure (no torch).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from autopart.core.choice import busiest_compute_ms, choose
from autopart.core.costmodel import CostModel, Problem
from autopart.core.fastest import RankMemory, split_fastest
from autopart.core.methods import split
from autopart.core.partition import Split, split_given
from autopart.core.planner import cost_model_of, make_plan
from autopart.core.scaling import scale_profile
from autopart.errors import AutopartError
from autopart.formats.devices import Device
from autopart.formats.plan import Candidate, Plan
from autopart.formats.profile import Profile
from autopart.formats.schedule_kinds import AUTO_SCHEDULES, canonical_schedule, stage_ranks, stages_per_rank
from autopart.formats.units import plural

__all__ = ["plan_partition", "plan_search", "score_balance", "all_schedules", "MAX_MICROBATCHES"]

MAX_MICROBATCHES = 128


def all_schedules(interleaved: int = 2) -> list[tuple[str, int]]:
    """Every schedule ``--schedule auto`` tries, with its stages per rank."""
    return [(name, stages_per_rank(name, interleaved)) for name in AUTO_SCHEDULES]


def _stage_devices(rank_devices: Sequence[Device], schedule: str, per_rank: int) -> list[Device]:
    """A device per (virtual) stage: its rank's, with an even share of the rank's memory (the ``exact``
    method then lets the stages share it as they need: :class:`RankMemory`)."""
    ranks = stage_ranks(schedule, len(rank_devices), per_rank)
    out = []
    for r in ranks:
        d = rank_devices[r]
        memory = d.memory_bytes // per_rank if d.memory_bytes is not None else None
        out.append(Device(name=d.name, memory_bytes=memory, speed=d.speed))
    return out


def _counts(global_batch: int | None, model: CostModel, search: bool, profile: Profile) -> list[tuple[int, int]]:
    """(micro-batches, micro-batch size) pairs to try."""
    if not search:
        m = model.microbatches
        if global_batch is None:
            return [(m, profile.microbatch_size)]
        if m > global_batch:
            raise AutopartError(f"{m} micro-batches > global batch {global_batch}: each needs at least one sample")
        if global_batch % m:
            raise AutopartError(f"global batch {global_batch} is not divisible by {plural(m, 'micro-batch')}")
        return [(m, global_batch // m)]
    if global_batch is None:
        raise AutopartError("--microbatches auto needs --global-batch N (the samples in one step)")
    return [(m, global_batch // m) for m in range(1, min(global_batch, MAX_MICROBATCHES) + 1) if global_batch % m == 0]


def plan_search(profile: Profile, rank_devices: Sequence[Device], model: CostModel, *, method: str = "exact",
                global_batch: int | None = None, search_microbatches: bool = False,
                schedules: Sequence[tuple[str, int]] | None = None, profile_path: str = "",
                keep: int = 5) -> Plan:
    """The fastest plan that fits memory, over the schedules and micro-batch counts asked for, or a more
    balanced one within the profile's noise band of it (:func:`autopart.core.choice.choose`).

    ``model`` fixes optimizer state, sends and recomputation, and (unless
    searched) the schedule, its stages per rank and the micro-batch count.
    ``schedules`` lists (name, stages per rank) to try instead of the model's
    (:func:`all_schedules` for every one).
    """
    if schedules is None:
        todo = [(model.schedule, model.stages_per_rank)]
    else:
        todo = [(canonical_schedule(name), v) for name, v in schedules]
    n_blocks = len(profile.layers)
    tried: list[tuple[float, int, Plan]] = []
    reasons: list[str] = []
    failures: list[AutopartError] = []
    unfit: Plan | None = None  # a baseline split that does not fit: the caller says why
    scaled_cache: dict[int, tuple[Profile, str]] = {}
    k = len(rank_devices)
    for m, size in _counts(global_batch, model, search_microbatches, profile):
        if size not in scaled_cache:
            scaled_cache[size] = scale_profile(profile, size)
        scaled, how = scaled_cache[size]
        for name, per_rank in todo:
            if k * per_rank > n_blocks:
                exc = AutopartError(f"{name} with {per_rank} stages per rank on {plural(k, 'rank')}: "
                                    f"{plural(k * per_rank, 'stage')} > {plural(n_blocks, 'block')}")
                reasons.append(str(exc))
                failures.append(exc)
                continue
            try:
                candidate = dataclasses.replace(model, schedule=name, microbatches=m, stages_per_rank=per_rank)
                plan = plan_one(scaled, how, size, rank_devices, candidate, splitter(method),
                                 profile_path)
            except AutopartError as exc:
                reasons.append(f"{name} M={m}: {exc}")
                failures.append(exc)
                continue
            if plan.fits:
                # ties go to the schedule that needs less memory
                tried.append((plan.predicted.step_ms, max(st.cost.memory_bytes for st in plan.stages), plan))
                if method == "exact" and len(plan.stages) > 1:  # the balanced split the choice may prefer
                    balanced = _bottleneck_plan(scaled, how, size, rank_devices, candidate, profile_path)
                    if balanced is not None:
                        tried.append((balanced.predicted.step_ms,
                                      max(st.cost.memory_bytes for st in balanced.stages), balanced))
            else:
                reasons.append(f"{name} M={m}: the {method} split does not fit memory")
                unfit = unfit or plan
    if not tried:
        if len(failures) == 1:
            raise failures[0]
        if unfit is not None:
            return unfit
        detail = reasons[-1] if reasons else "no candidate"
        raise AutopartError(f"no schedule and micro-batch count fits ({len(reasons)} tried); last: {detail}")
    tried.sort(key=lambda item: (item[0], item[1]))
    best, others = choose([p for _, _, p in tried], profile)
    runners = tuple(Candidate(schedule=p.schedule, microbatches=p.microbatches, stages_per_rank=p.stages_per_rank,
                              step_ms=p.predicted.step_ms, balance=p.balance, busiest_ms=busiest_compute_ms(p))
                    for p in others[:keep])
    return dataclasses.replace(best, runners_up=runners)


def _bottleneck_plan(scaled: Profile, how: str, size: int, rank_devices: Sequence[Device], model: CostModel,
                     profile_path: str) -> Plan | None:
    """The configuration's bottleneck-optimal split, scored like the exact one (None: it does not fit)."""
    try:
        plan = plan_one(scaled, how, size, rank_devices, model, splitter("bottleneck"), profile_path)
    except AutopartError:
        return None
    return plan if plan.fits else None


def _rank_memory(rank_devices: Sequence[Device], model: CostModel) -> RankMemory | None:
    """The stages that share each rank's memory, when ranks hold several and have a limit."""
    if model.stages_per_rank < 2 or all(d.memory_bytes is None for d in rank_devices):
        return None
    ranks = stage_ranks(model.schedule, len(rank_devices), model.stages_per_rank)
    return RankMemory(stages=tuple(tuple(s for s, r in enumerate(ranks) if r == rank) for rank in range(len(rank_devices))),
                      limit_bytes=tuple(float(d.memory_bytes) if d.memory_bytes is not None else float("inf")
                                        for d in rank_devices))


MakeSplit = Callable[[Problem, RankMemory | None], Split]


def splitter(method: str) -> MakeSplit:
    """How a configuration is split: ``exact`` lets a rank's stages share its memory as they need."""
    if method == "exact":
        return split_fastest
    return lambda p, _ranks: split(p, method)


def _shared_devices(devices: Sequence[Device], split_: Split, ranks: RankMemory) -> list[Device]:
    """Each stage's share of its rank's memory: what it holds, plus an even part of what is left."""
    out = list(devices)
    for group, limit in zip(ranks.stages, ranks.limit_bytes):
        if limit == float("inf"):
            continue
        spare = (limit - sum(split_.stages[s].memory_bytes for s in group)) / len(group)
        for s in group:
            out[s] = dataclasses.replace(devices[s], memory_bytes=int(split_.stages[s].memory_bytes + max(spare, 0)))
    return out


def plan_one(scaled: Profile, how: str, size: int, rank_devices: Sequence[Device], model: CostModel,
              make_split: MakeSplit, profile_path: str) -> Plan:
    """One configuration: the profile at its micro-batch size split on the ranks' (virtual) stage devices."""
    devices = _stage_devices(rank_devices, model.schedule, model.stages_per_rank)
    problem = Problem.from_profile(scaled, devices, model)
    ranks = _rank_memory(rank_devices, model)
    chosen = make_split(problem, ranks)
    if ranks is not None and chosen.method in ("exact", "local"):
        devices = _shared_devices(devices, chosen, ranks)
    return make_plan(chosen, problem, model, devices, profile_path=profile_path, model_name=scaled.model,
                     microbatch_size=size, scaling="" if how == "measured" else how, sample_shape=scaled.sample_shape,
                     threads=scaled.threads, batchnorm=scaled.batchnorm, precision=scaled.precision)


def score_balance(profile: Profile, rank_devices: Sequence[Device], plan: Plan, balance: Sequence[int],
                  recompute: bool = True) -> Plan:
    """``balance`` (a hand-tuned split, block counts per stage) under ``plan``'s schedule, micro-batches and
    cost model: what autopart predicts for it, to set beside ``plan``."""
    n = len(profile.layers)
    if len(balance) != plan.num_stages or sum(balance) != n or min(balance) < 1:
        raise AutopartError(f"balance {list(balance)} does not split {n} blocks into {plan.num_stages} non-empty "
                            f"stages (sum {sum(balance)}, {len(balance)} stages)")
    size = plan.microbatch_size or profile.microbatch_size
    scaled, how = scale_profile(profile, size)
    return plan_one(scaled, how, size, rank_devices, cost_model_of(plan, recompute),
                     lambda p, _ranks: split_given(p, balance), plan.profile)


def plan_partition(profile: Profile, devices: int | Sequence[Device], model: CostModel | None = None, *,
                   method: str = "exact", global_batch: int | None = None, search_microbatches: bool = False,
                   search_schedules: bool = False, profile_path: str = "") -> Plan:
    """The plan for ``profile`` on ``devices``: a count of unlimited devices, or one :class:`Device` per rank.

    ``model`` fixes the schedule, micro-batches, optimizer state, sends and
    recomputation (default: 1F1B with as many micro-batches as ranks).
    ``search_microbatches`` tries every divisor of ``global_batch`` as the
    micro-batch count, ``search_schedules`` every schedule; the plan keeps the
    fastest predicted step that fits and lists the runners-up.
    """
    ranks = [Device("device") for _ in range(devices)] if isinstance(devices, int) else list(devices)
    if not ranks:
        raise AutopartError("need at least 1 device")
    return plan_search(profile, ranks, model or CostModel(microbatches=len(ranks)), method=method,
                       global_batch=global_batch, search_microbatches=search_microbatches,
                       schedules=all_schedules() if search_schedules else None, profile_path=profile_path)

"""Joint search: micro-batch count, schedule (and virtual stages) and boundaries together.

    plan = plan_search(profile, rank_devices, settings, global_batch=64,
                       microbatches=None, schedules=None)   # None = search

For every schedule and every micro-batch count M that divides the global
batch (micro-batch size = global batch / M), the profile is scaled to that
micro-batch size (:mod:`autopart.core.scaling`), split exactly under that
schedule's in-flight memory, and its step simulated; the fastest that fits
wins, and the plan lists the runners-up. Pure (no torch).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

from autopart.core.costmodel import CostModel, Problem
from autopart.formats.devices import Device
from autopart.errors import AutopartError
from autopart.core.partition import split
from autopart.formats.plan import Candidate, Plan, make_plan
from autopart.formats.profile import Profile
from autopart.core.scaling import scale_profile
from autopart.core.schedules import canonical_schedule, stage_ranks

__all__ = ["Settings", "plan_search", "AUTO_SCHEDULES", "MAX_MICROBATCHES"]

AUTO_SCHEDULES = (("GPipe", 1), ("1F1B", 1), ("Interleaved1F1B", 2), ("ZBVZeroBubble", 2))
MAX_MICROBATCHES = 128


@dataclass(frozen=True)
class Settings:
    """What the search keeps fixed."""

    optimizer_states: int = 2
    bandwidth_bytes_per_ms: float | None = None
    latency_ms: float = 0.0
    recompute: bool = True
    method: str = "exact"


def _stage_devices(rank_devices: Sequence[Device], schedule: str, per_rank: int) -> list[Device]:
    """A device per (virtual) stage: its rank's, with the rank's memory shared by its stages."""
    ranks = stage_ranks(schedule, len(rank_devices), per_rank)
    out = []
    for r in ranks:
        d = rank_devices[r]
        memory = d.memory_bytes // per_rank if d.memory_bytes is not None else None
        out.append(Device(name=d.name, memory_bytes=memory, speed=d.speed))
    return out


def _counts(global_batch: int | None, microbatches: int | None, profile: Profile) -> list[tuple[int, int]]:
    """(micro-batches, micro-batch size) pairs to try."""
    if microbatches is not None:
        if global_batch is None:
            return [(microbatches, profile.microbatch_size)]
        if global_batch % microbatches:
            raise AutopartError(f"global batch {global_batch} is not divisible by {microbatches} micro-batches")
        return [(microbatches, global_batch // microbatches)]
    if global_batch is None:
        raise AutopartError("--microbatches auto needs --global-batch N (the samples in one step)")
    return [(m, global_batch // m) for m in range(1, min(global_batch, MAX_MICROBATCHES) + 1) if global_batch % m == 0]


def plan_search(profile: Profile, rank_devices: Sequence[Device], settings: Settings, *,
                global_batch: int | None = None, microbatches: int | None = None,
                schedules: Sequence[tuple[str, int]] | None = None, profile_path: str = "",
                keep: int = 5) -> Plan:
    """The fastest plan over the given (or all) schedules and micro-batch counts that fits memory."""
    todo = [(canonical_schedule(name), v) for name, v in (schedules or AUTO_SCHEDULES)]
    n_blocks = len(profile.layers)
    tried: list[tuple[float, int, Plan]] = []
    reasons: list[str] = []
    failures: list[AutopartError] = []
    unfit: Plan | None = None  # a baseline split that does not fit: the caller says why
    scaled_cache: dict[int, tuple[Profile, str]] = {}
    k = len(rank_devices)
    for m, size in _counts(global_batch, microbatches, profile):
        if size not in scaled_cache:
            scaled_cache[size] = scale_profile(profile, size)
        scaled, how = scaled_cache[size]
        for name, per_rank in todo:
            if k * per_rank > n_blocks:
                exc = AutopartError(f"{name} with {per_rank} stages per rank on {k} ranks: "
                                    f"{k * per_rank} stages > {n_blocks} blocks")
                reasons.append(str(exc))
                failures.append(exc)
                continue
            try:
                model = CostModel(schedule=name, microbatches=m, optimizer_states=settings.optimizer_states,
                                  bandwidth_bytes_per_ms=settings.bandwidth_bytes_per_ms,
                                  latency_ms=settings.latency_ms, recompute=settings.recompute,
                                  stages_per_rank=per_rank)
                devices = _stage_devices(rank_devices, name, per_rank)
                problem = Problem.from_profile(scaled, devices, model)
                result = split(problem, settings.method)
                plan = make_plan(result, problem, model, devices, profile_path=profile_path,
                                 model_name=profile.model, microbatch_size=size,
                                 scaling="" if how == "measured" else how, sample_shape=scaled.sample_shape)
            except AutopartError as exc:
                reasons.append(f"{name} M={m}: {exc}")
                failures.append(exc)
                continue
            if plan.fits:
                # ties go to the schedule that needs less memory
                tried.append((plan.predicted.step_ms, max(st.memory_bytes for st in plan.stages), plan))
            else:
                reasons.append(f"{name} M={m}: the {settings.method} split does not fit memory")
                unfit = unfit or plan
    if not tried:
        if len(failures) == 1:
            raise failures[0]
        if unfit is not None:
            return unfit
        detail = reasons[-1] if reasons else "no candidate"
        raise AutopartError(f"no schedule and micro-batch count fits ({len(reasons)} tried); last: {detail}")
    tried.sort(key=lambda item: (item[0], item[1]))
    best = tried[0][2]
    runners = tuple(Candidate(schedule=p.schedule, microbatches=p.microbatches, stages_per_rank=p.stages_per_rank,
                              step_ms=step, balance=p.balance) for step, _, p in tried[1: 1 + keep])
    return dataclasses.replace(best, runners_up=runners)

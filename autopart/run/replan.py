"""``--replan``: re-profile every block where it ran, and plan again from those measurements.

Each rank profiles its own stages' blocks on the real micro-batch they
received; the rank holding the last stage joins them into one profile and
writes the plan the same search would make from it: on a cluster, the joint
planner with the plan's depth, replicas, micro-batches and placement pinned.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from autopart.core.dataparallel import plan_cluster
from autopart.core.placement import Placement
from autopart.core.planner import cost_model_of
from autopart.core.search import plan_search
from autopart.formats.cluster import Cluster
from autopart.formats.plan import Plan
from autopart.formats.profile import LayerProfile, Profile
from autopart.formats.units import format_ms
from autopart.measure.profiler import profile_model
from autopart.run.job import Job
from autopart.run.log import say
from autopart.run.stages import split_backward

__all__ = ["StageProfile", "placed", "replan", "reprofile_stages", "write_replan"]


@dataclass(frozen=True)
class StageProfile:
    """One stage's blocks as this rank measured them."""

    stage: int
    layers: tuple[LayerProfile, ...]
    device: str
    dtype: str


def reprofile_stages(job: Job) -> list[StageProfile]:
    """Per-block profiles of this rank's stages, measured on the real micro-batch they received."""
    out = []
    for s, _ in job.pipe.modules:
        captured = job.pipe.captured.get(s)
        if captured is None:
            continue
        names = [name for name, _ in job.pipe.blocks[s]]
        seq = nn.Sequential(OrderedDict((f"b{i}", block) for i, (_, block) in enumerate(job.pipe.blocks[s])))
        last = s == job.plan.num_stages - 1
        prof = profile_model(seq, captured, name="stage", warmup=1, repeats=3,
                             loss_fn=job.pipe.loss_fn if last else None,
                             target=job.pipe.last_target if last else None, precision=job.plan.precision,
                             split_backward=split_backward)
        layers = tuple(dataclasses.replace(layer, name=names[i]) for i, layer in enumerate(prof.layers))
        out.append(StageProfile(stage=s, layers=layers, device=prof.device, dtype=prof.dtype))
    return out


def write_replan(job: Job, stages: list[StageProfile], measured_step_ms: float, path: str) -> None:
    """Plan again from the re-profiled blocks (same schedule, micro-batches, devices, replicas and placement) and
    write it."""
    plan = job.plan
    stages = sorted(stages, key=lambda item: item.stage)
    profile = Profile(model=job.cfg.model, device=stages[0].device, dtype=stages[0].dtype, precision=plan.precision,
                      microbatch_size=job.microbatch_size, sample_shape=tuple(plan.sample_shape) or (job.microbatch_size,),
                      torch=torch.__version__.split("+")[0], layers=tuple(x for st in stages for x in st.layers),
                      loss_in_last_block=True)
    new = replan(plan, profile, job.microbatch_size)
    new.to_json(path)
    allreduce = f" (all-reduce over {plan.data_parallel} replicas: {format_ms(new.predicted.allreduce_ms)} exposed)" \
        if plan.data_parallel > 1 else ""
    say(f"replan: measured blocks suggest balance {list(new.balance)} (now {list(plan.balance)}), predicted step "
        f"{format_ms(new.predicted.step_ms)}{allreduce} against {format_ms(measured_step_ms)} measured; wrote {path}")


def replan(plan: Plan, profile: Profile, microbatch_size: int) -> Plan:
    """The split the same search makes from ``profile`` (blocks measured at ``microbatch_size``) for ``plan``'s
    schedule, micro-batches and devices, keeping its replicas, cluster and placement: on a cluster, the joint
    planner with the depth, width and micro-batches pinned and the plan's placement, so the predicted step
    includes the all-reduce over those links; a plan of replicas without a cluster (free links) keeps them."""
    model = cost_model_of(plan)
    path = "(re-profiled during training)"
    if plan.cluster is None:
        devices = [plan.stages[plan.stages_of(r)[0]].device for r in range(plan.num_ranks)]
        new = plan_search(profile, devices, model, profile_path=path)
        return dataclasses.replace(new, data_parallel=plan.data_parallel, placement=plan.placement)
    mesh = tuple(tuple(row) for row in plan.mesh())
    search = plan_cluster(profile, plan.cluster, model,
                          global_batch=plan.data_parallel * plan.microbatches * microbatch_size,
                          schedules=[(plan.schedule, plan.stages_per_rank)], stages=plan.num_ranks,
                          data_parallel=plan.data_parallel, microbatches=plan.microbatches, profile_path=path,
                          placer=lambda cluster, *_: placed(cluster, mesh))
    return dataclasses.replace(search.best, placement=plan.placement)  # as the plan wrote it (empty: replica-major)


def placed(cluster: Cluster, ranks: Sequence[Sequence[int]]) -> Placement:
    """A given placement's links, by the rule :func:`autopart.core.placement.place` prices its own by: a pipeline
    boundary at the slowest link any replica's crosses; a data-parallel ring, visiting its members node after node,
    at the slowest link between neighbours (None: free, or no such link)."""
    def slowest(pairs: Sequence[tuple[int, int]]) -> float | None:
        links = [x for x in (cluster.link_bytes_per_s(a, b) for a, b in pairs) if x is not None]
        return min(links) if links else None

    rows = [list(row) for row in ranks]
    k = len(rows[0])
    pipeline = tuple(slowest([(row[b], row[b + 1]) for row in rows]) for b in range(k - 1))
    rings = []
    for r in range(k):
        column = sorted(row[r] for row in rows)
        rings.append(slowest(list(zip(column, column[1:] + column[:1]))) if len(column) > 1 else None)
    return Placement(ranks=tuple(tuple(row) for row in rows), pipeline_bytes_per_s=pipeline,
                     replica_bytes_per_s=tuple(rings), layout="the plan's placement")

"""``--replan``: re-profile every block where it ran, and plan again from those measurements.

Each rank profiles its own stages' blocks on the real micro-batch they
received; the rank holding the last stage joins them into one profile and
writes the plan the same search would make from it.
"""
from __future__ import annotations

import dataclasses
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

from autopart.core.planner import cost_model_of
from autopart.core.search import plan_search
from autopart.formats.profile import LayerProfile, Profile
from autopart.formats.units import format_ms
from autopart.measure.profiler import profile_model
from autopart.run.job import Job
from autopart.run.log import say

__all__ = ["StageProfile", "reprofile_stages", "write_replan"]


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
                             target=job.pipe.last_target if last else None, precision=job.plan.precision)
        layers = tuple(dataclasses.replace(layer, name=names[i]) for i, layer in enumerate(prof.layers))
        out.append(StageProfile(stage=s, layers=layers, device=prof.device, dtype=prof.dtype))
    return out


def write_replan(job: Job, stages: list[StageProfile], measured_step_ms: float, path: str) -> None:
    """Plan again from the re-profiled blocks (same schedule, micro-batches and devices) and write it."""
    plan = job.plan
    stages = sorted(stages, key=lambda item: item.stage)
    profile = Profile(model=job.cfg.model, device=stages[0].device, dtype=stages[0].dtype, precision=plan.precision,
                      microbatch_size=job.microbatch_size, sample_shape=tuple(plan.sample_shape) or (job.microbatch_size,),
                      torch=torch.__version__.split("+")[0], layers=tuple(x for st in stages for x in st.layers),
                      loss_in_last_block=True)
    devices = [plan.stages[plan.stages_of(r)[0]].device for r in range(plan.num_ranks)]
    new = plan_search(profile, devices, cost_model_of(plan), profile_path="(re-profiled during training)")
    new.to_json(path)
    say(f"replan: measured blocks suggest balance {list(new.balance)} (now {list(plan.balance)}), predicted step "
        f"{format_ms(new.predicted.step_ms)} against {format_ms(measured_step_ms)} measured; wrote {path}")

"""``train --global-batch`` that changes the plan's micro-batch size: refused, or re-checked before it runs.

The plan's times and memory are for its micro-batch size. A global batch that
makes micro-batches of another size is refused with the commands that plan
for it, unless the plan's profile measured that size too (``profile
--microbatch-size 2,4``): then the plan's own split, schedule and
recomputation are re-priced at that size (:mod:`autopart.core.resize`), the
new peak per stage is said before training, and a rank whose stages no
longer fit their device's limit is refused. Nothing here imports torch.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from autopart.errors import AutopartError
from autopart.formats.plan import Plan
from autopart.formats.profile import Profile
from autopart.formats.optimizers import DEFAULT_OPTIMIZER
from autopart.formats.units import format_bytes, parse_bytes, plural

if TYPE_CHECKING:
    from autopart.measure.spec import ModelBundle

__all__ = ["RunPlan", "microbatch_shape", "plan_for_run", "profile_of_plan", "replica_batch", "replan_commands",
           "partition_command"]


@dataclass(frozen=True)
class RunPlan:
    """The plan a run follows, at the micro-batch size it runs."""

    plan: Plan
    """The saved plan, or its split re-priced at the run's micro-batch size."""
    note: str | None = None
    """What to say before training (the new peaks), when the size changed; None when it did not."""


def plan_for_run(plan: Plan, plan_path: str, global_batch: int | None) -> RunPlan:
    """``plan`` at the micro-batch size ``global_batch`` makes (the plan's own when None): the same plan when
    the size is the plan's, re-priced from the profile when the profile measured that size, else refused.
    ``global_batch`` is every replica's samples together (:func:`replica_batch`)."""
    if global_batch is None:
        return RunPlan(plan)
    size = plan.microbatch_size_for(replica_batch(plan, global_batch))
    if plan.microbatch_size is None or size == plan.microbatch_size:
        return RunPlan(plan)
    from autopart.core.resize import plan_at_microbatch_size, ranks_over_limit

    change = (f"--global-batch {global_batch} makes micro-batches of {size}, the plan's are "
              f"{plan.microbatch_size} ({plural(plan.microbatches, 'micro-batch')})")
    profile, where, found = profile_of_plan(plan, plan_path)
    if profile is None or size not in profile.sizes():
        known = (f"its profile {where} was not measured at {size} (only {sorted(profile.sizes())})"
                 if profile is not None else f"its profile {where}")
        raise AutopartError(f"{change}, and {known}, so its memory and times at {size} are not known: "
                            f"re-plan for it: {replan_commands(plan, size, profile)}")
    resized = plan_at_microbatch_size(plan, profile, size)
    peaks = ", ".join(f"stage {s} {format_bytes(st.cost.memory_bytes)}" for s, st in enumerate(resized.stages))
    over = ranks_over_limit(resized)
    if over:
        rank, need, limit = over[0]
        raise AutopartError(f"{change}; at {size} the plan's split needs {format_bytes(need)} on rank {rank}, over "
                            f"its limit of {format_bytes(limit)}: re-plan for it: "
                            f"{partition_command(plan, size, found, global_batch)}")
    return RunPlan(resized, f"note: {change}; its profile measured {size}: the plan's split at that size peaks at "
                            f"{peaks} (was {', '.join(format_bytes(st.cost.memory_bytes) for st in plan.stages)})")


def replica_batch(plan: Plan, global_batch: int) -> int:
    """One replica's share of a step's ``global_batch`` samples (all replicas together): refused unless every
    replica gets the same whole number of micro-batches' worth."""
    d, m = plan.data_parallel, plan.microbatches
    if d == 1:
        return global_batch
    if global_batch % (d * m):
        raise AutopartError(f"global batch {global_batch} is not divisible by the plan's {d} data-parallel replicas x "
                            f"{m} micro-batches = {d * m}: each replica takes an equal share of every step")
    return global_batch // d


def profile_of_plan(plan: Plan, plan_path: str) -> tuple[Profile | None, str, str]:
    """The plan's profile (its path as partition was given it, from here or from the plan's folder), how to
    name it, and the path it was found at: None and why when it cannot be read."""
    if not plan.profile:
        return None, "is not named in the plan", ""
    for path in (Path(plan.profile), Path(plan_path).parent / plan.profile):
        if path.is_file():
            try:
                profile = Profile.from_json(path)
            except AutopartError as exc:
                return None, f"{plan.profile!r} cannot be read ({exc})", str(path)
            if profile.names != [name for st in plan.stages for name in st.blocks]:
                return None, f"{plan.profile!r} holds other blocks than the plan's (profiled again since?)", str(path)
            return profile, repr(plan.profile), str(path)
    return None, f"{plan.profile!r} is not there", ""


def replan_commands(plan: Plan, microbatch_size: int, profile: Profile | None = None) -> str:
    """The commands that profile the model at ``microbatch_size`` (on the profile's device and threads) and
    split it as the plan was split (:func:`partition_command`)."""
    model = plan.model or (profile.model if profile is not None else "MODEL")
    on_cpu = profile is None or profile.device.startswith("cpu")  # "cpu (Xeon)", or a GPU's name ("NVIDIA H200")
    device = "" if on_cpu else " --device cuda"
    device += f" --precision {plan.precision}" if plan.precision != "fp32" else ""
    threads = f" --threads {plan.threads}" if plan.threads else ""
    out = f"profile-mb{microbatch_size}.json"
    return (f"autopart profile {model} --microbatch-size {microbatch_size}{device}{threads} -o {out} && "
            f"{partition_command(plan, microbatch_size, out)}")


def partition_command(plan: Plan, microbatch_size: int, profile_path: str, global_batch: int | None = None) -> str:
    """``autopart partition`` of ``profile_path`` as the plan was made (its ranks, schedule, micro-batches,
    optimizer and memory limit; a cluster's plan: the cluster, its replicas and the global batch of
    ``microbatch_size``), at ``global_batch`` samples a step where given (the profile measured the size)."""
    out = f"autopart partition {profile_path}"
    if plan.cluster is not None:
        out += f" {plan.cluster.flags()} --data-parallel {plan.data_parallel}"
        if global_batch is None:  # partition on a cluster plans a global batch: the one of this micro-batch size
            global_batch = plan.data_parallel * plan.microbatches * microbatch_size
    out += f" --stages {plan.num_ranks} --schedule {plan.schedule} --microbatches {plan.microbatches}"
    if global_batch is not None:
        out += f" --global-batch {global_batch}"
    if plan.stages_per_rank > 1:
        out += f" --stages-per-rank {plan.stages_per_rank}"
    if plan.optimizer != DEFAULT_OPTIMIZER:
        out += f" --optimizer {plan.optimizer}"
    limits = {st.device.memory_bytes for st in plan.stages}
    if plan.cluster is None and len(limits) == 1 and None not in limits and plan.stages_per_rank == 1:
        out += f" --memory-limit {_size_arg(int(next(iter(limits)) or 0))}"
    return f"{out} -o plan-mb{microbatch_size}.json"


def _size_arg(n: int) -> str:
    """``n`` bytes as ``--memory-limit`` reads it back exactly: 400MiB, else the bare count."""
    text = format_bytes(n).replace(" ", "")
    return text if parse_bytes(text) == n else str(n)


def microbatch_shape(plan: Plan, bundle: "ModelBundle") -> tuple[int, tuple[int, ...]]:
    """Samples per micro-batch (the plan's, else the model's example's rows) and one sample's input shape (the
    plan's, else the example's): what ``train`` and ``check`` draw and cut."""
    example = bundle.example[0] if bundle.example else None
    per_mb = plan.microbatch_size or (int(example.shape[0]) if example is not None else 1)
    sample_shape = tuple(plan.sample_shape[1:]) if plan.sample_shape else (
        tuple(example.shape[1:]) if example is not None else ())
    return per_mb, sample_shape

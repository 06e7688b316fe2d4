"""Data parallel x pipeline: the ("dp", "pp") DeviceMesh a rank joins, its replica's share of every global batch,
and each stage's gradients averaged over the replicas that hold it.

A plan of ``D`` replicas of a ``K``-rank pipeline runs on ``D x K`` ranks laid out by :meth:`Plan.mesh`
(``mesh[replica][pipeline_rank]`` = torchrun's global rank; replica-major unless the plan's placement says
otherwise). Each replica's pipeline talks on its row (the "pp" group: stage indices and peers are pipeline
ranks, never global ones); each column (the "dp" group) holds the same stages in every replica, and averages
their gradients after the schedule's step, before the optimizer.

Why a bucketed all-reduce and not FSDP2's ``fully_shard`` (torchtitan's way): each stage's parameters stay
whole plain tensors on every replica, so what autopart already does with them is unchanged and stays right:
the tied weights' sum between a replica's pipeline holders (:class:`autopart.run.stages.SharedParameters`),
recomputation (``torch.utils.checkpoint``), deferred BatchNorm, fp16's ``ShardedGradScaler``, stage files that
do not depend on ``D`` (a checkpoint of one replica resumes ``D`` and back), and the optimizer's state, which
is the same on every replica (same averaged gradients) and so saved once. ``fully_shard`` itself runs on gloo
and CPU in torch 2.13 (tried: a 2-rank ``fully_shard(module, mesh=mesh["dp"])`` trains), but it turns every
parameter into a DTensor shard: stage files, the tied sums, weight loading and the meta-device materialisation
would each have to gather or scatter. Sharding the optimizer state (ZeRO) is what it would add, left for later.
The all-reduce is DDP's algorithm (buckets of at most 25 MiB, flattened, summed in float32, divided by ``D``;
zeros for a parameter without a gradient on one replica), run once per step after the last backward rather than
overlapped with it.

With ``D == 1`` nothing here runs: no mesh, no group, the pipeline on the default group as before.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from autopart.formats.plan import Plan

__all__ = ["Replicas", "BUCKET_BYTES", "join_mesh", "shard", "average_gradients", "mean_over_replicas"]

BUCKET_BYTES = 25 * 2**20
"""Gradients all-reduced together (torch DDP's default ``bucket_cap_mb``)."""


@dataclass(frozen=True)
class Replicas:
    """Where one rank stands in the plan's data-parallel x pipeline grid, and the groups it talks on."""

    data_parallel: int
    replica: int
    """This rank's replica (its row of the mesh, its "dp" coordinate)."""
    pipeline_rank: int
    """This rank's place in its replica's pipeline (its "pp" coordinate): what the plan's stages are assigned to."""
    mesh: tuple[tuple[int, ...], ...]
    """Global rank of every (replica, pipeline rank)."""
    pp_group: dist.ProcessGroup | None = None
    """This replica's pipeline ranks (None: the default group, one replica)."""
    dp_group: dist.ProcessGroup | None = None
    """The ranks that hold this rank's stages in every replica (None: one replica)."""

    @property
    def leader(self) -> bool:
        """Replica 0's rank: the one of its column that prints, reports and writes the checkpoint."""
        return self.replica == 0


def join_mesh(plan: Plan, rank: int, device_type: str) -> Replicas:
    """The ``DeviceMesh`` of dims ("dp", "pp") laid out by the plan (every rank must call this, in the same order
    with respect to other group creations: it makes the groups collectively); one replica: no mesh."""
    replica, pipeline_rank = plan.position_of(rank)
    mesh = tuple(tuple(row) for row in plan.mesh())
    if plan.data_parallel == 1:
        return Replicas(1, replica, pipeline_rank, mesh)
    from torch.distributed.device_mesh import DeviceMesh

    # DeviceMesh takes any layout (init_device_mesh only the replica-major arange); it makes one subgroup per row
    # and per column, on the default group's backend (gloo on CPU, NCCL on CUDA).
    grid = DeviceMesh(device_type, torch.tensor(mesh, dtype=torch.int), mesh_dim_names=("dp", "pp"))
    return Replicas(plan.data_parallel, replica, pipeline_rank, mesh, pp_group=grid.get_group("pp"),
                    dp_group=grid.get_group("dp"))


def shard(batch: torch.Tensor, replica: int, data_parallel: int) -> torch.Tensor:
    """Replica ``replica``'s rows of a global batch: ``[d*B/D, (d+1)*B/D)`` (``B`` divisible by ``D``, checked
    before)."""
    if data_parallel == 1:
        return batch
    rows = batch.shape[0] // data_parallel
    return batch[replica * rows:(replica + 1) * rows]


def average_gradients(parameters: Sequence[torch.nn.Parameter], group: dist.ProcessGroup | None,
                      data_parallel: int, bucket_bytes: int | None = None) -> None:
    """Every parameter's gradient replaced by its mean over the ``data_parallel`` replicas of ``group``.

    As DDP does, every parameter takes part: one that has no gradient on this replica but has one on another adds
    zeros (a branch the replica's rows did not take), and ends with the mean like the others; one that has none on
    any replica keeps none (a small all-reduce of which have one, first), so every replica's buckets hold the same
    parameters in the same order and every replica steps the same parameters. The sums are in float32 whatever the
    gradients' dtype (FSDP's ``reduce_dtype``: a bf16 sum would round at each of the D-1 ring steps), copied back
    after: flattened into buckets of at most ``bucket_bytes`` of float32 copies (:data:`BUCKET_BYTES` when None),
    each summed in one all-reduce and divided by ``D``; a float32 gradient larger than a bucket is reduced where it
    is, not copied."""
    if data_parallel == 1 or group is None:
        return
    bucket_bytes = BUCKET_BYTES if bucket_bytes is None else bucket_bytes
    params = list(parameters)
    if not params:
        return
    device = params[0].device
    held = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=device)
    dist.all_reduce(held, group=group)  # how many replicas have each gradient
    grads: list[torch.Tensor] = []
    for p, count in zip(params, held.tolist()):
        if count == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads:
        copy_bytes = g.numel() * 4
        if copy_bytes > bucket_bytes and g.dtype == torch.float32 and g.is_contiguous():
            dist.all_reduce(g, group=group)  # larger than a bucket: summed in place, no copy
            g.div_(data_parallel)
            continue
        if bucket and size + copy_bytes > bucket_bytes:
            _reduce_bucket(bucket, group, data_parallel)
            bucket, size = [], 0
        bucket.append(g)
        size += copy_bytes
    if bucket:
        _reduce_bucket(bucket, group, data_parallel)


def _reduce_bucket(bucket: list[torch.Tensor], group: dist.ProcessGroup, data_parallel: int) -> None:
    """The gradients of ``bucket`` summed over ``group`` in one float32 all-reduce, divided by ``data_parallel``,
    copied back in their own dtypes."""
    flat = torch.empty(sum(g.numel() for g in bucket), dtype=torch.float32, device=bucket[0].device)
    at = 0
    for g in bucket:
        flat[at:at + g.numel()].view_as(g).copy_(g)
        at += g.numel()
    dist.all_reduce(flat, group=group)
    flat.div_(data_parallel)
    at = 0
    for g in bucket:
        g.copy_(flat[at:at + g.numel()].view_as(g))
        at += g.numel()


def mean_over_replicas(value: float, replicas: Replicas, device: torch.device) -> float:
    """``value`` (a loss of this replica's equal share) averaged over the replicas (an all-reduce on the "dp"
    group: every rank of this column calls it)."""
    if replicas.data_parallel == 1 or replicas.dp_group is None:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=replicas.dp_group)
    return float(t[0]) / replicas.data_parallel

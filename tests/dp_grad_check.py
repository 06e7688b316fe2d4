"""Run under torchrun by tests/test_dp_train.py: one data-parallel x pipelined step on the ("dp", "pp") mesh;
each rank saves its losses (its replica's, and the mean over replicas), its gradients, and a dropout mask per
replica.

    dp_grad_check.py PLAN MODEL OUT_DIR BATCH.pt [BUCKET_BYTES]

BATCH.pt holds ``(inputs, target)`` (inputs a tuple of tensors): the whole global batch, which every replica
takes its share of. BUCKET_BYTES: the gradients' all-reduce buckets (default: autopart's), small to make many.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from autopart.measure.blocks import chain_of
from autopart.run import replicas as replicas_module
from autopart.run.replicas import join_mesh, mean_over_replicas, shard
from autopart.run.stages import build_pipeline
from tests.helpers import join_rank


def main(plan_path: str, model: str, out_dir: str, batch_path: str, bucket_bytes: str | None = None) -> None:
    if bucket_bytes:
        replicas_module.BUCKET_BYTES = int(bucket_bytes)
    rank, plan, bundle = join_rank(plan_path, model)
    replicas = join_mesh(plan, rank, "cpu")
    inputs, target = torch.load(batch_path)
    d = plan.data_parallel
    mine = tuple(shard(x, replicas.replica, d) for x in inputs)
    example = tuple(x.tensor_split(plan.microbatches)[0] for x in mine)  # the stages' shapes: one micro-batch
    chain = chain_of(bundle.module, example, model, bundle.input_names)
    assert bundle.loss_fn is not None
    pipe = build_pipeline(plan, chain, replicas.pipeline_rank, torch.device("cpu"), bundle.loss_fn,
                          replicas=replicas)
    losses = pipe.step(mine, shard(target, replicas.replica, d))
    mean = mean_over_replicas(sum(float(v) for v in losses) / len(losses), replicas, torch.device("cpu")) \
        if losses else None
    grads = {name: p.grad.clone() for _, m in pipe.modules for name, p in m.named_parameters()
             if p.grad is not None}
    pipe.streams.microbatch = 0
    pipe.streams.enter(0)  # the mask block 0 of this replica's first micro-batch draws
    mask = torch.rand(8)
    torch.save({"replica": replicas.replica, "pipeline_rank": replicas.pipeline_rank,
                "losses": [float(v) for v in losses] if losses else None, "mean": mean, "grads": grads,
                "mask": mask}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:6])

"""Run under torchrun (3 ranks, one replica each) by tests/test_dp_train.py: ``average_gradients`` on
parameters some replicas have no gradient for, bf16 gradients and a float32 one larger than a bucket; each rank
saves what it got.

    dp_average_check.py OUT_DIR
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from autopart.run.replicas import average_gradients


def gradients(rank: int) -> dict[str, torch.Tensor | None]:
    """What rank ``rank``'s backward left: ``a`` everywhere, ``b`` on rank 0 only, ``c`` nowhere, ``h`` in bf16,
    ``big`` larger than the 64-byte buckets."""
    g = torch.Generator().manual_seed(rank)
    return {"a": torch.randn(5, generator=g), "b": torch.randn(3, generator=g) if rank == 0 else None, "c": None,
            "h": torch.randn(64, generator=g).bfloat16(), "big": torch.randn(40, generator=g)}


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    params = {}
    for (name, grad), like in zip(gradients(rank).items(), gradients(0).values()):  # rank 0 has all but c
        p = torch.nn.Parameter(torch.zeros_like(like) if like is not None else torch.zeros(2))
        p.grad = grad
        params[name] = p
    big = params["big"].grad
    assert big is not None
    where = big.data_ptr()
    average_gradients(list(params.values()), dist.group.WORLD, dist.get_world_size(), bucket_bytes=64)
    torch.save({"grads": {n: p.grad for n, p in params.items()}, "big_in_place": params["big"].grad is big
                and big.data_ptr() == where}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])

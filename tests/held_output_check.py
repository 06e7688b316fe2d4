"""Run under torchrun by tests/test_memory_model.py: one GPipe step of the reviewer's ReLU model; each rank
counts, at its stage's first backward (every micro-batch in flight), the distinct storages one step keeps for
the backward: what autograd saved during the stage's forwards (parameters and the loss's target aside) and
the outputs in torch's forward cache.

    held_output_check.py PLAN OUT_DIR

Also the model factory: ``tests/held_output_check.py:relu_mlp``.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def relu_mlp() -> dict[str, Any]:
    """``Sequential(Linear(512, 512), ReLU) x 3`` on 64 x 512: every ReLU saves its own output."""
    module = nn.Sequential(*[nn.Sequential(nn.Linear(512, 512), nn.ReLU()) for _ in range(3)])
    return {"module": module, "example": torch.randn(64, 512), "loss_fn": nn.functional.mse_loss}


def main(plan_path: str, out_dir: str) -> None:
    from autopart.measure.blocks import chain_of
    from autopart.run.stages import build_pipeline
    from tests.helpers import join_rank

    rank, plan, bundle = join_rank(plan_path, f"{__file__}:relu_mlp")
    assert bundle.example is not None and bundle.loss_fn is not None
    example = tuple(bundle.example)
    inputs = tuple(torch.randn(plan.microbatches * x.shape[0], *x.shape[1:]) for x in example)
    target = torch.randn_like(inputs[0])
    chain = chain_of(bundle.module, example, "relu-mlp", bundle.input_names)
    pipe = build_pipeline(plan, chain, rank, torch.device("cpu"), bundle.loss_fn)
    stage = pipe.schedule._stage  # type: ignore[attr-defined]
    excluded = {t.untyped_storage().data_ptr() for t in stage.submod.parameters()}
    excluded.add(target.untyped_storage().data_ptr())
    saved: dict[int, int] = {}
    seen: dict[str, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not seen and t.untyped_storage().data_ptr() not in excluded:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    backward = stage.backward_one_chunk

    def first_backward(*args: Any, **kwargs: Any) -> Any:
        if not seen:
            held = dict(saved)
            for out, _ in stage.fwd_cache.values():
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    held[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            seen["in_flight"] = len(stage.fwd_cache)
            seen["held_bytes"] = sum(held.values())
        return backward(*args, **kwargs)

    stage.backward_one_chunk = first_backward
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        pipe.step(inputs[0], target=target)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])

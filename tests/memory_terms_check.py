"""Run under torchrun by tests/test_memory_model.py: one pipelined step; each rank records what torch's own
pipelining runtime holds beyond autograd's saved tensors, as the memory terms count it.

    memory_terms_check.py PLAN MODEL OUT_DIR

At the stage's first backward: the micro-batches in its forward cache and the bytes of the outputs held
there; after the step: the bytes of the receive buffers (inputs, one per micro-batch) and of the gradient
receive buffers.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any

import torch
import torch.distributed as dist

from autopart.measure.blocks import chain_of
from autopart.run.stages import build_pipeline
from tests.helpers import join_rank


def _bytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_bytes(v) for v in value)
    return 0


def _buffers(infos: dict[int, Any]) -> int:
    return sum(_bytes(getattr(info, "buffer", None)) for chunk in infos.values() for info in chunk)


def main(plan_path: str, model: str, out_dir: str) -> None:
    rank, plan, bundle = join_rank(plan_path, model)
    assert bundle.example is not None and bundle.loss_fn is not None
    example = tuple(bundle.example)
    inputs = tuple(x.repeat(plan.microbatches, *[1] * (x.dim() - 1)) for x in example)  # M micro-batches
    target = inputs[0].clone()
    chain = chain_of(bundle.module, example, model, bundle.input_names)
    pipe = build_pipeline(plan, chain, rank, torch.device("cpu"), bundle.loss_fn)
    stage = pipe.schedule._stage  # type: ignore[attr-defined]
    seen: dict[str, int] = {}
    backward = stage.backward_one_chunk

    def first_backward(*args: Any, **kwargs: Any) -> Any:
        if not seen:
            seen["in_flight"] = len(stage.fwd_cache)
            seen["held_output_bytes"] = sum(_bytes(out) for out, _ in stage.fwd_cache.values())
        return backward(*args, **kwargs)

    stage.backward_one_chunk = first_backward
    pipe.step(inputs, target)
    seen["receive_buffer_bytes"] = _buffers(stage.args_recv_info) if not stage.is_first else 0
    seen["gradient_buffer_bytes"] = _buffers(stage.grad_recv_info) if not stage.is_last else 0
    seen["receive_buffers"] = len(stage.args_recv_info) if not stage.is_first else 0
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(seen, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])

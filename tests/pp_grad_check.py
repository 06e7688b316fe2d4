"""Run under torchrun by the pipeline tests: one pipelined step; each rank saves its losses and gradients.

    pp_grad_check.py PLAN MODEL OUT_DIR [BATCH.pt]

BATCH.pt holds ``(inputs, target)`` (inputs a tuple of tensors); without it, gpt2-tiny's token batch.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from autopart.measure.blocks import chain_of
from autopart.run.stages import build_pipeline
from tests.helpers import join_rank


def main(plan_path: str, model: str, out_dir: str, batch_path: str | None = None) -> None:
    rank, plan, bundle = join_rank(plan_path, model)
    if batch_path is None:
        g = torch.Generator().manual_seed(1)
        batch = plan.microbatches * 2
        inputs: tuple[torch.Tensor, ...] = (torch.randint(0, 256, (batch, 16), generator=g),)
        target = torch.randint(0, 256, (batch, 16), generator=g)
    else:
        inputs, target = torch.load(batch_path)
    example = tuple(x.tensor_split(plan.microbatches)[0] for x in inputs)  # the stages' shapes: one micro-batch
    chain = chain_of(bundle.module, example, model, bundle.input_names)
    assert bundle.loss_fn is not None
    pipe = build_pipeline(plan, chain, rank, torch.device("cpu"), bundle.loss_fn)
    losses = pipe.step(inputs, target)
    grads = {name: p.grad.clone() for _, m in pipe.modules for name, p in m.named_parameters()
             if p.grad is not None}
    states = {s: {k: v.clone() for k, v in m.state_dict().items()} for s, m in pipe.modules}
    torch.save({"losses": [float(v) for v in losses] if losses else None, "grads": grads, "states": states},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])

"""Run under torchrun by test_execute.py: one pipelined step, each rank saves its losses and gradients."""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

from autopart.run.stages import build_pipeline
from autopart.measure.blocks import chain_of
from autopart.measure.spec import load_model, shape_example
from autopart.formats.plan import Plan


def main(plan_path: str, model: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    plan = Plan.from_json(plan_path)
    torch.manual_seed(0)
    bundle = load_model(model)
    g = torch.Generator().manual_seed(1)
    batch = plan.microbatches * 2
    x = torch.randint(0, 256, (batch, 16), generator=g)
    y = torch.randint(0, 256, (batch, 16), generator=g)
    chain = chain_of(bundle.module, shape_example(bundle, microbatch_size=2), model)
    pipe = build_pipeline(plan, chain, rank, torch.device("cpu"), bundle.loss_fn)
    losses = pipe.step(x, y)
    grads = {name: p.grad.clone() for _, m in pipe.modules for name, p in m.named_parameters() if p.grad is not None}
    torch.save({"losses": [float(v) for v in losses] if losses else None, "grads": grads},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])

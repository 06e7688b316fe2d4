"""Run under torchrun by tests/test_eval.py: forward-only evaluations around one training step, deferred BatchNorm.

    eval_check.py PLAN MODEL OUT_DIR BATCH.pt

Each rank saves the held-out losses of an evaluation before and after the step, its stages' state before the
first evaluation, after it, and after the step, and whether any gradient existed after the evaluation.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

from autopart.measure.batchnorm import defer_batchnorm
from autopart.measure.blocks import chain_of
from autopart.run.stages import build_pipeline
from tests.helpers import join_rank


def main(plan_path: str, model: str, out_dir: str, batch_path: str) -> None:
    rank, plan, bundle = join_rank(plan_path, model)
    inputs, target = torch.load(batch_path)
    chain = chain_of(bundle.module, (inputs.tensor_split(plan.microbatches)[0],), model, bundle.input_names)
    defer_batchnorm(chain.root)
    chain.reload_blocks()
    pipe = build_pipeline(plan, chain, rank, torch.device("cpu"), F.mse_loss)

    def states() -> dict[str, torch.Tensor]:
        return {k: v.clone() for _, m in pipe.modules for k, v in m.state_dict().items()}

    before = states()
    first = pipe.evaluate(inputs, target)
    evaluated = states()
    grads = any(p.grad is not None for p in pipe.parameters())
    modes = [m.training for _, stage in pipe.modules for m in stage.modules()]
    pipe.step(inputs, target)  # the training step after an evaluation: the schedule goes back to its backward
    with torch.no_grad():
        for p in pipe.parameters():
            p -= 0.1 * p.grad  # a plain SGD step, so the second evaluation sees other weights
    stepped = states()
    second = pipe.evaluate(inputs, target)
    torch.save({"first": [float(v) for v in first] if first else None,
                "second": [float(v) for v in second] if second else None,
                "before": before, "evaluated": evaluated, "stepped": stepped, "grads": grads, "modes": modes},
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])

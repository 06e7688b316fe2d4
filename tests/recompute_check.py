"""Run under torchrun by tests/test_recompute.py: one pipelined step with the chosen stages recomputed, then the same
step with none; each rank saves both runs' losses, gradients, states, and what autograd saved.

    recompute_check.py PLAN MODEL OUT_DIR BATCH.pt STAGES     # STAGES: the stages to recompute, "0,1"

BATCH.pt holds ``(inputs, target)`` (inputs a tuple of tensors). A model with BatchNorm runs it deferred, as
``autopart train`` does. Per run and stage: the bytes autograd saved during the stage's forwards (counted by a
``saved_tensors_hooks`` pair, which a checkpointed region's own hooks hide from: what it saves is its inputs), the
bytes of the stage's inputs over its micro-batches, and how often each block was entered (a recomputed forward enters
each block again).
"""
from __future__ import annotations

import copy
import dataclasses
import os
import sys
from collections import Counter
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from autopart.formats.plan import Plan
from autopart.measure.batchnorm import batchnorm_layers, defer_batchnorm
from autopart.measure.blocks import chain_of, tensors_of
from autopart.run import streams as streams_module
from autopart.run.stages import build_pipeline
from tests.helpers import join_rank

ENTERED: Counter[int] = Counter()
"""Block index -> how many times a block was entered (forward or recomputation), in this process."""

_enter = streams_module.BlockStreams.enter


def _counting_enter(self: streams_module.BlockStreams, block: int) -> None:
    ENTERED[block] += 1
    _enter(self, block)


streams_module.BlockStreams.enter = _counting_enter  # type: ignore[method-assign]


def with_recompute(plan: Plan, stages: set[int]) -> Plan:
    """``plan`` with recomputation on exactly ``stages``."""
    return dataclasses.replace(plan, stages=tuple(
        dataclasses.replace(st, cost=dataclasses.replace(st.cost, recompute=s in stages))
        for s, st in enumerate(plan.stages)))


def one_step(plan: Plan, chain: Any, rank: int, inputs: tuple[torch.Tensor, ...], target: torch.Tensor,
             loss_fn: Any) -> dict[str, Any]:
    ENTERED.clear()
    pipe = build_pipeline(plan, chain, rank, torch.device("cpu"), loss_fn)
    saved: Counter[int] = Counter()
    received: Counter[int] = Counter()
    inside: list[int] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        if inside:
            saved[inside[-1]] += x.numel() * x.element_size()
        return x

    def hooks(s: int, module: nn.Module) -> None:
        def pre(_: nn.Module, args: tuple[Any, ...]) -> None:
            inside.append(s)
            received[s] += sum(t.numel() * t.element_size() for t in tensors_of(args))

        def post(*_: Any) -> None:
            inside.pop()
        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post)

    for s, module in pipe.modules:
        hooks(s, module)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        losses = pipe.step(inputs, target)
    return {"losses": [float(v) for v in losses] if losses else None,
            "grads": {name: p.grad.clone() for _, m in pipe.modules for name, p in m.named_parameters()
                      if p.grad is not None},
            "states": {s: {k: v.clone() for k, v in m.state_dict().items()} for s, m in pipe.modules},
            "saved_bytes": dict(saved), "input_bytes": dict(received), "entered": dict(ENTERED),
            "spans": {s: pipe.span(s) for s, _ in pipe.modules}}


def main(plan_path: str, model: str, out_dir: str, batch_path: str, stages: str) -> None:
    rank, plan, bundle = join_rank(plan_path, model)
    inputs, target = torch.load(batch_path)
    example = tuple(x.tensor_split(plan.microbatches)[0] for x in inputs)
    chain = chain_of(bundle.module, example, model, bundle.input_names)
    if batchnorm_layers(chain.root):
        defer_batchnorm(chain.root)
        chain.reload_blocks()
    loss_fn = bundle.loss_fn or nn.functional.mse_loss
    start = copy.deepcopy(chain.root.state_dict())
    recomputed = {int(s) for s in stages.split(",") if s}
    runs = {}
    for name, flags in (("recompute", recomputed), ("plain", set())):
        chain.root.load_state_dict(start)
        for p in chain.root.parameters():
            p.grad = None
        runs[name] = one_step(with_recompute(plan, flags), chain, rank, inputs, target, loss_fn)
    torch.save(runs, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:6])

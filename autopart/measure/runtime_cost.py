"""The pipelining runtime's own cost per action: what a stage's forward or backward costs beyond its module.

    from autopart.run.stages import one_stage_world
    action_ms = runtime_action_ms(torch.device("cpu"), one_stage_world)   # None: not measurable here

A tiny stage (one ``Linear``) runs as the one stage of torch's ``GPipe``
schedule in a world of one process (``runtime``, which the caller hands in:
:func:`autopart.run.stages.one_stage_world`, as only ``autopart.run`` speaks
torch.distributed), so every action takes the path ``train``'s does —
``forward_one_chunk`` (the inputs flattened and cached for the backward, the
output normalised to a tuple), the loss the schedule computes on the last
stage, ``backward_one_chunk`` (``stage_backward``: the output's gradients
gathered, ``torch.autograd.backward``, the inputs' gradients collected) and
the schedule's splitting of the batch into micro-batches — against the same
module, micro-batches and loss called directly. The difference, over the
step's 2 M actions, is the cost per action: the median of several steps, at
the threads torch uses now (the profile's). The RNG is left as it was found.

Sends and receives are not in it: a world of one process has no peer to send
to, so a send's fixed cost is not measured here (the cost model's
``--latency`` stands for it).
"""
from __future__ import annotations

import statistics
from typing import Callable, ContextManager

import torch
from torch import nn

from autopart.measure.timing import Clock

__all__ = ["runtime_action_ms", "Runtime", "StepFn"]

StepFn = Callable[[torch.Tensor, torch.Tensor], None]
"""One training step of a batch and its target through the pipelining runtime."""
Runtime = Callable[[nn.Module, int, Callable[[torch.Tensor, torch.Tensor], torch.Tensor], torch.device],
                   ContextManager[StepFn | None]]
"""``runtime(module, microbatches, loss_fn, device)``: the module as a one-stage pipeline while the context lasts
(None: not possible here)."""

_WIDTH = 16
_ROWS = 4


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, target)


def runtime_action_ms(device: torch.device, runtime: Runtime, microbatches: int = 4, repeats: int = 15,
                      warmup: int = 3) -> float | None:
    """The runtime's time per forward or backward action (ms, >= 0; the median over ``repeats`` steps after
    ``warmup``), or None when ``runtime`` cannot run here (a process group already exists)."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        gen = torch.Generator().manual_seed(0)
        module = nn.Linear(_WIDTH, _WIDTH).to(device)
        x = torch.randn(microbatches * _ROWS, _WIDTH, generator=gen).to(device)
        target = torch.randn(microbatches * _ROWS, _WIDTH, generator=gen).to(device)
        chunks = list(zip(x.tensor_split(microbatches), target.tensor_split(microbatches)))
        clock = Clock(device)

        def direct() -> None:
            for xm, tm in chunks:
                _loss(module(xm), tm).backward()

        differences = []
        with runtime(module, microbatches, _loss, device) as step:
            if step is None:
                return None
            for i in range(warmup + repeats):
                _, pipelined_ms = clock.time(lambda: step(x, target))
                _, direct_ms = clock.time(direct)
                if i >= warmup:
                    differences.append((pipelined_ms - direct_ms) / (2 * microbatches))
    return max(0.0, statistics.median(differences))

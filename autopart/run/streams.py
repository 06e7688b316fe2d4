"""A random stream per block: dropout masks that do not depend on where the cuts fall.

Every rank seeds its generator alike, so without this a dropout on stage 1
draws the mask its twin on stage 0 drew. Here block ``b`` of micro-batch ``m``
in step ``t`` runs with the generators (the CPU's, and the GPU's on CUDA) seeded from ``(seed, b, t, m)``
(Megatron keeps a stream per model-parallel rank; a stream per block also
keeps the masks the same whatever the plan). A stage saves the caller's
generator states before its forward and puts them back after.

Under data parallel, replica ``d`` of ``D`` runs rows ``[d*B/D, (d+1)*B/D)`` of the global batch, which are
micro-batches ``d*M .. d*M+M-1`` of one pipeline running the whole batch in ``D*M`` micro-batches; its
micro-batch ``m`` draws as that one's micro-batch ``d*M + m`` (``first_microbatch``). So masks differ between
replicas, and D replicas of M micro-batches draw exactly the masks one pipeline of D*M micro-batches draws.

    streams = BlockStreams(seed=0, device=torch.device("cpu"))
    stage = chain.stage_module(first, last, enter=streams.enter)
    streams.keep_caller_state(stage)
    streams.step, streams.microbatch = t, m     # before each forward (and backward: a recomputation
    out = stage(x)                              # re-seeds from the same numbers, and so draws alike)
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

__all__ = ["BlockStreams"]


class BlockStreams:
    """The per-block random streams of one run, and where in the run it is (step, micro-batch)."""

    def __init__(self, seed: int, device: torch.device, step: int = 0, first_microbatch: int = 0) -> None:
        self.seed = seed
        self.first_microbatch = first_microbatch
        """The index, in the whole global batch, of this replica's first micro-batch (0 with one replica)."""
        self.device = device
        self.step = step
        """Steps done before the one running (0 in the first; a resumed run goes on from its checkpoint's)."""
        self.microbatch = 0
        """The micro-batch the schedule runs now (set before each forward and backward)."""
        self._saved: list[list[torch.Tensor]] = []

    def seed_of(self, block: int) -> int:
        """The seed of ``block`` in the current step and micro-batch (counted in the whole global batch): a hash
        of the four numbers."""
        key = f"{self.seed}/{block}/{self.step}/{self.first_microbatch + self.microbatch}".encode()
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")

    def enter(self, block: int) -> None:
        """Seed the generators for ``block``: the CPU's, and on CUDA the current device's too (a block on a GPU
        may still draw on the CPU, ``torch.randperm`` say)."""
        for generator in self._generators():
            generator.manual_seed(self.seed_of(block))

    def keep_caller_state(self, module: nn.Module) -> None:
        """``module``'s forward leaves the generators as the caller had them."""
        module.register_forward_pre_hook(self._save)
        module.register_forward_hook(self._restore, always_call=True)

    def _generators(self) -> list[torch.Generator]:
        if self.device.type == "cuda":
            index = self.device.index if self.device.index is not None else torch.cuda.current_device()
            return [torch.default_generator, torch.cuda.default_generators[index]]
        return [torch.default_generator]

    def _save(self, _module: nn.Module, _args: Any) -> None:
        self._saved.append([generator.get_state() for generator in self._generators()])

    def _restore(self, _module: nn.Module, _args: Any, _out: Any) -> None:
        for generator, state in zip(self._generators(), self._saved.pop()):
            generator.set_state(state)

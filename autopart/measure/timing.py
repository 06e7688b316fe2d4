"""Measuring one block: its times (forward, backward, the input's gradient, the optimizer's step), its bytes,
and the profile record the measurements make.

    clock = Clock(device)
    times = time_block(block, x, clock, 2, 7, device)  # BlockTimes: forward_ms, backward_ms, input_grad_ms, ...
    optimizer_ms, optimizer_ms_by_name = optimizer_times(block, clock)

Shared by the whole-model profiler (:mod:`autopart.measure.profiler`) and the
one-block-at-a-time profiler (:mod:`autopart.measure.stream`), so both measure a block the same way.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from autopart.formats.optimizers import OPTIMIZER_STATES
from autopart.formats.precision import DEFAULT_PRECISION, PRECISIONS, Precision
from autopart.formats.profile import LayerProfile, Profile, Tie
from autopart.measure.amp import autocast
from autopart.measure.blocks import NamedBlock, call_block, stage_inputs, tensors_of
from autopart.measure.optimizers import make_optimizer

__all__ = ["ProgressFn", "Clock", "BlockTimes", "SplitBackward", "time_block", "time_chain", "optimizer_times",
           "nbytes", "storage_key", "block_param_bytes",
           "detach", "make_profile", "crossing_bytes"]

ProgressFn = Callable[[str, int, int], None]
"""Called as ``progress(block_name, blocks_done, blocks_total)``."""


def storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    """(data pointer, bytes) of the storage under ``t``; None for one without (sparse, empty)."""
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    if storage.nbytes() == 0:
        return None
    return storage.data_ptr(), storage.nbytes()


def nbytes(value: Any) -> int:
    """Bytes of every tensor in ``value`` (a tensor, or nested tuples, lists and dicts of them)."""
    return sum(t.numel() * t.element_size() for t in tensors_of(value))


def largest_param_bytes(blocks: Sequence[NamedBlock]) -> list[int]:
    """Per block, the bytes of the largest parameter tensor it uses (a shared one too, whichever block owns
    it): one parameter's gradient before it is added into ``.grad``, and what a per-tensor optimizer step's
    temporaries scale with (docs/cost-model.md, "Memory")."""
    return [max((p.numel() * p.element_size() for p in block.parameters()), default=0) for _, block in blocks]


def block_param_bytes(blocks: Sequence[NamedBlock], qualified: bool = False) -> tuple[list[int], list[int], list[Tie]]:
    """Parameter and buffer bytes per block; a shared tensor counts in its first block.

    ``qualified``: the blocks' own parameter names are already the model's (graph blocks).
    """
    first_owner: dict[int, str] = {}
    names: dict[int, list[str]] = {}
    users: dict[int, list[str]] = {}
    sizes: dict[int, int] = {}
    params, buffers = [], []
    for block_name, block in blocks:
        total = 0
        for pname, p in block.named_parameters(remove_duplicate=False):
            key = id(p)
            names.setdefault(key, []).append(pname if qualified else f"{block_name}.{pname}")
            if block_name not in users.setdefault(key, []):
                users[key].append(block_name)
            if key not in first_owner:
                first_owner[key] = block_name
                sizes[key] = p.numel() * p.element_size()
                total += sizes[key]
        params.append(total)
        buffers.append(sum(b.numel() * b.element_size() for b in block.buffers()))
    ties = [Tie(params=tuple(names[k]), owner=first_owner[k], blocks=tuple(users[k]), bytes=sizes[k])
            for k in names if len(names[k]) > 1]
    return params, buffers, ties


def detach(value: Any) -> Any:
    """``value`` with its tensors (alone or in tuples) detached from autograd."""
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(detach(v) for v in value)
    return value


def _with_grad(value: Any) -> Any:
    """A fresh leaf copy of a block's input (a block that changes its input in place gets the same values in
    every pass); floating tensors require grad (a stage sends it back)."""
    if isinstance(value, torch.Tensor):
        leaf = value.detach().clone()
        return leaf.requires_grad_(True) if leaf.is_floating_point() else leaf
    if isinstance(value, tuple):
        return tuple(_with_grad(v) for v in value)
    return value


class Clock:
    """Wall time on CPU; CUDA events (after synchronising) on GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def time(self, fn: Callable[[], Any]) -> tuple[Any, float]:
        """``fn()``'s result and the milliseconds it took."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            result = fn()
            end.record()
            torch.cuda.synchronize()
            return result, float(start.elapsed_time(end))
        t0 = time.perf_counter()
        result = fn()
        return result, (time.perf_counter() - t0) * 1e3


def _iqr(values: Sequence[float]) -> float:
    if len(values) < 2:
        return 0.0
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[2] - q[0]


@dataclass(frozen=True)
class BlockTimes:
    """One block's times from :func:`time_block`: medians over the repeats, in ms (the :class:`LayerProfile`
    fields of the same names)."""

    forward_ms: float
    backward_ms: float
    """The whole backward in one call (``torch.autograd.backward``), as the schedules but the zero-bubble ones run
    it."""
    forward_iqr_ms: float
    backward_iqr_ms: float
    cuda_peak_bytes: int | None
    """The CUDA peak above the start; None on CPU."""
    input_grad_ms: float
    """The zero-bubble schedules' I: the inputs' gradients as torch.distributed.pipelining computes them, or by
    ``torch.autograd.grad`` without a ``split`` (0 when no input needs one)."""
    weight_grad_ms: float | None
    """Their W: the weights' gradients afterwards, as torch computes them (the whole backward when no input
    needs a gradient); None: not timed (no ``split`` given)."""


SplitBackward = Callable[[nn.Module, Sequence[torch.Tensor], Sequence[torch.Tensor], Sequence[Any]],
                         "Callable[[], None] | None"]
"""``split(module, outputs, output_grads, inputs)`` runs the input-gradient half of the backward as the pipelining
runtime runs it and returns the weight half to run next (None: no input needs a gradient, the weight half is
the whole backward): :func:`autopart.run.stages.split_backward`, handed in by the caller, as only
``autopart.run`` speaks torch.distributed."""


def time_block(block: nn.Module, block_input: Any, clock: Clock, warmup: int, repeats: int,
               device: torch.device, loss: Callable[[Any], torch.Tensor] | None = None,
               precision: Precision = PRECISIONS[DEFAULT_PRECISION], split: SplitBackward | None = None) -> BlockTimes:
    """The block's forward, its backward in one call, and its backward split in two as the zero-bubble schedules
    run it (the input's gradient, then the weights'), each timed over ``repeats`` after ``warmup``.

    With ``loss``, the forward includes computing the loss from the block's
    output and the backward starts from it (the last stage does both). With
    ``split``, the split backward is the runtime's own (torch's
    ``stage_backward_input`` and ``stage_backward_weight``) on a second
    forward: together they take longer than the backward in one call (they
    walk the graph in Python and keep it between the halves). Without it, the
    input's gradient is ``torch.autograd.grad`` on the inputs alone before the
    whole backward, and ``weight_grad_ms`` is None. The
    forward (and the loss) runs under the ``precision``'s autocast, as a stage of ``autopart train`` runs it.
    """
    run = _runner(block, device, loss, precision)
    grads = _output_grads(run, block_input, loss is not None)
    fwd, bwd, igrad, wgrad = [], [], [], []
    peak: int | None = None
    for i in range(warmup + repeats):
        x = _with_grad(block_input)
        if device.type == "cuda" and i == warmup:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        out, f_ms = clock.time(lambda: run(x))
        outs = [t for t in tensors_of(out) if t.requires_grad]
        needs = [t for t in tensors_of(x) if t.requires_grad]
        b_ms = i_ms = w_ms = 0.0
        if outs and needs and split is None:
            _, i_ms = clock.time(lambda: torch.autograd.grad(outs, needs, grads, retain_graph=True,
                                                             allow_unused=True))
        if outs:
            _, b_ms = clock.time(lambda: torch.autograd.backward(outs, grads))
        if device.type == "cuda" and i == warmup:
            peak = max(0, torch.cuda.max_memory_allocated(device) - base)
        del out, outs
        if b_ms and split is not None:
            x = _with_grad(block_input)
            out = run(x)
            outs = [t for t in tensors_of(out) if t.requires_grad]
            weight, i_ms = _input_half(clock, split, block, outs, grads, list(tensors_of(x)))
            w_ms = b_ms if weight is None else clock.time(weight)[1]
            del out, outs, weight
        if i >= warmup:
            fwd.append(f_ms)
            bwd.append(b_ms)
            igrad.append(i_ms if split is not None else min(i_ms, b_ms))
            wgrad.append(w_ms)
    return BlockTimes(forward_ms=statistics.median(fwd), backward_ms=statistics.median(bwd),
                      forward_iqr_ms=_iqr(fwd), backward_iqr_ms=_iqr(bwd), cuda_peak_bytes=peak,
                      input_grad_ms=statistics.median(igrad),
                      weight_grad_ms=statistics.median(wgrad) if split is not None else None)


def _input_half(clock: Clock, split: SplitBackward, block: nn.Module, outs: Sequence[torch.Tensor],
                grads: Sequence[torch.Tensor], inputs: Sequence[Any]) -> tuple[Callable[[], None] | None, float]:
    """``split``'s I of ``block``, timed: (its W, to run next, or None; ms). It runs on clones of ``outs``: torch
    detaches what it is given in place, which a view or a tensor the block saved refuses."""
    owned = [t.clone() for t in outs]
    return clock.time(lambda: split(block, owned, grads, inputs))


def _runner(block: nn.Module, device: torch.device, loss: Callable[[Any], torch.Tensor] | None,
            precision: Precision) -> Callable[[Any], Any]:
    """The block's forward on an input as a stage receives it (and the loss on its output), under the
    ``precision``'s autocast."""
    def run(x: Any) -> Any:
        with autocast(precision, device):
            out = call_block(block, stage_inputs(x))  # as a stage gets what it received
            return loss(out) if loss is not None else out
    return run


def _output_grads(run: Callable[[Any], Any], block_input: Any, with_loss: bool) -> list[torch.Tensor]:
    """The gradients a backward of ``run``'s outputs starts from: ones for a loss, small random ones else."""
    outs = [t for t in tensors_of(run(_with_grad(block_input))) if t.requires_grad]
    return [torch.ones_like(t) if with_loss else torch.randn_like(t) * 1e-3 for t in outs]


def time_chain(blocks: Sequence[nn.Module], block_inputs: Sequence[Any], clock: Clock, warmup: int, repeats: int,
               device: torch.device, loss: Callable[[Any], torch.Tensor] | None = None,
               precision: Precision = PRECISIONS[DEFAULT_PRECISION], split: SplitBackward | None = None
               ) -> list[BlockTimes]:
    """:func:`time_block`'s times of every block, each timed in the order a stage runs it rather than over and
    over alone: the forwards block after block, the backwards from the last block to the first, and with
    ``split`` every block's input half (I) from the last to the first and then every weight half (W). A block
    alone, run again and again, finds its weights and activations in the core's caches; in a stage the blocks
    before it have pushed them out, and on the development CPU a stage of 12 of gpt2-mini's blocks ran 1.2-1.4x
    their times alone (most at micro-batch 1, where a block reads its weights for little work). ``loss``
    follows the last block. No CUDA peak is measured (``cuda_peak_bytes`` None): :func:`time_block` measures one."""
    last = len(blocks) - 1
    runs = [_runner(block, device, loss if k == last else None, precision) for k, block in enumerate(blocks)]
    grads = [_output_grads(run, x, loss is not None and k == last)
             for k, (run, x) in enumerate(zip(runs, block_inputs))]
    times: list[dict[str, list[float]]] = [{"f": [], "b": [], "i": [], "w": []} for _ in blocks]

    def forwards(timed: bool) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        """Each block's (inputs, outputs that need a gradient), block after block."""
        graphs = []
        for k, run in enumerate(runs):
            x = _with_grad(block_inputs[k])
            out, f_ms = clock.time(lambda: run(x))
            if timed:
                times[k]["f"].append(f_ms)
            graphs.append(([t for t in tensors_of(x) if t.requires_grad],
                           [t for t in tensors_of(out) if t.requires_grad]))
        return graphs

    for r in range(warmup + repeats):
        keep = r >= warmup
        graphs = forwards(keep)
        for k in reversed(range(len(blocks))):
            needs, outs = graphs[k]
            i_ms = b_ms = 0.0
            if outs and needs and split is None:
                _, i_ms = clock.time(lambda: torch.autograd.grad(outs, needs, grads[k], retain_graph=True,
                                                                 allow_unused=True))
            if outs:
                _, b_ms = clock.time(lambda: torch.autograd.backward(outs, grads[k]))
            if keep:
                times[k]["b"].append(b_ms)
                times[k]["i"].append(min(i_ms, b_ms))
                times[k]["w"].append(b_ms)  # replaced below when the runtime's halves are timed
        del graphs
        if split is None:
            continue
        graphs = forwards(False)
        weights: list[Callable[[], None] | None] = [None] * len(blocks)
        for k in reversed(range(len(blocks))):
            needs, outs = graphs[k]
            if outs:
                graphs[k] = (needs, [])  # the outputs themselves go after the I, as torch's I lets them go
                weights[k], i_ms = _input_half(clock, split, blocks[k], outs, grads[k], needs)
                if keep:
                    times[k]["i"][-1] = i_ms
        for k in reversed(range(len(blocks))):
            weight = weights[k]
            if weight is not None:
                _, w_ms = clock.time(weight)
                if keep:
                    times[k]["w"][-1] = w_ms
        del graphs, weights
    return [BlockTimes(forward_ms=statistics.median(t["f"]), backward_ms=statistics.median(t["b"]),
                       forward_iqr_ms=_iqr(t["f"]), backward_iqr_ms=_iqr(t["b"]), cuda_peak_bytes=None,
                       input_grad_ms=statistics.median(t["i"]),
                       weight_grad_ms=statistics.median(t["w"]) if split is not None else None) for t in times]


def optimizer_times(block: nn.Module, clock: Clock, repeats: int = 3) -> tuple[float, tuple[tuple[str, float], ...]]:
    """Median time of a step plus zeroing the gradients, on copies of ``block``'s parameters: AdamW's, and
    every optimizer's by name."""
    params = [p for p in block.parameters() if p.requires_grad]
    if not params:
        return 0.0, tuple((name, 0.0) for name in OPTIMIZER_STATES)
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    for c in copies:
        c.grad = torch.zeros_like(c)
    by_name = []
    for name in OPTIMIZER_STATES:
        optimizer = make_optimizer(name, copies, lr=1e-3)

        def step() -> None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)

        step()  # creates the optimizer state
        by_name.append((name, statistics.median([clock.time(step)[1] for _ in range(repeats)])))
    return dict(by_name)["adamw"], tuple(by_name)  # a profile's optimizer_ms is AdamW's


def crossing_bytes(crossing: Sequence[tuple[int, int]], i: int, after: Any, precision: Precision) -> tuple[int, int]:
    """(main path, skips) bytes crossing the cut after block ``i``: a captured graph's sizes, or the values
    ``after`` it (a chain of children). A graph is captured without autocast, so under a mixed precision its
    sizes are scaled to what crosses the cut under autocast, main and skips alike."""
    real = nbytes(after)
    if i >= len(crossing):
        return real, 0
    main, skip = crossing[i]
    if not precision.mixed or main + skip == 0:
        return main, skip
    scaled_main = round(real * main / (main + skip))
    return scaled_main, real - scaled_main


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu ({line.split(':', 1)[1].strip()})"
    except OSError:
        pass
    return "cpu"


def make_profile(name: str, device: torch.device, dtype: torch.dtype, example: tuple[torch.Tensor, ...],
             layers: Sequence[LayerProfile], ties: Sequence[Tie], repeats: int, warmup: int, loss: bool,
             precision: Precision = PRECISIONS[DEFAULT_PRECISION]) -> Profile:
    """The profile of measured ``layers``, with what it was measured on and how (``dtype``: the parameters')."""
    first = example[0]
    return Profile(
        model=name, device=_device_name(device), dtype=str(dtype).removeprefix("torch."), precision=precision.name,
        microbatch_size=int(first.shape[0]) if first.dim() else 1, sample_shape=tuple(int(d) for d in first.shape),
        torch=torch.__version__.split("+")[0], layers=tuple(layers), ties=tuple(ties),
        threads=torch.get_num_threads() if device.type == "cpu" else None, repeats=repeats, warmup=warmup,
        input_bytes=nbytes(example), loss_in_last_block=loss,
    )

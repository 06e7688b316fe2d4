"""Measure a model block by block: time, parameter bytes, activation bytes, output bytes.

    profile = profile_model(module, example, name="gpt2-small")

Note: times are per micro-batch and per block, measured on inputs captured
from one real forward of the chain; each block's backward starts from a fixed
random gradient of its output and computes input and weight gradients, as a
pipeline stage does. CPU times use ``time.perf_counter`` (and depend on
``torch.get_num_threads()``, which the profile records); CUDA times use events
after a synchronisation. Activation bytes come from
``torch.autograd.graph.saved_tensors_hooks`` during one connected forward of
the whole chain: every storage autograd saves is counted once, in the first
block that saves it, and parameters and buffers are excluded. The loss is not
part of any block's own time, except the last's when a loss is given; the
loss is also timed alone on the last block's output (``loss_forward_ms``,
``loss_backward_ms``). Given the runtime, its own cost per action is timed
on a tiny stage (:mod:`autopart.measure.runtime_cost`, the profile's ``action_ms``).

The module is left as it was found: weights, buffers (BatchNorm running
statistics), gradients, ``requires_grad`` flags, train/eval modes and the RNG.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable, ContextManager, Iterator, Mapping, Sequence

import torch
from torch import nn

from autopart.errors import AutopartError
from autopart.formats.precision import Precision, check_precision, precision_of_dtype
from autopart.formats.profile import BATCHNORM_MODES, LayerProfile, Profile
from autopart.measure.amp import autocast, param_dtype
from autopart.measure.batchnorm import batchnorm_layers, deferred_batchnorm
from autopart.measure.blocks import NamedBlock, call_block, cannot_run, chain_of, tensors_of
from autopart.measure.memory import allocating_as_ranks_do
from autopart.measure.runtime_cost import Runtime, runtime_action_ms
from autopart.measure.timing import (
    Clock,
    ProgressFn,
    SplitBackward,
    block_param_bytes,
    largest_param_bytes,
    crossing_bytes,
    detach,
    make_profile,
    optimizer_times,
    storage_key,
    time_block,
    time_chain,
)

__all__ = ["profile_model", "ProgressFn", "cpu_cores"]


@contextlib.contextmanager
def _preserved(module: nn.Module, device: torch.device) -> Iterator[None]:
    """Restore modes, requires_grad flags, gradients, buffers and the RNG on exit."""
    modes = {m: m.training for m in module.modules()}
    flags = {p: p.requires_grad for p in module.parameters()}
    grads = {p: p.grad for p in module.parameters()}
    buffers = {b: b.detach().clone() for b in module.buffers()}
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        try:
            for p in module.parameters():
                p.grad = None
            yield
        finally:
            for m, training in modes.items():
                m.training = training
            for p, flag in flags.items():
                p.requires_grad_(flag)
                p.grad = grads[p]
            with torch.no_grad():
                for b, saved in buffers.items():
                    b.copy_(saved)


def _activation_pass(module: nn.Module, blocks: Sequence[NamedBlock], example: tuple[torch.Tensor, ...],
                     loss: Callable[[Any], torch.Tensor] | None = None,
                     mixed: ContextManager[object] | None = None
                     ) -> tuple[list[int], list[Any], int, list[int]]:
    """One connected forward (under ``mixed``, the precision's autocast): saved bytes per block, each block's
    input (detached), the bytes the loss saves (counted apart; 0 without a loss), and per block the bytes of
    its output's storage it saved itself (charged to it, so to no block after it)."""
    excluded = {k for t in list(module.parameters()) + list(module.buffers()) if (k := storage_key(t))}
    seen: set[tuple[int, int]] = set()
    saved = [0] * (len(blocks) + 1)  # the last entry: the loss's
    charged: set[tuple[int, int]] = set()  # the storages the current block saved first
    output_saved = [0] * len(blocks)
    current = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key is not None and key not in excluded and key not in seen:
            seen.add(key)
            saved[current] += key[1]
            charged.add(key)
        return t

    inputs: list[Any] = []
    out: Any = example if len(example) > 1 else example[0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mixed or contextlib.nullcontext():
        for current, (_, block) in enumerate(blocks):
            inputs.append(detach(out))
            charged.clear()
            out = call_block(block, out)
            held = {key for t in tensors_of(out) if (key := storage_key(t)) is not None} & charged
            output_saved[current] = sum(size for _, size in held)
        final = detach(out)
        if loss is not None:
            current = len(blocks)
            loss(out)  # what the loss saves for backward is the last stage's too
    inputs.append(final)
    return saved[:-1], inputs, saved[-1], output_saved


def _precision_for(name: str | None, dtype: torch.dtype) -> Precision:
    """The precision asked for (its parameter dtype must be the module's), or the one the module's dtype means."""
    chosen = check_precision(name or precision_of_dtype(str(dtype), "a model whose parameters are"))
    if param_dtype(chosen) != dtype:
        raise AutopartError(f"precision {chosen.name} keeps parameters in {chosen.param_dtype}, but the model's are "
                            f"{str(dtype).removeprefix('torch.')}")
    return chosen


def _module_device_dtype(module: nn.Module, example: Sequence[torch.Tensor]) -> tuple[torch.device, torch.dtype]:
    params = list(module.parameters())
    device = params[0].device if params else example[0].device
    floats = [p.dtype for p in params if p.is_floating_point()]
    dtype = floats[0] if floats else torch.get_default_dtype()
    return device, dtype


@allocating_as_ranks_do()
def profile_model(module: nn.Module, example: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor], *,
                  name: str = "model", warmup: int = 2, repeats: int = 7, progress: ProgressFn | None = None,
                  loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, target: Any = None,
                  batchnorm: str = "deferred", precision: str | None = None,
                  threads: Sequence[int] = (), runtime: Runtime | None = None,
                  split_backward: SplitBackward | None = None) -> Profile:
    """Profile ``module`` on one micro-batch ``example``: a tensor, a tuple of tensors, or keyword inputs.

    The module is profiled where it is (its device and dtype) in training mode,
    and left unchanged. Blocks are the flattened ``nn.Sequential`` children, or
    the top-level children of another module when they reproduce its forward.
    Given ``loss_fn`` and ``target``, the last block's time and activations
    include the loss, as the last pipeline stage computes it. BatchNorm layers are
    measured as training will run them: ``batchnorm="deferred"`` swaps in
    :class:`~autopart.measure.batchnorm.DeferredBatchNorm` while measuring. ``precision``
    (:mod:`autopart.formats.precision`): each forward and the loss run under its autocast when it is mixed,
    so activation and output bytes are its sizes; its parameter dtype must be the module's. None: the
    module's dtype says (float32 is fp32, bfloat16 bf16-true). ``threads`` (CPU only): the torch thread counts
    to time the blocks at, the first for ``layers`` and each other for ``by_threads`` (the thread count is
    restored after); empty: torch's current count only. A CPU profile records ``cpu_cores``. ``runtime``
    (:func:`autopart.run.stages.one_stage_world`): the pipelining runtime, whose own cost per action the profile
    records (``action_ms``; 0 without it). ``split_backward`` (:func:`autopart.run.stages.split_backward`): the
    runtime's own halves of a backward, whose times the profile records (``input_grad_ms``, ``weight_grad_ms``;
    without it, ``weight_grad_ms`` is None and the input's gradient is plain autograd's). CPU memory is
    allocated as a ``train`` rank allocates it meanwhile (:func:`autopart.measure.memory.allocating_as_ranks_do`),
    so the times are a rank's.
    """
    if repeats < 1:
        raise AutopartError(f"repeats must be >= 1, got {repeats}")
    if warmup < 0:
        raise AutopartError(f"warmup must be >= 0, got {warmup}")
    names = tuple(example) if isinstance(example, Mapping) else None
    example_t = (example,) if isinstance(example, torch.Tensor) else (
        tuple(example.values()) if isinstance(example, Mapping) else tuple(example))
    if not example_t:
        raise AutopartError("example input is empty")
    from autopart.measure.stream import on_meta, profile_by_block

    if batchnorm not in BATCHNORM_MODES:
        raise AutopartError(f"batchnorm must be one of {', '.join(BATCHNORM_MODES)}, got {batchnorm!r}")
    mode = batchnorm if batchnorm_layers(module) else None
    if on_meta(module):  # too big to build: one block at a time
        floats = [t.dtype for t in module.parameters() if t.is_floating_point()]
        meta_dtype = floats[0] if floats else torch.float32
        with deferred_batchnorm(module, mode or "micro"):
            streamed = profile_by_block(module, example_t, name=name, device=example_t[0].device, input_names=names,
                                        dtype=meta_dtype, warmup=warmup, repeats=repeats,
                                        progress=progress, loss_fn=loss_fn, target=target,
                                        precision=_precision_for(precision, meta_dtype),
                                        split_backward=split_backward)
        return dataclasses.replace(streamed, batchnorm=mode, cpu_cores=_cores(example_t[0].device),
                                   action_ms=_action_ms(example_t[0].device, runtime))
    device, dtype = _module_device_dtype(module, example_t)
    chosen = _precision_for(precision, dtype)
    bad = [str(t.device) for t in example_t if t.device != device]
    if bad:
        raise AutopartError(f"example is on {bad[0]} but the model is on {device}")
    with _preserved(module, device):
        chain = chain_of(module, example_t, name, names)
    blocks = chain.blocks
    if loss_fn is not None:
        loss_fn = chain.model_loss(loss_fn)
    param_bytes, buffer_bytes, ties = block_param_bytes(blocks, qualified=chain.qualified_parameters)
    largest = largest_param_bytes(blocks)
    crossing = chain.crossing_bytes()
    clock = Clock(device)
    layers = []
    counts = list(threads) if device.type == "cpu" else []
    passes = max(1, len(counts))
    with _preserved(module, device), deferred_batchnorm(module, mode or "micro"), _thread_count(counts[:1]):
        if mode == "deferred":  # the blocks again, with the swapped layers
            chain.reload_blocks()
            blocks = chain.blocks
        module.train()
        try:
            loss = (lambda out: loss_fn(out, target)) if loss_fn is not None and target is not None else None
            saved, inputs, loss_saved, output_saved = _activation_pass(module, blocks, example_t, loss, autocast(chosen, device))
        except Exception as exc:
            raise cannot_run(name, example_t, exc) from None
        total = passes * len(blocks)
        times = _timed_pass(blocks, inputs, clock, warmup, repeats, device, loss, chosen, split_backward, progress,
                            "", 0, total)
        for i, (block_name, _) in enumerate(blocks):
            last = i == len(blocks) - 1
            main, skip = crossing_bytes(crossing, i, inputs[i + 1], chosen)
            layers.append(LayerProfile(
                name=block_name, param_bytes=param_bytes[i], largest_param_bytes=largest[i],
                activation_bytes=saved[i] + (loss_saved if last else 0),
                loss_activation_bytes=loss_saved if last and loss is not None else None,
                output_bytes=main, skip_bytes=skip, buffer_bytes=buffer_bytes[i], output_saved_bytes=output_saved[i],
                **times[i],
            ))
        profile = make_profile(name, device, dtype, example_t, layers, ties, repeats, warmup,
                               loss_fn is not None and target is not None, chosen)
        by_threads = []
        for k, count in enumerate(counts[1:], start=1):  # the same blocks and inputs, timed at another count
            with _thread_count([count]):
                again = _timed_pass(blocks, inputs, clock, warmup, repeats, device, loss, chosen, split_backward,
                                    progress,
                                    f" ({count} thread{'s' * (count != 1)})", k * len(blocks), total)
            by_threads.append((count, tuple(dataclasses.replace(x, **t) for x, t in zip(layers, again))))
    return dataclasses.replace(profile, batchnorm=mode, cpu_cores=_cores(device), by_threads=tuple(by_threads),
                               action_ms=_action_ms(device, runtime))


def _timed_pass(blocks: Sequence[NamedBlock], inputs: Sequence[Any], clock: Clock, warmup: int, repeats: int,
                device: torch.device, loss: Callable[[Any], torch.Tensor] | None, precision: Precision,
                split: SplitBackward | None, progress: ProgressFn | None, label: str, done: int, total: int
                ) -> list[dict[str, Any]]:
    """Each block's :class:`LayerProfile` time fields at torch's current thread count (the last block's with the
    loss, and the loss alone on its output); ``label`` follows each block's name in the progress, which counts
    from ``done`` of ``total``. On a CPU the blocks are timed in the order a stage runs them
    (:func:`~autopart.measure.timing.time_chain`: what ran before a block decides what its caches hold); on a
    GPU each alone (:func:`~autopart.measure.timing.time_block`, with its CUDA peak)."""
    times: list[dict[str, Any]] = []
    chain = time_chain([block for _, block in blocks], inputs[:len(blocks)], clock, warmup, repeats, device, loss,
                       precision, split) if device.type == "cpu" else None
    for i, (block_name, block) in enumerate(blocks):
        last = i == len(blocks) - 1
        timed = chain[i] if chain is not None else time_block(block, inputs[i], clock, warmup, repeats, device,
                                                              loss if last else None, precision, split)
        optimizer_ms, by_name = optimizer_times(block, clock)
        times.append(dict(dataclasses.asdict(timed), optimizer_ms=optimizer_ms, optimizer_ms_by_name=by_name))
        if progress is not None:
            progress(block_name + label, done + i + 1, total)
    if loss is not None:  # the loss alone on the last block's output
        alone = time_block(_Output(), inputs[-1], clock, warmup, repeats, device, loss, precision)
        times[-1].update(loss_forward_ms=alone.forward_ms, loss_backward_ms=alone.backward_ms)
    return times


@contextlib.contextmanager
def _thread_count(counts: Sequence[int]) -> Iterator[None]:
    """torch's CPU thread count set to ``counts[0]`` (none given: left as it is), restored on exit."""
    was = torch.get_num_threads()
    if counts:
        torch.set_num_threads(counts[0])
    try:
        yield
    finally:
        torch.set_num_threads(was)


def cpu_cores() -> int:
    """The CPU cores this process may run on (``os.sched_getaffinity``): what ranks on this machine share."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cores(device: torch.device) -> int | None:
    """:func:`cpu_cores` on a CPU; None on a GPU."""
    return cpu_cores() if device.type == "cpu" else None


class _Output(nn.Module):
    """The last block's output as it is: timed with the loss, the loss alone (its forward, and its backward
    to that output)."""

    def forward(self, *values: Any) -> Any:
        return values[0] if len(values) == 1 else values


def _action_ms(device: torch.device, runtime: Runtime | None) -> float:
    """The pipelining runtime's own time per action (:mod:`autopart.measure.runtime_cost`); 0 without a runtime or
    when it cannot run in this process (a process group exists already)."""
    return (runtime_action_ms(device, runtime) or 0.0) if runtime is not None else 0.0



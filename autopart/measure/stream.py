"""Profile a model too big to build: on the meta device, one block materialised at a time.

    with torch.device("meta"):
        model = build()                       # no memory for the weights
    profile = profile_by_block(model, example, name="hf:llama", device=torch.device("cpu"))

Note: the model is captured (or cut into its children) on the meta device.
Then, in order, each block gets real storage on ``device`` with random
weights (normal, std 0.02; floating buffers 1, integer buffers 0: the values
do not change what a block costs), runs on the real output of the block
before it, is timed like :func:`autopart.measure.profiler.profile_model`
times a block, and goes back to the meta device. At most one block's weights,
gradients and optimizer state are real at a time, plus the activations of
one micro-batch. A block identical to one measured before (the same
operations on the same shapes and dtypes, parameters of the same shapes, the
same inputs saved by the block before it) is not measured again: its profile is that block's, and ``same_as`` says so.
Activation bytes are counted per block (a storage two blocks save is charged
to the first), as the whole-model profiler counts them.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import fx, nn

from autopart.errors import AutopartError
from autopart.formats.precision import DEFAULT_PRECISION, PRECISIONS, Precision
from autopart.formats.profile import LayerProfile, Profile
from autopart.measure.amp import autocast
from autopart.measure.blocks import Chain, call_block, chain_of, tensors_of
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
)

if TYPE_CHECKING:
    from autopart.measure.spec import ModelBundle

__all__ = ["profile_by_block", "on_meta", "load_with_weights", "retarget"]


def on_meta(module: nn.Module) -> bool:
    """True when the module's weights have no storage (built under ``torch.device("meta")``)."""
    return any(t.is_meta for t in list(module.parameters()) + list(module.buffers()))


def load_with_weights(spec: str) -> ModelBundle:
    """The model built as its factory builds it, which must give it weights: autopart itself puts a model on
    the meta device where it must (too big to build, or a rank that materialises its own stages)."""
    from autopart.measure.spec import load_model

    bundle = load_model(spec)
    if on_meta(bundle.module):
        raise AutopartError(f"model factory {spec!r} returned a module on the meta device (no weights): build it on "
                            f"a real device; autopart builds a model too big for memory on the meta device itself")
    return bundle


def _materialise(block: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    block.to_empty(device=device)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, dtype=torch.float32).mul_(0.02).to(dtype))
        for b in block.buffers():
            b.fill_(1 if b.is_floating_point() else 0)


def _off_meta(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.device) and value.type == "meta":
        return device
    if isinstance(value, (list, tuple)):
        return type(value)(_off_meta(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _off_meta(v, device) for k, v in value.items()}
    return value


def retarget(block: nn.Module, device: torch.device) -> None:
    """A graph captured on the meta device names it in some operations (``arange(device=meta)``): run on ``device``."""
    for module in block.modules():  # nested graphs too (autocast and no-grad regions)
        if isinstance(module, fx.GraphModule):
            for node in module.graph.nodes:
                node.args = _off_meta(node.args, device)
                node.kwargs = _off_meta(node.kwargs, device)
            module.recompile()


def _signature(chain: Chain, index: int, block: nn.Module, inputs: Any, carried: set[tuple[int, int]]) -> str:
    """What makes two blocks cost the same: their operations on the same shapes, their parameters' shapes, and
    which of their inputs the block before saved (those are charged to it, not to this block)."""
    params = [(tuple(p.shape), str(p.dtype)) for p in block.parameters()]
    tensors = [t for t in (inputs if isinstance(inputs, tuple) else (inputs,)) if isinstance(t, torch.Tensor)]
    shapes = [(tuple(t.shape), str(t.dtype), storage_key(t) in carried) for t in tensors]
    return repr((chain.operations(index), params, shapes))


def _held_positions(value: Any, held: set[tuple[int, int]]) -> tuple[int, ...]:
    """Which of a block's output tensors it saved itself (by position)."""
    return tuple(k for k, t in enumerate(tensors_of(value)) if storage_key(t) in held)


def _as_received(value: Any) -> Any:
    """A block's input from the block before as the whole model's forward has it: its floating tensors need a
    gradient, so what the block saves for its input's gradient (under autocast, the low-precision copy of a
    weight) is counted as there."""
    if isinstance(value, torch.Tensor):
        return value.detach().requires_grad_(value.is_floating_point())
    if isinstance(value, tuple):
        return tuple(_as_received(v) for v in value)
    return value


def _fake_outputs(like: Any) -> Any:
    """A reused block's outputs for the next block: the same shapes and dtypes, random values."""
    if isinstance(like, torch.Tensor):
        if like.is_floating_point():
            return torch.randn(like.shape, dtype=like.dtype, device=like.device)
        return torch.zeros_like(like)
    if isinstance(like, tuple):
        return tuple(_fake_outputs(x) for x in like)
    return like


def profile_by_block(module: nn.Module, example: Sequence[torch.Tensor], *, name: str, device: torch.device,
                     dtype: torch.dtype = torch.float32, warmup: int = 2, repeats: int = 7,
                     progress: ProgressFn | None = None, loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
                     target: Any = None, input_names: Sequence[str] | None = None,
                     precision: Precision = PRECISIONS[DEFAULT_PRECISION],
                     split_backward: SplitBackward | None = None) -> Profile:
    """Profile a meta-device ``module`` on the real micro-batch ``example``, one block in memory at a time, each
    forward (and the loss) under ``precision``'s autocast; ``dtype``: the parameters'; ``split_backward``: as
    :func:`autopart.measure.timing.time_block` takes it."""
    example_t = tuple(example)
    chain = chain_of(module, tuple(t.to("meta") for t in example_t), name, input_names)
    blocks = chain.blocks
    for _, block in blocks:
        retarget(block, device)
    param_bytes, buffer_bytes, ties = block_param_bytes(blocks, qualified=chain.qualified_parameters)
    largest = largest_param_bytes(blocks)
    crossing = chain.crossing_bytes()
    loss = None
    if loss_fn is not None and target is not None:
        wrapped = chain.model_loss(loss_fn)
        loss = lambda out: wrapped(out, target)  # noqa: E731
    clock = Clock(device)
    measured: dict[str, tuple[str, LayerProfile, Any, tuple[int, ...]]] = {}
    layers: list[LayerProfile] = []
    carried: set[tuple[int, int]] = set()  # storages the block before saved that its output still holds
    value: Any = example_t if len(example_t) > 1 else example_t[0]
    for i, (block_name, block) in enumerate(blocks):
        last = i == len(blocks) - 1
        sig = _signature(chain, i, block, value, carried)
        if sig in measured and not last:
            first, layer, out_like, positions = measured[sig]
            layers.append(dataclasses.replace(layer, name=block_name, same_as=first))
            value = _fake_outputs(out_like)  # what the block saved of it, the next block is not charged for
            carried = {k for p, t in enumerate(tensors_of(value)) if p in positions and (k := storage_key(t))}
        else:
            layer, value, carried = _measure(block, block_name, value if i == 0 else _as_received(value), device,
                                             dtype, clock, warmup, repeats,
                                             carried, loss if last else None, precision, split_backward)
            layers.append(layer)
            measured.setdefault(sig, (block_name, layer, detach(value), _held_positions(value, carried)))
        main, skip = crossing_bytes(crossing, i, value, precision)
        layers[-1] = dataclasses.replace(layers[-1], param_bytes=param_bytes[i], buffer_bytes=buffer_bytes[i],
                                         largest_param_bytes=largest[i],
                                         output_bytes=main, skip_bytes=skip)
        if progress is not None:
            progress(block_name, i + 1, len(blocks))
    return make_profile(name, device, dtype, example_t, layers, ties, repeats, warmup, loss is not None, precision)


def _measure(block: nn.Module, name: str, value: Any, device: torch.device, dtype: torch.dtype, clock: Clock,
             warmup: int, repeats: int, carried: set[tuple[int, int]],
             loss: Callable[[Any], torch.Tensor] | None, precision: Precision, split: SplitBackward | None
             ) -> tuple[LayerProfile, Any, set[tuple[int, int]]]:
    """One block, with real weights for as long as it is measured: its profile, its (detached) output, and
    the storages it saved that the output holds (charged to it, not to the next block)."""
    _materialise(block, device, dtype)
    try:
        block.train()
        excluded = {k for t in list(block.parameters()) + list(block.buffers()) if (k := storage_key(t))}
        seen = set(carried)
        mine: set[tuple[int, int]] = set()
        by_loss: set[tuple[int, int]] = set()  # what the loss saves, counted apart
        sink = [mine]

        def pack(t: torch.Tensor) -> torch.Tensor:
            key = storage_key(t)
            if key is not None and key not in excluded and key not in seen:
                seen.add(key)
                sink[0].add(key)
            return t

        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast(precision, device):
                out = call_block(block, value)
                if loss is not None:
                    sink[0] = by_loss
                    loss(out)
        except Exception as exc:
            raise AutopartError(f"block {name!r} cannot run: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        out = detach(out)
        held = {k for t in tensors_of(out) if (k := storage_key(t))} & mine
        timed = time_block(block, value, clock, warmup, repeats, device, loss, precision, split)
        optimizer_ms, by_name = optimizer_times(block, clock)
        layer = LayerProfile(name=name, forward_ms=timed.forward_ms, backward_ms=timed.backward_ms,
                             input_grad_ms=timed.input_grad_ms, weight_grad_ms=timed.weight_grad_ms, param_bytes=0,
                             activation_bytes=sum(size for _, size in mine | by_loss),
                             loss_activation_bytes=sum(size for _, size in by_loss) if loss is not None else None,
                             output_bytes=0, forward_iqr_ms=timed.forward_iqr_ms,
                             backward_iqr_ms=timed.backward_iqr_ms, cuda_peak_bytes=timed.cuda_peak_bytes,
                             optimizer_ms=optimizer_ms, optimizer_ms_by_name=by_name,
                             output_saved_bytes=sum(size for _, size in held))
    finally:
        for p in block.parameters():
            p.grad = None
        block.to_empty(device="meta")
    return layer, out, held

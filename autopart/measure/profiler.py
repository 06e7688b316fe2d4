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
part of any block.

The module is left as it was found: weights, buffers (BatchNorm running
statistics), gradients, ``requires_grad`` flags, train/eval modes and the RNG.
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from autopart.errors import AutopartError
from autopart.formats.profile import BATCHNORM_MODES, LayerProfile, Profile, Tie
from autopart.measure.batchnorm import batchnorm_layers, deferred_batchnorm
from autopart.measure.blocks import NamedBlock, call_block, cannot_run, chain_of, stage_inputs, tensors_of

__all__ = ["profile_model", "ProgressFn", "make_optimizer", "OPTIMIZERS"]

ProgressFn = Callable[[str, int, int], None]
"""Called as ``progress(block_name, blocks_done, blocks_total)``."""


def _nbytes(value: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_of(value))


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    if storage.nbytes() == 0:
        return None
    return storage.data_ptr(), storage.nbytes()


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


def _param_bytes(blocks: Sequence[NamedBlock], qualified: bool = False) -> tuple[list[int], list[int], list[Tie]]:
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


def _activation_pass(module: nn.Module, blocks: Sequence[NamedBlock], example: tuple[torch.Tensor, ...],
                     loss: Callable[[Any], torch.Tensor] | None = None) -> tuple[list[int], list[Any]]:
    """One connected forward: saved bytes per block, and each block's input (detached)."""
    excluded = {k for t in list(module.parameters()) + list(module.buffers()) if (k := _storage_key(t))}
    seen: set[tuple[int, int]] = set()
    saved = [0] * len(blocks)
    current = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key is not None and key not in excluded and key not in seen:
            seen.add(key)
            saved[current] += key[1]
        return t

    inputs: list[Any] = []
    out: Any = example if len(example) > 1 else example[0]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for current, (_, block) in enumerate(blocks):
            inputs.append(_detach(out))
            out = call_block(block, out)
        final = _detach(out)
        if loss is not None:
            loss(out)  # what the loss saves for backward is the last stage's too
    inputs.append(final)
    return saved, inputs


def _detach(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
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


class _Clock:
    """Wall time on CPU; CUDA events (after synchronising) on GPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def time(self, fn: Callable[[], Any]) -> tuple[Any, float]:
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


def _time_block(block: nn.Module, block_input: Any, clock: _Clock, warmup: int, repeats: int,
                device: torch.device, loss: Callable[[Any], torch.Tensor] | None = None
                ) -> tuple[float, float, float, float, int | None, float]:
    """Median forward and backward ms (and their IQRs), the CUDA peak above the start, and the median ms of
    the backward for the input's gradient alone (0 when no input needs one).

    With ``loss``, the forward includes computing the loss from the block's
    output and the backward starts from it (the last stage does both). The
    input-gradient half is ``torch.autograd.grad`` on the inputs alone, as
    torch.distributed.pipelining's ``stage_backward_input`` runs it; the
    graph is kept for the full backward timed after it.
    """
    def run(x: Any) -> Any:
        out = call_block(block, stage_inputs(x))  # as a stage gets what it received
        return loss(out) if loss is not None else out

    x = _with_grad(block_input)
    probe = run(x)
    outs = [t for t in tensors_of(probe) if t.requires_grad]
    grads = [torch.ones_like(t) if loss is not None else torch.randn_like(t) * 1e-3 for t in outs]
    del probe, outs
    fwd, bwd, igrad = [], [], []
    peak: int | None = None
    for i in range(warmup + repeats):
        x = _with_grad(block_input)
        needs = [t for t in tensors_of(x) if t.requires_grad]
        if device.type == "cuda" and i == warmup:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        out, f_ms = clock.time(lambda: run(x))
        outs = [t for t in tensors_of(out) if t.requires_grad]
        b_ms = i_ms = 0.0
        if outs and needs:
            _, i_ms = clock.time(lambda: torch.autograd.grad(outs, needs, grads, retain_graph=True,
                                                             allow_unused=True))
        if outs:
            _, b_ms = clock.time(lambda: torch.autograd.backward(outs, grads))
        if device.type == "cuda" and i == warmup:
            peak = max(0, torch.cuda.max_memory_allocated(device) - base)
        del out, outs
        if i >= warmup:
            fwd.append(f_ms)
            bwd.append(b_ms)
            igrad.append(min(i_ms, b_ms))
    return statistics.median(fwd), statistics.median(bwd), _iqr(fwd), _iqr(bwd), peak, statistics.median(igrad)


def make_optimizer(name: str, params: Sequence[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """The optimizer a plan names (``adam``, ``adamw``, ``sgd-momentum`` with momentum 0.9, ``sgd``), over
    ``params`` as one group; no parameters (a stage of activations only) give one with nothing to update."""
    groups: list[dict[str, Any]] = [{"params": list(params)}]  # torch refuses a bare empty list, not an empty group
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    if name in ("sgd", "sgd-momentum"):
        return torch.optim.SGD(groups, lr=lr, momentum=0.9 if name == "sgd-momentum" else 0.0)
    raise AutopartError(f"unknown optimizer {name!r}; known: adam, adamw, sgd-momentum, sgd")


OPTIMIZERS = ("adamw", "adam", "sgd-momentum", "sgd")


def _optimizer_ms(block: nn.Module, clock: _Clock, repeats: int = 3) -> tuple[float, tuple[tuple[str, float], ...]]:
    """Median time of a step plus zeroing the gradients, on copies of ``block``'s parameters: AdamW's, and
    every optimizer's by name."""
    params = [p for p in block.parameters() if p.requires_grad]
    if not params:
        return 0.0, tuple((name, 0.0) for name in OPTIMIZERS)
    copies = [p.detach().clone().requires_grad_(True) for p in params]
    for c in copies:
        c.grad = torch.zeros_like(c)
    by_name = []
    for name in OPTIMIZERS:
        optimizer = make_optimizer(name, copies, lr=1e-3)

        def step() -> None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=False)

        step()  # creates the optimizer state
        by_name.append((name, statistics.median([clock.time(step)[1] for _ in range(repeats)])))
    return by_name[0][1], tuple(by_name)


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


def _module_device_dtype(module: nn.Module, example: Sequence[torch.Tensor]) -> tuple[torch.device, torch.dtype]:
    params = list(module.parameters())
    device = params[0].device if params else example[0].device
    floats = [p.dtype for p in params if p.is_floating_point()]
    dtype = floats[0] if floats else torch.get_default_dtype()
    return device, dtype


def profile_model(module: nn.Module, example: torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor], *,
                  name: str = "model", warmup: int = 2, repeats: int = 7, progress: ProgressFn | None = None,
                  loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, target: Any = None,
                  batchnorm: str = "deferred") -> Profile:
    """Profile ``module`` on one micro-batch ``example``: a tensor, a tuple of tensors, or keyword inputs.

    The module is profiled where it is (its device and dtype) in training mode,
    and left unchanged. Blocks are the flattened ``nn.Sequential`` children, or
    the top-level children of another module when they reproduce its forward.
    Given ``loss_fn`` and ``target``, the last block's time and activations
    include the loss, as the last pipeline stage computes it. BatchNorm layers are
    measured as training will run them: ``batchnorm="deferred"`` swaps in
    :class:`~autopart.measure.batchnorm.DeferredBatchNorm` while measuring.
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
        with deferred_batchnorm(module, mode or "micro"):
            streamed = profile_by_block(module, example_t, name=name, device=example_t[0].device, input_names=names,
                                        dtype=floats[0] if floats else torch.float32, warmup=warmup, repeats=repeats,
                                        progress=progress, loss_fn=loss_fn, target=target)
        return dataclasses.replace(streamed, batchnorm=mode)
    device, dtype = _module_device_dtype(module, example_t)
    bad = [str(t.device) for t in example_t if t.device != device]
    if bad:
        raise AutopartError(f"example is on {bad[0]} but the model is on {device}")
    with _preserved(module, device):
        chain = chain_of(module, example_t, name, names)
    blocks = chain.blocks
    if loss_fn is not None:
        loss_fn = chain.model_loss(loss_fn)
    param_bytes, buffer_bytes, ties = _param_bytes(blocks, qualified=chain.graph is not None)
    crossing = chain.crossing_bytes() or []
    clock = _Clock(device)
    layers = []
    with _preserved(module, device), deferred_batchnorm(module, mode or "micro"):
        if mode == "deferred":  # the blocks again, with the swapped layers
            chain.reload_blocks()
            blocks = chain.blocks
        module.train()
        try:
            loss = (lambda out: loss_fn(out, target)) if loss_fn is not None and target is not None else None
            saved, inputs = _activation_pass(module, blocks, example_t, loss)
        except Exception as exc:
            raise cannot_run(name, example_t, exc) from None
        for i, (block_name, block) in enumerate(blocks):
            last = i == len(blocks) - 1
            f_ms, b_ms, f_iqr, b_iqr, peak, i_ms = _time_block(block, inputs[i], clock, warmup, repeats, device,
                                                               loss if last else None)
            main, skip = crossing[i] if i < len(crossing) else (_nbytes(inputs[i + 1]), 0)
            optimizer_ms, by_name = _optimizer_ms(block, clock)
            layers.append(LayerProfile(
                name=block_name, forward_ms=f_ms, backward_ms=b_ms, optimizer_ms=optimizer_ms,
                optimizer_ms_by_name=by_name,
                param_bytes=param_bytes[i], activation_bytes=saved[i], output_bytes=main, skip_bytes=skip,
                forward_iqr_ms=f_iqr, backward_iqr_ms=b_iqr, buffer_bytes=buffer_bytes[i], cuda_peak_bytes=peak,
                input_grad_ms=i_ms,
            ))
            if progress is not None:
                progress(block_name, i + 1, len(blocks))
    profile = _profile(name, device, dtype, example_t, layers, ties, repeats, warmup,
                       loss_fn is not None and target is not None)
    return dataclasses.replace(profile, batchnorm=mode)


def _profile(name: str, device: torch.device, dtype: torch.dtype, example: tuple[torch.Tensor, ...],
             layers: Sequence[LayerProfile], ties: Sequence[Tie], repeats: int, warmup: int, loss: bool) -> Profile:
    """The profile of measured ``layers``, with what it was measured on and how."""
    first = example[0]
    return Profile(
        model=name, device=_device_name(device), dtype=str(dtype).removeprefix("torch."),
        microbatch_size=int(first.shape[0]) if first.dim() else 1, sample_shape=tuple(int(d) for d in first.shape),
        torch=torch.__version__.split("+")[0], layers=tuple(layers), ties=tuple(ties),
        threads=torch.get_num_threads() if device.type == "cpu" else None, repeats=repeats, warmup=warmup,
        input_bytes=_nbytes(example), loss_in_last_block=loss,
    )

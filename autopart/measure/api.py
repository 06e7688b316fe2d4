"""One library entry point for ``autopart profile``: build a model from its spec and profile it.

:class:`ProfileConfig` holds what the command's flags say (defaults equal to the CLI's);
:func:`prepare` builds the model and its examples (on the meta device when its weights
would not fit), :func:`measure` profiles them, and :func:`profile` does both. The CLI
only parses argv into a config, calls these, and prints, so the Python API gives
what ``autopart profile`` writes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import nn

from autopart.errors import AutopartError
from autopart.formats.precision import DEFAULT_PRECISION, Precision, check_precision, precision_of_dtype
from autopart.formats.profile import Profile
from autopart.measure.amp import param_dtype
from autopart.formats.units import format_bytes
from autopart.measure.blocks import cannot_run
from autopart.measure.empty import on_meta_device
from autopart.measure.hf import hf_fields, is_hf_spec
from autopart.measure.profiler import cpu_cores, profile_model
from autopart.measure.runtime_cost import Runtime
from autopart.measure.timing import SplitBackward
from autopart.measure.spec import (Example, LossFn, ModelBundle, call_model, load_model, parse_dtype,
                                   require_parameters, shape_example)
from autopart.measure.stream import load_with_weights, on_meta
from autopart.torch_compat import pytree

__all__ = ["Prepared", "ProfileConfig", "ProgressFn", "NoteFn", "meta_build", "measure", "prepare", "profile",
           "training_precision"]

ProgressFn = Callable[[str, int, int], None]
"""``progress(block, done, total)``: the block being measured (with its micro-batch size when there are
several) and the blocks done and in all, over every micro-batch size."""
NoteFn = Callable[[str], None]
"""Where a one-line note goes (the CLI prints it on stderr)."""


@dataclass(frozen=True)
class ProfileConfig:
    """What to measure and how: the flags of ``autopart profile``, with its defaults."""

    microbatch_sizes: tuple[int, ...] = ()
    """Rows per micro-batch, each measured and stored; the first is the profile's main size.
    Empty: the example's first dimension."""
    input_shape: tuple[int, ...] | None = None
    """Shape of one micro-batch input, for a factory that gives no example."""
    input_dtype: str | None = None
    """dtype of that input (``long`` for token ids ...); None: the example's, else float32."""
    device: str = "cpu"
    """cpu, cuda or cuda:N."""
    precision: str | None = None
    """Training precision (:mod:`autopart.formats.precision`): fp32, bf16-mixed, bf16-true or fp16-mixed; None:
    what ``dtype`` means, else fp32."""
    dtype: str | None = None
    """The old way to say it, by the parameters' dtype: float32 (fp32) or bfloat16 (bf16-true); float16 is
    refused (use ``precision="fp16-mixed"``), as is giving both."""
    repeats: int = 7
    """Timed passes per block; the median is kept."""
    warmup: int = 2
    """Untimed passes per block first."""
    batchnorm: Literal["deferred", "micro"] = "deferred"
    """BatchNorm as train runs it: deferred (running statistics once per step) or micro (PyTorch's)."""
    threads: int | tuple[int, ...] | None = None
    """CPU threads for torch while measuring: one count, or several, each timed and stored (the first is the
    profile's ``threads``, the others its ``by_threads``, at the first micro-batch size); None: every core this
    process may use (:func:`~autopart.measure.profiler.cpu_cores`) and, where there are several, 1 besides.
    CPU only; given, it sets torch's global thread count to the first."""
    seed: int = 0
    """Seed for the random weights and inputs."""
    build: Literal["auto", "whole", "by-block"] = "auto"
    """auto: whole unless the weights need more than half the memory available, then on the meta device and
    one block at a time; whole or by-block: always one or the other."""

    def __post_init__(self) -> None:
        if self.repeats < 1:
            raise AutopartError(f"repeats must be >= 1, got {self.repeats}")
        if self.warmup < 0:
            raise AutopartError(f"warmup must be >= 0, got {self.warmup}")
        counts = (self.threads,) if isinstance(self.threads, int) else self.threads or ()
        if any(count < 1 for count in counts):
            raise AutopartError(f"threads must be >= 1, got {min(counts)}")
        if len(set(counts)) != len(counts):
            raise AutopartError(f"threads {', '.join(map(str, counts))} repeats a count")
        _request(self, apply=False)  # the device and the dtypes, checked now

    def thread_counts(self) -> tuple[int, ...]:
        """The CPU thread counts to time the blocks at, the profile's first: ``threads``, else every core this
        process may use and 1 besides (where there are several)."""
        if isinstance(self.threads, int):
            return (self.threads,)
        if self.threads:
            return self.threads
        cores = cpu_cores()
        return (cores, 1) if cores > 1 else (cores,)


@dataclass(frozen=True)
class Prepared:
    """A model built for profiling: its bundle, the module on the device and dtype asked for, and one example
    per micro-batch size."""

    spec: str
    bundle: ModelBundle
    module: nn.Module
    examples: tuple[Example, ...]


@dataclass(frozen=True)
class _Request:
    """The config, checked and parsed to torch values."""

    device: torch.device
    precision: Precision
    dtype: torch.dtype
    """The parameters' (float32 under a mixed precision)."""
    input_shape: tuple[int, ...] | None
    input_dtype: torch.dtype | None
    sizes: list[int | None]
    """Micro-batch sizes to measure; None keeps the example's."""
    seed: int


def profile(spec: str, config: ProfileConfig | None = None, *, progress: ProgressFn | None = None,
            note: NoteFn | None = None, runtime: Runtime | None = None,
            split_backward: SplitBackward | None = None) -> Profile:
    """Profile the model ``spec`` (a built-in name, ``pkg.module:factory`` or ``file.py:factory``) as
    ``autopart profile`` does: the same build, examples, loss target and micro-batch sizes; ``runtime`` and
    ``split_backward`` as :func:`measure` takes them (``autopart.profile`` hands in the pipelining runtime's)."""
    return measure(prepare(spec, config, note=note), config, progress=progress,  # None: ProfileConfig()
                   runtime=runtime, split_backward=split_backward)


def prepare(spec: str, config: ProfileConfig | None = None, *, note: NoteFn | None = None) -> Prepared:
    """Check ``config``, build the model ``spec`` and its examples (one per micro-batch size).

    ``config`` None: :class:`ProfileConfig`'s defaults (``autopart profile``'s). A model whose weights would take more than half the memory available is built on the meta device
    (``build="auto"``; ``"by-block"`` always, ``"whole"`` never) and profiled one block at a time.
    Raises :class:`AutopartError` for a bad config or model, an example with no rows included.
    """
    config = config or ProfileConfig()
    request = _request(config)
    fields = hf_fields(spec) if note is not None and is_hf_spec(spec) else None
    if note is not None and fields is not None and fields.given:  # which fields the spec set, which followed
        note(fields.describe(spec))
    torch.manual_seed(request.seed)
    meta = meta_build(spec, request.dtype, config.build, note) if config.build != "whole" else None
    if meta is not None:
        bundle, module = meta, meta.module.to(dtype=request.dtype)
    else:
        torch.manual_seed(request.seed)
        bundle = load_with_weights(spec)
        module = bundle.module.to(device=request.device, dtype=request.dtype)
    require_parameters(bundle)
    examples = tuple(_real(shape_example(bundle, request.input_shape, request.input_dtype, size), request)
                     for size in request.sizes)
    _check_rows(spec, examples)
    return Prepared(spec=spec, bundle=bundle, module=module, examples=examples)


def measure(prepared: Prepared, config: ProfileConfig | None = None, *,
            progress: ProgressFn | None = None, runtime: Runtime | None = None,
            split_backward: SplitBackward | None = None) -> Profile:
    """Profile every example of ``prepared``; the first is the profile, the others its other sizes. The
    loss of a model autopart brings data for (built-ins, hf:) is measured in the last block. ``runtime``
    (:func:`autopart.run.stages.one_stage_world`): the pipelining runtime, whose cost per action the profile
    records once (``action_ms``). ``split_backward`` (:func:`autopart.run.stages.split_backward`): the runtime's
    halves of a backward, timed at every size (``input_grad_ms``, ``weight_grad_ms``)."""
    config = config or ProfileConfig()
    bundle, module, examples = prepared.bundle, prepared.module, prepared.examples
    counts = config.thread_counts() if _device(config.device).type == "cpu" else ()
    passes = [max(1, len(counts))] + [1] * (len(examples) - 1)  # other sizes: at the first count only
    profiles = []
    for k, example in enumerate(examples):
        label = f" (micro-batch {example[0].shape[0]})" if len(examples) > 1 else ""

        def one(name: str, done: int, total: int, label: str = label, k: int = k) -> None:
            if progress is not None:
                blocks = total // passes[k]
                progress(name + label, sum(passes[:k]) * blocks + done, sum(passes) * blocks)

        loss_fn, target = _loss_and_target(bundle, module, example)
        inputs = dict(zip(bundle.input_names, example)) if bundle.input_names else example
        profiles.append(profile_model(module, inputs, name=prepared.spec, warmup=config.warmup,
                                      repeats=config.repeats, progress=one, loss_fn=loss_fn, target=target,
                                      batchnorm=config.batchnorm, precision=training_precision(config).name,
                                      threads=counts if k == 0 else counts[:1],
                                      runtime=runtime if k == 0 else None, split_backward=split_backward))
    others = tuple((p.microbatch_size, p.layers) for p in profiles[1:])
    return dataclasses.replace(profiles[0], by_microbatch_size=others) if others else profiles[0]


def _check_rows(model: str, examples: tuple[Example, ...]) -> None:
    """Refuse an example with no rows: a micro-batch of 0 samples measures nothing and plans nothing."""
    for example in examples:
        first = example[0]
        if first.dim() and first.shape[0] == 0:
            raise AutopartError(f"model {model!r}: the example input has 0 rows (shape {list(first.shape)}); a "
                                f"micro-batch needs at least one")


def _request(config: ProfileConfig, apply: bool = True) -> _Request:
    """``config`` parsed to torch values (one-line errors for bad ones); ``apply``: set torch's thread count."""
    device = _device(config.device)
    if apply and config.threads is not None and device.type == "cpu":
        torch.set_num_threads(config.thread_counts()[0])
    precision = training_precision(config)
    sizes: list[int | None] = list(config.microbatch_sizes) or [None]
    return _Request(device=device, precision=precision, dtype=param_dtype(precision), input_shape=config.input_shape,
                    input_dtype=parse_dtype(config.input_dtype) if config.input_dtype else None, sizes=sizes,
                    seed=config.seed)


def training_precision(config: ProfileConfig) -> Precision:
    """The precision ``config`` asks for: ``precision``, or what the old ``dtype`` means, else fp32. One-line
    errors for an unknown name, a dtype that is not floating or not offered, and both given."""
    if config.dtype is not None:
        if config.precision is not None:
            raise AutopartError(f"dtype {config.dtype} and precision {config.precision} both given: dtype is "
                                f"the old name of precision, give only precision")
        if not parse_dtype(config.dtype).is_floating_point:
            raise AutopartError(f"dtype must be a floating type, got {config.dtype!r}")
        return check_precision(precision_of_dtype(config.dtype, "dtype"), "precision")
    return check_precision(config.precision or DEFAULT_PRECISION, "precision")


def meta_build(spec: str, dtype: torch.dtype, build: str, note: NoteFn | None) -> ModelBundle | None:
    """The model built on the meta device when it is to be measured one block at a time (``build`` is
    ``by-block``, or ``auto`` and its weights in ``dtype`` need more than half the memory available), else None
    (build it then with :func:`autopart.measure.stream.load_with_weights`). ``note``: where to say so."""
    try:
        with on_meta_device():  # a factory's .to("cpu") / .cuda() stays on meta
            bundle = load_model(spec)
    except AutopartError:
        if build == "by-block":
            raise
        return None  # a factory that cannot run on the meta device: build it whole
    need = sum(p.numel() for p in bundle.module.parameters()) * dtype.itemsize
    free = _available_bytes()
    if build != "by-block" and (free is None or need <= free // 2):
        return None
    if note is not None:
        note(f"{spec}: {format_bytes(need)} of weights, {format_bytes(free or 0)} available: built on the meta "
             f"device, measured one block at a time")
    return bundle


def _real(example: Example, request: _Request) -> Example:
    """The example on the device and dtype asked for; one made on the meta device gets random values
    (ids 0 and 1: valid in any vocabulary; only shapes matter for the cost)."""
    out = []
    for t in example:
        if t.is_meta:
            t = torch.randn(t.shape).to(t.dtype) if t.is_floating_point() else torch.randint(0, 2, t.shape, dtype=t.dtype)
        out.append(t.to(device=request.device, dtype=request.dtype) if t.is_floating_point() else t.to(request.device))
    return tuple(out)


def _available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where there is none)."""
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _loss_and_target(bundle: ModelBundle, module: nn.Module, example: Example
                     ) -> tuple[LossFn | None, torch.Tensor | None]:
    """The loss of a model autopart brings data for (built-ins, hf:), with a random target of the right shape
    (class ids over the last dimension of its first output)."""
    if bundle.data_kind is None or bundle.loss_fn is None:
        return None, None
    if bundle.data_kind in ("text", "masked-text"):  # next (or masked) bytes: ids 0..255 shaped like the input
        return bundle.loss_fn, torch.randint(0, 256, tuple(example[0].shape), device=example[0].device)
    if bundle.data_kind == "seq2seq-text":  # the target bytes: shaped like the decoder's input
        return bundle.loss_fn, torch.randint(0, 256, tuple(example[-1].shape), device=example[-1].device)
    was = module.training
    try:
        module.eval()
        with torch.no_grad():
            inputs = [t.to("meta") if on_meta(module) else t for t in example]
            leaves = pytree.tree_leaves(call_model(module, inputs, bundle.input_names))
            out = next(x for x in leaves if isinstance(x, torch.Tensor))
    except Exception as exc:
        raise cannot_run(bundle.name, example, exc) from None
    finally:
        module.train(was)
    target = torch.randint(0, out.shape[-1], tuple(out.shape[:-1]), device=example[0].device)
    return bundle.loss_fn, target


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise AutopartError(f"unknown device {text!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AutopartError(f"device {text!r} asked for, but CUDA is not available on this machine")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise AutopartError(f"device {text!r}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise AutopartError(f"unsupported device {text!r}; use cpu, cuda or cuda:N")
    return device

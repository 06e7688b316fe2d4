"""``autopart profile``: measure a model block by block and write a profile JSON."""
from __future__ import annotations

import argparse
import contextlib
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

from autopart.cli.common import Subcommands, path_arg, unused_loss_note
from autopart.errors import AutopartError

if TYPE_CHECKING:  # torch is imported when the command runs, so `autopart --help` stays fast
    import torch
    from rich.console import Console
    from torch import nn

    from autopart.formats.profile import Profile
    from autopart.measure.spec import Example, LossFn, ModelBundle

__all__: list[str] = []

HELP = """Measure MODEL one block at a time (forward and backward time, parameter,
activation and output bytes for one micro-batch) and write a profile JSON
(schema autopart.profile/1).

MODEL is a built-in name, 'pkg.module:factory' or 'path/to/file.py:factory'.
The factory returns an nn.Module (then give --input-shape), (module, example),
or a mapping with 'module', 'example' and optionally 'loss_fn' and 'data'."""


def add_parser(sub: Subcommands) -> None:
    from autopart.measure.models import BUILTIN_NAMES

    p = sub.add_parser("profile", help="measure a model block by block", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="built-in models: " + ", ".join(BUILTIN_NAMES))
    p.add_argument("model", metavar="MODEL", help="built-in name, pkg.mod:factory or file.py:factory")
    p.add_argument("--microbatch-size", metavar="B[,B...]",
                   help="rows in one micro-batch; replaces the first dimension of the example input. Several "
                        "sizes (1,2,4,8) are all measured and stored, so the planner can fit how time grows with "
                        "the micro-batch size; the first is the profile's main size")
    p.add_argument("--input-shape", metavar="SHAPE",
                   help="shape of one micro-batch input, e.g. 8,1024 (needed when the factory gives no example)")
    p.add_argument("--input-dtype", metavar="DTYPE",
                   help="dtype of that input: long for token ids, float32 ... (default: the example's, else float32)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default: cpu)")
    p.add_argument("--dtype", default="float32", help="parameter dtype: float32, bfloat16 or float16 (default: float32)")
    p.add_argument("--repeats", type=int, default=7, metavar="N", help="timed passes per block; the median is kept (default: 7)")
    p.add_argument("--warmup", type=int, default=2, metavar="N", help="untimed passes per block first (default: 2)")
    p.add_argument("--batchnorm", choices=("deferred", "micro"), default="deferred",
                   help="BatchNorm as train will run it: deferred (default; running statistics over the mini-batch, "
                        "once per step) or micro (PyTorch's, once per micro-batch); see autopart train --help")
    p.add_argument("--threads", type=int, metavar="N",
                   help="CPU threads for torch while measuring (default: torch's choice); times depend on it")
    p.add_argument("--seed", type=int, default=0, help="seed for the random weights and inputs (default: 0)")
    p.add_argument("--build", choices=("auto", "whole", "by-block"), default="auto",
                   help="auto (default): build the model, unless its weights need more than half the memory "
                        "available: then build it on the meta device and measure one block at a time, identical "
                        "blocks once; whole or by-block: always one or the other")
    p.add_argument("-o", "--output", metavar="FILE", type=path_arg,
                   help="where to write the profile (default: MODEL-DEVICE-mbB.json in the current folder)")
    p.set_defaults(run=run)


def _default_output(model: str, device: str, microbatch: int) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "-", model.rsplit("/", 1)[-1].replace(".py:", "-").replace(":", "-"))
    return f"{stem}-{device.replace(':', '')}-mb{microbatch}.json"


def run(args: argparse.Namespace) -> int:
    # torch is imported here, not at the top, so `autopart --help` stays fast.
    from rich.console import Console

    from autopart.formats.atomic import check_writable
    from autopart.formats.units import plural

    err = Console(emoji=False, stderr=True)
    request = _request(args)
    if args.output:
        check_writable(args.output)
    with err.status(f"building {args.model} ...") if err.is_terminal else _nothing():
        bundle, module, examples = _build(args.model, request, args.build, err)
    note = unused_loss_note(bundle)
    if note:
        sys.stderr.write(note)
    _check_rows(args.model, examples)
    output = args.output or _default_output(args.model, args.device, int(examples[0][0].shape[0]))
    check_writable(output)
    profile = _measure(args, bundle, module, examples, err)
    profile.to_json(output)
    _print_table(profile)
    sizes_text = ", ".join(str(b) for b in profile.sizes())
    err.print(f"wrote {output} ({plural(len(profile.layers), 'block')}, {profile.device}, "
              f"micro-batch {sizes_text}, {profile.dtype})", soft_wrap=True, highlight=False)
    return 0


def _check_rows(model: str, examples: list[Example]) -> None:
    """Refuse an example with no rows: a micro-batch of 0 samples measures nothing and plans nothing."""
    for example in examples:
        first = example[0]
        if first.dim() and first.shape[0] == 0:
            raise AutopartError(f"model {model!r}: the example input has 0 rows (shape {list(first.shape)}); a "
                                f"micro-batch needs at least one (--microbatch-size or --input-shape give rows)")


@dataclass(frozen=True)
class _Request:
    """The flags that shape the model and its examples, checked."""

    device: torch.device
    dtype: torch.dtype
    input_shape: tuple[int, ...] | None
    input_dtype: torch.dtype | None
    sizes: list[int | None]
    """Micro-batch sizes to measure; None keeps the example's."""
    seed: int


def _request(args: argparse.Namespace) -> _Request:
    import torch

    from autopart.measure.spec import parse_dtype, parse_shape

    if args.repeats < 1:
        raise AutopartError(f"--repeats must be >= 1, got {args.repeats}")
    if args.warmup < 0:
        raise AutopartError(f"--warmup must be >= 0, got {args.warmup}")
    if args.threads is not None:
        if args.threads < 1:
            raise AutopartError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    device = _device(args.device)
    dtype = parse_dtype(args.dtype)
    if not dtype.is_floating_point:
        raise AutopartError(f"--dtype must be a floating type, got {args.dtype!r}")
    sizes: list[int | None] = [None]
    if args.microbatch_size is not None:
        sizes = list(_microbatch_sizes(args.microbatch_size))
    return _Request(device=device, dtype=dtype, input_shape=parse_shape(args.input_shape) if args.input_shape else None,
                    input_dtype=parse_dtype(args.input_dtype) if args.input_dtype else None, sizes=sizes,
                    seed=args.seed)


def _microbatch_sizes(text: str) -> list[int]:
    """``--microbatch-size 1,2,4,8``: rows per micro-batch, each an integer >= 1, none repeated."""
    parts = [part.strip() for part in text.split(",")]
    sizes = [int(part) for part in parts if part.isascii() and part.isdigit()]
    if len(sizes) != len(parts) or min(sizes, default=0) < 1:
        bad = next((part for part in parts if not (part.isascii() and part.isdigit()) or int(part) < 1), text)
        which = f"{text!r}" if bad == text else f"{text!r}: {bad!r}"
        raise AutopartError(f"--microbatch-size {which} is not a micro-batch size: give rows per micro-batch, "
                            f"integers >= 1 like 4 or 1,2,4,8")
    if len(set(sizes)) != len(sizes):
        raise AutopartError(f"--microbatch-size {text!r} repeats a size")
    return sizes


def _build(spec: str, request: _Request, build: str, err: Console) -> tuple[ModelBundle, nn.Module, list[Example]]:
    """The model on the requested device and dtype, and one example per micro-batch size.

    A model whose weights would take more than half the memory available is built on the meta device
    (``--build auto``; ``by-block`` always, ``whole`` never) and profiled one block at a time.
    """
    import torch

    from autopart.measure.spec import require_parameters, shape_example
    from autopart.measure.stream import load_with_weights

    torch.manual_seed(request.seed)
    meta = meta_build(spec, request.dtype, build, err) if build != "whole" else None
    if meta is not None:
        bundle, module = meta, meta.module.to(dtype=request.dtype)
    else:
        torch.manual_seed(request.seed)
        bundle = load_with_weights(spec)
        module = bundle.module.to(device=request.device, dtype=request.dtype)
    require_parameters(bundle)
    return bundle, module, [_real(shape_example(bundle, request.input_shape, request.input_dtype, size), request)
                            for size in request.sizes]


def meta_build(spec: str, dtype: torch.dtype, build: str, err: Console | None) -> ModelBundle | None:
    """The model built on the meta device when it is to be measured one block at a time (``build`` is
    ``by-block``, or ``auto`` and its weights in ``dtype`` need more than half the memory available), else None
    (build it then with :func:`autopart.measure.stream.load_with_weights`). ``err``: where to say so."""
    import torch

    from autopart.formats.units import format_bytes
    from autopart.measure.spec import load_model

    try:
        with torch.device("meta"):
            bundle = load_model(spec)
    except AutopartError:
        if build == "by-block":
            raise
        return None  # a factory that cannot run on the meta device: build it whole
    need = sum(p.numel() for p in bundle.module.parameters()) * dtype.itemsize
    free = _available_bytes()
    if build != "by-block" and (free is None or need <= free // 2):
        return None
    if err is not None:
        err.print(f"{spec}: {format_bytes(need)} of weights, {format_bytes(free or 0)} available: built on the meta "
                  f"device, measured one block at a time", highlight=False, soft_wrap=True)
    return bundle


def _real(example: Example, request: _Request) -> Example:
    """The example on the device and dtype asked for; one made on the meta device gets random values
    (ids 0 and 1: valid in any vocabulary; only shapes matter for the cost)."""
    import torch

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


def _measure(args: argparse.Namespace, bundle: ModelBundle, module: nn.Module, examples: list[Example],
             err: Console) -> Profile:
    """Profile every example with a progress bar; the first is the profile, the others its other sizes."""
    import dataclasses

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from autopart.measure.profiler import profile_model

    profiles = []
    with Progress(TextColumn("profiling [bold]{task.fields[block]}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("profile", total=None, block="...")
        for k, example in enumerate(examples):
            label = f" (micro-batch {example[0].shape[0]})" if len(examples) > 1 else ""

            def progress(name: str, done: int, total: int, label: str = label, k: int = k) -> None:
                bar.update(task, completed=k * total + done, total=len(examples) * total, block=name + label)

            loss_fn, target = _loss_and_target(bundle, module, example)
            inputs = dict(zip(bundle.input_names, example)) if bundle.input_names else example
            profiles.append(profile_model(module, inputs, name=args.model, warmup=args.warmup,
                                          repeats=args.repeats, progress=progress, loss_fn=loss_fn, target=target,
                                          batchnorm=args.batchnorm))
    others = tuple((p.microbatch_size, p.layers) for p in profiles[1:])
    return dataclasses.replace(profiles[0], by_microbatch_size=others) if others else profiles[0]


def _loss_and_target(bundle: ModelBundle, module: nn.Module, example: Example
                     ) -> tuple[LossFn | None, torch.Tensor | None]:
    """The loss of a model autopart brings data for (built-ins, hf:), with a random target of the right shape
    (class ids over the last dimension of its first output)."""
    import torch

    from autopart.measure.blocks import cannot_run
    from autopart.torch_compat import pytree
    from autopart.measure.spec import call_model
    from autopart.measure.stream import on_meta

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


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


def _device(text: str) -> torch.device:
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise AutopartError(f"unknown device {text!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise AutopartError(f"--device {text} asked for, but CUDA is not available on this machine")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise AutopartError(f"--device {text}: only {torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise AutopartError(f"unsupported device {text!r}; use cpu, cuda or cuda:N")
    return device


def _print_table(profile: Profile) -> None:
    from rich.table import Table

    from autopart.cli.console import stdout_console
    from autopart.formats.units import format_bytes, format_ms

    total = profile.step_ms or 1.0
    skips = any(layer.skip_bytes for layer in profile.layers)
    norm = f", BatchNorm {profile.batchnorm}" if profile.batchnorm else ""
    table = Table(title=f"{profile.model} on {profile.device}, micro-batch {profile.microbatch_size}{norm}",
                  title_justify="left")
    for col in ("block", "forward", "backward", "share", "params", "activations", "output") + ("skips",) * skips:
        table.add_column(col, justify="left" if col == "block" else "right", no_wrap=col == "block")
    for layer in profile.layers:
        share = (layer.forward_ms + layer.backward_ms) / total
        label = layer.name + (f" (= {layer.same_as})" if layer.same_as else "")
        table.add_row(label, format_ms(layer.forward_ms), format_ms(layer.backward_ms), f"{share:.1%}",
                      format_bytes(layer.param_bytes), format_bytes(layer.activation_bytes),
                      format_bytes(layer.output_bytes),
                      *([format_bytes(layer.skip_bytes) if layer.skip_bytes else "-"] if skips else []))
    table.add_section()
    table.add_row("total", format_ms(sum(x.forward_ms for x in profile.layers)),
                  format_ms(sum(x.backward_ms for x in profile.layers)), "100%",
                  format_bytes(profile.param_bytes), format_bytes(sum(x.activation_bytes for x in profile.layers)), "",
                  *([""] if skips else []))
    console = stdout_console(140)
    console.print(table)

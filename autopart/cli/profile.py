"""``autopart profile``: measure a model block by block and write a profile JSON."""
from __future__ import annotations

import argparse
import contextlib
import re
import sys
from typing import TYPE_CHECKING, Iterator

from autopart.cli.common import Subcommands, at_least, path_arg, unused_loss_note
from autopart.errors import AutopartError

if TYPE_CHECKING:  # torch is imported when the command runs, so `autopart --help` stays fast
    from rich.console import Console

    from autopart.formats.profile import Profile
    from autopart.measure.api import Prepared, ProfileConfig

__all__: list[str] = []

HELP = """Measure MODEL one block at a time (forward and backward time, parameter,
activation and output bytes for one micro-batch) and write a profile JSON
(schema autopart.profile/1).

MODEL is a built-in name, 'pkg.module:factory' or 'path/to/file.py:factory'.
The factory returns an nn.Module (then give --input-shape), (module, example),
or a mapping with 'module', 'example' and optionally 'loss_fn' and 'data'."""


def add_parser(sub: Subcommands) -> None:
    from autopart.formats.precision import PRECISIONS
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
    p.add_argument("--precision", choices=list(PRECISIONS),
                   help="training precision to measure under, which the plan records and train runs: fp32 "
                        "(default), bf16-mixed / fp16-mixed (float32 weights, forward and loss under autocast; "
                        "fp16 with a gradient scaler), bf16-true (everything in bfloat16)")
    p.add_argument("--dtype", help="old name: float32 is --precision fp32, bfloat16 is --precision bf16-true")
    p.add_argument("--repeats", type=at_least(1), default=7, metavar="N", help="timed passes per block; the median is kept (default: 7)")
    p.add_argument("--warmup", type=at_least(0), default=2, metavar="N", help="untimed passes per block first (default: 2)")
    p.add_argument("--batchnorm", choices=("deferred", "micro"), default="deferred",
                   help="BatchNorm as train will run it: deferred (default; running statistics over the mini-batch, "
                        "once per step) or micro (PyTorch's, once per micro-batch); see autopart train --help")
    p.add_argument("--threads", type=_threads_arg, metavar="N[,N...]",
                   help="CPU threads for torch while measuring; times depend on it. Several counts (1,2) are each "
                        "timed and stored, the first as the profile's, so partition can price ranks that share the "
                        "cores (default: every core this process may use, and 1 thread besides where there are "
                        "several: a second pass over the blocks)")
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
    from autopart.measure.api import prepare

    err = Console(emoji=False, stderr=True)
    config = _config(args)
    if args.output:
        check_writable(args.output)

    def note(text: str) -> None:
        err.print(text, highlight=False, soft_wrap=True)

    with err.status(f"building {args.model} ...") if err.is_terminal else _nothing():
        prepared = prepare(args.model, config, note=note)
    loss_note = unused_loss_note(prepared.bundle)
    if loss_note:
        sys.stderr.write(loss_note)
    output = args.output or _default_output(args.model, args.device, int(prepared.examples[0][0].shape[0]))
    check_writable(output)
    profile = _measure(prepared, config, err)
    profile.to_json(output)
    _print_table(profile)
    sizes_text = ", ".join(str(b) for b in profile.sizes())
    others = ", ".join(str(count) for count, _ in profile.by_threads)
    threads = f", {plural(profile.threads, 'thread')}" if profile.threads else ""
    threads += f" (also timed at {others})" if others else ""
    err.print(f"wrote {output} ({plural(len(profile.layers), 'block')}, {profile.device}, "
              f"micro-batch {sizes_text}{threads}, {profile.precision})", soft_wrap=True, highlight=False)
    return 0


def _config(args: argparse.Namespace) -> ProfileConfig:
    """The flags as a :class:`~autopart.measure.api.ProfileConfig` (its checks raise on bad values)."""
    from autopart.measure.api import ProfileConfig
    from autopart.measure.spec import parse_shape

    sizes = tuple(_microbatch_sizes(args.microbatch_size)) if args.microbatch_size is not None else ()
    return ProfileConfig(microbatch_sizes=sizes, input_shape=parse_shape(args.input_shape) if args.input_shape else None,
                         input_dtype=args.input_dtype or None, device=args.device, dtype=args.dtype,
                         precision=args.precision,
                         repeats=args.repeats, warmup=args.warmup, batchnorm=args.batchnorm, threads=args.threads,
                         seed=args.seed, build=args.build)


def _threads_arg(text: str) -> tuple[int, ...]:
    """The argparse type of ``--threads``: one count or several (``1,2``), each >= 1, none repeated."""
    counts = tuple(at_least(1)(part.strip()) for part in text.split(","))
    if len(set(counts)) != len(counts):
        raise argparse.ArgumentTypeError(f"{text!r} repeats a count")
    return counts


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


def _measure(prepared: Prepared, config: ProfileConfig, err: Console) -> Profile:
    """:func:`autopart.measure.api.measure` with a progress bar on a terminal."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from autopart.measure.api import measure
    from autopart.run.stages import one_stage_world, split_backward  # the runtime whose own costs the profile records

    with Progress(TextColumn("profiling [bold]{task.fields[block]}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True, disable=not err.is_terminal) as bar:
        task = bar.add_task("profile", total=None, block="...")

        def progress(block: str, done: int, total: int) -> None:
            bar.update(task, completed=done, total=total, block=block)

        return measure(prepared, config, progress=progress, runtime=one_stage_world, split_backward=split_backward)


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


def _print_table(profile: Profile) -> None:
    from rich.table import Table

    from autopart.cli.console import stdout_console
    from autopart.formats.units import format_bytes, format_ms

    total = profile.step_ms or 1.0
    skips = any(layer.skip_bytes for layer in profile.layers)
    norm = f", BatchNorm {profile.batchnorm}" if profile.batchnorm else ""
    norm += f", {profile.precision}" if profile.precision != "fp32" else ""
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

"""``autopart check``: a plan's stages tried one at a time on this machine's device (docs/check.md)."""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Any

from autopart.cli.common import Subcommands, path_arg
from autopart.errors import AutopartError

if TYPE_CHECKING:
    from rich.table import Table

    from autopart.run.check import StageCheck

__all__: list[str] = []

HELP = """Try PLAN's stages on the one device this machine has, before booking the
machines the plan is for: each stage in turn is built alone (only its blocks),
runs its schedule's forwards and backwards (holding as many micro-batches at
once as the schedule does) and the optimizer step, and is measured: peak memory
against the plan's and against its device's limit, forward and backward times
against the plan's. Exit code 1 when a stage does not fit."""


def add_parser(sub: Subcommands) -> None:
    p = sub.add_parser("check", help="try a plan's stages one at a time on this device", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  autopart check plan.json --model gpt2-mini\n"
                              "  autopart check plan.json --model gpt2-medium --device cuda -o check.json")
    p.add_argument("plan", metavar="PLAN", type=path_arg, help="plan JSON written by autopart partition")
    p.add_argument("--model", required=True, help="the model the plan was made for (built-in or factory spec)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when it is there, else CPU (default: auto)")
    p.add_argument("--stage", type=int, action="append", metavar="S",
                   help="check only this stage (repeat for several; default: every stage)")
    p.add_argument("--steps", type=int, default=2, metavar="N",
                   help="steps per stage; the first creates gradients and optimizer state, times come from the "
                        "others (default: 2)")
    p.add_argument("--data", metavar="PATH", type=path_arg,
                   help="text file or folder for GPT models, as train takes it (default: Python's own sources)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and data (default: 0)")
    p.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: the plan's profile's)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("-o", "--output", metavar="FILE", type=path_arg, help="also write the results as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autopart.measure.memory import lower_mmap_threshold

    lower_mmap_threshold()  # before anything big is allocated: freed memory goes back, so the peak is the stage's
    import torch

    from autopart.core.planner import simulate_plan
    from autopart.formats.atomic import check_writable, write_json_atomic
    from autopart.formats.plan import Plan
    from autopart.run.check import check_plan

    for flag, value in (("--steps", args.steps), ("--threads", args.threads)):
        if value is not None and value < 1:
            raise AutopartError(f"{flag} must be >= 1, got {value}")
    if args.output:
        check_writable(args.output)
    plan = Plan.from_json(args.plan)
    simulate_plan(plan)  # a schedule the plan's ranks and micro-batches can run
    if args.device == "cuda" and not torch.cuda.is_available():
        raise AutopartError("--device cuda asked for, but CUDA is not available on this machine")
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    if not use_cuda:
        torch.set_num_threads(args.threads or plan.threads or torch.get_num_threads())
    results = check_plan(plan, args.model, device, data=args.data, seed=args.seed, steps=args.steps,
                         stages=args.stage, progress=_say)
    summary = _summary(args, plan, device, results)
    if args.output:
        write_json_atomic(args.output, summary)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        from autopart.cli.console import stdout_console
        from autopart.formats.units import plural

        console = stdout_console(160)
        console.print(f"{plan.model or args.model}: {plural(plan.num_stages, 'stage')} of {plan.schedule}, "
                      f"{plural(plan.microbatches, 'micro-batch')}, each stage alone on {summary['device']}",
                      style="bold", highlight=False)
        console.print(_table(results))
        console.print(f"memory: {summary['meter']}", highlight=False)
        if args.output:
            console.print(f"wrote {args.output}", highlight=False)
    return 0 if all(r.fits for r in results) else 1


def _say(line: str) -> None:
    sys.stderr.write(f"checking {line}\n")


def _summary(args: argparse.Namespace, plan: Any, device: Any, results: list[StageCheck]) -> dict[str, Any]:
    import torch

    from autopart.run.check import memory_method

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"plan": args.plan, "model": args.model, "schedule": plan.schedule, "microbatches": plan.microbatches,
            "device": name, "threads": torch.get_num_threads() if device.type == "cpu" else None,
            "meter": memory_method(device), "fits": all(r.fits for r in results),
            "stages": [r.to_dict() for r in results]}


def _table(results: list[StageCheck]) -> Table:
    """Per stage: memory measured, planned and the limit; times measured against planned; the verdict."""
    from rich.table import Table

    from autopart.formats.units import format_bytes, format_ms

    def size(n: int | None) -> str:
        return "-" if n is None else format_bytes(n)

    def against(measured: float, planned: float) -> str:
        return f"{format_ms(measured)} / {format_ms(planned)}"

    table = Table(title_justify="left")
    for col in ("stage", "blocks", "in flight", "peak memory", "planned", "limit", "forward / plan",
                "backward / plan", "optimizer / plan", "verdict"):
        table.add_column(col, justify="left" if col in ("blocks", "verdict") else "right")
    for r in results:
        blocks = r.blocks[0] if len(r.blocks) == 1 else f"{r.blocks[0]}..{r.blocks[-1]}"
        table.add_row(str(r.stage), blocks, str(r.in_flight), size(r.measured_bytes), size(r.planned_bytes),
                      size(r.limit_bytes), against(r.forward_ms, r.planned_forward_ms),
                      against(r.backward_ms, r.planned_backward_ms),
                      against(r.optimizer_ms, r.planned_optimizer_ms), r.verdict,
                      style="" if r.fits else "red")
    return table

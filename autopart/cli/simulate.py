"""``autopart simulate``: predict a plan's training step, draw its timeline."""
from __future__ import annotations

import argparse
import dataclasses
import json
from typing import TYPE_CHECKING

from autopart.cli.common import Subcommands, path_arg, schedule_arg
from autopart.errors import AutopartError

if TYPE_CHECKING:
    from rich.table import Table

    from autopart.core.simulate import Simulation
    from autopart.formats.plan import Plan

__all__: list[str] = []

MIN_WIDTH = 10
"""The narrowest timeline, in characters (``render_text`` draws no narrower)."""

HELP = """Simulate one training step of PLAN under its schedule (or another): step
time, idle share per rank, peak memory per rank, and the timeline of every
forward, backward and send, in the terminal and optionally as SVG."""


def add_parser(sub: Subcommands) -> None:
    p = sub.add_parser("simulate", help="simulate a plan's step and draw its timeline", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  autopart simulate plan.json\n"
                              "  autopart simulate plan.json --microbatches 16 --schedule gpipe --svg step.svg\n"
                              "  autopart simulate plan.json --trace step.json      # open in https://ui.perfetto.dev")
    p.add_argument("plan", metavar="PLAN", type=path_arg, help="plan JSON written by autopart partition")
    p.add_argument("--microbatches", "-m", type=int, metavar="M", help="micro-batches (default: the plan's)")
    p.add_argument("--schedule", type=schedule_arg, metavar="NAME",
                   help="GPipe, 1F1B, Interleaved1F1B, ZBVZeroBubble (default: the plan's)")
    p.add_argument("--stages-per-rank", type=int, metavar="V",
                   help="virtual stages per rank for Interleaved1F1B (default: the plan's, else 2)")
    p.add_argument("--overhead", metavar="TIME", help="the runtime's own time per forward or backward action, "
                   "instead of the plan's (the 'runtime overhead' autopart train reports; 0 turns it off)")
    p.add_argument("--json", action="store_true", help="print a machine-readable summary only")
    p.add_argument("--svg", metavar="FILE", type=path_arg, help="write the timeline as an SVG picture (atomically)")
    p.add_argument("--csv", metavar="FILE", type=path_arg, help="write the schedule's per-rank actions as torch's CSV")
    p.add_argument("--trace", metavar="FILE", type=path_arg,
                   help="write the predicted timeline as Chrome trace JSON (torch.profiler's "
                   "format; open it in Perfetto or chrome://tracing)")
    p.add_argument("--width", type=int, default=100,
                   help=f"timeline width in characters, at least {MIN_WIDTH} (default: 100)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autopart.cli.console import stdout_console
    from autopart.cli.partition import overhead_ms_arg
    from autopart.render.timeline import render_svg, render_text
    from autopart.core.planner import simulate_plan
    from autopart.core.schedules import build_schedule
    from autopart.core.trace import write_trace
    from autopart.formats.atomic import check_writable, write_atomic
    from autopart.formats.plan import Plan
    from autopart.formats.schedule_kinds import stage_ranks, stages_per_rank
    from autopart.formats.units import format_ms, plural

    for path in (args.svg, args.csv, args.trace):
        if path:
            check_writable(path)
    if args.microbatches is not None and args.microbatches < 1:
        raise AutopartError(f"--microbatches must be >= 1, got {args.microbatches}")
    if args.width < MIN_WIDTH:
        raise AutopartError(f"--width must be >= {MIN_WIDTH} characters, got {args.width}")
    plan = Plan.from_json(args.plan)
    schedule = args.schedule or plan.schedule
    per_rank = args.stages_per_rank
    if per_rank is None:
        per_rank = plan.stages_per_rank if schedule == plan.schedule else stages_per_rank(schedule)
    microbatches = args.microbatches or plan.microbatches
    overhead = overhead_ms_arg(args.overhead)
    if overhead is not None:
        plan = dataclasses.replace(plan, stages=tuple(
            dataclasses.replace(st, cost=dataclasses.replace(st.cost, overhead_ms=overhead)) for st in plan.stages))
    sim = simulate_plan(plan, microbatches, schedule, per_rank)
    if args.csv:
        text = build_schedule(schedule, plan.num_stages // per_rank, microbatches, per_rank).csv_text()
        write_atomic(args.csv, lambda handle: handle.write(text.encode()))
    title = (f"{plan.model}: {schedule}, {plural(plan.num_stages, 'stage')} on {plural(sim.num_ranks, 'rank')}, "
             f"{plural(microbatches, 'micro-batch')}")
    if args.svg:
        svg = render_svg([("", sim)], title=title)
        write_atomic(args.svg, lambda handle: handle.write(svg.encode()))
    if args.trace:
        write_trace(args.trace, (f"{plan.model} predicted", sim))
    if args.json:
        print(json.dumps({"plan": args.plan, **sim.to_dict()}, indent=2))
        return 0
    console = stdout_console(max(args.width + 30, 100))
    console.print(title, style="bold", highlight=False)
    console.print(f"step {format_ms(sim.step_ms)}, bubble {sim.bubble_fraction:.1%}"
                  + (f" (the plan predicted {format_ms(plan.predicted.step_ms)})"
                     if (schedule, microbatches) != (plan.schedule, plan.microbatches) else ""), highlight=False)
    if plan.data_parallel > 1:
        own = (schedule, microbatches) == (plan.schedule, plan.microbatches)
        console.print(f"data parallel: {plan.data_parallel} replicas of this pipeline on {plan.world_size} ranks; "
                      f"the gradient all-reduce the drain does not hide: "
                      + (f"{format_ms(plan.predicted.allreduce_ms)}, step with it {format_ms(plan.predicted.step_ms)}"
                         if own else f"{format_ms(plan.predicted.allreduce_ms)} under the plan's own schedule"),
                      highlight=False, soft_wrap=True)
    console.print(_rank_table(plan, sim, stage_ranks(schedule, sim.num_ranks, per_rank)))
    console.print(render_text(sim, width=args.width))
    if args.svg:
        console.print(f"wrote {args.svg}", highlight=False)
    if args.trace:
        console.print(f"wrote {args.trace}", highlight=False)
    return 0


def _rank_table(plan: Plan, sim: Simulation, ranks: tuple[int, ...]) -> Table:
    """Per rank: its stages, busy time, idle share, peak memory against the sum of its stages' limits."""
    from rich.table import Table

    from autopart.formats.units import format_bytes, format_ms

    table = Table(title_justify="left")
    for col in ("rank", "stages", "busy", "idle", "peak memory", "limit"):
        table.add_column(col, justify="right")
    limits: dict[int, int] = {}
    stages_of: dict[int, list[int]] = {}
    for s, r in enumerate(ranks):
        stages_of.setdefault(r, []).append(s)
        limit = plan.stages[s].device.memory_bytes
        if limit is not None:
            limits[r] = limits.get(r, 0) + limit
    for r in range(sim.num_ranks):
        over = r in limits and sim.peak_memory_bytes[r] > limits[r]
        table.add_row(str(r), ",".join(map(str, stages_of[r])), format_ms(sim.busy_ms[r]),
                      f"{sim.bubble_fractions[r]:.1%}", format_bytes(sim.peak_memory_bytes[r]),
                      format_bytes(limits[r]) if r in limits else "-", style="red" if over else "")
    return table

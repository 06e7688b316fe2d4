"""``autopart partition``: turn a profile into a plan and print its balance list."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from typing import TYPE_CHECKING

from autopart.cli.common import Subcommands, at_least, path_arg, schedule_or_auto_arg
from autopart.errors import AutopartError

if TYPE_CHECKING:
    from autopart.core.dataparallel import ClusterSearch
    from autopart.formats.cluster import Cluster
    from autopart.formats.plan import Plan
    from autopart.formats.profile import Profile

__all__: list[str] = []

HELP = """Split the profiled blocks into pipeline stages and write a plan JSON
(schema autopart.plan/1). The default method, exact, gives the split with the
smallest predicted step under the schedule and micro-batch count (pipeline
fill and drain, sends and each rank's optimizer step included) that fits
every device's memory under the schedule's in-flight micro-batches: every
split is simulated when there are few enough (the plan says "exact"),
otherwise a local search from the bottleneck-optimal split (the plan says
"local"). Among equal steps, the smallest slowest stage wins, then the most
even split. The bottleneck-optimal split is scored too: when its step is
within the profile's noise band of the fastest (the busiest rank's blocks'
interquartile ranges over their medians) and its busiest rank computes
less, it is chosen; the plan records the margin and the band. --method
bottleneck gives the smallest possible slowest stage. Stages that fit only
with activation recomputation get it."""

FORMATS = ("table", "json", "balance", "split-spec", "fqns")


def _balance_arg(text: str) -> list[int]:
    try:
        balance = [int(x) for x in text.replace(" ", "").strip("[]").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of block counts like 4,5,4,1") from None
    if not balance or min(balance) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every stage needs at least one block")
    return balance


def _count_arg(text: str) -> int | str:
    if text.lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number or 'auto'") from None


def add_parser(sub: Subcommands) -> None:
    from autopart.core.methods import METHODS
    from autopart.formats.optimizers import DEFAULT_OPTIMIZER, OPTIMIZER_STATES

    p = sub.add_parser("partition", help="choose stage boundaries (and micro-batches, schedule) from a profile",
                       description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  autopart partition p.json --stages 4\n"
                              "  autopart partition p.json --stages 4 --memory-limit 16GiB --schedule gpipe "
                              "--microbatches 8\n"
                              "  autopart partition p.json --stages 4 --global-batch 64 --microbatches auto "
                              "--schedule auto --memory-limit 8GiB\n"
                              "  autopart partition p.json --devices 2xA100-40GB,2xH100-80GB@2.0 --bandwidth 25GB/s\n"
                              "  autopart partition p.json --nodes 4 --devices-per-node 8xH100-80GB "
                              "--link 450GB/s,50GB/s --global-batch 1024")
    p.add_argument("profile", metavar="PROFILE", type=path_arg, help="profile JSON written by autopart profile")
    p.add_argument("--stages", "-k", type=int, metavar="K", help="pipeline ranks, one device each (default: the "
                   "number of --devices); interleaved schedules put several stages on each")
    p.add_argument("--microbatches", "-m", type=_count_arg, default=None, metavar="M|auto",
                   help="micro-batches per step, or auto: search the divisors of --global-batch "
                        "(default: K, the fewest 1F1B accepts)")
    p.add_argument("--global-batch", type=int, metavar="N",
                   help="samples per step (all replicas together); the micro-batch size is N / (M x replicas) (default: the "
                        "profile's micro-batch x M; with a cluster, x the devices)")
    p.add_argument("--schedule", type=schedule_or_auto_arg, metavar="NAME|auto",
                   help="GPipe, 1F1B (default; auto with a cluster), Interleaved1F1B, ZBVZeroBubble "
                        "(torch.distributed.pipelining names, any case), or auto: simulate each and keep the fastest")
    p.add_argument("--stages-per-rank", type=int, default=2, metavar="V",
                   help="virtual stages per rank for Interleaved1F1B (default: 2; ZBVZeroBubble always 2)")
    p.add_argument("--method", default="exact", choices=list(METHODS),
                   help="exact (default: the fastest predicted step), bottleneck (the smallest slowest stage), "
                        "minvar (GPipe's objective), uniform (equal block counts), parameters (DeepSpeed's default)")
    p.add_argument("--memory-limit", metavar="SIZE",
                   help="memory per device: 16GiB, 40GB or bytes (default: unlimited, or from --devices)")
    p.add_argument("--optimizer", default=DEFAULT_OPTIMIZER, choices=list(OPTIMIZER_STATES),
                   help="the optimizer training will use: its state per parameter (adam/adamw 2 copies, "
                        "sgd-momentum 1, sgd 0) and its step time; autopart train runs it "
                        f"(default: {DEFAULT_OPTIMIZER})")
    p.add_argument("--devices", metavar="SPEC",
                   help="per-rank devices in order: 2xA100-40GB,2xH100-80GB@2.0 (COUNTxNAME-or-MEMORY[@SPEED], "
                        "speed relative to the profiled device) or a .json/.toml file")
    p.add_argument("--nodes", type=int, metavar="N", help="a cluster of N nodes (with --devices-per-node): "
                   "the planner chooses the pipeline depth K and the data-parallel width D (K x D = the devices) "
                   "with the micro-batches, schedule and split for --global-batch")
    p.add_argument("--devices-per-node", metavar="SPEC", help="each node's devices: 8xH100-80GB, 2x24GiB "
                   "(COUNTxNAME-or-MEMORY[@SPEED], all alike)")
    p.add_argument("--link", metavar="INTRA[,INTER]", help="per-device bandwidth inside a node and between nodes: "
                   "450GB/s,50GB/s (default: free; one value: both)")
    p.add_argument("--cluster", metavar="FILE", help="the cluster as a .toml or .json file (nodes, "
                   "devices_per_node, memory_bytes, intra_node_bytes_per_s, inter_node_bytes_per_s, ...)")
    p.add_argument("--data-parallel", type=int, metavar="D", help="with a cluster: pin the replicas of the "
                   "pipeline (--stages pins its depth)")
    p.add_argument("--bandwidth", metavar="RATE", help="link between neighbouring stages: 25GB/s, 100Gbit/s "
                   "(default: sends are free)")
    p.add_argument("--latency", metavar="TIME", help="per send: 10us, 0.05ms (default: 0)")
    p.add_argument("--overhead", metavar="TIME", help="the pipelining runtime's own time per forward or backward "
                   "action (its send/receive calls and bookkeeping): the 'runtime overhead' autopart train reports "
                   "(default: the profile's measured cost per action, 0 if it has none; 0 turns it off)")
    p.add_argument("--ranks-per-machine", type=at_least(1), metavar="N",
                   help="how many ranks share the profiled machine's cores: each rank's times are the profile's at "
                        "max(1, cores / N) threads (timed, or between two timed counts). Default, for a CPU profile "
                        "timed at several counts (autopart profile's default) and no GPU devices: every rank of the "
                        "plan (train launches them all on this machine); a cluster's devices per node")
    p.add_argument("--no-recompute", action="store_true", help="never turn on activation recomputation")
    p.add_argument("--balance", type=_balance_arg, metavar="N,N,...",
                   help="also score this split (blocks per stage, as torchgpipe or DeepSpeed take it) under the "
                        "same cost model and show it beside autopart's plan")
    p.add_argument("--format", default="table", choices=FORMATS,
                   help="stdout: table (default), json (the plan), balance, split-spec (Python defining "
                        "torch pipelining's split_spec, to paste), fqns (module names per stage)")
    p.add_argument("-o", "--output", metavar="FILE", type=path_arg, help="write the plan JSON here (atomically)")
    p.set_defaults(run=run)


def overhead_ms_arg(text: str | None) -> float | None:
    """``--overhead``: None when not given (the profile's measured cost per action), else milliseconds; a zero
    needs no unit (``0`` turns the cost off)."""
    from autopart.formats.units import parse_duration_ms

    if text is None:
        return None
    if re.fullmatch(r"\s*0*\.?0*\s*", text) and "0" in text:
        return 0.0
    return parse_duration_ms(text, "--overhead")


def _bottleneck_note(method: str) -> str:
    """Why an ``exact`` plan's slowest stage may sit above the bound: it minimises the step instead."""
    if method in ("exact", "local"):
        return "; exact minimises the predicted step, which can take a slower bottleneck: --method bottleneck"
    return ""


PLACEMENT_LINES = 8
"""Replicas the table output places line by line; the plan file holds all."""
CLUSTER_FLAGS = ("--nodes", "--devices-per-node", "--link", "--cluster", "--data-parallel")


def _cluster_flags(args: argparse.Namespace) -> list[str]:
    return [flag for flag in CLUSTER_FLAGS if getattr(args, flag.lstrip("-").replace("-", "_")) is not None]


def _is_gpu(name: str) -> bool:
    """A device named as a GPU (``H100-80GB``): not the profiled machine's CPU cores."""
    from autopart.formats.devices import KNOWN_MEMORY

    return name.lower() in {known.lower() for known in KNOWN_MEMORY}


def _at_rank_threads(args: argparse.Namespace, profile: Profile, ranks: int, gpus: bool, who: str) -> Profile:
    """``profile`` at the CPU threads each rank gets when ``--ranks-per-machine`` ranks (default: ``ranks``, the
    plan's ranks ``who`` names, where the profile was timed at several counts and no device is a GPU) share
    the profiled machine's cores (:meth:`Profile.at_threads`); said in a note. Unchanged for a profile that
    does not record its cores (a GPU's, or one from before autopart recorded them)."""
    from autopart.formats.units import plural

    sharing = args.ranks_per_machine
    if sharing is None and (gpus or not profile.by_threads):
        return profile
    if profile.cpu_cores is None:
        args.notes.append(f"--ranks-per-machine {sharing} changes nothing: profile {args.profile} does not record "
                          f"its CPU cores (a GPU's, or profiled before autopart recorded them)")
        return profile
    sharing = sharing or ranks
    threads = max(1, profile.cpu_cores // sharing)
    timed = sorted(profile.thread_counts())
    default = "" if args.ranks_per_machine else f", every rank {who}; --ranks-per-machine N sets another count"
    how = ""
    if threads not in timed:
        nearest = min(timed, key=lambda count: abs(count - threads))
        how = (f"; between the {max(t for t in timed if t < threads)} and {min(t for t in timed if t > threads)} "
               f"threads timed, as a + b / threads" if timed[0] < threads < timed[-1]
               else f"; the profile timed {', '.join(map(str, timed))} threads only: the times of {nearest}")
    share = "shares" if sharing == 1 else "share"
    args.notes.append(f"times for {plural(threads, 'thread')} per rank ({plural(sharing, 'rank')} {share} "
                      f"{plural(profile.cpu_cores, 'core')}{default}{how})")
    return profile.at_threads(threads)


def make_cluster_search_from_args(args: argparse.Namespace, cluster: Cluster) -> ClusterSearch:
    """The joint (K, D, M, schedule, split) search the cluster flags ask for."""
    from autopart.core.costmodel import CostModel
    from autopart.core.dataparallel import plan_cluster
    from autopart.core.search import all_schedules
    from autopart.formats.profile import Profile
    from autopart.formats.schedule_kinds import stages_per_rank
    from autopart.formats.units import parse_bytes, parse_duration_ms

    for flag, value in (("--devices", args.devices), ("--bandwidth", args.bandwidth), ("--balance", args.balance)):
        if value is not None:
            why = "the cluster gives the devices" if flag == "--devices" else \
                "the cluster's links give it (--link)" if flag == "--bandwidth" else "not with a cluster yet"
            raise AutopartError(f"{flag} with a cluster ({', '.join(_cluster_flags(args))}): {why}")
    profile = Profile.from_json(args.profile)
    profile = _at_rank_threads(args, profile, cluster.devices_per_node, gpus=_is_gpu(cluster.device_name),
                               who="on each node")
    if args.global_batch is None:
        args.global_batch = profile.microbatch_size * cluster.num_devices
        args.notes.append(f"global batch {args.global_batch}: the profile's micro-batch of {profile.microbatch_size} "
                          f"on each of the {cluster.num_devices} devices (--global-batch N sets it)")
    if args.global_batch < 1:
        raise AutopartError(f"--global-batch must be >= 1, got {args.global_batch}")
    if args.memory_limit:
        cluster = dataclasses.replace(cluster, memory_bytes=parse_bytes(args.memory_limit, "--memory-limit"))
    if args.stages_per_rank < 1:
        raise AutopartError(f"--stages-per-rank must be >= 1, got {args.stages_per_rank}")
    if args.schedule in (None, "auto"):
        schedules = all_schedules(args.stages_per_rank)
    else:
        schedules = [(args.schedule, stages_per_rank(args.schedule, args.stages_per_rank))]
    microbatches = None if args.microbatches in (None, "auto") else int(args.microbatches)
    if microbatches is not None and microbatches < 1:
        raise AutopartError(f"--microbatches must be >= 1, got {microbatches}")
    model = CostModel(optimizer=args.optimizer, latency_ms=parse_duration_ms(args.latency) if args.latency else 0.0,
                      recompute=not args.no_recompute,
                      overhead_ms=overhead_ms_arg(args.overhead))
    return plan_cluster(profile, cluster, model, global_batch=args.global_batch, method=args.method,
                        schedules=schedules, stages=args.stages, data_parallel=args.data_parallel,
                        microbatches=microbatches, profile_path=args.profile)


def make_plan_from_args(args: argparse.Namespace) -> Plan:
    """Profile, devices and the search or single configuration the flags ask for."""
    from autopart.core.costmodel import CostModel
    from autopart.core.search import all_schedules, plan_search, score_balance
    from autopart.formats.devices import Device, parse_devices
    from autopart.formats.profile import Profile
    from autopart.formats.schedule_kinds import stages_per_rank
    from autopart.formats.units import parse_bandwidth, parse_bytes, parse_duration_ms, plural

    profile = Profile.from_json(args.profile)
    devices = parse_devices(args.devices) if args.devices else None
    args.schedule = args.schedule or "1F1B"
    k = args.stages
    if k is None and args.balance and args.schedule not in ("auto", "Interleaved1F1B", "ZBVZeroBubble"):
        k = len(args.balance)
    if k is None:
        if devices is None:
            raise AutopartError("give --stages K (or --devices)")
        k = len(devices)
    if k < 1:
        raise AutopartError(f"--stages must be >= 1, got {k}")
    if devices is not None and len(devices) != k:
        raise AutopartError(f"--devices names {plural(len(devices), 'device')} for {plural(k, 'stage')}")
    if k > len(profile.layers):
        raise AutopartError(f"{plural(k, 'stage')} > {plural(len(profile.layers), 'block')} in {args.profile}")
    profile = _at_rank_threads(args, profile, k, gpus=any(_is_gpu(d.name) for d in devices or ()),
                               who="of the plan")
    limit = parse_bytes(args.memory_limit, "--memory-limit") if args.memory_limit else None
    if devices is None:
        devices = [Device(name="device", memory_bytes=limit) for _ in range(k)]
    elif limit is not None:
        devices = [Device(name=d.name, memory_bytes=limit, speed=d.speed) for d in devices]
    if args.global_batch is not None and args.global_batch < 1:
        raise AutopartError(f"--global-batch must be >= 1, got {args.global_batch}")
    search_microbatches = args.microbatches == "auto"
    microbatches = k if search_microbatches or args.microbatches is None else args.microbatches
    if microbatches < 1:
        raise AutopartError(f"--microbatches must be >= 1, got {microbatches}")
    if args.stages_per_rank < 1:
        raise AutopartError(f"--stages-per-rank must be >= 1, got {args.stages_per_rank}")
    if args.schedule == "auto":
        schedules = all_schedules(args.stages_per_rank)
    else:
        schedules = [(args.schedule, stages_per_rank(args.schedule, args.stages_per_rank))]
    model = CostModel(microbatches=microbatches, optimizer=args.optimizer,
                      bandwidth_bytes_per_ms=parse_bandwidth(args.bandwidth) / 1e3 if args.bandwidth else None,
                      latency_ms=parse_duration_ms(args.latency) if args.latency else 0.0,
                      recompute=not args.no_recompute,
                      overhead_ms=overhead_ms_arg(args.overhead))
    plan = plan_search(profile, devices, model, method=args.method, global_batch=args.global_batch,
                       search_microbatches=search_microbatches, schedules=schedules, profile_path=args.profile)
    if args.balance:
        args.given = score_balance(profile, devices, plan, args.balance, recompute=not args.no_recompute)
    if args.bandwidth is None:
        args.notes.extend(free_tie_notes(plan, profile, latency=bool(model.latency_ms)))
    return plan


def free_tie_notes(plan: Plan, profile: Profile, latency: bool = False) -> list[str]:
    """Per tied weight whose copies the plan puts on different ranks, a note that its gradient sum (the ring
    all-reduce ``autopart train`` runs each step) is priced free, or at the latency alone: no bandwidth given."""
    from autopart.formats.units import format_bytes

    rank_of = {name: rank for st, rank in zip(plan.stages, plan.stage_ranks()) for name in st.blocks}
    notes = []
    for tie in profile.ties:
        ranks = sorted({rank_of[b] for b in tie.blocks if b in rank_of})
        if len(ranks) < 2:
            continue
        between = (f"between ranks {ranks[0]} and {ranks[1]}" if len(ranks) == 2
                   else f"among ranks {', '.join(map(str, ranks[:-1]))} and {ranks[-1]}")
        priced = "at the --latency alone" if latency else "free"
        notes.append(f"the tied weight's gradient sum {between} ({tie.params[0]}, {format_bytes(tie.bytes)} a step) "
                     f"is priced {priced}: no --bandwidth given")
    return notes


def run(args: argparse.Namespace) -> int:
    from autopart.formats.atomic import check_writable
    from autopart.formats.cluster import parse_cluster
    from autopart.formats.units import format_bytes

    if args.output:
        check_writable(args.output)
    cluster = parse_cluster(args.nodes, args.devices_per_node, args.link, args.cluster)
    search = None
    args.notes = []
    if cluster is not None:
        search = make_cluster_search_from_args(args, cluster)
        plan = search.best
    elif args.data_parallel is not None:
        raise AutopartError("--data-parallel needs a cluster: --nodes N --devices-per-node SPEC (or --cluster FILE)")
    else:
        plan = make_plan_from_args(args)
    if not plan.fits:
        over = next(s for s, st in enumerate(plan.stages)
                    if st.device.memory_bytes is not None and st.cost.memory_bytes > st.device.memory_bytes)
        st = plan.stages[over]
        raise AutopartError(
            f"the {args.method} split {list(plan.balance)} does not fit: stage {over} needs "
            f"{format_bytes(st.cost.memory_bytes)} > {format_bytes(st.device.memory_bytes or 0)}; "
            f"--method exact finds one that fits")
    if args.output:
        plan.to_json(args.output)
    if args.format == "table":
        _print_plan(plan)
        if search is not None:
            _print_what_if(search)
        for note in args.notes:
            print(f"note: {note}")
        if args.balance:
            _print_given(plan, args.given)
    elif args.format == "json":
        print(json.dumps(plan.to_dict(), indent=2))
    elif args.format == "balance":
        print(json.dumps(list(plan.balance)))
    elif args.format == "split-spec":
        print(plan.split_spec_code(), end="")
    else:
        print(json.dumps(plan.fqns(), indent=2))
    return 0


def _blocks_label(blocks: tuple[str, ...]) -> str:
    return blocks[0] if len(blocks) == 1 else f"{blocks[0]} … {blocks[-1]}"


def _print_plan(plan: Plan) -> None:
    from rich.table import Table

    from autopart.cli.console import stdout_console
    from autopart.formats.units import format_bytes, format_ms, plural

    console = stdout_console(140)
    bottleneck = plan.predicted.bottleneck_ms
    sends = any(st.cost.send_ms for st in plan.stages)
    limits = any(st.device.memory_bytes for st in plan.stages)
    named = any(st.device.name != "device" or st.device.speed != 1 for st in plan.stages)
    ranks = plan.stage_ranks()
    method = "exact method, local search (too many splits to simulate each)" if plan.method == "local" \
        else plan.method
    replicas = f" x {plan.data_parallel} replicas" if plan.data_parallel > 1 else ""
    table = Table(title=f"{plan.model}: {method}, {plural(plan.num_stages, 'stage')} on "
                        f"{plural(plan.num_ranks, 'rank')}{replicas}",
                  title_justify="left")
    columns = ["stage", "rank", "blocks", "n", "time", "share"] + ["sends"] * sends + ["memory"] + ["limit"] * limits \
        + ["device"] * named
    for col in columns:
        table.add_column(col, justify="left" if col in ("blocks", "device") else "right", no_wrap=True)
    for s, st in enumerate(plan.stages):
        cost = st.cost
        row = [str(s), str(ranks[s]), _blocks_label(st.blocks), str(len(st.blocks)), format_ms(cost.time_ms),
               f"{cost.time_ms / bottleneck:.0%}" if bottleneck else "-"]
        if sends:
            row.append(format_ms(cost.send_ms))
        row.append(format_bytes(cost.memory_bytes) + (" recompute" if cost.recompute else ""))
        if limits:
            row.append(format_bytes(st.device.memory_bytes) if st.device.memory_bytes else "-")
        if named:
            row.append(f"{st.device.name} x{st.device.speed:g}")
        table.add_row(*row, style="bold" if cost.time_ms == bottleneck else "")
    console.print(table)
    pred = plan.predicted
    gap = max(pred.bottleneck_ms / pred.lower_bound_ms - 1, 0.0) if pred.lower_bound_ms else 0.0
    size = f" of {plan.microbatch_size}" if plan.microbatch_size else ""
    per_rank = f" ({plan.stages_per_rank} stages per rank)" if plan.stages_per_rank > 1 else ""
    console.print(f"bottleneck {format_ms(pred.bottleneck_ms)}, lower bound {format_ms(pred.lower_bound_ms)} "
                  f"(gap {gap:.1%}{_bottleneck_note(plan.method)})", highlight=False, soft_wrap=True)
    console.print(f"schedule {plan.schedule}{per_rank}, {plural(plan.microbatches, 'micro-batch')}{size}: predicted step "
                  f"{format_ms(pred.step_ms)}, bubble {pred.bubble_fraction:.1%}", highlight=False, soft_wrap=True)
    if plan.scaling:
        console.print(f"note: {plan.scaling}", highlight=False, soft_wrap=True)
    if plan.runners_up and plan.cluster is None:  # with a cluster, the what-if table lists them
        runners = Table(title="runners-up", title_justify="left")
        for col in ("schedule", "micro-batches", "predicted step", "slower by", "balance"):
            runners.add_column(col, justify="left" if col in ("schedule", "balance") else "right")
        for c in plan.runners_up:
            name = c.schedule + (f" x{c.stages_per_rank}" if c.stages_per_rank > 1 else "")
            runners.add_row(name, str(c.microbatches), format_ms(c.step_ms),
                            f"{c.step_ms / pred.step_ms - 1:+.1%}", str(list(c.balance)))
        console.print(runners)
    line = choice_line(plan)
    if line and plan.cluster is None:  # with a cluster, the what-if's "chosen:" line says it
        console.print(f"chosen: {line}", highlight=False, soft_wrap=True)
    print(f"balance: {list(plan.balance)}")


def choice_line(plan: Plan) -> str:
    """Why the plan won (its ``predicted.margin`` against ``predicted.noise``); "" when nothing else was scored."""
    from autopart.core.choice import busiest_compute_ms
    from autopart.formats.units import format_ms

    pred = plan.predicted
    if pred.margin is None or pred.noise is None or not plan.runners_up:
        return ""
    runner = plan.runners_up[0]
    replicas = f"{plan.num_ranks}x{plan.data_parallel} " if plan.data_parallel > 1 else ""
    me = f"{replicas}{plan.schedule} M={plan.microbatches} {list(plan.balance)}"
    noise = f"{pred.noise:.1%}"
    if pred.margin < 0:
        slower = -pred.margin / (1 + pred.margin)
        what = "compute and runtime actions" if any(st.cost.overhead_ms for st in plan.stages) else "compute"
        busiest = f" (busiest rank {format_ms(busiest_compute_ms(plan))} vs {format_ms(runner.busiest_ms)} of " \
                  f"{what} per step)" if runner.busiest_ms else ""
        return (f"{me}: {slower:.1%} slower than the fastest predicted ({runner.label}) but within the profile's "
                f"noise ({noise}); more balanced{busiest}")
    if pred.margin > pred.noise:
        return f"{me}: beats the runner-up ({runner.label}) by {pred.margin:.1%}, more than the profile's noise ({noise})"
    return (f"{me}: the fastest predicted, {pred.margin:.1%} ahead of the runner-up ({runner.label}): within the "
            f"profile's noise ({noise}), and no configuration within it is more balanced")


def _print_given(plan: Plan, given: Plan) -> None:
    """autopart's plan beside a given split, under the same cost model."""
    from rich.table import Table

    from autopart.cli.console import stdout_console
    from autopart.formats.units import format_bytes, format_ms, plural

    table = Table(title=f"the given split under the same cost model ({plan.schedule}, "
                        f"{plural(plan.microbatches, 'micro-batch')})", title_justify="left")
    for col in ("split", "balance", "predicted step", "bottleneck", "memory per stage", "vs autopart"):
        table.add_column(col, justify="left" if col in ("split", "balance", "memory per stage") else "right")
    for label, p in ((f"autopart ({plan.method})", plan), ("given", given)):
        memory = ", ".join(format_bytes(st.cost.memory_bytes) for st in p.stages)
        slower = f"{p.predicted.step_ms / plan.predicted.step_ms - 1:+.1%}" if plan.predicted.step_ms else "-"
        table.add_row(label, str(list(p.balance)), format_ms(p.predicted.step_ms), format_ms(p.predicted.bottleneck_ms),
                      memory + ("" if p.fits else "  (does not fit)"), slower)
    console = stdout_console(160)
    console.print(table)


def _print_what_if(search: ClusterSearch, rows: int = 6) -> None:
    """The best configurations the joint search scored, why the chosen one wins, and where its ranks run."""
    from rich.table import Table

    from autopart.cli.console import stdout_console
    from autopart.formats.units import format_bytes, format_ms, plural

    console = stdout_console(160)
    best, plan = search.tried[0], search.best
    cluster = plan.cluster
    assert cluster is not None
    scored = [c for c in search.tried if c.scored]
    table = Table(title=f"what if: {len(scored)} of {plural(len(search.tried), 'configuration')} split and simulated "
                        f"on {cluster.nodes} x {cluster.devices_per_node} devices (the rest ruled out by a bound or "
                        f"memory; a one-rank pipeline only under one-stage schedules); the best few, then the best of "
                        f"each other K x D",
                  title_justify="left")
    for col in ("K x D", "schedule", "M", "mb size", "time per batch", "memory/device", "bubble", "comm",
                "vs best", "why it loses"):
        table.add_column(col, justify="left" if col in ("K x D", "schedule", "why it loses") else "right",
                         no_wrap=col != "why it loses")
    shown = scored[:rows - 2]  # the best few, then the best of every other K x D (even one ruled out)
    for c in search.tried:
        if all(c.label != x.label for x in shown):
            shown.append(c)
    for c in shown:
        name = c.schedule + (f" x{c.stages_per_rank}" if c.stages_per_rank > 1 and c.schedule != "ZBVZeroBubble"
                             else "")
        if not c.scored:  # ruled out before its split: what the bound says
            time = f">= {format_ms(c.step_ms)}" if c.fits else "-"
            memory = f">= {format_bytes(c.memory_bytes)}" if c.memory_bytes else "-"
            table.add_row(c.label, name, str(c.microbatches), str(c.microbatch_size), time, memory, "-", "-", "-",
                          c.why, style="dim")
            continue
        ratio = c.step_ms / best.step_ms - 1 if best.step_ms else 0.0
        slower = f"{ratio if abs(ratio) > 1e-9 else 0.0:+.1%}" if best.step_ms else "-"
        table.add_row(c.label, name, str(c.microbatches), str(c.microbatch_size), format_ms(c.step_ms),
                      format_bytes(c.memory_bytes) + ("" if c.fits else " (no fit)"), f"{c.bubble_fraction:.1%}",
                      f"{c.comm_share:.1%}", "best" if c is best else slower, c.why or "chosen",
                      style="bold" if c is best else "")
    console.print(table)
    runner = next((c for c in search.tried[1:] if c.scored and c.fits), None)
    noise = plan.predicted.noise or 0.0
    if runner is None:
        reason = "the only configuration that fits"
    else:
        reason = (f"{runner.step_ms / best.step_ms - 1:.1%} faster than the next, {runner.label} {runner.schedule} "
                  f"M={runner.microbatches} ({runner.why})" if runner.step_ms > best.step_ms
                  else f"ties with {runner.label} {runner.schedule} M={runner.microbatches} ({runner.why})")
        margin = plan.predicted.margin or 0.0
        reason += f"; {'more than' if margin > noise else 'within'} the profile's noise ({noise:.1%})"
    console.print(f"chosen: {plural(plan.num_ranks, 'pipeline rank')} x {plural(plan.data_parallel, 'replica')}, "
                  f"{plan.schedule}, "
                  f"{plural(plan.microbatches, 'micro-batch')} of {plan.microbatch_size}: "
                  f"{format_ms(plan.predicted.step_ms)} per global batch (all-reduce exposed "
                  f"{format_ms(plan.predicted.allreduce_ms)}): {reason}", highlight=False, soft_wrap=True)
    console.print(f"placement ({search.layout}), replica: pipeline rank -> node:device", highlight=False,
                  soft_wrap=True)
    mesh = plan.mesh()
    placed = mesh if len(mesh) <= PLACEMENT_LINES else mesh[:PLACEMENT_LINES - 1]
    for d, row in enumerate(placed):
        where = ", ".join(f"{r}->{cluster.node_of(g)}:{g % cluster.devices_per_node}" for r, g in enumerate(row))
        console.print(f"  replica {d}: {where}", highlight=False, soft_wrap=True)
    if len(placed) < len(mesh):
        console.print(f"  … and {len(mesh) - len(placed)} more replicas (the plan file's \"placement\" lists every one)",
                      highlight=False, soft_wrap=True)

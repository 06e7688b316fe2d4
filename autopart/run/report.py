"""Measured against predicted, at the end of a run: the step, each rank and each stage.

Every rank times each of its actions inside the real steps
(:mod:`autopart.run.timeline`); the timelines are gathered, and the rank
holding the last stage hands the comparison to autopart's launcher, which
prints it (:func:`hand_over_report`; under a user's own torchrun the rank
prints it itself), and writes ``--report`` JSON
(the fields of :class:`autopart.formats.report.Report`), ``--trace`` (Chrome trace JSON) and
``--svg`` (predicted above measured, one time axis); :mod:`autopart.render`
draws the tables and the picture.

Each rank's peak memory in the steps (:class:`autopart.measure.memory.MemoryMeter`, read by the loop)
is gathered with the timelines and set beside the plan's ``memory_bytes`` of that rank's stages.

The measured step of a training step is its slowest rank's: from leaving
the barrier before the step to the end of that rank's optimizer step. The
step reported is the median over the steady steps (all but the first
quarter), with their spread.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import statistics
import sys
from dataclasses import dataclass
from typing import Any, Sequence

import torch.distributed as dist
from rich.console import Console

from autopart.core.planner import simulate_plan
from autopart.core.schedules import Action
from autopart.core.simulate import Event, Simulation, Timeline
from autopart.formats.atomic import write_atomic, write_json_atomic
from autopart.formats.plan import Plan
from autopart.formats.report import TERMS, RankRow, Report, StageRow, TermRow
from autopart.formats.stage import StageCost
from autopart.formats.units import plural
from autopart.measure.memory import MemoryPeak
from autopart.render.report import report_lines
from autopart.run.job import Job, StepLog
from autopart.run.replan import StageProfile

__all__ = ["Measured", "gather_measured", "make_report", "measured_timeline", "print_report", "write_report",
           "REPORT_HANDOFF_ENV", "hand_over_report", "read_handed_report",
           "write_timelines"]


@dataclass(frozen=True)
class Measured:
    """What every rank timed, gathered: per step, the slowest rank's step and all ranks' actions."""

    step_ms: tuple[tuple[float, ...], ...]
    """Per step, each rank's time from the barrier to the end of its optimizer step."""
    events: tuple[tuple[Event, ...], ...]
    """Per step, every rank's actions (ms from that rank's start of the step)."""
    memory: tuple[MemoryPeak, ...] = ()
    """Per rank, its peak memory over the training steps (:mod:`autopart.measure.memory`)."""
    build: tuple[int | None, ...] = ()
    """Per rank, its peak memory while it built its stages, over the same baseline."""
    memory_method: str = "not measured"
    """How the reporting rank measured it."""

    @functools.cached_property
    def slowest_ms(self) -> list[float]:
        return [max(ranks) for ranks in self.step_ms]

    def steady(self) -> list[int]:
        """The steps after warm-up: all but the first quarter (all of them when there are fewer than 2)."""
        n = len(self.step_ms)
        return list(range(max(1, math.ceil(n / 4)), n)) if n > 1 else list(range(n))


def gather_measured(job: Job, log: StepLog, profiles: list[StageProfile], memory: MemoryPeak,
                    memory_method: str, build_peak_bytes: int | None = None) -> tuple[Measured, list[StageProfile]]:
    """Every rank's step times, actions, peak memory and re-profiled stages (``--replan``), on every rank. Several
    replicas: by pipeline rank, replica 0's times and stages (the others run the same pipeline on their share), and
    the most memory any replica's rank at that pipeline rank used."""
    everyone: list[Any] = [None] * job.world
    dist.all_gather_object(everyone, (log.step_ms, log.timelines, profiles, memory, build_peak_bytes))
    mesh = job.replicas.mesh
    gathered = [everyone[g] for g in mesh[0]]
    if len(mesh) > 1:
        def most(peaks: list[MemoryPeak]) -> MemoryPeak:
            def top(values: list[int | None]) -> int | None:
                return None if any(v is None for v in values) else max(v for v in values if v is not None)
            return MemoryPeak(top([p.peak_bytes for p in peaks]), top([p.reserved_bytes for p in peaks]))

        gathered = [(g[0], g[1], g[2], most([everyone[row[r]][3] for row in mesh]), g[4])
                    for r, g in enumerate(gathered)]
    steps = len(log.step_ms)
    step_ms = tuple(tuple(float(g[0][i]) for g in gathered) for i in range(steps))
    events = tuple(tuple(e for g in gathered for e in g[1][i]) for i in range(steps))
    return (Measured(step_ms, events, memory=tuple(g[3] for g in gathered), memory_method=memory_method,
                     build=tuple(g[4] for g in gathered)),
            [p for g in gathered for p in g[2]])


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _stage_times(measured: Measured, stages: int) -> dict[int, tuple[float, float, tuple[float, float] | None]]:
    """Stage -> (forward, backward, (I, W) or None) ms of one micro-batch, medians over the steady steps (the last
    stage's forward with its loss: :class:`~autopart.run.timeline.ActionClock`); a backward the schedule split is
    its I and W together."""
    by: dict[tuple[int, str], list[float]] = {}
    for i in measured.steady():
        for e in measured.events[i]:
            if e.kind in ("F", "B", "I", "W"):
                by.setdefault((Action.parse(e.action).stage, e.kind), []).append(e.end_ms - e.start_ms)
    out: dict[int, tuple[float, float, tuple[float, float] | None]] = {}
    for s in range(stages):
        if (s, "F") not in by:
            continue
        if (s, "B") in by:
            out[s] = (_median(by[(s, "F")]), _median(by[(s, "B")]), None)
        else:
            halves = (_median(by.get((s, "I"), [])), _median(by.get((s, "W"), [])))
            out[s] = (_median(by[(s, "F")]), sum(halves), halves)
    return out


def _predicted_backward_ms(cost: StageCost, split: bool) -> float:
    """A stage's backward as the run times it: its I and W where the schedule split it and the plan priced the
    halves as torch runs them, else the backward in one call."""
    if split and cost.input_grad_ms is not None and cost.weight_grad_ms is not None:
        return cost.input_grad_ms + cost.weight_grad_ms
    return cost.backward_ms


def _predicted_terms(plan: Plan, sim: Simulation, rank: int) -> dict[str, float]:
    """The :data:`TERMS` of ``rank``'s step in the simulated ``sim`` (ms); they add up to the predicted step,
    ``sim.step_ms`` plus the plan's exposed all-reduce over its replicas (``all-reduce``, 0 with one replica)."""
    terms = dict.fromkeys(TERMS, 0.0)
    terms["all-reduce"] = plan.predicted.allreduce_ms if plan.data_parallel > 1 else 0.0
    for e in sim.events:
        if e.rank != rank:
            continue
        length = e.end_ms - e.start_ms
        if e.kind in ("SEND", "TIE", "OPT"):
            terms[{"SEND": "sends", "TIE": "tie sum", "OPT": "optimizer"}[e.kind]] += length
            continue
        cost = plan.stages[Action.parse(e.action).stage].cost
        loss = cost.loss_ms if e.kind == "F" else 0.0  # once per micro-batch: its forward and backward
        terms["action cost"] += cost.overhead_ms
        terms["loss"] += loss
        terms["compute"] += length - cost.overhead_ms - loss
    terms["rest"] = sim.step_ms + terms["all-reduce"] - sum(terms.values())
    return terms


def _measured_terms(measured: Measured, rank: int) -> dict[str, float | None]:
    """The :data:`TERMS` of ``rank``'s step as the run timed them (medians over the steady steps): the actions as
    timed are ``compute`` (the loss and the runtime's work inside each action with them: not timed apart), the tie
    sum the shortest of the holders' (the others waited in theirs for the last to join), the all-reduce over the
    replicas (AR events) as ``rank`` timed it; the sends and the runtime's work between actions are not timed apart
    (in ``rest``)."""
    by: dict[str, list[float]] = {term: [] for term in TERMS}
    for i in measured.steady():
        mine = dict.fromkeys(TERMS, 0.0)
        ties: dict[int, float] = {}
        for e in measured.events[i]:
            length = e.end_ms - e.start_ms
            if e.kind == "TIE":
                ties[e.rank] = ties.get(e.rank, 0.0) + length
            elif e.rank == rank:
                term = {"F": "compute", "B": "compute", "I": "compute", "W": "compute", "AR": "all-reduce",
                        "OPT": "optimizer"}.get(e.kind)
                if term is not None:
                    mine[term] += length
        mine["tie sum"] = min(ties.values()) if rank in ties else 0.0
        mine["rest"] = measured.slowest_ms[i] - sum(mine.values())
        for term in TERMS:
            by[term].append(mine[term])
    return {term: None if term in ("loss", "action cost", "sends") else _median(values) for term, values in by.items()}


def _term_rows(plan: Plan, measured: Measured, predicted: Simulation | None, rank: int,
               measured_step: float) -> list[TermRow]:
    """Each term of ``rank``'s step, predicted (None without a prediction) and measured, with its share of its
    step (the predicted one: the simulated step plus the plan's exposed all-reduce). The all-reduce is a row only
    with several replicas."""
    guessed = _predicted_terms(plan, predicted, rank) if predicted is not None else None
    predicted_step = sum(guessed.values()) if guessed is not None else 0.0
    timed = _measured_terms(measured, rank)
    rows = []
    for term in TERMS:
        if term == "all-reduce" and plan.data_parallel == 1:
            continue
        p = guessed[term] if guessed is not None else None
        m = timed[term]
        rows.append(TermRow(term=term, predicted_ms=p, measured_ms=m,
                            predicted_share=p / predicted_step if p is not None and predicted_step > 0 else None,
                            measured_share=m / measured_step if m is not None and measured_step > 0 else None))
    return rows


def measured_timeline(plan: Plan, measured: Measured) -> Timeline:
    """The steady step whose slowest rank took the median time, as a timeline."""
    steady = measured.steady()
    median = _median([measured.slowest_ms[i] for i in steady])
    pick = min(steady, key=lambda i: abs(measured.slowest_ms[i] - median))
    return Timeline(schedule=plan.schedule, num_ranks=plan.num_ranks, microbatches=plan.microbatches,
                    step_ms=measured.slowest_ms[pick], events=measured.events[pick])


def _rank_rows(plan: Plan, measured: Measured, predicted: Simulation | None) -> list[RankRow]:
    rows = []
    steady = measured.steady()
    for r in range(plan.num_ranks):
        compute, opt, finish, wait = [], [], [], []
        for i in steady:
            mine = [e for e in measured.events[i] if e.rank == r]
            c = sum(e.end_ms - e.start_ms for e in mine if e.kind not in ("OPT", "TIE", "AR"))  # sums: waiting
            o = sum(e.end_ms - e.start_ms for e in mine if e.kind == "OPT")
            compute.append(c)
            opt.append(o)
            finish.append(measured.step_ms[i][r])
            wait.append(measured.slowest_ms[i] - c - o)
        busy = predicted.busy_ms[r] if predicted is not None else None
        planned = sum(plan.stages[s].cost.memory_bytes for s in plan.stages_of(r))
        peak = measured.memory[r] if r < len(measured.memory) else MemoryPeak(None, None)
        rows.append(RankRow(rank=r, predicted_busy_ms=busy,
                            predicted_idle_ms=predicted.step_ms - busy if predicted is not None and busy is not None
                            else None,
                            measured_compute_ms=_median(compute), measured_optimizer_ms=_median(opt),
                            measured_wait_ms=_median(wait), measured_finish_ms=_median(finish),
                            memory_planned_bytes=planned, memory_measured_bytes=peak.peak_bytes,
                            memory_reserved_bytes=peak.reserved_bytes,
                            memory_ratio=peak.peak_bytes / planned if peak.peak_bytes is not None and planned > 0
                            else None, build_peak_bytes=measured.build[r] if r < len(measured.build) else None))
    return rows


def fit_overhead_ms(plan: Plan, step_ms: float) -> float:
    """The overhead per action (ms, to 1 us) under which ``plan`` simulates to ``step_ms``: the step grows
    with it, so bisection finds it."""
    def simulated(overhead: float) -> float:
        stages = tuple(dataclasses.replace(st, cost=dataclasses.replace(st.cost, overhead_ms=overhead))
                       for st in plan.stages)
        return simulate_plan(dataclasses.replace(plan, stages=stages)).step_ms

    if not math.isfinite(step_ms) or simulated(0.0) >= step_ms:
        return 0.0
    low, high = 0.0, step_ms
    while high - low > 1e-3:
        mid = (low + high) / 2
        low, high = (mid, high) if simulated(mid) < step_ms else (low, mid)
    return (low + high) / 2


def _actions_per_microbatch(measured: Measured, stages: int) -> dict[int, int]:
    """Stage -> the forward and backward actions it runs per micro-batch in the steady steps: a forward and a
    backward (2), or a forward and the backward's input- and weight-gradient halves (3)."""
    kinds: dict[int, set[str]] = {}
    for i in measured.steady():
        for e in measured.events[i]:
            if e.kind in ("F", "B", "I", "W"):
                kinds.setdefault(Action.parse(e.action).stage, set()).add(e.kind)
    return {s: len(kinds[s]) for s in range(stages) if s in kinds}


def _speed(plan: Plan, stage_ms: dict[int, tuple[float, float, tuple[float, float] | None]],
           actions: dict[int, int]) -> float | None:
    """Predicted over measured compute of the stages measured, each at its device's speed. The measured actions
    hold the runtime's own work, which the plan prices apart (``overhead_ms`` per action): taken out, ``actions[s]``
    per micro-batch on stage ``s`` (:func:`_actions_per_microbatch`), so a plan at this speed does not count it twice.
    None when nothing is left."""
    predicted = sum((plan.stages[s].cost.forward_ms + _predicted_backward_ms(plan.stages[s].cost, halves is not None))
                    * plan.stages[s].device.speed for s, (_, _, halves) in stage_ms.items())
    measured = sum(f + b - actions.get(s, 2) * plan.stages[s].cost.overhead_ms for s, (f, b, _) in stage_ms.items())
    return predicted / measured if measured > 0 and math.isfinite(measured) else None


def _replayed(cost: StageCost, forward_ms: float, backward_ms: float, halves: tuple[float, float] | None) -> StageCost:
    """``cost`` with the times measured in the run (its I and W too where the schedule split the backward)."""
    cost = dataclasses.replace(cost, forward_ms=forward_ms, backward_ms=backward_ms, overhead_ms=0.0)
    return cost if halves is None else dataclasses.replace(cost, input_grad_ms=halves[0], weight_grad_ms=halves[1])


def make_report(job: Job, log: StepLog, measured: Measured) -> Report:
    plan, mb = job.plan, job.microbatch_size
    steady = measured.steady()
    slowest = [measured.slowest_ms[i] for i in steady]
    measured_step = _median(slowest)
    same_size = plan.microbatch_size in (None, mb)
    stage_ms = _stage_times(measured, plan.num_stages)
    ranks = plan.stage_ranks()
    rows = []
    for s, st in enumerate(plan.stages):
        f, b, halves = stage_ms.get(s, (float("nan"), float("nan"), None))
        backward = _predicted_backward_ms(st.cost, halves is not None)
        compute = st.cost.forward_ms + backward
        rows.append(StageRow(stage=s, rank=ranks[s], blocks=len(st.blocks),
                             predicted_forward_ms=st.cost.forward_ms if same_size else None,
                             predicted_backward_ms=backward if same_size else None,
                             measured_forward_ms=f, measured_backward_ms=b,
                             error=(f + b) / compute - 1 if same_size and compute > 0 else None))
    replay = [dataclasses.replace(st, cost=_replayed(st.cost, *stage_ms[s])) if s in stage_ms else st
              for s, st in enumerate(plan.stages)]
    replay_plan = dataclasses.replace(plan, stages=tuple(replay))
    replayed = simulate_plan(replay_plan, microbatches=plan.microbatches)
    predicted = simulate_plan(plan) if same_size else None
    # several replicas: the measured step includes the gradients' all-reduce, so the prediction does too (the
    # plan's exposed all-reduce: the part the pipeline's drain does not hide)
    predicted_step = predicted.step_ms + plan.predicted.allreduce_ms if predicted is not None else None
    last = [max(range(plan.num_ranks), key=lambda r: measured.step_ms[i][r]) for i in steady]
    slowest_rank = statistics.mode(last)
    untied = dataclasses.replace(replay_plan, stages=tuple(
        dataclasses.replace(st, cost=dataclasses.replace(st.cost, tie_ms=())) for st in replay_plan.stages))
    tokens = job.data.tokens_per_sample
    return Report(
        plan=job.cfg.plan, model=job.cfg.model, schedule=plan.schedule, microbatches=plan.microbatches,
        microbatch_size=mb, global_batch=job.global_batch, ranks=plan.num_ranks, steps=len(measured.step_ms),
        losses=log.losses, step_ms=measured.slowest_ms, measured_step_ms=measured_step,
        measured_step_spread_ms=(min(slowest), max(slowest)), steady_steps=len(steady), slowest_rank=slowest_rank,
        predicted_step_ms=predicted_step, predicted_bubble_fraction=plan.predicted.bubble_fraction,
        step_error=measured_step / predicted_step - 1 if predicted_step else None,
        simulated_with_measured_stages_ms=replayed.step_ms,
        fitted_overhead_ms=fit_overhead_ms(untied, measured_step),
        unexplained_ms=fit_overhead_ms(replay_plan, measured_step),
        action_ms=plan.stages[0].cost.overhead_ms if plan.stages else 0.0,
        terms=_term_rows(plan, measured, predicted, slowest_rank, measured_step),
        measured_speed=_speed(plan, stage_ms, _actions_per_microbatch(measured, plan.num_stages)) if same_size
        else None,
        throughput_per_s=job.global_batch * tokens / (measured_step / 1e3) if measured_step > 0 else None,
        throughput_unit="tokens" if tokens > 1 else "samples", memory_method=measured.memory_method, stages=rows,
        ranks_detail=_rank_rows(plan, measured, predicted), eval_losses=log.eval_losses,
        data_parallel=plan.data_parallel)


REPORT_HANDOFF_ENV = "AUTOPART_REPORT_HANDOFF"
"""Set by autopart's launcher for the ranks: the file the reporting rank writes the report to, for the
launcher to print (ranks are other processes)."""


def hand_over_report(report: Report, plan_microbatch_size: int | None) -> None:
    """The report to whoever prints it: written atomically to the launcher's :data:`REPORT_HANDOFF_ENV` file,
    or, under a user's own torchrun (no such file), printed by this rank."""
    path = os.environ.get(REPORT_HANDOFF_ENV)
    if not path:
        print_report(report, plan_microbatch_size)
        return
    text = json.dumps(report.to_dict())  # NaN and inf as JSON's extensions: read back by the launcher only
    write_atomic(path, lambda handle: handle.write(text.encode()))


def read_handed_report(path: str) -> Report | None:
    """The report a rank handed over in ``path``; None when no rank wrote one."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return None
    spread = data.pop("measured_step_spread_ms")
    return Report(**{**data, "measured_step_spread_ms": (spread[0], spread[1]),
                     "stages": [StageRow(**row) for row in data["stages"]],
                     "ranks_detail": [RankRow(**row) for row in data["ranks_detail"]],
                     "terms": [TermRow(**row) for row in data.get("terms", [])]})


def print_report(report: Report, plan_microbatch_size: int | None) -> None:
    """The per-stage and per-rank tables and the step lines: results, so on stdout (progress is on stderr).

    A reader that went away (``train ... | head -1``) stops the printing silently, and the rest of the run
    (``--report``, ``--trace``, ``--replan``) goes on: this rank does not fail for it (rich's own answer to
    a closed stdout is ``SystemExit(1)``, which the launcher could only report as a failure with no cause).
    """
    console = _Results(emoji=False)
    if not console.is_terminal:
        console = _Results(emoji=False, width=120)
    try:
        for item in report_lines(report, plan_microbatch_size):
            if isinstance(item, str):
                console.print(item, highlight=False, soft_wrap=True)
            else:
                console.print(item)
        sys.stdout.flush()
    except BrokenPipeError:
        _stdout_to_devnull()


class _Results(Console):
    """rich's console, but a closed stdout ends the printing, not the process."""

    def on_broken_pipe(self) -> None:
        self.quiet = True  # print nothing more
        _stdout_to_devnull()


def _stdout_to_devnull() -> None:
    """Send what is left for stdout (and the flush at exit, which would fail again) to /dev/null."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def write_report(report: Report, path: str) -> None:
    """``--report``: the report as JSON, atomically (NaN written as null-free floats by ``default=float``)."""
    write_json_atomic(path, json.loads(json.dumps(report.to_dict(), default=float)))


def write_timelines(plan: Plan, measured: Measured, trace: str | None, svg: str | None) -> None:
    """``--trace``: the measured step (and the predicted one, a second process) as Chrome trace JSON;
    ``--svg``: predicted above measured on one time axis."""
    from autopart.render.timeline import render_svg
    from autopart.core.trace import write_trace
    from autopart.formats.atomic import write_atomic

    run = measured_timeline(plan, measured)
    predicted = simulate_plan(plan)
    if trace:
        write_trace(trace, ("measured", run), ("predicted", predicted))
    if svg:
        picture = render_svg([("predicted", predicted), ("measured (the median step)", run)],
                             title=f"{plan.model}: {plan.schedule}, {plural(plan.num_stages, 'stage')}, balance "
                                   f"{list(plan.balance)}")
        write_atomic(svg, lambda handle: handle.write(picture.encode()))

"""Measured against predicted, at the end of a run: each stage's compute and the step.

Every rank times its own stages on the first micro-batch they received; the
times are gathered, and the rank holding the last stage prints the table and
writes ``--report`` JSON (the same fields as :class:`Report`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from autopart.core.planner import simulate_plan
from autopart.formats.atomic import write_json_atomic
from autopart.formats.units import format_ms
from autopart.measure.profiler import time_block
from autopart.run.job import Job, StepLog
from autopart.run.replan import StageProfile

__all__ = ["StageRow", "Report", "measure_stages", "gather_measurements", "make_report", "print_report",
           "write_report"]

StageTimes = dict[int, tuple[float, float]]
"""Stage index -> (forward ms, backward ms) of one micro-batch."""


@dataclass(frozen=True)
class StageRow:
    stage: int
    blocks: int
    predicted_compute_ms: float | None
    """None when the run's micro-batch size differs from the plan's."""
    measured_compute_ms: float
    measured_forward_ms: float
    measured_backward_ms: float
    error: float | None
    """measured / predicted - 1."""


@dataclass(frozen=True)
class Report:
    plan: str
    model: str
    schedule: str
    microbatches: int
    microbatch_size: int
    global_batch: int
    ranks: int
    steps: int
    losses: list[float]
    step_ms: list[float]
    measured_step_ms: float
    """Median step after the first quarter of the steps (warm-up)."""
    predicted_step_ms: float | None
    predicted_bubble_fraction: float
    step_error: float | None
    simulated_with_measured_stages_ms: float
    """The plan's schedule replayed with the measured stage times."""
    throughput_per_s: float | None
    throughput_unit: str
    stages: list[StageRow]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def measure_stages(job: Job) -> StageTimes:
    """Forward and backward ms of each local stage on the first micro-batch it received in the run."""
    measured: StageTimes = {}
    target = job.pipe.last_target
    for s, module in job.pipe.modules:
        captured = job.pipe.captured.get(s)
        if captured is None:
            continue
        loss: Callable[[Any], torch.Tensor] | None = None
        if s == job.plan.num_stages - 1 and target is not None:
            loss = lambda out: job.pipe.loss_fn(out, target)  # noqa: E731
        measured[s] = time_block(module, captured, job.device, warmup=1, repeats=3, loss=loss)
    return measured


def gather_measurements(job: Job, measured: StageTimes, profiles: list[StageProfile]
                        ) -> tuple[StageTimes, list[StageProfile]]:
    """Every rank's stage times and re-profiled stages (``--replan``), on every rank."""
    gathered: list[Any] = [None] * job.world
    dist.all_gather_object(gathered, (measured, profiles))
    times = {s: v for item, _ in gathered for s, v in item.items()}
    return times, [p for _, ps in gathered for p in ps]


def make_report(job: Job, log: StepLog, stage_ms: StageTimes) -> Report:
    plan, mb = job.plan, job.microbatch_size
    steady = log.step_ms[max(1, math.ceil(len(log.step_ms) / 4)):] if len(log.step_ms) > 1 else log.step_ms
    measured_step = statistics.median(steady) if steady else float("nan")
    same_size = plan.microbatch_size in (None, mb)
    rows = []
    for s, st in enumerate(plan.stages):
        f, b = stage_ms.get(s, (float("nan"), float("nan")))
        predicted = st.cost.compute_ms
        rows.append(StageRow(stage=s, blocks=len(st.blocks), predicted_compute_ms=predicted if same_size else None,
                             measured_compute_ms=f + b, measured_forward_ms=f, measured_backward_ms=b,
                             error=(f + b) / predicted - 1 if same_size and predicted > 0 else None))
    replay = [dataclasses.replace(st, cost=dataclasses.replace(st.cost, forward_ms=stage_ms[s][0],
                                                               backward_ms=stage_ms[s][1]))
              if s in stage_ms else st for s, st in enumerate(plan.stages)]
    replayed = simulate_plan(dataclasses.replace(plan, stages=tuple(replay)), microbatches=plan.microbatches)
    predicted_step = plan.predicted.step_ms if same_size else None
    tokens = job.data.tokens_per_sample
    return Report(
        plan=job.cfg.plan, model=job.cfg.model, schedule=plan.schedule, microbatches=plan.microbatches,
        microbatch_size=mb, global_batch=job.global_batch, ranks=job.world, steps=len(log.step_ms),
        losses=log.losses, step_ms=log.step_ms, measured_step_ms=measured_step,
        predicted_step_ms=predicted_step, predicted_bubble_fraction=plan.predicted.bubble_fraction,
        step_error=measured_step / predicted_step - 1 if predicted_step else None,
        simulated_with_measured_stages_ms=replayed.step_ms,
        throughput_per_s=job.global_batch * tokens / (measured_step / 1e3) if measured_step > 0 else None,
        throughput_unit="tokens" if tokens > 1 else "samples", stages=rows)


def print_report(report: Report, plan_microbatch_size: int | None) -> None:
    """The per-stage table and the step line, on stderr."""
    from rich.console import Console
    from rich.table import Table

    console = Console(emoji=False, stderr=True)
    if not console.is_terminal:
        console = Console(emoji=False, stderr=True, width=120)
    table = Table(title="compute per micro-batch", title_justify="left")
    for col in ("stage", "blocks", "predicted", "measured", "error"):
        table.add_column(col, justify="right")
    for row in report.stages:
        pred, err = row.predicted_compute_ms, row.error
        table.add_row(str(row.stage), str(row.blocks), format_ms(pred) if pred is not None else "-",
                      format_ms(row.measured_compute_ms), f"{err:+.1%}" if err is not None else "-")
    console.print(table)
    line = f"step: measured {format_ms(report.measured_step_ms)}"
    if report.predicted_step_ms is not None and report.step_error is not None:
        line += f", predicted {format_ms(report.predicted_step_ms)} (error {report.step_error:+.1%}, bubble " \
                f"{report.predicted_bubble_fraction:.1%})"
    else:
        line += f" (the plan is for micro-batches of {plan_microbatch_size}, this run used {report.microbatch_size})"
    line += f"; simulated with the measured stage times {format_ms(report.simulated_with_measured_stages_ms)}"
    console.print(line, highlight=False, soft_wrap=True)
    if report.throughput_per_s:
        console.print(f"throughput {report.throughput_per_s:,.0f} {report.throughput_unit}/s", highlight=False)


def write_report(report: Report, path: str) -> None:
    """``--report``: the report as JSON, atomically (NaN written as null-free floats by ``default=float``)."""
    write_json_atomic(path, json.loads(json.dumps(report.to_dict(), default=float)))

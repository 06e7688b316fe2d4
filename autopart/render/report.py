"""A training run's report as the terminal shows it: the per-stage and per-rank tables and the step lines.

    for item in report_lines(report, plan.microbatch_size):
        console.print(item) if isinstance(item, Table) else console.print(item, highlight=False, soft_wrap=True)

Rendering only (rich objects and strings; no torch, nothing printed): the
rank that holds the results prints them (:func:`autopart.run.report.print_report`).
"""
from __future__ import annotations

import math

from rich.table import Table

from autopart.formats.report import Report
from autopart.formats.units import format_bytes, format_ms, plural

__all__ = ["report_lines"]


def _ms(value: float | None) -> str:
    return format_ms(value) if value is not None and math.isfinite(value) else "-"


def _bytes(value: int | None) -> str:
    return format_bytes(value) if value is not None else "-"


def _memory_table(report: Report) -> Table:
    """Per rank: the steps' peak memory beside the plan's (and, on CUDA, the allocator's reserved peak)."""
    reserved = any(rr.memory_reserved_bytes is not None for rr in report.ranks_detail)
    table = Table(title="per rank, peak memory in the training steps", title_justify="left")
    for col in ("rank", "measured", "(planned)", "measured/planned", *(("reserved",) if reserved else ()),
                "build peak"):
        table.add_column(col, justify="right")
    for rr in report.ranks_detail:
        table.add_row(str(rr.rank), _bytes(rr.memory_measured_bytes), _bytes(rr.memory_planned_bytes),
                      f"{rr.memory_ratio:.2f}x" if rr.memory_ratio is not None else "-",
                      *((_bytes(rr.memory_reserved_bytes),) if reserved else ()), _bytes(rr.build_peak_bytes))
    return table


def _share(value: float | None) -> str:
    return f"{value:.1%}" if value is not None and math.isfinite(value) else "-"


def _terms_table(report: Report) -> Table:
    """The step's terms on the slowest rank: predicted and measured, each with its share of its step."""
    table = Table(title=f"per term, one step of the slowest rank (rank {report.slowest_rank})", title_justify="left")
    for col in ("term", "predicted", "share", "measured", "share"):
        table.add_column(col, justify="right")
    for row in report.terms:
        table.add_row(row.term, _ms(row.predicted_ms), _share(row.predicted_share), _ms(row.measured_ms),
                      _share(row.measured_share))
    return table


def report_lines(report: Report, plan_microbatch_size: int | None) -> list[Table | str]:
    """The tables (stages, ranks, memory), then one string per line (rich markup; printed without
    highlighting, soft-wrapped)."""
    out: list[Table | str] = []
    table = Table(title="per stage, one micro-batch, timed inside the pipeline", title_justify="left")
    for col in ("stage", "rank", "blocks", "forward", "(predicted)", "backward", "(predicted)", "error"):
        table.add_column(col, justify="right")
    for row in report.stages:
        table.add_row(str(row.stage), str(row.rank), str(row.blocks), _ms(row.measured_forward_ms),
                      _ms(row.predicted_forward_ms), _ms(row.measured_backward_ms), _ms(row.predicted_backward_ms),
                      f"{row.error:+.1%}" if row.error is not None else "-")
    out.append(table)
    ranks = Table(title="per rank, one step (medians)", title_justify="left")
    for col in ("rank", "compute", "optimizer", "waiting", "(predicted idle)", "done at"):
        ranks.add_column(col, justify="right")
    for rr in report.ranks_detail:
        ranks.add_row(str(rr.rank), _ms(rr.measured_compute_ms), _ms(rr.measured_optimizer_ms),
                      _ms(rr.measured_wait_ms), _ms(rr.predicted_idle_ms), _ms(rr.measured_finish_ms))
    out.append(ranks)
    if report.terms:
        out.append(_terms_table(report))
    out.append(_memory_table(report))
    low, high = report.measured_step_spread_ms
    line = (f"step (slowest rank, rank {report.slowest_rank}): measured {format_ms(report.measured_step_ms)} "
            f"(median of {plural(report.steady_steps, 'step')}, "
            f"{format_ms(low)}-{format_ms(high)})")
    if report.predicted_step_ms is not None and report.step_error is not None:
        line += f", predicted {format_ms(report.predicted_step_ms)} (error {report.step_error:+.1%}, bubble " \
                f"{report.predicted_bubble_fraction:.1%})"
    else:
        line += f" (the plan is for micro-batches of {plan_microbatch_size}, this run used {report.microbatch_size})"
    line += f"; simulated with the measured stage times {format_ms(report.simulated_with_measured_stages_ms)}"
    out.append(line)
    if report.measured_speed is not None:
        flag = (f"--devices-per-node NxMEMORY@{report.measured_speed:.2f}" if report.data_parallel > 1
                else f"--devices {report.ranks}xMEMORY@{report.measured_speed:.2f}")
        out.append(f"compute in the pipeline ran at {report.measured_speed:.2f}x the profile's speed "
                   f"(plan with {flag} to predict this machine as it ran)")
    if report.unexplained_ms > 0:
        overhead = report.action_ms + report.unexplained_ms
        out.append(f"unexplained: {format_ms(report.unexplained_ms)} per forward or backward action (what the "
                   f"measured terms leave; the plan's action cost is {format_ms(report.action_ms)}: plan with "
                   f"--overhead {overhead:.3g}ms to predict this machine as it ran)")
    if report.throughput_per_s:
        out.append(f"throughput {report.throughput_per_s:,.0f} {report.throughput_unit}/s")
    out.append(f"memory per rank: {report.memory_method}")
    if report.data_parallel > 1:
        out.append(f"data parallel: {report.data_parallel} replicas of this pipeline; the rows are replica 0's "
                   f"ranks (memory: the most any replica's rank used), the losses the mean over the replicas")
    return out

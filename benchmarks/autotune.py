"""Does the planner pick what trains fastest? Every schedule x micro-batch count, predicted and measured.

    python benchmarks/autotune.py [--model gpt2-mini] [--global-batch 8] [--rounds 3] [--steps 5]

Real ``autopart profile / partition / train`` runs: 2 CPU ranks with 1
thread each (gloo), the model profiled with 1 thread at every micro-batch
size the sweep uses. The sweep is what ``--schedule auto --microbatches auto``
searches on 2 ranks: GPipe, 1F1B, Interleaved1F1B (2 stages per rank) and
ZBVZeroBubble with 2, 4 and 8 micro-batches, each with its step-optimal split
(the exact search's fastest predicted split: ``--method exact``'s plan, or its
runner-up when the choice preferred a more balanced split within the noise
band) and, where it differs, its bottleneck-optimal split
(``--method bottleneck``).

Calibration: one run that is not in the sweep (1F1B, 2 micro-batches, the
uniform split) measures how fast the blocks run inside the pipeline against
the profile ("compute ran at 0.7x the profile's speed": two ranks on two
cores share one memory system) from ``autopart train``'s report. The
runtime's own time per action is the profile's measured ``action_ms`` when it
has one (then ``partition`` prices it itself), else the calibration run's
fitted "runtime overhead" (``--overhead T``); the table's title says which.
Every point is then planned and predicted with them (``--devices
2x24GiB@SPEED``), the planner's own choice included (``--schedule auto
--microbatches auto``). Predictions from the profile alone, for the same
splits, are reported too.

Each point is trained ``--rounds`` times, the rounds interleaved (every point
once, then every point again) so that drifts of the machine spread over all
points; a run's step is the median of its steady steps (all but the first
quarter), the slowest rank's. The table gives the median of the rounds and
their spread ((max - min) / median).

Targets (issue #10): the planner's choice within 3% of the best measured
step; every prediction within 10% of its measurement; the predicted ranking
agrees with the measured one (Spearman >= 0.9). Issue #21 adds a summary
(:func:`error_summary`, also in the results JSON): the mean |error| of the
step-optimal points against the bottleneck points and their difference in
points (target: within 5), the planner's choice against the best measured
point (target: within 5%), and whether every prediction is within 15%.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, cli, report  # noqa: E402

from autopart.core.costmodel import CostModel  # noqa: E402
from autopart.core.search import plan_search, score_balance  # noqa: E402
from autopart.formats.atomic import write_atomic  # noqa: E402
from autopart.formats.devices import Device, parse_devices  # noqa: E402
from autopart.formats.plan import Plan  # noqa: E402
from autopart.formats.profile import Profile  # noqa: E402

SCHEDULES = ("GPipe", "1F1B", "Interleaved1F1B", "ZBVZeroBubble")


@dataclass
class Point:
    schedule: str
    microbatches: int
    method: str
    plan: Path
    balance: list[int]
    predicted_ms: float = 0.0
    """With the calibrated overhead."""
    predicted_raw_ms: float = 0.0
    """From the profile alone."""
    measured_ms: tuple[float, ...] = ()
    bottleneck_too: bool = False
    """A step-optimal split that is also the bottleneck-optimal one (it counts in both groups of the summary)."""

    @property
    def label(self) -> str:
        return f"{self.schedule} M={self.microbatches} {self.method}"

    @property
    def median_ms(self) -> float:
        return statistics.median(self.measured_ms)


def _plan(profile: Path, out: Path, work: Path, *flags: str) -> dict[str, object]:
    cli("partition", str(profile), "--stages", "2", "-o", str(out), *flags, cwd=work)
    return dict(json.loads(out.read_text()))


def _predict(plan: Path, work: Path) -> float:
    return float(json.loads(cli("simulate", str(plan), "--json", cwd=work).stdout)["step_ms"])


def _predict_raw(profile: Path, point: Point, global_batch: int) -> float:
    """The same split, priced from the profile's block times alone: speed 1 and no cost per action (neither a fitted
    overhead nor the profile's measured ``action_ms``: ``overhead_ms=0.0`` turns it off)."""
    raw = Profile.from_json(str(profile))
    devices = [Device("cpu")] * 2
    per_rank = 2 if point.schedule in ("Interleaved1F1B", "ZBVZeroBubble") else 1
    model = CostModel(schedule=point.schedule, microbatches=point.microbatches, stages_per_rank=per_rank,
                      overhead_ms=0.0)
    plan = plan_search(raw, devices, model, global_batch=global_batch)
    return score_balance(raw, devices, plan, point.balance).predicted.step_ms


def _train(plan: Path, model: str, steps: int, global_batch: int, work: Path) -> dict[str, object]:
    out = work / "report.json"
    cli("train", str(plan), "--model", model, "--steps", str(steps), "--threads", "1", "--global-batch",
        str(global_batch), "--report", str(out), cwd=work)
    return dict(json.loads(out.read_text()))


def action_cost(profile: Profile, fitted_overhead_ms: float) -> tuple[list[str], str]:
    """The ``partition`` flags for the runtime's cost per action, and what the table's title says of it: the
    profile's measured ``action_ms`` when it has one (``partition`` then prices it itself), else the
    calibration run's fitted overhead."""
    action_ms = float(getattr(profile, "action_ms", 0.0) or 0.0)
    if action_ms > 0:
        return [], f"the profile's measured action cost, {action_ms:.2f} ms"
    return ["--overhead", f"{fitted_overhead_ms:.4f}ms"], f"a fitted overhead of {fitted_overhead_ms:.2f} ms per action"


def step_optimal_balance(plan: Plan) -> list[int]:
    """The fastest predicted split of the plan's one (schedule, M): its own, or its runner-up when the choice
    preferred a more balanced split within the noise band (``predicted.margin`` < 0)."""
    margin = plan.predicted.margin
    if margin is not None and margin < 0 and plan.runners_up:
        return list(plan.runners_up[0].balance)
    return list(plan.balance)


def _points(profile: Path, work: Path, global_batch: int, calibrated: list[str], speed: float) -> list[Point]:
    points: list[Point] = []
    raw = Profile.from_json(str(profile))
    devices = parse_devices(f"2x24GiB@{speed:.4f}")
    for schedule in SCHEDULES:
        for m in (2, 4, 8):
            flags = ("--schedule", schedule, "--microbatches", str(m), "--global-batch", str(global_batch))
            exact = work / f"{schedule}-{m}-exact.json"
            _plan(profile, exact, work, *flags, "--method", "exact", *calibrated)
            chosen = Plan.from_json(exact)
            fastest = step_optimal_balance(chosen)
            if fastest != list(chosen.balance):  # the split the step-optimal search found, planned as such
                score_balance(raw, devices, chosen, fastest).to_json(exact)
            out = work / f"{schedule}-{m}-bottleneck.json"
            _plan(profile, out, work, *flags, "--method", "bottleneck", *calibrated)
            balance = list(Plan.from_json(out).balance)
            points.append(Point(schedule, m, "exact", exact, fastest, bottleneck_too=balance == fastest))
            if balance != fastest:
                points.append(Point(schedule, m, "bottleneck", out, balance))
    return points


def _svg(points: list[Point]) -> str:
    """Predicted (with overhead) against measured step, one dot per point, the diagonal for reference."""
    size, pad = 520, 60
    values = [p.predicted_ms for p in points] + [p.median_ms for p in points]
    low, high = min(values) * 0.95, max(values) * 1.05

    def xy(predicted: float, measured: float) -> tuple[float, float]:
        return (pad + (measured - low) / (high - low) * (size - 2 * pad),
                size - pad - (predicted - low) / (high - low) * (size - 2 * pad))
    colour = {"GPipe": "#4C78A8", "1F1B": "#54A24B", "Interleaved1F1B": "#B279A2", "ZBVZeroBubble": "#F58518"}
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{size + 170}" height="{size}" font-family="sans-serif" '
             f'font-size="11">', '<rect width="100%" height="100%" fill="white"/>']
    x0, y0 = xy(low, low)
    x1, y1 = xy(high, high)
    parts.append(f'<line x1="{x0}" y1="{y0}" x2="{x1}" y2="{y1}" stroke="#999" stroke-dasharray="4 3"/>')
    for p in points:
        x, y = xy(p.predicted_ms, p.median_ms)
        shape = "circle" if p.method == "exact" else "rect"
        if shape == "circle":
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{colour[p.schedule]}"><title>{p.label}: '
                         f'predicted {p.predicted_ms:.0f} ms, measured {p.median_ms:.0f} ms</title></circle>')
        else:
            parts.append(f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="none" '
                         f'stroke="{colour[p.schedule]}" stroke-width="2"><title>{p.label}</title></rect>')
    for i in range(6):
        v = low + (high - low) * i / 5
        x, _ = xy(low, v)
        _, y = xy(v, low)
        parts.append(f'<text x="{x:.1f}" y="{size - pad + 16}" text-anchor="middle">{v:.0f}</text>')
        parts.append(f'<text x="{pad - 6}" y="{y + 4:.1f}" text-anchor="end">{v:.0f}</text>')
    parts.append(f'<text x="{size / 2}" y="{size - 14}" text-anchor="middle">measured step (ms)</text>')
    parts.append(f'<text x="14" y="{size / 2}" transform="rotate(-90 14 {size / 2})" text-anchor="middle">'
                 f'predicted step (ms)</text>')
    for i, (name, fill) in enumerate(colour.items()):
        parts.append(f'<circle cx="{size + 10}" cy="{pad + 18 * i}" r="5" fill="{fill}"/>')
        parts.append(f'<text x="{size + 20}" y="{pad + 4 + 18 * i}">{name}</text>')
    parts.append(f'<text x="{size + 4}" y="{pad + 18 * 4 + 4}">● exact  □ bottleneck</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2-mini")
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        profile = work / "profile.json"
        print(f"profiling {args.model} with 1 thread at micro-batches of 1, 2, 4, 8 ...", flush=True)
        cli("profile", args.model, "--microbatch-size", "1,2,4,8", "--threads", "1", "-o", str(profile), cwd=work)
        calibration = work / "calibration.json"
        _plan(profile, calibration, work, "--schedule", "1F1B", "--microbatches", "2", "--global-batch",
              str(args.global_batch), "--method", "uniform")
        measured = _train(calibration, args.model, args.steps, args.global_batch, work)
        overhead, speed = float(measured["fitted_overhead_ms"]), float(measured["measured_speed"])  # type: ignore[arg-type]
        action_flags, action = action_cost(Profile.from_json(str(profile)), overhead)
        print(f"calibration run: compute at {speed:.3f}x the profile's speed, fitted runtime overhead "
              f"{overhead:.2f} ms per action; predicting with {action}", flush=True)
        calibrated = ["--devices", f"2x24GiB@{speed:.4f}", *action_flags]
        points = _points(profile, work, args.global_batch, calibrated, speed)
        chosen = _plan(profile, work / "chosen.json", work, "--schedule", "auto", "--microbatches", "auto",
                       "--global-batch", str(args.global_batch), *calibrated)
        balance = [len(st["blocks"]) for st in chosen["stages"]]  # type: ignore[index, union-attr]
        if not any(p.schedule == chosen["schedule"] and p.microbatches == chosen["microbatches"]
                   and p.balance == balance for p in points):
            points.append(Point(str(chosen["schedule"]), int(chosen["microbatches"]), "planner",  # type: ignore[arg-type]
                                work / "chosen.json", balance))
        for p in points:
            p.predicted_ms = _predict(p.plan, work)
            p.predicted_raw_ms = _predict_raw(profile, p, args.global_batch)
        for r in range(args.rounds):
            for p in points:
                done = _train(p.plan, args.model, args.steps, args.global_batch, work)
                p.measured_ms += (float(done["measured_step_ms"]),)  # type: ignore[arg-type]
                print(f"round {r + 1}/{args.rounds}  {p.label:<32} {p.measured_ms[-1]:8.0f} ms  "
                      f"(predicted {p.predicted_ms:.0f})", flush=True)
    _summarise(points, chosen, overhead, speed, action, args)


def error_summary(points: list[Point], pick: Point | None) -> dict[str, object]:
    """Issue 21's targets: mean |error| of the step-optimal points and of the bottleneck points (a point that is
    both counts in both) and their difference in points (target: within 5); the planner's choice against the
    best measured point (target: within 5%); whether every prediction is within 15%."""
    def mean_abs(group: list[Point]) -> float | None:
        return statistics.mean(abs(p.predicted_ms / p.median_ms - 1) for p in group) if group else None

    exact = mean_abs([p for p in points if p.method == "exact"])
    bottleneck = mean_abs([p for p in points if p.method == "bottleneck" or p.bottleneck_too])
    gap = (exact - bottleneck) * 100 if exact is not None and bottleneck is not None else None
    best = min(points, key=lambda p: p.median_ms)
    vs_best = pick.median_ms / best.median_ms - 1 if pick is not None else None
    within = sum(abs(p.predicted_ms / p.median_ms - 1) <= 0.15 for p in points)
    return {"mean_abs_error_exact": exact, "mean_abs_error_bottleneck": bottleneck, "error_gap_points": gap,
            "error_gap_within_5_points": gap is not None and abs(gap) <= 5,
            "planner_vs_best_measured": vs_best, "planner_within_5pct": vs_best is not None and vs_best <= 0.05,
            "predictions_within_15pct": f"{within}/{len(points)}",
            "every_prediction_within_15pct": within == len(points)}


def summary_line(summary: dict[str, object]) -> str:
    """:func:`error_summary`'s numbers in one line, for the console and the docs."""
    def pct(key: str) -> str:
        value = summary[key]
        return f"{value:.1%}" if isinstance(value, float) else "-"

    gap = summary["error_gap_points"]
    gap_text = f"{gap:+.1f} points apart (target: within 5)" if isinstance(gap, float) else "- points apart"
    return (f"mean |error|: step-optimal {pct('mean_abs_error_exact')}, bottleneck "
            f"{pct('mean_abs_error_bottleneck')}: {gap_text}; the planner's choice {pct('planner_vs_best_measured')} "
            f"from the best measured (target: 5%); predictions within 15%: {summary['predictions_within_15pct']}")


def _summarise(points: list[Point], chosen: dict[str, object], overhead: float, speed: float, action: str,
               args: argparse.Namespace) -> None:
    best = min(points, key=lambda p: p.median_ms)
    chosen_balance = [len(st["blocks"]) for st in chosen["stages"]]  # type: ignore[index, union-attr]
    pick = next((p for p in points if p.schedule == chosen["schedule"] and p.microbatches == chosen["microbatches"]
                 and p.balance == chosen_balance), None)
    rho = float(spearmanr([p.predicted_ms for p in points], [p.median_ms for p in points]).statistic)
    rho_raw = float(spearmanr([p.predicted_raw_ms for p in points], [p.median_ms for p in points]).statistic)
    rows = []
    for p in sorted(points, key=lambda q: q.median_ms):
        spread = (max(p.measured_ms) - min(p.measured_ms)) / p.median_ms
        rows.append([p.label + (" ← planner" if p is pick else ""), str(p.balance), f"{p.predicted_raw_ms:.0f}",
                     f"{p.predicted_ms:.0f}", f"{p.median_ms:.0f}", f"{spread:.1%}",
                     f"{p.predicted_ms / p.median_ms - 1:+.1%}", f"{p.median_ms / best.median_ms - 1:+.1%}"])
    within = sum(abs(p.predicted_ms / p.median_ms - 1) <= 0.10 for p in points)
    issue21 = error_summary(points, pick)
    summary = {
        "overhead_ms": overhead, "action_cost": action, "speed": speed, "spearman": rho,
        "spearman_without_overhead": rho_raw, "predictions_within_10pct": f"{within}/{len(points)}",
        "planner_choice": f"{chosen['schedule']} M={chosen['microbatches']} {chosen_balance}",
        "best_measured": best.label, "model": args.model, "global_batch": args.global_batch,
        "rounds": args.rounds, "steps": args.steps, **issue21, "summary": summary_line(issue21)}
    report("autotune", f"{args.model}, 2 CPU ranks x 1 thread, global batch {args.global_batch}: predicted "
           f"(profile only; calibrated: {speed:.2f}x speed, {action}) against measured step, "
           f"{args.rounds} rounds", ["point", "balance", "predicted raw ms", "predicted ms", "measured ms",
                                     "spread", "error", "vs best"], rows, extra=summary)
    picture = _svg(points)
    write_atomic(RESULTS / "autotune.svg", lambda handle: handle.write(picture.encode()))
    for key, value in summary.items():
        print(f"{key}: {value}")


if __name__ == "__main__":
    main()

"""A plan checked on one GPU: profiles under bf16-mixed, `autopart check` of a 4-stage plan, one training step.

    python benchmarks/gpu_check.py                          # one GPU, under 8 minutes: gpt2-medium and a 1B Llama
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gc   # the same steps, one tiny Llama (tested)

For each model, real `autopart` commands (subprocesses, as a user runs them):

1. `autopart profile MODEL --precision bf16-mixed --device DEVICE`, written to
   `profiles/MODEL-DEVICE-mbB-PRECISION.json` (under `--out` with `--tiny`);
2. `autopart partition --stages 4` (1F1B) and `autopart check` of that plan on
   the one device: each stage's measured peak memory against the plan's, its
   forward and backward times against the profile's;
3. `autopart partition --stages 1` and `autopart train` of it on one rank:
   the measured step time and peak memory against the plan's prediction.

The results go to `benchmarks/results/gpu_check.json` and `.md` (under `--out`
with `--tiny`, so a test leaves the checkout alone). The 1B Llama is
`hf:llama` at Llama 3.2 1B's shape (16 layers, width 2048, MLP 8192, 32 heads,
8 key-value heads) with LlamaConfig's 32000-word vocabulary: 1.1 B parameters.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from autopart.formats.atomic import write_atomic, write_json_atomic  # noqa: E402
from autopart.formats.units import format_bytes  # noqa: E402

PRECISION = "bf16-mixed"


@dataclass(frozen=True)
class Model:
    label: str
    """The profile file's MODEL part."""
    spec: str
    microbatch_size: int
    input_shape: str | None = None
    """``--input-shape`` for the profile (the tiny runs shorten the sequence); None: the model's own."""


LLAMA_1B = ("hf:llama:num_hidden_layers=16,hidden_size=2048,intermediate_size=8192,num_attention_heads=32,"
            "num_key_value_heads=8")
FULL = (Model("gpt2-medium", "gpt2-medium", 4), Model("llama-1b", LLAMA_1B, 4))
TINY = (Model("llama-tiny", "hf:llama:num_hidden_layers=4,hidden_size=64,intermediate_size=128,"
                            "num_attention_heads=4,num_key_value_heads=2,vocab_size=256", 2, "2,32"),)
"""The tiny run's one model: every command runs for each model alike, so one runs them all; the ``hf:`` Llama is
the full run's riskier kind (a built-in model's bf16-mixed profile and check are tested elsewhere), and small
where gpt2-tiny (the tiny run's other model until issue 21) carries a 50257-word embedding and head (25 MB each)."""
STAGES = 4
MICROBATCHES = 4
DATA = ROOT / "autopart"
"""The text both `check` and `train` read (this package's sources, some 1 MB): on CPU every rank holds its
corpus, which the default (Python's standard library, tens of MB) would make most of a tiny model's peak."""


@dataclass(frozen=True)
class Effort:
    """How long each command measures: the real run's, or the tiny test's (fewer repeats and steps)."""

    profile: tuple[str, ...]
    check_steps: int
    train_steps: int


REAL = Effort(("--repeats", "5", "--warmup", "2"), check_steps=2, train_steps=4)
QUICK = Effort(("--repeats", "1", "--warmup", "1"), check_steps=1, train_steps=2)


def autopart(*args: str, cwd: Path, allowed: Sequence[int] = (0,)) -> subprocess.CompletedProcess[str]:
    """``autopart ARGS`` as a user runs it (this checkout first on the path); stop on an exit code not allowed."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "autopart", *args], cwd=cwd, env=env, text=True,
                            capture_output=True)
    print(f"  autopart {' '.join(args[:2])} ... ({time.perf_counter() - started:.0f} s)", flush=True)
    if result.returncode not in allowed:
        raise SystemExit(f"autopart {' '.join(args)} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return result


def check_model(model: Model, device: str, profiles: Path, work: Path, threads: list[str], effort: Effort
                ) -> tuple[list[list[Any]], list[Any], dict[str, Any]]:
    """Profile, check a 4-stage plan, train a 1-stage plan: the check's rows, the training row, raw results."""
    print(f"{model.label} ({model.spec})", flush=True)
    profile = profiles / f"{model.label}-{device}-mb{model.microbatch_size}-{PRECISION}.json"
    shape = ["--input-shape", model.input_shape] if model.input_shape else []
    autopart("profile", model.spec, "--device", device, "--precision", PRECISION, "--microbatch-size",
             str(model.microbatch_size), *shape, *effort.profile, *threads, "-o", str(profile), cwd=work)
    plan4, checked = work / f"{model.label}-plan4.json", work / f"{model.label}-check.json"
    autopart("partition", str(profile), "--stages", str(STAGES), "--schedule", "1F1B", "--microbatches",
             str(MICROBATCHES), "-o", str(plan4), cwd=work)
    data = ["--data", str(DATA)]
    autopart("check", str(plan4), "--model", model.spec, "--device", device, "--steps", str(effort.check_steps),
             *data, *threads, "-o", str(checked), cwd=work, allowed=(0, 1))
    check = json.loads(checked.read_text())
    rows = [[model.label, s["stage"], len(s["blocks"]), s["in_flight"], _size(s["measured_bytes"]),
             _size(s["planned_bytes"]), _error(s["measured_bytes"], s["planned_bytes"]),
             f"{s['forward_ms']:.3g} / {s['planned_forward_ms']:.3g}",
             f"{s['backward_ms']:.3g} / {s['planned_backward_ms']:.3g}", s["verdict"]] for s in check["stages"]]
    plan1, report = work / f"{model.label}-plan1.json", work / f"{model.label}-train.json"
    autopart("partition", str(profile), "--stages", "1", "--microbatches", str(MICROBATCHES), "-o", str(plan1),
             cwd=work)
    autopart("train", str(plan1), "--model", model.spec, "--device", device, "--steps", str(effort.train_steps),
             *data, *threads, "--report", str(report), cwd=work)
    trained = json.loads(report.read_text())
    planned = json.loads(plan1.read_text())["stages"][0]["memory_bytes"]
    measured = _rank_memory(trained)
    train_row = [model.label, f"{trained['measured_step_ms']:.4g}", f"{trained['predicted_step_ms']:.4g}",
                 f"{trained['step_error']:+.1%}" if trained.get("step_error") is not None else "-",
                 _size(measured), _size(planned), _error(measured, planned)]
    return rows, train_row, {"profile": str(profile), "check": check, "train": trained}


def _rank_memory(report: dict[str, Any]) -> int | None:
    """Rank 0's measured peak memory in a train report (None where the report has none)."""
    for rank in report.get("ranks_detail", []):
        if rank.get("rank") == 0 and rank.get("memory_measured_bytes") is not None:
            return int(rank["memory_measured_bytes"])
    return None


def _size(n: int | None) -> str:
    return "-" if n is None else format_bytes(n)


def _error(measured: int | None, planned: int) -> str:
    return "-" if measured is None or not planned else f"{measured / planned - 1:+.1%}"


CHECK_COLUMNS = ["model", "stage", "blocks", "in flight", "peak memory", "planned", "error", "forward ms / plan",
                 "backward ms / plan", "verdict"]
TRAIN_COLUMNS = ["model", "step ms", "predicted ms", "error", "peak memory", "planned", "error"]


def _markdown(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = [f"### {title}", "", "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _print(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, justify="left" if col in ("model", "verdict") else "right")
    for row in rows:
        table.add_row(*[str(v) for v in row])
    Console(width=160).print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="one 4-layer Llama 64 wide, short sequences")
    parser.add_argument("--out", type=Path, help="write results and profiles here (with --tiny: required)")
    parser.add_argument("--threads", type=int, help="CPU threads for every command (CPU only)")
    args = parser.parse_args(argv)
    if args.tiny and args.out is None:
        parser.error("--tiny writes under --out DIR (the checkout's profiles/ and results/ are for real runs)")
    out = args.out.resolve() if args.out else None
    results = out if out else ROOT / "benchmarks" / "results"
    profiles = out / "profiles" if out else ROOT / "profiles"
    work = (out or results) / "gpu_check-work"
    for folder in (results, profiles, work):
        folder.mkdir(parents=True, exist_ok=True)
    threads = ["--threads", str(args.threads)] if args.threads else []
    effort = QUICK if args.tiny else REAL
    started = time.perf_counter()
    check_rows: list[list[Any]] = []
    train_rows: list[Any] = []
    raw = {}
    for model in TINY if args.tiny else FULL:
        rows, train_row, raw[model.label] = check_model(model, args.device, profiles, work, threads, effort)
        check_rows += rows
        train_rows.append(train_row)
    elapsed = time.perf_counter() - started
    device = raw[next(iter(raw))]["check"]["device"]
    title = f"autopart check of a {STAGES}-stage 1F1B plan, {MICROBATCHES} micro-batches, {PRECISION}, on {device}"
    train_title = (f"one rank trains a 1-stage plan ({effort.train_steps} steps, median of the steady ones), "
                   f"{PRECISION}, on {device}")
    _print(title, CHECK_COLUMNS, check_rows)
    _print(train_title, TRAIN_COLUMNS, train_rows)
    print(f"{elapsed:.0f} s in all", flush=True)
    markdown = (_markdown(title, CHECK_COLUMNS, check_rows) + "\n" + _markdown(train_title, TRAIN_COLUMNS, train_rows)
                + f"\n{elapsed:.0f} s in all, {time.strftime('%Y-%m-%d')}.\n")
    write_atomic(results / "gpu_check.md", markdown.encode())
    write_json_atomic(results / "gpu_check.json", {
        "benchmark": "gpu_check", "device": device, "precision": PRECISION, "tiny": args.tiny, "seconds": elapsed,
        "date": time.strftime("%Y-%m-%d"), "check": {"columns": CHECK_COLUMNS, "rows": check_rows},
        "train": {"columns": TRAIN_COLUMNS, "rows": train_rows}, "models": raw})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

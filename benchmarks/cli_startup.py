"""How long the planning command takes from start to exit: the start-up a user feels.

    python benchmarks/cli_startup.py [--runs 15] [--compare OTHER_CHECKOUT]

Times ``autopart partition PROFILE --stages 4 --format balance`` (the
installed console script and ``python -m autopart``) and ``autopart simulate``
as whole processes, after one untimed run; median, min and max of ``--runs``.
``--compare DIR`` also times ``python -m autopart`` from another checkout (an
older commit) on the same machine. Target (issue #8, 2-core CPU): under 0.4 s
for the partition command, which needs numpy only, never torch.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROFILE = ROOT / "profiles" / "gpt2-small-cpu-mb1.json"


def timed(cmd: list[str], cwd: Path, runs: int) -> list[float]:
    env = dict(os.environ, PYTHONPATH=str(cwd))
    subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)  # warm the file cache
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(cmd, cwd=cwd, env=env, check=True, capture_output=True)
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--compare", metavar="DIR", help="another autopart checkout to time the same way")
    args = parser.parse_args()
    plan = Path(tempfile.mkdtemp()) / "plan.json"
    partition = ["partition", str(PROFILE), "--stages", "4", "--format", "balance"]
    subprocess.run([sys.executable, "-m", "autopart", *partition, "-o", str(plan)], cwd=ROOT, check=True,
                   capture_output=True)
    script = shutil.which("autopart") or str(Path(sys.executable).parent / "autopart")
    cases = [("autopart partition ... --format balance", [script, *partition], ROOT),
             ("python -m autopart partition ... --format balance", [sys.executable, "-m", "autopart", *partition], ROOT),
             ("python -m autopart simulate plan.json --json", [sys.executable, "-m", "autopart", "simulate", str(plan),
                                                              "--json"], ROOT),
             ("python -c 'import torch' (for scale)", [sys.executable, "-c", "import torch"], ROOT)]
    if args.compare:
        cases.append((f"python -m autopart partition ... ({args.compare})",
                      [sys.executable, "-m", "autopart", *partition], Path(args.compare).resolve()))
    rows = []
    for label, cmd, cwd in cases:
        times = timed(cmd, cwd, args.runs)
        rows.append([label, round(statistics.median(times), 3), round(min(times), 3), round(max(times), 3)])
    report("cli_startup", f"whole-process wall time, {args.runs} runs after one warm-up (seconds)",
           ["command", "median s", "min s", "max s"], rows, {"target_s": 0.4})


if __name__ == "__main__":
    main()

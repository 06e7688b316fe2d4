"""Shared by the benchmark scripts: where results go, and how a table is printed."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from rich.console import Console
from rich.table import Table

from autopart.formats.atomic import write_atomic, write_json_atomic

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``autopart ARGS`` as a user would (this checkout first on the path); stop on failure."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "autopart", *args], cwd=cwd, env=env, text=True,
                            capture_output=True)
    if result.returncode:
        raise SystemExit(f"autopart {' '.join(args)} failed:\n{result.stderr[-2000:]}")
    return result


def machine() -> dict[str, Any]:
    import os

    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d")}


def report(name: str, title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]],
           extra: dict[str, Any] | None = None) -> Path:
    """Print ``rows`` as a table; write them with the machine to results/NAME.json, and as markdown to NAME.md."""
    table = Table(title=title, title_justify="left")
    for col in columns:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*[f"{v:.3g}" if isinstance(v, float) else str(v) for v in row])
    Console(width=max(Console().width, 140)).print(table)
    RESULTS.mkdir(exist_ok=True)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row) + " |" for row in rows]
    markdown = "\n".join(lines) + "\n"
    write_atomic(RESULTS / f"{name}.md", lambda handle: handle.write(markdown.encode()))
    data = {"benchmark": name, "machine": machine(), "columns": list(columns),
            "rows": [list(r) for r in rows], **(extra or {})}
    return write_json_atomic(RESULTS / f"{name}.json", json.loads(json.dumps(data, default=str)))

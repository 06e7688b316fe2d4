"""benchmarks/gpu_check.py at a tiny size on CPU: every step it runs on a GPU, with the files it writes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, text=True, capture_output=True,
                          timeout=600)


def test_tiny_needs_a_folder_of_its_own() -> None:
    result = _run("--tiny", "--device", "cpu")
    assert result.returncode == 2 and "--tiny writes under --out DIR" in result.stderr


@pytest.mark.slow
def test_tiny_run_on_cpu_writes_results_and_profiles(tmp_path: Path) -> None:
    results = ROOT / "benchmarks" / "results" / "gpu_check.json"
    before = results.stat().st_mtime_ns if results.exists() else None
    result = _run("--device", "cpu", "--tiny", "--out", str(tmp_path), "--threads", "1")
    assert result.returncode == 0, result.stderr[-3000:] + result.stdout[-3000:]
    assert (results.stat().st_mtime_ns if results.exists() else None) == before  # the checkout's is left alone
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["precision"] == "bf16-mixed" and data["device"] == "cpu" and data["tiny"] is True
    models = [row[0] for row in data["check"]["rows"]]
    assert models == ["llama-tiny"] * 4  # a row per stage of the 4-stage plan
    assert [row[0] for row in data["train"]["rows"]] == ["llama-tiny"]
    for label in ("llama-tiny",):
        profile = json.loads((tmp_path / "profiles" / f"{label}-cpu-mb2-bf16-mixed.json").read_text())
        assert profile["precision"] == "bf16-mixed"
        run = data["models"][label]
        assert [s["in_flight"] for s in run["check"]["stages"]] == [4, 3, 2, 1]  # 1F1B's, stage by stage
        assert all(s["measured_bytes"] is not None for s in run["check"]["stages"])
        assert run["train"]["measured_step_ms"] > 0 and run["train"]["ranks"] == 1
    markdown = (tmp_path / "gpu_check.md").read_text()
    assert "| llama-tiny | 3 |" in markdown and "one rank trains a 1-stage plan" in markdown

"""Several machines, tested on one: two torchrun agents as two nodes (one rank each) over c10d on 127.0.0.1."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli, run_cli_here, run_two_agents

TINY = str(ROOT / "profiles" / "gpt2-tiny-cpu-mb4.json")


@pytest.mark.slow
def test_two_nodes_train_the_same_losses_as_one_launcher(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    made = run_cli_here("partition", TINY, "--stages", "2", "--microbatches", "2", "-o", str(plan))
    assert made.returncode == 0, made.stderr
    single = run_cli("train", str(plan), "--model", "gpt2-tiny", "--steps", "2", "--report", str(tmp_path / "one.json"))
    assert single.returncode == 0, single.stderr[-2000:]

    results = run_two_agents(tmp_path, 1, "train", str(plan), "--model", "gpt2-tiny", "--steps", "2")
    for code, _, err in results:
        assert code == 0, err[-3000:]
    reports = [tmp_path / f"node{n}.json" for n in range(2) if (tmp_path / f"node{n}.json").exists()]
    assert len(reports) == 1  # written by the rank of the last stage, on whichever node it ran
    two = json.loads(reports[0].read_text())["losses"]
    one = json.loads((tmp_path / "one.json").read_text())["losses"]
    assert len(two) == len(one) == 2
    assert two == pytest.approx(one, rel=1e-6, abs=1e-6)

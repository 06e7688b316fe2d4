"""`autopart simulate` and the joint search of `autopart partition`, as a user runs them."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.conftest import ROOT, assert_one_line_error, run_cli, run_cli_here

GPT2 = str(ROOT / "profiles" / "gpt2-small-cpu-mb1.json")


@pytest.fixture(scope="module")
def plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("plan") / "plan.json"
    result = run_cli("partition", GPT2, "--stages", "4", "--global-batch", "64", "--microbatches", "auto",
                     "--schedule", "auto", "--memory-limit", "8GiB", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "runners-up" in result.stdout and "predicted step" in result.stdout and "balance: [" in result.stdout
    return out


def test_joint_search_records_winner_and_runners_up(plan: Path) -> None:
    data = json.loads(plan.read_text())
    assert 64 % data["microbatches"] == 0 and data["microbatch_size"] * data["microbatches"] == 64
    assert len(data["runners_up"]) == 5
    assert all(r["step_ms"] >= data["predicted"]["step_ms"] for r in data["runners_up"])


def test_simulate_prints_timeline_and_writes_svg(plan: Path, tmp_path: Path) -> None:
    svg = tmp_path / "step.svg"
    result = run_cli("simulate", str(plan), "--svg", str(svg), "--csv", str(tmp_path / "s.csv"))
    assert result.returncode == 0, result.stderr
    assert "rank 0" in result.stdout and "idle" in result.stdout and "peak memory" in result.stdout
    root = ET.parse(svg).getroot()
    assert root.tag.endswith("svg") and len(root.findall("{http://www.w3.org/2000/svg}rect")) > 10
    assert (tmp_path / "s.csv").read_text().count("\n") == json.loads(plan.read_text())["stages"].__len__() // \
        json.loads(plan.read_text())["stages_per_rank"]


def test_simulate_json_and_overrides(plan: Path) -> None:
    """The plan's own stages under GPipe with 8 micro-batches: its step has a closed form (test_fastest),
    ΣF' + 7 max F' + max_s [Σ_{t>=s} B' + 7 max_{t>=s} B' + opt_s], and GPipe holds all 8 in flight."""
    data = json.loads(plan.read_text())
    assert (data["schedule"], data["microbatches"], data["stages_per_rank"]) != ("GPipe", 8, 1)  # overrides show
    result = run_cli("simulate", str(plan), "--json", "--microbatches", "8", "--schedule", "gpipe")
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    stages = data["stages"]
    k, m = len(stages), 8
    assert all(st["overhead_ms"] == 0.0 for st in stages)  # the closed form has no cost per action
    f = [st["forward_ms"] + (st["send_forward_ms"] if s < k - 1 else 0.0) for s, st in enumerate(stages)]
    b = [st["backward_ms"] + (st["send_backward_ms"] if s > 0 else 0.0) for s, st in enumerate(stages)]
    step_ms = sum(f) + (m - 1) * max(f) + max(sum(b[s:]) + (m - 1) * max(b[s:]) + stages[s]["optimizer_ms"]
                                              for s in range(k))
    assert (got["schedule"], got["num_ranks"], got["microbatches"]) == ("GPipe", k, m)
    assert got["step_ms"] == pytest.approx(step_ms, rel=1e-9)
    assert got["peak_in_flight"] == [m] * k
    # the first backward starts with every micro-batch in flight and adds its gradients (backward_extra_bytes)
    assert got["peak_activation_bytes"] == [m * st["activation_bytes"] + st["backward_extra_bytes"] for st in stages]
    own = json.loads(run_cli("simulate", str(plan), "--json").stdout)  # no overrides: the plan's own
    assert (own["schedule"], own["microbatches"]) == (data["schedule"], data["microbatches"])
    assert own["step_ms"] == pytest.approx(data["predicted"]["step_ms"], rel=1e-9)


def test_simulate_errors(plan: Path, tmp_path: Path) -> None:
    one_f = run_cli("partition", GPT2, "--stages", "4", "--schedule", "1f1b", "-o", str(tmp_path / "p.json"))
    assert one_f.returncode == 0
    assert_one_line_error(run_cli("simulate", str(tmp_path / "p.json"), "--microbatches", "2"),
                          "at least as many micro-batches as ranks: 2 < 4")
    assert_one_line_error(run_cli("simulate", str(tmp_path / "p.json"), "--schedule", "nope"), "unknown schedule")
    assert_one_line_error(run_cli("simulate", str(tmp_path / "p.json"), "--schedule", "interleaved1f1b",
                                  "--stages-per-rank", "3"), "must divide")
    assert_one_line_error(run_cli("simulate", str(tmp_path / "missing.json")), "does not exist")
    assert_one_line_error(run_cli("partition", GPT2, "--stages", "4", "--schedule", "1f1b", "--microbatches", "2"),
                          "2 < 4")
    assert_one_line_error(run_cli("partition", GPT2, "--stages", "8", "--schedule", "interleaved1f1b"),
                          "16 stages > 14 blocks")


def test_schedule_names_are_checked_where_they_are_read(tmp_path: Path) -> None:
    """Both commands read --schedule with the shared argument types: only partition chooses one (auto)."""
    plan = tmp_path / "p.json"
    assert run_cli_here("partition", GPT2, "--stages", "2", "--schedule", "AUTO", "-o", str(plan)).returncode == 0
    assert_one_line_error(run_cli_here("simulate", str(plan), "--schedule", "auto"),
                          "autopart simulate: error: argument --schedule: unknown schedule 'auto'; known: GPipe, 1F1B,",
                          "(see autopart simulate --help)")
    assert run_cli_here("simulate", str(plan), "--schedule", "gpipe", "--json").returncode == 0


def test_trace_is_the_simulated_step_as_chrome_trace_json(plan: Path, tmp_path: Path) -> None:
    trace = tmp_path / "step.json"
    result = run_cli("simulate", str(plan), "--trace", str(trace), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    data = json.loads(trace.read_text())
    events = [e for e in data["traceEvents"] if e["ph"] == "X"]
    names = {e["tid"]: e["args"]["name"] for e in data["traceEvents"] if e["name"] == "thread_name"}
    assert names == {r: f"rank {r}" for r in range(summary["num_ranks"])}
    assert data["otherData"]["step_ms"] == pytest.approx(summary["step_ms"])
    for rank in range(summary["num_ranks"]):  # each rank's events: in order, no overlap, busy time as simulated
        mine = sorted((e for e in events if e["tid"] == rank), key=lambda e: e["ts"])
        assert all(a["ts"] + a["dur"] <= b["ts"] + 1e-3 for a, b in zip(mine, mine[1:]))
        busy_ms = sum(e["dur"] for e in mine) / 1e3
        idle = summary["bubble_fraction_per_rank"][rank]
        assert busy_ms == pytest.approx(summary["step_ms"] * (1 - idle), rel=1e-6)
    assert {e["cat"] for e in events} >= {"forward", "backward", "optimizer"}

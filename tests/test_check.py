"""`autopart check`: a plan's stages tried one at a time in one process, against the plan and against `train`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from autopart.run.check import verdict
from tests.conftest import ROOT, assert_one_line_error, run_cli, run_cli_here
from tests.helpers import plan_for

WIDE = f"{Path(__file__).resolve()}:wide_mlp"
"""Four 4 MiB blocks: big enough that each stage's memory stands well above the meter's noise."""

DEEP = f"{Path(__file__).resolve()}:deep_mlp"
"""Narrow layers on a wide micro-batch: activations outweigh parameters (to see recomputation)."""
OTHER = f"{ROOT / 'tests' / 'helpers.py'}:linear_relu_spec"
MIB = 2**20


def wide_mlp() -> dict[str, Any]:
    torch.manual_seed(0)
    blocks = [nn.Linear(1024, 1024) for _ in range(4)]
    return {"module": nn.Sequential(blocks[0], nn.Tanh(), blocks[1], nn.Tanh(), blocks[2], blocks[3]),
            "example": torch.randn(256, 1024)}


def deep_mlp() -> dict[str, Any]:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(6):
        layers += [nn.Linear(256, 256), nn.Tanh()]
    return {"module": nn.Sequential(*layers), "example": torch.randn(1024, 256)}


@pytest.fixture(scope="module")
def wide_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("check") / "plan.json"
    plan_for(WIDE, [3, 3], "GPipe", 4, path)
    return path


def test_verdict_against_a_limit_or_the_plan() -> None:
    assert verdict(300 * MIB, 100 * MIB, 400 * MIB) == (True, "fits (75% of 400 MiB)")
    assert verdict(int(1.7 * 2**30), 100 * MIB, 512 * MIB) == (False, "over by 1.2 GiB")
    assert verdict(103 * MIB, 100 * MIB, None) == (True, "as planned (+3%)")
    assert verdict(145 * MIB, 100 * MIB, None) == (True, "above plan (+45%)")
    assert verdict(80 * MIB, 100 * MIB, None) == (True, "below plan (-20%)")
    assert verdict(None, 100 * MIB, 10) == (True, "not measured")


@pytest.mark.slow
def test_check_prints_a_row_per_stage_and_writes_json(wide_plan: Path, tmp_path: Path) -> None:
    out = tmp_path / "check.json"
    result = run_cli("check", str(wide_plan), "--model", WIDE, "--threads", "1", "-o", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("│")]
    assert len(rows) == 2 and "0..2" in rows[0] and "3..5" in rows[1], result.stdout
    assert "checking stage 0/1" in result.stderr and "checking stage 1/1" in result.stderr
    data = json.loads(out.read_text())
    assert data["fits"] is True and data["device"] == "cpu" and data["threads"] == 1
    plan = json.loads(wide_plan.read_text())
    for stage, planned in zip(data["stages"], plan["stages"]):
        assert stage["in_flight"] == stage["planned_in_flight"] == 4  # GPipe holds every micro-batch
        assert stage["planned_bytes"] == planned["memory_bytes"]
        assert stage["forward_ms"] > 0 and stage["backward_ms"] > 0 and stage["optimizer_ms"] > 0
        # parameters, gradients and AdamW's two states of two 4 MiB layers at least: 32 MiB
        assert stage["measured_bytes"] > 32 * MIB, stage
        assert stage["verdict"].startswith(("as planned", "above plan", "below plan"))


@pytest.mark.slow
@pytest.mark.parametrize("schedule, balance, per_rank, in_flight", [
    ("1F1B", [2, 2, 2], 1, [3, 2, 1]),
    ("ZBVZeroBubble", [2, 1, 1, 2], 2, [4, 3, 2, 1]),  # held from F until W, the backward's second half
])
def test_in_flight_follows_the_schedule(tmp_path: Path, schedule: str, balance: list[int], per_rank: int,
                                        in_flight: list[int]) -> None:
    """Each stage runs its rank's actions in the schedule's order: it holds as many micro-batches at once as the
    cost model counts for it."""
    path = tmp_path / "plan.json"
    plan_for(WIDE, balance, schedule, 4, path, per_rank=per_rank)
    result = run_cli("check", str(path), "--model", WIDE, "--threads", "1", "--steps", "1", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    stages = json.loads(result.stdout)["stages"]
    assert [s["in_flight"] for s in stages] == [s["planned_in_flight"] for s in stages] == in_flight


@pytest.mark.slow
def test_a_stage_over_its_limit_fails_with_exit_1(wide_plan: Path, tmp_path: Path) -> None:
    raw = json.loads(wide_plan.read_text())
    raw["stages"][1]["memory_limit_bytes"] = 8 * MIB  # less than its parameters and their optimizer state
    tight = tmp_path / "tight.json"
    tight.write_text(json.dumps(raw))
    result = run_cli("check", str(tight), "--model", WIDE, "--threads", "1", "--steps", "1", "--json")
    assert result.returncode == 1, result.stderr[-2000:]
    first, second = json.loads(result.stdout)["stages"]
    assert first["fits"] and first["limit_bytes"] is None
    assert not second["fits"] and second["limit_bytes"] == 8 * MIB and second["limit_source"] == "plan"
    assert second["verdict"].startswith("over by ")


@pytest.mark.slow
def test_recomputation_and_precision_change_what_a_stage_holds(tmp_path: Path) -> None:
    """Stage 0 holds five Linear-Tanh pairs; each of 8 micro-batches of 1024 x 256 keeps five Tanh outputs
    (5 MiB in float32, the last one its output) until its backward under GPipe. Marked recompute, it keeps only
    its output (1 MiB) and one micro-batch's 4 MiB while recomputing: some 28 MiB less at the peak. Under
    bf16-mixed, autocast runs each Linear in bfloat16, so the Tanh outputs are half as big: some 20 MiB less."""
    plain = tmp_path / "plain.json"
    plan_for(DEEP, [10, 2], "GPipe", 8, plain)
    raw = json.loads(plain.read_text())
    variants = {"recompute": dict(raw, stages=[dict(raw["stages"][0], recompute=True), raw["stages"][1]]),
                "bf16-mixed": dict(raw, precision="bf16-mixed", features=["precision"])}
    peaks = {}
    for name, path in [("plain", plain)] + [(n, tmp_path / f"{n}.json") for n in variants]:
        if name in variants:
            path.write_text(json.dumps(variants[name]))
        result = run_cli("check", str(path), "--model", DEEP, "--threads", "1", "--steps", "2", "--stage", "0",
                         "--json")
        assert result.returncode == 0, result.stderr[-2000:]
        peaks[name] = json.loads(result.stdout)["stages"][0]["measured_bytes"]
    assert peaks["plain"] - peaks["recompute"] > 20 * MIB, peaks
    assert peaks["plain"] - peaks["bf16-mixed"] > 12 * MIB, peaks


@pytest.mark.cuda
@pytest.mark.slow
def test_check_on_cuda_measures_the_allocator_against_the_device(wide_plan: Path, tmp_path: Path) -> None:
    """On a GPU the peak is the caching allocator's over what was allocated before the stage was moved there, and
    a plan without limits is held against the device's total memory."""
    result = run_cli("check", str(wide_plan), "--model", WIDE, "--device", "cuda", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    data = json.loads(result.stdout)
    assert "max_memory_allocated" in data["meter"]
    total = torch.cuda.get_device_properties(0).total_memory
    for stage in data["stages"]:
        assert stage["limit_bytes"] == total and stage["limit_source"] == "device" and stage["fits"]
        assert 32 * MIB < stage["measured_bytes"] < 200 * MIB, stage  # the weights, gradients and AdamW state


@pytest.fixture(scope="module")
def mlp_plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plan made from a saved profile (nothing profiled, nothing to wait for)."""
    out = tmp_path_factory.mktemp("check") / "mlp.json"
    made = run_cli_here("partition", str(ROOT / "profiles" / "mlp-hetero-cpu-mb32.json"), "--stages", "2", "-o",
                        str(out))
    assert made.returncode == 0, made.stderr
    return out


@pytest.mark.parametrize("args, fragments", [
    (["missing.json", "--model", "mlp-hetero"], ["missing.json"]),
    (["{plan}", "--model", OTHER], ["do not match model", "vs 3 blocks)"]),
    (["{plan}", "--model", "mlp-hetero", "--stage", "2"], ["stage 2 is not in the plan's 2 stages (0..1)"]),
    (["{plan}", "--model", "mlp-hetero", "--steps", "0"], ["--steps must be >= 1, got 0"]),
    (["{plan}", "--model", "no-such-model"], ["no-such-model"]),
    (["{plan}", "--model", "mlp-hetero", "-o", "/no/such/folder/out.json"], ["/no/such/folder"]),
])
def test_bad_input_is_one_line(mlp_plan: Path, args: list[str], fragments: list[str]) -> None:
    result = run_cli_here("check", *[a.format(plan=mlp_plan) for a in args])
    assert_one_line_error(result, *fragments)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_asked_for_without_cuda(mlp_plan: Path) -> None:
    result = run_cli_here("check", str(mlp_plan), "--model", "mlp-hetero", "--device", "cuda")
    assert_one_line_error(result, "--device cuda asked for, but CUDA is not available")


@pytest.mark.slow
@pytest.mark.parametrize("schedule, recompute", [("GPipe", False), ("1F1B", True)])
def test_check_agrees_with_train(tmp_path: Path, schedule: str, recompute: bool) -> None:
    """Each stage's peak in `check` is within 10% of what `train --report` measures on its rank, for the same plan
    of gpt2-tiny (from the saved profile) on 2 CPU ranks: GPipe, and 1F1B with stage 0 recomputed. Both read a
    small text file (the default corpus would add the rank's copy of it to train's side only)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes((ROOT / "autopart" / "run" / "loop.py").read_bytes() * 4)
    plan = tmp_path / "plan.json"
    made = run_cli_here("partition", str(ROOT / "profiles" / "gpt2-tiny-cpu-mb4.json"), "--stages", "2",
                        "--microbatches", "4", "--schedule", schedule, "-o", str(plan))
    assert made.returncode == 0, made.stderr
    if recompute:
        raw = json.loads(plan.read_text())
        raw["stages"][0]["recompute"] = True
        plan.write_text(json.dumps(raw))
    common = ["--model", "gpt2-tiny", "--steps", "2", "--threads", "1", "--data", str(corpus)]
    trained = run_cli("train", str(plan), *common, "--report", str(tmp_path / "train.json"), cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr[-2000:]
    checked = run_cli("check", str(plan), *common, "-o", str(tmp_path / "check.json"), cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr[-2000:]
    ranks = {r["rank"]: r["memory_measured_bytes"] for r in json.loads((tmp_path / "train.json").read_text())
             ["ranks_detail"]}
    stages = json.loads((tmp_path / "check.json").read_text())["stages"]
    assert len(ranks) == len(stages) == 2
    for stage in stages:
        run = ranks[stage["rank"]]
        assert abs(stage["measured_bytes"] - run) <= 0.10 * run, (stage["stage"], stage["measured_bytes"], run)

"""`autopart partition` as a user runs it."""
from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest

from autopart.core.costmodel import Problem
from autopart.core.planner import cost_model_of
from autopart.formats.devices import Device
from autopart.formats.plan import Plan
from autopart.formats.profile import Profile
from tests.conftest import ROOT, assert_one_line_error, run_cli
from tests.test_fastest import _brute

GPT2 = str(ROOT / "profiles" / "gpt2-small-cpu-mb1.json")
TINY = str(ROOT / "profiles" / "gpt2-tiny-cpu-mb4.json")


def test_partition_prints_balance_and_writes_plan(tmp_path: Path) -> None:
    out = tmp_path / "plan.json"
    result = run_cli("partition", GPT2, "--stages", "4", "-o", str(out))
    assert result.returncode == 0, result.stderr
    balance_line = [line for line in result.stdout.splitlines() if line.startswith("balance: ")]
    assert len(balance_line) == 1
    balance = json.loads(balance_line[0].removeprefix("balance: "))
    plan = Plan.from_json(out)
    assert list(plan.balance) == balance and sum(balance) == 14
    uniform = run_cli("partition", GPT2, "--stages", "4", "--method", "uniform", "--format", "balance")
    assert balance[-1] < json.loads(uniform.stdout)[-1]  # fewer layers beside the LM head


def test_machine_formats() -> None:
    """Every format prints the same split: the fastest of all 78 (brute force) is [5, 7, 2], but the more
    balanced [6, 6, 2] is within the profile's noise band of it, so the choice takes it."""
    printed = {}
    for fmt in ("json", "balance", "split-spec", "fqns"):
        result = run_cli("partition", GPT2, "--stages", "3", "--format", fmt)
        assert result.returncode == 0 and result.stderr == "", (fmt, result.stderr)
        printed[fmt] = result.stdout
    plan = Plan.from_dict(json.loads(printed["json"]))
    assert plan.schema == "autopart.plan/1" and plan.num_stages == 3
    problem = Problem.from_profile(Profile.from_json(GPT2), [Device("cpu")] * 3, cost_model_of(plan))
    every = _brute(problem)
    assert len(every) == 78
    fastest_step, _, fastest = min(every, key=lambda x: (x[0], x[1]))
    assert fastest == [5, 7, 2] and list(plan.runners_up[0].balance) == fastest
    noise = plan.predicted.noise
    assert noise is not None and fastest_step < plan.predicted.step_ms <= fastest_step * (1 + noise)
    assert plan.predicted.margin == pytest.approx(fastest_step / plan.predicted.step_ms - 1, rel=1e-9)
    chosen = [6, 6, 2]
    assert list(plan.balance) == chosen and json.loads(printed["balance"]) == chosen
    names = [layer.name for layer in Profile.from_json(GPT2).layers]
    firsts = list(itertools.accumulate(chosen[:-1]))  # each later stage's first block
    assert json.loads(printed["fqns"]) == [names[a:b] for a, b in zip([0] + firsts, firsts + [len(names)])]
    assert printed["split-spec"] == (
        "from torch.distributed.pipelining import SplitPoint\n\n"
        "# gpt2-small: 3 stages, balance [6, 6, 2]; pipeline(model, mb_args=..., split_spec=split_spec)\n"
        "split_spec = {\n" + "".join(f'    "{names[i]}": SplitPoint.BEGINNING,\n' for i in firsts) + "}\n")


@pytest.mark.parametrize("stages", [2, 3])
def test_a_printed_split_spec_builds_the_pipe_in_torch(tmp_path: Path, stages: int) -> None:
    """Pasted as it is printed, the split-spec is Python that torch's own ``pipeline()`` takes, and it cuts
    the real model into the plan's stages."""
    from torch.distributed.pipelining import pipeline

    from autopart.measure.spec import load_model

    out = tmp_path / "plan.json"
    result = run_cli("partition", TINY, "--stages", str(stages), "--format", "split-spec", "-o", str(out))
    assert result.returncode == 0, result.stderr
    namespace: dict[str, Any] = {}
    exec(result.stdout, namespace)
    plan = Plan.from_json(out)
    assert list(namespace["split_spec"]) == plan.split_points()
    bundle = load_model("gpt2-tiny")
    assert bundle.example is not None
    pipe = pipeline(bundle.module, mb_args=bundle.example, split_spec=namespace["split_spec"])
    assert pipe.num_stages == plan.num_stages == stages


def test_devices_bandwidth_and_memory() -> None:
    result = run_cli("partition", GPT2, "--devices", "2x2GiB,2x2GiB@2", "--bandwidth", "1GB/s", "--latency",
                     "50us", "--schedule", "gpipe", "--microbatches", "8", "--format", "json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["microbatches"] == 8 and [s["speed"] for s in plan["stages"]] == [1, 1, 2, 2]
    assert all(s["memory_bytes"] <= 2 * 2**30 for s in plan["stages"]) and plan["stages"][0]["send_ms"] > 0


@pytest.mark.parametrize("args, fragments", [
    (["--stages", "15"], ["15 stages > 14 blocks"]),
    (["--stages", "0"], ["--stages must be >= 1"]),
    (["--stages", "4", "--memory-limit", "100MiB"], ["alone needs", "the smallest limit that fits is"]),
    (["--stages", "4", "--memory-limit", "lots"], ["not a size"]),
    (["--stages", "4", "--bandwidth", "fast"], ["bandwidth 'fast'"]),
    (["--stages", "3", "--devices", "4x16GiB"], ["4 devices for 3 stages"]),
    (["--stages", "4", "--memory-limit", "900MiB", "--method", "uniform"], ["does not fit", "--method exact"]),
])
def test_bad_input(args: list[str], fragments: list[str]) -> None:
    assert_one_line_error(run_cli("partition", GPT2, *args), *fragments)


def test_bad_profiles(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("partition", str(tmp_path / "none.json"), "--stages", "2"), "does not exist")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "autopart.profile/1", "layers": [{"name": "a"}]}))
    assert_one_line_error(run_cli("partition", str(bad), "--stages", "1"), "missing field")
    nan = tmp_path / "nan.json"
    data = json.loads(Path(GPT2).read_text())
    data["layers"][3]["forward_ms"] = -1
    nan.write_text(json.dumps(data))
    assert_one_line_error(run_cli("partition", str(nan), "--stages", "2"), "layers[3].forward_ms is -1")


def test_a_given_balance_is_scored_beside_the_plan() -> None:
    profile = str(ROOT / "profiles" / "gpt2-small-cpu-mb1.json")
    # 4 stages, from the list; the given split is the fastest predicted, but the balanced one within the
    # profile's noise of it is chosen (docs/partition.md, "The choice and the noise band")
    result = run_cli("partition", profile, "--balance", "2,6,5,1")
    assert result.returncode == 0, result.stderr
    rows = {line.split("│")[1].strip(): line for line in result.stdout.splitlines() if line.startswith("│")}
    assert "[4, 5, 4, 1]" in rows["autopart (bottleneck)"] and "2.18 s" in rows["autopart (bottleneck)"]
    assert "[2, 6, 5, 1]" in rows["given"] and "2.1 s" in rows["given"] and "-3.9%" in rows["given"]
    assert "balance: [4, 5, 4, 1]" in result.stdout  # the plan's own list, for scripts


@pytest.mark.parametrize("balance, fragment", [
    ("4,5,4", "does not split 14 blocks into 4 non-empty stages"),
    ("4,5,4,2", "(sum 15, 4 stages)"),
])
def test_a_given_balance_that_does_not_split_the_blocks_is_one_line(balance: str, fragment: str) -> None:
    profile = str(ROOT / "profiles" / "gpt2-small-cpu-mb1.json")
    assert_one_line_error(run_cli("partition", profile, "--stages", "4", "--balance", balance), fragment)
    assert_one_line_error(run_cli("partition", profile, "--stages", "4", "--balance", "4,x"), "not a list of block counts")


TIE_BYTES = int(12.3 * 2**20)


def _hand_profile(path: Path, action_ms: float = 0.0, tied: bool = False) -> str:
    """Four blocks of 1, 2, 2, 1 ms forward (backward twice that); ``tied``: b0 and b3 share a 12.3 MiB weight."""
    from autopart.formats.profile import LayerProfile, Tie

    layers = tuple(LayerProfile(name=f"b{i}", forward_ms=f, backward_ms=2 * f, param_bytes=1000,
                                activation_bytes=100, output_bytes=10) for i, f in enumerate((1.0, 2.0, 2.0, 1.0)))
    ties = (Tie(params=("b0.weight", "b3.weight"), owner="b0", blocks=("b0", "b3"), bytes=TIE_BYTES),) if tied else ()
    Profile(model="hand", device="cpu", dtype="float32", microbatch_size=1, sample_shape=(1, 4), torch="2.13",
            layers=layers, action_ms=action_ms, ties=ties).to_json(path)
    return str(path)


def test_overhead_0_turns_the_profiles_action_cost_off(tmp_path: Path) -> None:
    """A profile that measured 2 ms per action: not given, every stage pays it; --overhead 0 prices none, the
    same plan as a profile that measured nothing; another value replaces it."""
    from tests.conftest import run_cli_here

    measured = _hand_profile(tmp_path / "measured.json", action_ms=2.0)
    none = _hand_profile(tmp_path / "none.json")

    def plan(profile: str, *flags: str) -> dict[str, Any]:
        result = run_cli_here("partition", profile, "--stages", "2", "--format", "json", *flags)
        assert result.returncode == 0, result.stderr
        return dict(json.loads(result.stdout))

    assert [st["overhead_ms"] for st in plan(measured)["stages"]] == [2.0, 2.0]
    off = plan(measured, "--overhead", "0")
    assert [st["overhead_ms"] for st in off["stages"]] == [0.0, 0.0]
    assert off["predicted"] == plan(none)["predicted"]
    assert off["predicted"]["step_ms"] < plan(measured)["predicted"]["step_ms"]
    assert plan(measured, "--overhead", "0ms")["predicted"] == off["predicted"]  # a zero needs no unit
    assert [st["overhead_ms"] for st in plan(measured, "--overhead", "0.5ms")["stages"]] == [0.5, 0.5]


def test_a_tie_across_ranks_on_a_free_link_is_noted(tmp_path: Path) -> None:
    """b0 and b3 share a weight: on 2 ranks under 1F1B its copies are on ranks 0 and 1, and without --bandwidth
    its gradient sum is priced 0, which partition says once; with a bandwidth it is priced (no note), and under
    ZBVZeroBubble the V puts both copies on rank 0 (nothing to sum, no note)."""
    from tests.conftest import run_cli_here

    tied = _hand_profile(tmp_path / "tied.json", tied=True)
    note = ("note: the tied weight's gradient sum between ranks 0 and 1 (b0.weight, 12.3 MiB a step) is priced "
            "free: no --bandwidth given")
    free = run_cli_here("partition", tied, "--stages", "2")
    assert free.returncode == 0, free.stderr
    assert [line for line in free.stdout.splitlines() if "tied" in line] == [note]
    priced = run_cli_here("partition", tied, "--stages", "2", "--bandwidth", "1GB/s")
    assert priced.returncode == 0 and "tied" not in priced.stdout, priced.stderr
    zbv = run_cli_here("partition", tied, "--stages", "2", "--schedule", "zbv")
    assert zbv.returncode == 0 and "tied" not in zbv.stdout, zbv.stderr
    untied = run_cli_here("partition", _hand_profile(tmp_path / "untied.json"), "--stages", "2")
    assert untied.returncode == 0 and "tied" not in untied.stdout, untied.stderr

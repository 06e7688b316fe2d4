"""`autopart train` as a user runs it: real ranks, real data, checkpoints, resume, faults."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from autopart.errors import AutopartError
from autopart.run.checkpoint import latest_complete, merge_checkpoint
from autopart.measure.spec import load_model
from tests.conftest import ROOT, assert_one_line_error, run_cli, run_cli_here

TINY = str(ROOT / "profiles" / "gpt2-tiny-cpu-mb4.json")


@pytest.fixture(scope="module")
def plan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("train") / "plan.json"
    made = run_cli_here("partition", TINY, "--stages", "2", "--microbatches", "2", "-o", str(out))
    assert made.returncode == 0, made.stderr
    return out


@dataclass(frozen=True)
class Run:
    """One run of ``autopart train`` that several tests read."""

    result: subprocess.CompletedProcess[str]
    folder: Path
    """Its working directory (nothing else is written there)."""
    report: Path
    checkpoint: Path | None = None


@pytest.fixture(scope="module")
def trained(plan: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """``autopart train`` of the 2-stage plan, 3 steps with a checkpoint and a report, run once for the tests that
    check what it prints, writes and leaves."""
    root = tmp_path_factory.mktemp("trained")
    folder, ckpt = root / "cwd", root / "ckpt"
    folder.mkdir()
    result = run_cli("train", str(plan), "--model", "gpt2-tiny", "--steps", "3", "--checkpoint", str(ckpt),
                     "--report", str(folder / "report.json"), "--lr", "3e-3", cwd=folder)
    return Run(result, folder, folder / "report.json", ckpt)


@pytest.fixture(scope="module")
def under_torchrun(plan: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The plan's 2 ranks under a user's torchrun, 2 steps, with the old ``--meta-init`` and the launcher's
    hand-over variable set (``handed.json`` in its folder), run once for the tests that read it."""
    folder = tmp_path_factory.mktemp("torchrun")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1",
               AUTOPART_REPORT_HANDOFF=str(folder / "handed.json"))
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "autopart", "train", str(plan), "--model", "gpt2-tiny", "--steps", "2",
                             "--meta-init", "--report", str(folder / "r.json")],
                            cwd=folder, env=env, text=True, capture_output=True, timeout=300)
    return Run(result, folder, folder / "r.json")


@pytest.mark.slow
def test_train_checkpoint_merge_resume(trained: Run, plan: Path, tmp_path: Path) -> None:
    first, report = trained.result, trained.report
    assert first.returncode == 0, first.stderr[-2000:]
    assert trained.checkpoint is not None
    ckpt = Path(shutil.copytree(trained.checkpoint, tmp_path / "ckpt"))  # the resume below adds to its copy
    assert "step 3/3" in first.stderr and "tokens/s" in first.stderr  # progress on stderr
    assert "predicted" in first.stdout and "per stage" in first.stdout and "per stage" not in first.stderr  # results
    assert "measured with" not in first.stderr  # profiled with 1 thread, as each rank gets: nothing to say
    data = json.loads(report.read_text())
    assert len(data["losses"]) == 3 and data["losses"][-1] < data["losses"][0]
    # each rank built only its stages: the losses of one process from the whole build's weights (test_build's check
    # for gpt2-tiny, on this run)
    from tests.test_build import reference_losses

    expected = reference_losses("gpt2-tiny", plan, 3, lr=3e-3)
    assert data["losses"] == pytest.approx(expected, rel=1e-6, abs=1e-6), (data["losses"], expected)
    assert all(r["build_peak_bytes"] is not None for r in data["ranks_detail"])
    assert data["predicted_step_ms"] > 0 and data["measured_step_ms"] > 0 and len(data["stages"]) == 2
    assert latest_complete(ckpt) == ckpt / "step-000003"

    merged = merge_checkpoint(ckpt)
    model = load_model("gpt2-tiny").module
    model.load_state_dict(merged)  # strict: every name of the unpartitioned model, nothing else
    fresh = load_model("gpt2-tiny").module.state_dict()
    assert not torch.equal(merged["head.lm_head.weight"], fresh["head.lm_head.weight"])  # it trained

    out = tmp_path / "merged.pt"
    assert run_cli("merge-checkpoint", str(ckpt), "-o", str(out)).returncode == 0
    assert set(torch.load(out)) == set(merged)

    second = run_cli("train", str(plan), "--model", "gpt2-tiny", "--steps", "5", "--checkpoint", str(ckpt),
                     "--lr", "3e-3")
    assert second.returncode == 0, second.stderr[-2000:]
    assert "resuming after step 3" in second.stderr and "step 4/5" in second.stderr
    assert "step 1/5" not in second.stderr and latest_complete(ckpt) == ckpt / "step-000005"


BOOM = '''
import torch
import torch.distributed as dist


class Boom(torch.nn.Module):
    """Fails on its fifth forward in a distributed run: during step 2 (after step 1's checkpoint)."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        if dist.is_initialized() and self.calls >= 5:
            raise RuntimeError("boom in the last stage")
        return self.linear(x)


def make():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), Boom())
    return {"module": model, "example": torch.randn(4, 8), "loss_fn": torch.nn.functional.mse_loss}
'''


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_job(tmp_path: Path) -> None:
    (tmp_path / "boom.py").write_text(BOOM)
    spec = f"{tmp_path / 'boom.py'}:make"
    assert run_cli_here("profile", spec, "--repeats", "1", "-o", str(tmp_path / "p.json")).returncode == 0
    assert run_cli_here("partition", str(tmp_path / "p.json"), "--stages", "2", "--microbatches", "2",
                   "-o", str(tmp_path / "plan.json")).returncode == 0
    ckpt = tmp_path / "ckpt"
    started = time.monotonic()
    result = run_cli("train", str(tmp_path / "plan.json"), "--model", spec, "--steps", "4", "--checkpoint", str(ckpt),
                     "--checkpoint-every", "1", timeout=120)
    assert time.monotonic() - started < 90
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert "rank 1 failed" in result.stderr and "boom in the last stage" in result.stderr
    assert latest_complete(ckpt) == ckpt / "step-000001"  # the last complete checkpoint survives


def test_plan_for_another_model_is_refused(plan: Path) -> None:
    # refused before any rank starts: the CLI's main in this process says what a new interpreter would
    assert_one_line_error(run_cli_here("train", str(plan), "--model", "mlp-hetero", "--steps", "1"),
                          "do not match model 'mlp-hetero'")
    assert_one_line_error(run_cli_here("train", str(plan), "--model", "gpt2-tiny", "--global-batch", "7"),
                          "not divisible")
    assert_one_line_error(run_cli_here("train", str(plan), "--model", "gpt2-tiny", "--data", "/no/such/corpus"),
                          "does not exist")


@pytest.mark.slow
def test_plan_for_more_ranks_than_processes(tmp_path: Path) -> None:
    out = tmp_path / "plan3.json"
    assert run_cli_here("partition", TINY, "--stages", "3", "-o", str(out)).returncode == 0
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "autopart", "train", str(out), "--model", "gpt2-tiny", "--steps", "1"],
                            cwd=tmp_path, env=env, text=True, capture_output=True, timeout=120)
    # torchrun's own exit code and failure summary (its traceback, not ours) follow autopart's one line
    assert result.returncode == 1
    ours = [line for line in result.stderr.splitlines() if line.startswith("autopart train:")]
    assert ours == ["autopart train: error: the plan has 3 stages on 3 ranks (1 per rank) but 2 processes were "
                    "started"], result.stderr
    assert "autopart/run" not in result.stderr and "autopart/cli" not in result.stderr  # no frames of ours


@pytest.mark.slow
def test_images_batchnorm_warning_and_replan(tmp_path: Path) -> None:
    profile, plan, suggested = tmp_path / "p.json", tmp_path / "plan.json", tmp_path / "replan.json"
    assert run_cli("profile", "resnet-mini", "--microbatch-size", "4", "--repeats", "1", "--threads", "1",
                   "-o", str(profile)).returncode == 0
    assert run_cli_here("partition", str(profile), "--stages", "2", "--microbatches", "2", "--method", "uniform",
                   "-o", str(plan)).returncode == 0
    result = run_cli("train", str(plan), "--model", "resnet-mini", "--steps", "2", "--replan", str(suggested))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "scikit-learn digits" in result.stderr and "samples/s" in result.stderr
    assert "BatchNorm" in result.stderr and "replan:" in result.stderr
    old, new = json.loads(plan.read_text()), json.loads(suggested.read_text())
    assert sum(new["balance"]) == 10 and new["schema"] == "autopart.plan/1"
    # planned again, by the default search, from blocks measured in the run: not the old (uniform) plan; the
    # default search's choice is its step-optimal split or, within the profile's noise, its bottleneck split
    assert (old["method"], old["balance"]) == ("uniform", [5, 5])
    assert new["method"] in ("exact", "bottleneck") and new["profile"] == "(re-profiled during training)"
    for key in ("model", "schedule", "microbatches", "microbatch_size", "stages_per_rank", "sample_shape"):
        assert new[key] == old[key], key  # the same run's settings
    blocks = [name for stage in old["stages"] for name in stage["blocks"]]
    assert [name for stage in new["stages"] for name in stage["blocks"]] == blocks
    assert [len(stage["blocks"]) for stage in new["stages"]] == new["balance"]
    assert new["stages"] != old["stages"]  # re-measured costs, even where the balance is the same
    said = [line for line in result.stderr.splitlines() if line.startswith("replan: ")]
    assert len(said) == 1 and f"suggest balance {new['balance']} (now [5, 5])" in said[0], said
    # its prediction is its own stages' simulated step
    from autopart.core.planner import simulate_plan
    from autopart.formats.plan import Plan

    replanned = Plan.from_json(suggested)
    assert simulate_plan(replanned).step_ms == pytest.approx(new["predicted"]["step_ms"], rel=1e-9)


@pytest.mark.slow
def test_the_launcher_prints_the_report_the_rank_hands_over(trained: Run, under_torchrun: Run, plan: Path) -> None:
    """The ranks are other processes: the reporting rank hands the report over in a file, and the launcher
    prints exactly what rendering the ``--report`` JSON gives (the same lines the rank printed before)."""
    import contextlib
    import io

    from autopart.formats.plan import Plan
    from autopart.run.report import print_report, read_handed_report

    result = trained.result
    assert result.returncode == 0, result.stderr[-2000:]
    report = read_handed_report(str(trained.report))
    assert report is not None
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown):
        print_report(report, Plan.from_json(str(plan)).microbatch_size)
    assert "per stage" in result.stdout and result.stdout == shown.getvalue()
    assert list(trained.folder.iterdir()) == [trained.report]  # the hand-over file is not left behind here
    # under torchrun, with the launcher's variable set, the rank hands the report over instead of printing it
    ranks = under_torchrun.result
    assert ranks.returncode == 0, ranks.stderr[-2000:]
    assert "per stage" not in ranks.stdout
    handed = read_handed_report(str(under_torchrun.folder / "handed.json"))
    assert handed is not None and handed == read_handed_report(str(under_torchrun.report))


@pytest.mark.slow
def test_meta_init_is_a_no_op_and_running_inside_torchrun(under_torchrun: Run, plan: Path) -> None:
    """Each rank builds only its own stages, always: the old ``--meta-init`` is accepted and changes nothing, and
    the first loss is that of the whole model ``build_model`` gives in one process."""
    result = under_torchrun.result
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(under_torchrun.report.read_text())
    assert len(report["losses"]) == 2 and all(loss == loss for loss in report["losses"])
    assert report["losses"][0] == pytest.approx(_first_loss(plan), rel=1e-5)
    assert "--meta-init" not in run_cli("train", "--help").stdout  # hidden


def _first_loss(plan_path: Path) -> float:
    """gpt2-tiny's loss on the run's first batch (seed 0), averaged over the plan's micro-batches, in this
    process, with the weights every rank's stages start from (``autopart.run.build.build_model``)."""
    from autopart.formats.plan import Plan
    from autopart.run.build import build_model
    from autopart.run.data import training_data

    plan = Plan.from_json(plan_path)
    bundle = build_model("gpt2-tiny", 0)
    m, size = plan.microbatches, plan.microbatch_size
    assert size is not None
    data = training_data(bundle, None, size * m, tuple(plan.sample_shape[1:]), 0, 0)
    inputs, target = next(data.batches)
    assert isinstance(inputs, torch.Tensor) and data.loss_fn is not None
    with torch.no_grad():
        losses = [data.loss_fn(bundle.module(x), t) for x, t in zip(inputs.tensor_split(m), target.tensor_split(m))]
    return float(torch.stack(losses).mean())


@pytest.mark.slow
def test_threads_other_than_the_profiles_are_said_before_training(plan: Path, tmp_path: Path) -> None:
    data = json.loads(Path(TINY).read_text())
    data["threads"] = 64  # more than this machine's cores allow per rank
    profile, two = tmp_path / "p.json", tmp_path / "plan.json"
    profile.write_text(json.dumps(data))
    assert run_cli_here("partition", str(profile), "--stages", "2", "--microbatches", "2", "-o", str(two)).returncode == 0
    assert json.loads(two.read_text())["threads"] == 64
    noted = run_cli("train", str(two), "--model", "gpt2-tiny", "--steps", "1")
    assert noted.returncode == 0, noted.stderr[-2000:]
    assert "measured with 64 CPU threads" in noted.stderr and "--threads" in noted.stderr


@pytest.mark.slow
def test_the_report_and_the_trace_are_measured_inside_the_pipeline(tmp_path: Path) -> None:
    """Blocks that sleep a known time: each stage's forward and backward, timed where the schedule ran them,
    are what the sleeps add up to; the step is the slowest rank's; the trace and SVG hold every action."""
    spec = f"{ROOT / 'tests' / 'helpers.py'}:sleep_spec"
    profile, plan, report = tmp_path / "p.json", tmp_path / "plan.json", tmp_path / "r.json"
    trace, svg = tmp_path / "t.json", tmp_path / "t.svg"
    assert run_cli_here("profile", spec, "--microbatch-size", "1", "-o", str(profile)).returncode == 0
    made = run_cli_here("partition", str(profile), "--stages", "2", "--microbatches", "4", "--balance", "2,2",
                   "--optimizer", "sgd-momentum", "-o", str(plan))
    assert made.returncode == 0, made.stderr
    ran = run_cli("train", str(plan), "--model", spec, "--steps", "5", "--report", str(report),
                  "--trace", str(trace), "--svg", str(svg))
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert "step (slowest rank, rank" in ran.stdout and "per rank, one step" in ran.stdout
    assert "sgd-momentum, data:" in ran.stderr  # the plan's optimizer runs
    data = json.loads(report.read_text())
    for row in data["stages"]:  # two blocks: 16 ms forward, 32 ms backward, and sleep overshoots a little
        assert 16 <= row["measured_forward_ms"] < 16 * 1.3 and 32 <= row["measured_backward_ms"] < 32 * 1.3
    finishes = [r["measured_finish_ms"] for r in data["ranks_detail"]]
    assert data["measured_step_ms"] >= max(finishes) * (1 - 1e-9)  # each step's slowest rank
    # 4 micro-batches through 2 ranks: (4 + 1)(16 + 32) ms of compute at the least
    assert data["measured_step_ms"] >= 5 * 48
    assert data["simulated_with_measured_stages_ms"] == pytest.approx(data["measured_step_ms"], rel=0.25)
    assert 0 <= data["fitted_overhead_ms"] < 10  # sleeps leave little for the runtime to add
    events = json.loads(trace.read_text())["traceEvents"]
    measured = [e for e in events if e["ph"] == "X" and e["pid"] == 0]
    for rank in (0, 1):
        names = sorted(e["name"] for e in measured if e["tid"] == rank)
        assert names == sorted([f"{rank}F{m}" for m in range(4)] + [f"{rank}B{m}" for m in range(4)] + ["OPT"])
    assert any(e["pid"] == 1 for e in events if e["ph"] == "X")  # the predicted step beside it
    picture = svg.read_text()
    assert "predicted: step" in picture and "measured (the median step): step" in picture


SMALL = str(ROOT / "profiles" / "gpt2-small-cpu-mb1-2-4-8.json")


def test_a_global_batch_that_changes_the_microbatch_size_is_refused_with_the_commands_that_replan(plan: Path) -> None:
    # The plan is for 2 micro-batches of 4, from a profile measured at 4 only: 16 would run micro-batches of 8,
    # whose memory and times nothing measured. Refused before any rank starts.
    assert_one_line_error(run_cli_here("train", str(plan), "--model", "gpt2-tiny", "--global-batch", "16"),
                          "--global-batch 16 makes micro-batches of 8, the plan's are 4 (2 micro-batches)",
                          "not measured at 8 (only [4])",
                          "autopart profile gpt2-tiny --microbatch-size 8 --threads 1 -o profile-mb8.json && "
                          "autopart partition profile-mb8.json --stages 2 --schedule 1F1B --microbatches 2")


def test_a_measured_microbatch_size_over_the_memory_limit_is_refused_before_training(tmp_path: Path) -> None:
    free, limited = tmp_path / "free.json", tmp_path / "limited.json"
    args = ("--stages", "2", "--schedule", "GPipe", "--microbatches", "4", "--global-batch", "8")
    assert run_cli_here("partition", SMALL, *args, "-o", str(free)).returncode == 0
    need = max(st["memory_bytes"] for st in json.loads(free.read_text())["stages"])
    limit = int(need * 1.2)  # micro-batches of 2 fit without recomputation; of 8, not
    assert run_cli_here("partition", SMALL, *args, "--memory-limit", str(limit), "-o", str(limited)).returncode == 0
    assert not any(st["recompute"] for st in json.loads(limited.read_text())["stages"])
    assert_one_line_error(run_cli_here("train", str(limited), "--model", "gpt2-small", "--global-batch", "32"),
                          "--global-batch 32 makes micro-batches of 8, the plan's are 2",
                          "at 8 the plan's split needs", "over its limit of", f"re-plan for it: autopart partition {SMALL} "
                          "--stages 2 --schedule GPipe --microbatches 4 --global-batch 32 --memory-limit "
                          f"{limit} -o plan-mb8.json")


PROBE = '''
import torch
import torch.distributed as dist


class Probe(torch.nn.Linear):
    """Says the threads torch uses and the rows of its input, in a distributed run, whenever they change."""

    said = set()

    def forward(self, x):
        seen = (torch.get_num_threads(), x.shape[0])
        if dist.is_initialized() and seen not in Probe.said:
            Probe.said.add(seen)
            print(f"probe: rank {dist.get_rank()} torch threads {seen[0]} rows {seen[1]}", flush=True)
        return super().forward(x)


def make():
    model = torch.nn.Sequential(Probe(8, 8), torch.nn.Tanh(), Probe(8, 8))
    return {"module": model, "example": torch.randn(4, 8), "loss_fn": torch.nn.functional.mse_loss}
'''


@pytest.mark.slow
def test_a_measured_microbatch_size_is_rechecked_said_and_run(tmp_path: Path) -> None:
    (tmp_path / "probe.py").write_text(PROBE)
    spec, profile, plan, report = f"{tmp_path / 'probe.py'}:make", tmp_path / "p.json", tmp_path / "plan.json", \
        tmp_path / "r.json"
    assert run_cli_here("profile", spec, "--microbatch-size", "2,4", "--repeats", "1", "-o", str(profile)).returncode == 0
    assert run_cli_here("partition", str(profile), "--stages", "2", "--microbatches", "2", "--global-batch", "4",
                        "-o", str(plan)).returncode == 0
    result = run_cli("train", str(plan), "--model", spec, "--steps", "1", "--global-batch", "8", "--report",
                     str(report), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    note = next(line for line in result.stderr.splitlines() if line.startswith("note: --global-batch 8"))
    assert "micro-batches of 4, the plan's are 2" in note and "its profile measured 4" in note
    assert result.stderr.index(note) < result.stderr.index("training ")  # said before training
    assert "rows 4" in result.stdout and "rows 2" not in result.stdout  # micro-batches of 4 ran
    data = json.loads(report.read_text())
    assert data["microbatch_size"] == 4 and data["predicted_step_ms"] is not None  # the re-priced plan's


@pytest.mark.slow
def test_threads_follow_the_plan_under_a_users_torchrun(tmp_path: Path) -> None:
    # torchrun leaves a rank torch's default thread count (1 here, as OMP_NUM_THREADS says); the rank sets the
    # count the plan's profile measured with (2: one rank on this machine's 2 cores), and says so
    (tmp_path / "probe.py").write_text(PROBE)
    spec, profile, plan = f"{tmp_path / 'probe.py'}:make", tmp_path / "p.json", tmp_path / "plan.json"
    assert run_cli_here("profile", spec, "--repeats", "1", "--threads", "2", "-o", str(profile)).returncode == 0
    assert run_cli_here("partition", str(profile), "--stages", "1", "--microbatches", "2", "-o", str(plan)).returncode == 0
    assert json.loads(plan.read_text())["threads"] == 2
    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 cores")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                             "-m", "autopart", "train", str(plan), "--model", spec, "--steps", "1"],
                            cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "probe: rank 0 torch threads 2" in result.stdout, result.stdout + result.stderr[-2000:]
    assert "training " + spec + ": 1 stage on 1 rank, 1F1B, 2 micro-batches of " in result.stderr, result.stderr
    assert ("CPU threads: 2 per rank (as the plan's profile measured; not OMP_NUM_THREADS=1; --threads N sets "
            "another count)") in result.stderr


def test_under_a_users_torchrun_every_rank_checks_the_microbatch_size_before_joining(plan: Path) -> None:
    from autopart.run.config import TrainConfig
    from autopart.run.worker import check_before_joining

    check_before_joining(TrainConfig(plan=str(plan), model="gpt2-tiny", global_batch=8), world=2)  # the plan's 4
    with pytest.raises(AutopartError, match="--global-batch 16 makes micro-batches of 8, the plan's are 4"):
        check_before_joining(TrainConfig(plan=str(plan), model="gpt2-tiny", global_batch=16), world=2)

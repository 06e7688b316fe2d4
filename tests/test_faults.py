"""Faults a long job meets, with real ranks: a rank killed by a signal (restarts), a rank that hangs
(timeouts), Ctrl-C, and a checkpoint writer killed mid-write."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from autopart.run.checkpoint import latest_complete, load_stages, merge_checkpoint
from tests.conftest import ROOT, run_cli_here

HELPERS = ROOT / "tests" / "helpers.py"


def _cli(*args: str, new_session: bool = False) -> subprocess.Popen[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200")
    env.pop("AUTOPART_TRACEBACK", None)
    return subprocess.Popen([sys.executable, "-m", "autopart", *args], env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=new_session)


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    proc = _cli(*args)
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _plan(tmp_path: Path, spec: str, *flags: str) -> Path:
    profile, plan = tmp_path / "p.json", tmp_path / "plan.json"
    made = run_cli_here("profile", spec, "--repeats", "1", "--warmup", "0", "-o", str(profile))
    assert made.returncode == 0, made.stderr
    made = run_cli_here("partition", str(profile), "--stages", "2", "--microbatches", "2", *flags, "-o", str(plan))
    assert made.returncode == 0, made.stderr
    return plan


def _rank_pids(launcher: int, rank: int) -> list[int]:
    """Processes below ``launcher`` whose environment says they are rank ``rank``."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found = []
    for pid in parents:
        up = pid
        while up in parents and up != launcher:
            up = parents[up]
        if up != launcher or pid == launcher:
            continue
        try:
            env = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env and any(v.startswith(b"TORCHELASTIC_RUN_ID=") for v in env):
            found.append(pid)
    return found


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.02)


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_rank_killed_by_a_signal_is_restarted_and_ends_with_the_uninterrupted_weights(tmp_path: Path) -> None:
    spec = f"{HELPERS}:restart_spec"
    plan = _plan(tmp_path, spec)
    train = ["train", str(plan), "--model", spec, "--steps", "6", "--checkpoint-every", "2"]
    whole = _run(*train, "--checkpoint", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = _cli(*train, "--checkpoint", str(killed), "--max-restarts", "2", "--timeout", "30")
    _wait_for(killed / "step-000002" / "COMPLETE", proc)
    victims = _rank_pids(proc.pid, 1)
    assert victims, "rank 1's process was not found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)  # a signal, not a Python exception: nothing in the rank runs after it
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "restart 1 of 2 after a rank failed: resuming after step" in err, err[-3000:]
    assert "Traceback" not in err and "step 6/6" in err
    assert latest_complete(killed) == killed / "step-000006"
    resumed, reference = merge_checkpoint(killed), merge_checkpoint(tmp_path / "whole")
    assert resumed.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-6, atol=1e-6, msg=name)


def test_a_rank_that_hangs_is_reported_within_the_timeout_with_what_its_peer_waited_for(tmp_path: Path) -> None:
    spec = f"{HELPERS}:hang_spec"
    plan = _plan(tmp_path, spec, "--schedule", "GPipe")
    started = time.monotonic()
    result = _run("train", str(plan), "--model", spec, "--steps", "3", "--timeout", "4")
    assert time.monotonic() - started < 60
    assert result.returncode == 1, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("autopart train:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    # stage 1 hangs in its second forward of step 2; stage 0 sent both micro-batches and waits for a gradient
    assert "rank 0 failed (exit code 1): PeerTimeout: no answer within --timeout 4 s: in step 2, stage 0 waited " \
           "for the gradient of micro-batch 0 from stage 1 (rank 1) (that rank hung" in lines[0], lines[0]


def test_ctrl_c_stops_every_rank_with_one_line_and_130(tmp_path: Path) -> None:
    spec = f"{HELPERS}:restart_spec"
    plan = _plan(tmp_path, spec)
    proc = _cli("train", str(plan), "--model", spec, "--steps", "200", new_session=True)
    assert proc.stderr is not None
    for line in proc.stderr:  # the first step has run: every rank is in the middle of its work
        if line.startswith("step 1/"):
            break
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == \
        "autopart train: interrupted; the ranks were stopped", err
    time.sleep(0.5)
    assert not _rank_pids(proc.pid, 0) and not _rank_pids(proc.pid, 1)


WRITER = """
import sys, torch
from autopart.run.checkpoint import mark_complete, save_stage
step = 0
while True:
    step += 1
    for stage in range(2):
        save_stage(sys.argv[1], step, stage, {"w": torch.full((1 << 18,), float(step))}, None, stage, [stage])
    mark_complete(sys.argv[1], step, 2)
"""


def test_a_checkpoint_half_written_by_a_killed_process_is_never_loaded(tmp_path: Path) -> None:
    """A writer killed by SIGKILL at an arbitrary moment: the latest complete step loads whole, every one of
    its files from that step, and a step whose marker was never written is ignored."""
    root = tmp_path / "ckpt"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for delay_s in (0.05, 0.17, 0.31):  # after its first step: somewhere inside a later one
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(root)], env=env, text=True)
        while not (root / "step-000001" / "COMPLETE").exists():
            assert proc.poll() is None
            time.sleep(0.01)
        time.sleep(delay_s)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        latest = latest_complete(root)
        assert latest is not None
        step = int(latest.name.split("-")[1])
        for content in load_stages(latest):
            assert content["step"] == step and torch.equal(content["model"]["w"], torch.full((1 << 18,), float(step)))
        newer = [p for p in root.iterdir() if p.name.startswith("step-") and p.name > latest.name]
        assert all(not (p / "COMPLETE").exists() for p in newer)
        (root / "step-000001" / "COMPLETE").unlink()  # the next writer's first step is watched afresh

"""Faults a long job meets, with real ranks: a rank killed by a signal (restarts), a rank that hangs
(timeouts), Ctrl-C, a checkpoint writer killed mid-write, a launcher killed outright, a full disk; and runs
the checks let through that used to fail in a rank: a finished job run again, a last block returning a
dict, factory data shorter than --steps, a reader that stops early."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from autopart.run.checkpoint import latest_complete, load_stages, mark_complete, merge_checkpoint, save_stage
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


def check_restart_after_a_kill(tmp_path: Path, plan: Path, spec: str, steps: int, rank: int,
                               max_restarts: int) -> None:
    """``train PLAN`` with ``--max-restarts``: global ``rank`` killed by SIGKILL after step 2's checkpoint; every
    rank restarts from it, and the last checkpoint equals an uninterrupted run's."""
    train = ["train", str(plan), "--model", spec, "--steps", str(steps), "--checkpoint-every", "2"]
    whole = _run(*train, "--checkpoint", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]

    killed = tmp_path / "killed"
    proc = _cli(*train, "--checkpoint", str(killed), "--max-restarts", str(max_restarts), "--timeout", "30")
    _wait_for(killed / "step-000002" / "COMPLETE", proc)
    victims = _rank_pids(proc.pid, rank)
    assert victims, f"rank {rank}'s process was not found"
    for pid in victims:
        os.kill(pid, signal.SIGKILL)  # a signal, not a Python exception: nothing in the rank runs after it
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert f"restart 1 of {max_restarts} after a rank failed: resuming after step" in err, err[-3000:]
    assert "Traceback" not in err and f"step {steps}/{steps}" in err
    assert latest_complete(killed) == killed / f"step-{steps:06d}"
    resumed, reference = merge_checkpoint(killed), merge_checkpoint(tmp_path / "whole")
    assert resumed.keys() == reference.keys()
    for name, value in reference.items():
        torch.testing.assert_close(resumed[name], value, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_rank_killed_by_a_signal_is_restarted_and_ends_with_the_uninterrupted_weights(tmp_path: Path) -> None:
    """One launch for the pipeline and its replicas: 2 replicas x 2 stages, global rank 3 (replica 1's last
    stage) killed; every rank of both pipelines restarts (their pipeline and replica groups made again) and the
    final weights are the uninterrupted run's. A plan of one pipeline restarts through the same steps with fewer
    groups (this was two tests, one per plan, that ran the same kill and restart)."""
    import dataclasses

    from autopart.formats.plan import Plan

    spec = f"{HELPERS}:restart_spec"
    plan = tmp_path / "two.json"
    dataclasses.replace(Plan.from_json(_plan(tmp_path, spec)), data_parallel=2).to_json(plan)
    check_restart_after_a_kill(tmp_path, plan, spec, steps=4, rank=3, max_restarts=2)


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
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


# --- issue #16, items 9, 12 and 13: finished jobs, runs that fail after the checks, faults ----------------------

FAULTS = ROOT / "tests" / "fault_models.py"


def _saved_steps(root: Path, steps: tuple[int, ...]) -> None:
    """Complete checkpoints of two stages at each of ``steps``, written as the ranks write them."""
    for step in steps:
        for stage in (0, 1):
            save_stage(root, step, stage, {f"w{stage}": torch.ones(4)}, None, stage, [stage])
        mark_complete(root, step, 2)


def _stale(folder: Path, name: str) -> Path:
    """A temporary file as a writer killed in the middle of writing ``folder/name`` leaves it."""
    folder.mkdir(parents=True, exist_ok=True)
    stale = folder / f".{name}.k1ll_d3d.tmp"
    stale.write_bytes(b"half a file")
    return stale


def test_a_rerun_of_a_finished_job_says_it_is_complete_and_starts_no_rank(tmp_path: Path) -> None:
    spec = f"{FAULTS}:short_data_spec"
    plan, ckpt = _plan(tmp_path, spec), tmp_path / "ckpt"
    _saved_steps(ckpt, (3, 6))
    stale = [_stale(ckpt / "step-000006", "stage-1.pt"), _stale(ckpt / "step-000009", "stage-0.pt"),
             _stale(ckpt / "step-000009", "COMPLETE")]
    mine = ckpt / "step-000009" / "notes.tmp"  # not a name autopart's writes give their temporaries
    mine.write_text("the user's")
    for steps in ("6", "4"):
        result = run_cli_here("train", str(plan), "--model", spec, "--steps", steps, "--checkpoint", str(ckpt))
        assert result.returncode == 0, result.stderr
        assert result.stderr.splitlines()[-1] == (
            f"autopart train: the run is complete: checkpoint {ckpt} has step 6, --steps {steps}; nothing to "
            f"train (raise --steps to continue)"), result.stderr
        assert "resuming" not in result.stderr and "training" not in result.stderr
    assert not any(path.exists() for path in stale) and mine.read_text() == "the user's"
    assert latest_complete(ckpt) == ckpt / "step-000006"


@pytest.mark.slow
def test_a_restart_after_the_final_checkpoint_ends_cleanly_before_joining(tmp_path: Path) -> None:
    """A rank as torchrun's agent starts it again after the final checkpoint (restart 1): it says the run
    is complete and exits 0 without waiting for its peer (which would hang until --timeout); rank 0 first
    removes what a writer killed mid-write left."""
    spec = f"{FAULTS}:short_data_spec"
    plan, ckpt = _plan(tmp_path, spec), tmp_path / "ckpt"
    _saved_steps(ckpt, (6,))
    stale = _stale(ckpt / "step-000006", "stage-0.pt")
    env = dict(os.environ, PYTHONPATH=str(ROOT), RANK="0", LOCAL_RANK="0", WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT="1", TORCHELASTIC_RESTART_COUNT="1",
               TORCHELASTIC_MAX_RESTARTS="2", TORCHELASTIC_RUN_ID="restart-test")
    result = subprocess.run([sys.executable, "-m", "autopart", "train", str(plan), "--model", spec, "--steps", "6",
                             "--checkpoint", str(ckpt), "--timeout", "20"], env=env, text=True,
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"autopart train: restart 1 after a rank failed: the run is complete: checkpoint {ckpt} has step 6, "
        f"--steps 6; nothing to train (raise --steps to continue)"]
    assert not stale.exists()


def test_a_stage_writer_removes_what_an_earlier_writer_of_that_stage_left(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt" / "step-000002"
    own, other = _stale(folder, "stage-0.pt"), _stale(folder, "stage-1.pt")  # another rank may be writing 1
    save_stage(tmp_path / "ckpt", 2, 0, {"w": torch.ones(4)}, None, 0, [0])
    assert not own.exists() and other.exists()
    assert sorted(p.name for p in folder.iterdir()) == [other.name, "stage-0.pt"]


def _reference_losses(spec: str, steps: int, microbatches: int = 2) -> list[float]:
    """The losses one process gets training the unpartitioned model as ``train`` does (the same seed,
    AdamW at --lr 1e-3, the mean loss of the step's micro-batches), cycling the factory's data."""
    from autopart.measure.blocks import run_chain, split_blocks
    from autopart.run.build import build_model

    bundle = build_model(spec, 0)  # the weights every rank's stages start from
    assert bundle.loss_fn is not None and bundle.data is not None
    batches, blocks = list(bundle.data), split_blocks(bundle.module)  # a tuple is spread into the next block
    optimizer = torch.optim.AdamW(bundle.module.parameters(), lr=1e-3)
    losses = []
    for step in range(steps):
        inputs, target = batches[step % len(batches)]
        optimizer.zero_grad()
        loss = torch.stack([bundle.loss_fn(run_chain(blocks, (x,)), y) for x, y in
                            zip(inputs.chunk(microbatches), target.chunk(microbatches))]).mean()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _trained_losses(tmp_path: Path, spec: str, steps: int) -> tuple[list[float], str]:
    import json

    plan, report = _plan(tmp_path, spec), tmp_path / "report.json"
    result = _run("train", str(plan), "--model", spec, "--steps", str(steps), "--report", str(report))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    return json.loads(report.read_text())["losses"], result.stderr


@pytest.mark.slow
def test_a_last_block_returning_a_dict_trains_as_one_process_does(tmp_path: Path) -> None:
    spec = f"{FAULTS}:dict_spec"
    losses, _ = _trained_losses(tmp_path, spec, 3)
    assert losses == pytest.approx(_reference_losses(spec, 3), rel=1e-5)


@pytest.mark.slow
def test_a_tuple_into_a_two_argument_block_across_the_cut_trains_as_one_process_does(tmp_path: Path) -> None:
    spec = f"{FAULTS}:tuple_spec"
    losses, _ = _trained_losses(tmp_path, spec, 3)
    assert losses == pytest.approx(_reference_losses(spec, 3), rel=1e-5)


@pytest.mark.slow
def test_a_number_in_the_tuple_crossing_a_cut_is_named_with_its_block(tmp_path: Path) -> None:
    spec = f"{FAULTS}:number_spec"
    plan = _plan(tmp_path, spec)
    result = _run("train", str(plan), "--model", spec, "--steps", "1")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.splitlines()[-1]
    assert re.fullmatch(r"autopart train: error: rank [01]: (.*)", last), last  # every rank sizes every stage alike
    assert last.split(": ", 3)[-1] == (
        "block '0' (Pair) returns a tuple of (Tensor, float), which cannot cross the cut after it: PyTorch's "
        "pipelining sends only tensors between stages; return only tensors from it")


@pytest.mark.slow
def test_factory_data_shorter_than_the_steps_is_cycled_and_said_once(tmp_path: Path) -> None:
    spec = f"{FAULTS}:short_data_spec"
    losses, err = _trained_losses(tmp_path, spec, 5)
    assert losses == pytest.approx(_reference_losses(spec, 5), rel=1e-5)
    notes = [line for line in err.splitlines() if "cycled" in line]
    assert notes == ["note: the factory's data has 2 batches, fewer than --steps 5: it is cycled (3 passes; step 3 "
                     "trains on its first batch again)"], err


def test_factory_data_read_once_says_how_many_batches_it_had(tmp_path: Path) -> None:
    from autopart.errors import AutopartError
    from autopart.measure.spec import ModelBundle
    from autopart.run.data import training_data

    pairs = [(torch.full((4, 8), float(i)), torch.zeros(4, 4)) for i in range(2)]

    def bundle(data: Any) -> ModelBundle:
        return ModelBundle("m", torch.nn.Linear(8, 4), (torch.zeros(2, 8),), torch.nn.functional.mse_loss, data)

    cycled = training_data(bundle(pairs), None, 4, (8,), 0, start_step=3).batches
    assert [float(next(cycled)[0][0, 0]) for _ in range(3)] == [1.0, 0.0, 1.0]  # steps 4, 5, 6
    once = training_data(bundle(iter(pairs)), None, 4, (8,), 0, start_step=0).batches
    next(once), next(once)
    with pytest.raises(AutopartError, match=r"^the factory's data ran out after 2 batches, at step 3 \(it can be "
                                            r"read only once, like a generator"):
        next(once)


@pytest.mark.slow
def test_train_into_a_reader_that_stops_early_ends_as_a_success(tmp_path: Path) -> None:
    """``train ... | head -1``: the rank printing the report finds its stdout closed; it stops printing, writes
    --report all the same, and the job succeeds."""
    spec = f"{FAULTS}:short_data_spec"
    plan, report = _plan(tmp_path, spec), tmp_path / "report.json"
    proc = _cli("train", str(plan), "--model", spec, "--steps", "2", "--report", str(report))
    assert proc.stderr is not None and proc.stdout is not None
    for line in proc.stderr:
        if line.startswith("step 2/2"):  # the report comes after the last step: nobody reads it
            break
    proc.stdout.close()
    err = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == 0, err
    assert "error" not in err and "failed" not in err, err
    assert report.exists()


def _alive(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_ranks_die_with_a_launcher_killed_by_sigkill(tmp_path: Path) -> None:
    spec = f"{HELPERS}:restart_spec"
    plan = _plan(tmp_path, spec)
    proc = _cli("train", str(plan), "--model", spec, "--steps", "300", new_session=True)
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("step 1/"):
            break
    ranks = _rank_pids(proc.pid, 0) + _rank_pids(proc.pid, 1)
    assert len(ranks) >= 2, ranks
    try:
        proc.kill()  # SIGKILL: the launcher can pass nothing on
        proc.wait(timeout=30)
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in ranks) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not any(_alive(pid) for pid in ranks), "ranks outlived their launcher"
    finally:
        for pid in ranks:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize("agent", [False, True])
def test_only_a_rank_an_agent_started_dies_with_its_parent(tmp_path: Path, agent: bool) -> None:
    """A rank started by hand (``RANK``/``WORLD_SIZE``, no elastic agent), whose starter exits first (``nohup``,
    a batch script), keeps running; one an agent started (``TORCHELASTIC_RUN_ID``) dies with it."""
    done = tmp_path / "done"
    code = ("import time, pathlib; from autopart.run.parent import die_with_parent; die_with_parent(); "
            f"time.sleep(1.5); pathlib.Path({str(done)!r}).write_text('ran')")
    env = dict(os.environ, PYTHONPATH=str(ROOT), RANK="0", WORLD_SIZE="2")
    env.pop("AUTOPART_PARENT_PID", None)
    if agent:
        env["TORCHELASTIC_RUN_ID"] = "test"
    else:
        env.pop("TORCHELASTIC_RUN_ID", None)
    # the shell starts the rank and exits after 0.5 s, while the rank still runs
    subprocess.run(["sh", "-c", f"{sys.executable} -c \"{code}\" & sleep 0.5"], env=env, check=True, timeout=30)
    time.sleep(2.5)
    assert done.exists() is not agent


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_rank_killed_by_a_signal_is_reported_with_it_not_with_the_agents_sigterm(tmp_path: Path) -> None:
    spec = f"{HELPERS}:restart_spec"
    plan = _plan(tmp_path, spec)
    proc = _cli("train", str(plan), "--model", spec, "--steps", "300")
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith("step 1/"):
            break
    for pid in _rank_pids(proc.pid, 1):
        os.kill(pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    assert err.strip().splitlines()[-1] == ("autopart train: error: rank 1 failed (exit code -9): killed by SIGKILL; "
                                            "the other ranks were stopped"), err


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Any:
    """A 1 MiB file system (tmpfs; needs root and a kernel that lets this process mount one)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_full_disk_names_the_folder_and_the_size_and_leaves_no_temporary(tiny_disk: Path) -> None:
    from autopart.errors import AutopartError

    with pytest.raises(AutopartError) as caught:
        save_stage(tiny_disk / "ckpt", 2, 0, {"w": torch.zeros(1 << 19)}, None, 0, [0])  # 2 MiB of weights
    folder = tiny_disk / "ckpt" / "step-000002"
    said = str(caught.value)
    assert said.startswith(f"cannot write '{folder / 'stage-0.pt'}': no space left on the device (2 MiB to write, "), \
        said
    assert f"free in '{folder}'" in said, said
    assert list(folder.iterdir()) == []


@pytest.mark.slow
def test_a_run_whose_checkpoint_fills_the_disk_says_where(tmp_path: Path, tiny_disk: Path) -> None:
    spec = f"{FAULTS}:big_spec"
    plan, ckpt = _plan(tmp_path, spec), tiny_disk / "ckpt"
    result = _run("train", str(plan), "--model", spec, "--steps", "1", "--checkpoint", str(ckpt))
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("autopart train:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    folder = ckpt / "step-000001"
    assert lines[0].startswith(f"autopart train: error: rank 0: cannot write '{folder / 'stage-0.pt'}': no space "
                               f"left on the device ("), lines[0]
    assert not [p for p in (ckpt / "step-000001").iterdir() if p.name.endswith(".tmp")]


def test_the_rank_killed_first_is_named_not_the_ranks_the_agent_then_stopped(tmp_path: Path) -> None:
    """torchrun's own failure records, as its agent makes them when rank 1 is killed (SIGKILL: no error file)
    and it then stops rank 0 with SIGTERM, in the same second: the launcher names rank 1 and its signal."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from autopart.run.launch import _root_cause

    failures = {0: ProcessFailure(local_rank=0, pid=100, exitcode=-15, error_file=str(tmp_path / "none-0")),
                1: ProcessFailure(local_rank=1, pid=101, exitcode=-9, error_file=str(tmp_path / "none-1"))}
    failures[0].timestamp = failures[1].timestamp  # the agent stamps both when it notices them
    rank, failure = _root_cause(ChildFailedError("autopart", failures))  # type: ignore[arg-type]
    assert (rank, failure.exitcode) == (1, -9)

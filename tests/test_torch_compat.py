"""The private torch APIs in one place (autopart.torch_compat), the version claim, and the one PipelineStage
subclass (autopart.run.stages.TimedStage), on known answers."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

from autopart import torch_compat
from autopart.run.stages import _full_backward
from autopart.torch_compat import failure_line, is_timeout, untested_torch, warn_if_untested, write_error_file
from tests.conftest import ROOT, run_cli, run_cli_here


@pytest.mark.parametrize("version", ["2.13.0", "2.13.0+cpu", "2.13.1", "2.13.0a0+git1234567"])
def test_the_tested_torch_versions_say_nothing(version: str) -> None:
    assert untested_torch(version) is None


@pytest.mark.parametrize("version", ["2.6.0", "2.12.1", "2.14.0", "2.14.0.dev20260101+cpu", "3.0.0", "1.13.1",
                                     "nightly"])
def test_every_other_torch_version_is_named_with_the_tested_ones(version: str) -> None:
    assert untested_torch(version) == (
        f"autopart: warning: torch {version} is not a version autopart was tested on (tested: torch 2.13); "
        f"it may work, but its pipelining internals may differ")


def test_the_installed_torch_is_a_tested_one() -> None:
    """The suite runs on the torch it claims (setup.cfg: torch>=2.13,<3, tested 2.13)."""
    assert untested_torch(torch.__version__) is None
    assert "torch>=2.13,<3" in (ROOT / "setup.cfg").read_text()


def test_an_untested_torch_is_said_once_in_one_line_and_only_by_rank_0(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(torch_compat, "_warned", False)
    monkeypatch.setenv("RANK", "1")
    assert not warn_if_untested("2.14.0")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("AUTOPART_LAUNCHED", "1")  # a rank of autopart's launcher: the launcher said it
    assert not warn_if_untested("2.14.0")
    monkeypatch.delenv("AUTOPART_LAUNCHED")
    assert warn_if_untested("2.14.0") and not warn_if_untested("2.14.0")
    assert not warn_if_untested("2.13.0")
    assert capsys.readouterr().err == untested_torch("2.14.0") + "\n"


@pytest.mark.parametrize("text, timed_out", [
    # what gloo raises in torch 2.13 (a plain RuntimeError): the receive that waited, then the next operation
    ("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 2000ms "
     "for recv operation to complete", True),
    ("Application timeout caused pair closure", True),
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:1234", False),
    ("loss is nan at step 3", False),
])
def test_a_timeout_is_told_from_gloos_own_words(text: str, timed_out: bool) -> None:
    assert is_timeout(RuntimeError(text)) is timed_out


def test_the_error_file_is_read_back_by_torchelastic_as_our_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchelastic's own reader (ProcessFailure, what the agent builds from a rank's error file) gets the line
    where it expects a traceback, and the launcher takes it back out."""
    path = tmp_path / "error.json"
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(path))
    write_error_file("ValueError: 4 stages > 3 blocks")
    failure = ProcessFailure(local_rank=1, pid=os.getpid(), exitcode=1, error_file=str(path))
    assert failure.message == {"message": "RankFailure: ValueError: 4 stages > 3 blocks",
                               "extraInfo": {"py_callstack": "ValueError: 4 stages > 3 blocks\n",
                                             "timestamp": str(failure.timestamp)}}
    assert failure_line(failure) == "ValueError: 4 stages > 3 blocks"
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE")
    path.unlink()
    write_error_file("anything")  # outside torchrun: nothing is written
    assert not path.exists()


@pytest.mark.parametrize("args, kwargs, full", [
    ((), {}, True),                                  # the default
    ((None,), {}, True),
    ((None, False), {}, False),                      # by position, after the loss (torch's signature)
    ((None, True, True), {}, True),
    ((None,), {"full_backward": False}, False),      # by keyword, as the zero-bubble schedules pass it
    ((), {"loss": None, "full_backward": False, "last_backward": True}, False),
    ((None, False), {"last_backward": True}, False),
])
def test_full_backward_is_found_where_torchs_signature_puts_it(args: tuple[object, ...], kwargs: dict[str, object],
                                                               full: bool) -> None:
    assert _full_backward(args, kwargs) is full


@pytest.mark.slow
def test_every_action_zero_bubble_runs_is_timed_as_the_kind_the_simulator_predicts(tmp_path: Path) -> None:
    """ZBVZeroBubble on 2 ranks: the measured trace holds, rank by rank, the very actions of the predicted step,
    forward, whole backward (B), input-gradient half (I, ``full_backward=False``) and weight gradient (W)."""
    spec = f"{ROOT / 'tests' / 'helpers.py'}:sleep_spec"
    profile, plan, trace = tmp_path / "p.json", tmp_path / "plan.json", tmp_path / "t.json"
    assert run_cli_here("profile", spec, "--microbatch-size", "1", "-o", str(profile)).returncode == 0
    made = run_cli_here("partition", str(profile), "--stages", "2", "--schedule", "ZBVZeroBubble",
                        "--microbatches", "4", "-o", str(plan))
    assert made.returncode == 0, made.stderr
    ran = run_cli("train", str(plan), "--model", spec, "--steps", "1", "--trace", str(trace))
    assert ran.returncode == 0, ran.stderr[-2000:]
    events = [e for e in json.loads(trace.read_text())["traceEvents"] if e["ph"] == "X"]
    measured, predicted = ([sorted(e["name"] for e in events if e["pid"] == pid and e["tid"] == rank)
                            for rank in (0, 1)] for pid in (0, 1))
    assert measured == predicted
    kinds = {name.lstrip("0123456789")[0] for names in measured for name in names if name != "OPT"}
    assert {"F", "I", "W"} <= kinds, measured

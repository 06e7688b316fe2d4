"""Several machines, tested on one: two torchrun agents as two nodes (one rank each) over c10d on 127.0.0.1."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli, run_cli_here

TINY = str(ROOT / "profiles" / "gpt2-tiny-cpu-mb4.json")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_two_nodes_train_the_same_losses_as_one_launcher(tmp_path: Path) -> None:
    plan = tmp_path / "plan.json"
    made = run_cli_here("partition", TINY, "--stages", "2", "--microbatches", "2", "-o", str(plan))
    assert made.returncode == 0, made.stderr
    single = run_cli("train", str(plan), "--model", "gpt2-tiny", "--steps", "2", "--report", str(tmp_path / "one.json"))
    assert single.returncode == 0, single.stderr[-2000:]

    endpoint = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("AUTOPART_TRACEBACK", None)
    nodes = []
    for node in range(2):  # node 0 hosts the rendezvous store; both run the same command otherwise
        nodes.append(subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
             "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "autopart-two-nodes",
             "--rdzv-conf", f"is_host={'true' if node == 0 else 'false'}",
             "-m", "autopart", "train", str(plan), "--model", "gpt2-tiny", "--steps", "2",
             "--report", str(tmp_path / f"node{node}.json")],
            cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    try:
        for proc in nodes:
            out, err = proc.communicate(timeout=300)
            results.append((proc.returncode, out, err))
    finally:
        for proc in nodes:
            proc.kill()
    for code, _, err in results:
        assert code == 0, err[-3000:]
    reports = [tmp_path / f"node{n}.json" for n in range(2) if (tmp_path / f"node{n}.json").exists()]
    assert len(reports) == 1  # written by the rank of the last stage, on whichever node it ran
    two = json.loads(reports[0].read_text())["losses"]
    one = json.loads((tmp_path / "one.json").read_text())["losses"]
    assert len(two) == len(one) == 2
    assert two == pytest.approx(one, rel=1e-6, abs=1e-6)

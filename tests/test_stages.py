"""The executor with real torchrun/gloo processes: a pipelined step equals one process's step."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autopart.measure.spec import load_model
from autopart.formats.plan import Plan
from tests.conftest import ROOT, run_cli_here

TINY = str(ROOT / "profiles" / "gpt2-tiny-cpu-mb4.json")


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           *args], cwd=cwd, env=env, text=True, capture_output=True, timeout=300)


@pytest.mark.parametrize("schedule, microbatches", [("GPipe", 2), ("1F1B", 4), ("Interleaved1F1B", 4),
                                                    ("ZBVZeroBubble", 4)])
@pytest.mark.slow
def test_pipelined_step_equals_single_process(schedule: str, microbatches: int, tmp_path: Path) -> None:
    plan_path = tmp_path / "plan.json"
    made = run_cli_here("partition", TINY, "--stages", "2", "--schedule", schedule, "--microbatches", str(microbatches),
                   "-o", str(plan_path))
    assert made.returncode == 0, made.stderr
    result = _torchrun(str(ROOT / "tests" / "pp_grad_check.py"), str(plan_path), "gpt2-tiny", str(tmp_path),
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = Plan.from_json(plan_path)

    torch.manual_seed(0)
    bundle = load_model("gpt2-tiny")
    g = torch.Generator().manual_seed(1)
    batch = plan.microbatches * 2
    x = torch.randint(0, 256, (batch, 16), generator=g)
    y = torch.randint(0, 256, (batch, 16), generator=g)
    assert bundle.loss_fn is not None
    loss = bundle.loss_fn(bundle.module(x), y)
    loss.backward()
    expected = {name: p.grad for name, p in bundle.module.named_parameters()}

    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    got = {name: grad for r in ranks for name, grad in r["grads"].items()}
    assert set(got) == set(expected)
    for name, grad in expected.items():
        scale = float(grad.abs().max()) or 1.0
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-5 * scale, msg=name)
    losses = [v for r in ranks if r["losses"] for v in r["losses"]]
    assert len(losses) == plan.microbatches
    assert sum(losses) / len(losses) == pytest.approx(float(loss.detach()), rel=1e-5)

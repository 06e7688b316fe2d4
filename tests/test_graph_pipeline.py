"""Models that are not a chain, on real torchrun/gloo ranks: one pipelined step equals the unpartitioned model.

U-Net skips (BatchNorm included), a Hugging Face GPT-2 with its tied embedding, two inputs and two outputs;
GPipe, 1F1B and Interleaved1F1B; and three ranks where a skip passes through the middle one.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autopart.measure.spec import call_model, load_model
from tests.conftest import ROOT
from tests.helpers import plan_for

MODELS = str(ROOT / "tests" / "graph_models.py")


def _batch(spec: str, microbatches: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    n = 2 * microbatches
    if spec.endswith(":unet"):
        return (torch.randn(n, 1, 8, 8, generator=g),), torch.randn(n, 2, 8, 8, generator=g)
    if spec.endswith(":two_in_two_out") or spec.endswith(":two_in_two_out_keywords"):
        return (torch.randn(n, 6, generator=g), torch.rand(n, 1, generator=g) + 0.5), torch.randn(n, 3, generator=g)
    return (torch.randint(0, 256, (n, 16), generator=g),), torch.randint(0, 256, (n, 16), generator=g)


def _reference(spec: str, inputs: tuple[torch.Tensor, ...], target: torch.Tensor, microbatches: int
               ) -> tuple[float, torch.nn.Module]:
    """The unpartitioned model, one micro-batch at a time, gradients of the mean loss (what the pipeline computes)."""
    torch.manual_seed(0)
    bundle = load_model(spec)
    assert bundle.loss_fn is not None
    model = bundle.module.train()
    parts = [x.tensor_split(microbatches) for x in inputs]
    losses = [bundle.loss_fn(call_model(model, [p[k] for p in parts], bundle.input_names),
                             target.tensor_split(microbatches)[k]) for k in range(microbatches)]
    loss = torch.stack(losses).mean()
    loss.backward()
    return float(loss.detach()), model


@pytest.mark.parametrize("factory, balance, schedule, microbatches, per_rank", [
    ("unet", [2, 3], "GPipe", 2, 1),
    ("unet", [1, 1, 2, 1], "Interleaved1F1B", 2, 2),
    ("hf_gpt2", [3, 3], "1F1B", 2, 1),
    ("hf_gpt2", [2, 1, 1, 2], "Interleaved1F1B", 4, 2),
    ("two_in_two_out", [2, 2], "1F1B", 4, 1),
    ("two_in_two_out_keywords", [1, 3], "GPipe", 2, 1),
    ("unet", [1, 2, 2], "1F1B", 3, 1),  # three ranks: down1's output passes through the middle rank
])
@pytest.mark.slow
def test_pipelined_step_equals_the_unpartitioned_model(factory: str, balance: list[int], schedule: str,
                                                       microbatches: int, per_rank: int, tmp_path: Path) -> None:
    if factory.startswith("hf_"):
        pytest.importorskip("transformers")
    spec = f"{MODELS}:{factory}"
    plan = plan_for(spec, balance, schedule, microbatches, tmp_path / "plan.json", per_rank)
    inputs, target = _batch(spec, microbatches)
    torch.save((inputs, target), tmp_path / "batch.pt")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                             str(plan.num_ranks), str(ROOT / "tests" / "pp_grad_check.py"), str(tmp_path / "plan.json"),
                             spec, str(tmp_path), str(tmp_path / "batch.pt")],
                            cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    expected_loss, model = _reference(spec, inputs, target, microbatches)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(plan.num_ranks)]
    got = {name: grad for r in ranks for name, grad in r["grads"].items()}
    expected = {name: p.grad for name, p in model.named_parameters(remove_duplicate=False)}
    assert set(got) <= set(expected) and {id(model.get_parameter(n)) for n in got} == {
        id(p) for p in model.parameters()}
    # a conv bias before BatchNorm has a gradient of rounding noise: tolerances are relative to the largest one
    scale = max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None)
    for name, grad in got.items():
        want = model.get_parameter(name).grad
        assert want is not None
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-6 * scale, msg=name)
    losses = [v for r in ranks if r["losses"] for v in r["losses"]]
    assert len(losses) == microbatches
    assert sum(losses) / len(losses) == pytest.approx(expected_loss, rel=1e-5)

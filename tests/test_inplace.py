"""In-place ops where a stage starts (``ReLU(inplace=True)``, ``Dropout(inplace=True)`` after a cut) and on the model
input: profiled, and a stage that receives its input computes what the unpartitioned model computes, in one process
and on two real gloo ranks."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from autopart.measure.blocks import ChildrenChain, chain_of
from autopart.measure.cutpoints import contiguous_grad
from autopart.measure.profiler import profile_model
from autopart.measure.spec import load_model
from tests.conftest import ROOT

MODELS = str(ROOT / "tests" / "inplace_models.py")


def test_contiguous_grad_may_be_changed_in_place_and_still_gives_contiguous_gradients() -> None:
    x = torch.randn(4, 3, requires_grad=True)
    y = contiguous_grad(x)
    y.relu_()  # refused when the function's output is the input or a view of it
    torch.cat([y, 2 * y], 1).t().sum().backward()
    assert x.grad is not None
    torch.testing.assert_close(x.grad, 3.0 * (x.detach() > 0))
    got, = torch.autograd.grad(torch.cat([contiguous_grad(x), x], 1).t().sum(), x)
    assert got.is_contiguous()


@pytest.mark.parametrize("factory, blocks", [
    ("relu_chain", ["0", "1", "2"]),
    ("dropout_chain", ["0", "1", "2"]),
    ("relu_first", ["0", "1", "2"]),
    ("inplace_on_input", ["0", "1"]),
    ("classified_dropout", ["body.0", "body.1", "classifier"]),  # captured: the in-place ops start a graph block
])
def test_a_block_that_starts_with_an_inplace_op_profiles(factory: str, blocks: list[str]) -> None:
    bundle = load_model(f"{MODELS}:{factory}")
    assert bundle.example is not None
    profile = profile_model(bundle.module, bundle.example, name=factory, warmup=0, repeats=2)
    assert [layer.name for layer in profile.layers] == blocks
    assert all(layer.backward_ms > 0 for layer in profile.layers if layer.param_bytes)


@pytest.mark.parametrize("factory, cut", [("relu_chain", 1), ("dropout_chain", 1), ("classified_dropout", 2)])
def test_a_stage_that_starts_with_an_inplace_op_computes_what_the_model_does(factory: str, cut: int) -> None:
    """Blocks before the cut, then the stage after it on a received input (a leaf that requires grad, as
    pipelining gives it): the output and every gradient are the unpartitioned model's (the same dropout mask:
    the same seed, and nothing random before the cut)."""
    bundle = load_model(f"{MODELS}:{factory}")
    model, x = bundle.module.train(), torch.randn(6, 8)
    torch.manual_seed(3)
    expected_out = model(x.clone())
    expected_out.pow(2).sum().backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    chain = chain_of(model, (x,), factory)
    last = len(chain.blocks) - 1
    before, after = chain.stage_module(0, cut - 1), chain.stage_module(cut, last)
    sent = before(x.clone())
    sent = sent if isinstance(sent, tuple) else (sent,)
    received = [t.detach().requires_grad_(True) for t in sent]
    torch.manual_seed(3)
    out = after(*received)
    out = out[0] if isinstance(out, tuple) else out
    torch.testing.assert_close(out, expected_out)
    out.pow(2).sum().backward()
    torch.autograd.backward(sent, [r.grad for r in received])
    got = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert set(got) == set(expected)
    for name, grad in got.items():
        torch.testing.assert_close(grad, expected[name], msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("factory, balance", [("relu_chain", [1, 2]), ("classified", [2, 1])])
def test_two_ranks_with_an_inplace_op_first_on_a_stage_equal_one_process(factory: str, balance: list[int],
                                                                           tmp_path: Path) -> None:
    """The second stage starts with ``ReLU(inplace=True)``: one 1F1B step on two gloo ranks gives the loss and
    gradients of the unpartitioned model."""
    from tests.helpers import plan_for
    from tests.test_graph_pipeline import _reference

    spec = f"{MODELS}:{factory}"
    plan = plan_for(spec, balance, "1F1B", 2, tmp_path / "plan.json")
    assert plan.stages[1].blocks[0] == ("1" if factory == "relu_chain" else "classifier")
    g = torch.Generator().manual_seed(1)
    inputs, target = (torch.randn(4, 8, generator=g),), torch.randn(4, 4, generator=g)
    torch.save((inputs, target), tmp_path / "batch.pt")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             str(ROOT / "tests" / "pp_grad_check.py"), str(tmp_path / "plan.json"), spec,
                             str(tmp_path), str(tmp_path / "batch.pt")],
                            cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    expected_loss, model = _reference(spec, inputs, target, 2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    got = {name: grad for r in ranks for name, grad in r["grads"].items()}
    assert set(got) == {name for name, _ in model.named_parameters()}
    for name, grad in got.items():
        torch.testing.assert_close(grad, model.get_parameter(name).grad, msg=name)
    losses = [v for r in ranks if r["losses"] for v in r["losses"]]
    assert sum(losses) / len(losses) == pytest.approx(expected_loss, rel=1e-5)


def test_children_that_change_the_input_in_place_are_still_a_chain() -> None:
    """The check that the children reproduce the forward runs both on copies of the example: had the first run
    doubled the example, the second would see 4x and call the model not a chain (then capture it)."""
    from tests.inplace_models import ScaledPair

    x = torch.randn(4, 8)
    chain = chain_of(ScaledPair(), (x,), "scaled_pair")
    assert isinstance(chain, ChildrenChain) and chain.names == ["scale", "out"]

"""Deferred BatchNorm: running statistics over the mini-batch, as the unpartitioned model would keep them."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from autopart.measure.batchnorm import DeferredBatchNorm, deferred_batchnorm, deferred_layers
from autopart.measure.optimizers import make_optimizer
from autopart.run.build import build_model
from autopart.run.checkpoint import merge_checkpoint
from autopart.run.data import training_data
from tests.conftest import ROOT, run_cli, run_cli_here

SPEC = f"{ROOT / 'tests' / 'helpers.py'}:batchnorm_spec"
UNET = f"{ROOT / 'tests' / 'graph_models.py'}:unet"
"""A U-Net with BatchNorm, not a chain of its children: captured as a graph."""

KINDS = [(nn.BatchNorm1d, (5,)), (nn.BatchNorm1d, (5, 7)), (nn.BatchNorm2d, (3, 4, 4)), (nn.BatchNorm3d, (3, 2, 3, 2))]


@settings(max_examples=60)
@given(kind=st.sampled_from(KINDS), momentum=st.sampled_from([0.1, 0.5, None]),
       sizes=st.lists(st.integers(2, 9), min_size=1, max_size=5), steps=st.integers(1, 3), seed=st.integers(0, 99))
def test_deferred_statistics_equal_one_forward_of_the_mini_batch(kind: Any, momentum: float | None, sizes: list[int],
                                                                  steps: int, seed: int) -> None:
    """Micro-batches of any sizes, merged and committed once per step, equal one BatchNorm forward of their
    concatenation per step: running mean, running variance (unbiased) and ``num_batches_tracked``."""
    cls, shape = kind
    g = torch.Generator().manual_seed(seed)
    reference = cls(shape[0], momentum=momentum)
    model = nn.Sequential(copy.deepcopy(reference))
    with deferred_batchnorm(model) as swapped:
        assert swapped == 1 and isinstance(model[0], DeferredBatchNorm)
        for _ in range(steps):
            chunks = [torch.randn(n, *shape, generator=g) * 3 + 1 for n in sizes]
            reference(torch.cat(chunks))
            outs = [model(c) for c in chunks]
            for layer in deferred_layers(model):
                layer.commit()
            for c, out in zip(chunks, outs):  # the forward still normalises each micro-batch on its own
                torch.testing.assert_close(out, nn.functional.batch_norm(c, None, None, model[0].weight, model[0].bias,
                                                                         True, 0.0, model[0].eps))
    assert type(model[0]) is cls  # put back, the same tensors
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(model[0], name), getattr(reference, name), rtol=1e-5, atol=1e-5)


def test_the_swap_keeps_names_tensors_and_eval() -> None:
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Sequential(nn.BatchNorm1d(6, affine=False)))
    before = model.state_dict()
    weight = model[1].weight
    with deferred_batchnorm(model, "micro") as none:
        assert none == 0 and type(model[1]) is nn.BatchNorm1d
    with deferred_batchnorm(model):
        assert model.state_dict().keys() == before.keys() and model[1].weight is weight
        assert [type(m).__name__ for m in model.modules()].count("DeferredBatchNorm") == 2
        model.eval()
        x = torch.randn(8, 4)
        out = model(x)  # eval: the running statistics, nothing merged
        assert all(layer._count == 0 for layer in deferred_layers(model))
    assert not model[1].training  # the mode set while swapped stays
    torch.testing.assert_close(out, model(x))


def _ghost(bn: nn.modules.batchnorm._BatchNorm, microbatches: int, mode: str) -> None:
    """Make ``bn`` run as the pipeline runs it on a whole mini-batch, with PyTorch's own kernel: every
    micro-batch's rows normalised with their own statistics; the running statistics updated once from all the
    mini-batch's rows (deferred) or once per micro-batch, in order (micro)."""
    def forward(x: torch.Tensor) -> torch.Tensor:
        chunks = x.tensor_split(microbatches)
        if mode == "micro":
            return torch.cat([nn.functional.batch_norm(c, bn.running_mean, bn.running_var, bn.weight, bn.bias, True,
                                                       _factor(bn), bn.eps) for c in chunks])
        out = torch.cat([nn.functional.batch_norm(c, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
                         for c in chunks])
        with torch.no_grad():
            nn.functional.batch_norm(x, bn.running_mean, bn.running_var, None, None, True, _factor(bn), bn.eps)
        return out

    bn.forward = forward  # type: ignore[method-assign]


def _factor(bn: nn.modules.batchnorm._BatchNorm) -> float:
    """Count one more batch; the weight of its statistics (``momentum``, or 1/batches for ``momentum=None``)."""
    assert bn.num_batches_tracked is not None
    bn.num_batches_tracked.add_(1)
    return bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked)


def _reference(spec: str, mode: str, steps: int, microbatches: int, lr: float) -> dict[str, torch.Tensor]:
    """The unpartitioned model in one process, one forward and backward of each mini-batch per step, with
    its BatchNorm layers run as :func:`_ghost` says (so its gradient is the pipeline's too), and SGD."""
    bundle = build_model(spec, 0)
    model = bundle.module
    assert bundle.example is not None
    example = bundle.example[0]
    data = training_data(bundle, None, example.shape[0] * microbatches, tuple(example.shape[1:]), 0, 0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            _ghost(m, microbatches, mode)
    optimizer = make_optimizer("sgd", list(model.parameters()), lr=lr)
    model.train()
    for _ in range(steps):
        x, y = next(data.batches)
        optimizer.zero_grad()
        data.loss_fn(model(x), y).backward()  # MSE over equal micro-batches: the mean of theirs
        optimizer.step()
    return model.state_dict()


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each model's profile, made once for the module's tests."""
    folder, made = tmp_path_factory.mktemp("bn"), {}
    for i, spec in enumerate((SPEC, UNET)):
        out = folder / f"p{i}.json"
        ran = run_cli_here("profile", spec, "--repeats", "1", "--warmup", "0", "-o", str(out))
        assert ran.returncode == 0, ran.stderr
        assert json.loads(out.read_text())["batchnorm"] == "deferred"  # measured as it will train
        made[spec] = out
    return made


@pytest.mark.parametrize("spec, schedule, mode", [(SPEC, "GPipe", "deferred"), (SPEC, "1F1B", "deferred"),
                                                  (SPEC, "1F1B", "micro"), (UNET, "1F1B", "deferred")],
                         ids=["chain-GPipe-deferred", "chain-1F1B-deferred", "chain-1F1B-micro", "unet-1F1B-deferred"])
@pytest.mark.slow
def test_pipelined_running_statistics_equal_the_unpartitioned_models(profiles: dict[str, Path], tmp_path: Path,
                                                                      spec: str, schedule: str, mode: str) -> None:
    """3 steps of 4 micro-batches on 2 real ranks: every BatchNorm's running mean, variance and
    ``num_batches_tracked`` equal the unpartitioned model's after one forward of each mini-batch (deferred:
    updated once per step from all its rows; micro: once per micro-batch, PyTorch's own, as before). The
    U-Net is captured as a graph: its stages call the BatchNorm layers as modules, so they are swapped too."""
    plan, ckpt = tmp_path / "plan.json", tmp_path / "ckpt"
    split = ["--balance", "7,11"] if spec == SPEC else []
    made = run_cli_here("partition", str(profiles[spec]), "--stages", "2", *split, "--schedule", schedule,
                   "--microbatches", "4", "--optimizer", "sgd", "-o", str(plan))
    assert made.returncode == 0, made.stderr
    flags = ["--batchnorm", mode] if mode == "micro" else []
    ran = run_cli("train", str(plan), "--model", spec, "--steps", "3", "--lr", "0.05", "--checkpoint", str(ckpt),
                  *flags)
    assert ran.returncode == 0, ran.stderr[-3000:]
    first = "0.1" if spec == SPEC else "down1.1"
    assert f"BatchNorm: {4 if spec == SPEC else 2} layers ({first}, ...), {mode}" in ran.stderr
    got = merge_checkpoint(ckpt)
    expected = _reference(spec, mode, steps=3, microbatches=4, lr=0.05)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        if "running" in name or "num_batches" in name:
            torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-5, msg=name)
        else:  # the weights trained the same way (pipelined gradients equal one process's to 1e-5)
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=name)
    assert int(got[f"{first}.num_batches_tracked"]) == (3 if mode == "deferred" else 12)

"""Precision is part of the plan: the profile measures under it, the plan records it, ``train`` runs it.

The multi-rank tests run real torchrun/gloo ranks through ``autopart train`` and compare them with one
process running the same blocks under the same autocast (and, for fp16-mixed, the same gradient scaler).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from autopart.errors import AutopartError
from autopart.formats.plan import Plan
from autopart.formats.precision import PRECISIONS, check_precision, precision_of_dtype
from autopart.formats.profile import Profile
from autopart.measure.api import ProfileConfig, training_precision
from autopart.measure.blocks import chain_of
from autopart.measure.optimizers import make_optimizer
from autopart.measure.profiler import profile_model
from autopart.run.build import build_model
from autopart.run.checkpoint import merge_checkpoint
from tests.conftest import ROOT, assert_one_line_error, run_cli, run_cli_here
from tests.helpers import plan_for

HELPERS = str(ROOT / "tests" / "helpers.py")
TINY = ROOT / "profiles" / "gpt2-tiny-cpu-mb4.json"
GOLDEN_PLAN = ROOT / "tests" / "golden" / "plan-gpt2-tiny-search.json"


def test_the_table() -> None:
    assert list(PRECISIONS) == ["fp32", "bf16-mixed", "bf16-true", "fp16-mixed"]
    assert [(p.param_dtype, p.dtype, p.mixed, p.scaler) for p in PRECISIONS.values()] == [
        ("float32", "float32", False, False), ("float32", "bfloat16", True, False),
        ("bfloat16", "bfloat16", False, False), ("float32", "float16", True, True)]
    assert precision_of_dtype("float32") == "fp32" and precision_of_dtype("bfloat16") == "bf16-true"
    with pytest.raises(AutopartError, match="unknown precision 'fp8'; known: fp32, bf16-mixed"):
        check_precision("fp8")


@pytest.mark.parametrize("flags, message", [
    ({"dtype": "float16"}, "^dtype float16 is not offered .*use precision fp16-mixed"),
    ({"dtype": "bfloat16", "precision": "fp32"}, "^dtype bfloat16 and precision fp32 both given"),
    ({"precision": "fp8"}, "^precision: unknown precision 'fp8'"),
])
def test_dtype_is_an_alias_that_refuses_float16_and_both(flags: dict[str, str], message: str) -> None:
    with pytest.raises(AutopartError, match=message):
        ProfileConfig(**flags)  # type: ignore[arg-type]


def test_dtype_alias_maps_to_precisions() -> None:
    assert training_precision(ProfileConfig(dtype="bfloat16")).name == "bf16-true"
    assert training_precision(ProfileConfig(dtype="float32")).name == "fp32"
    assert training_precision(ProfileConfig()).name == "fp32"


def _stack(rows: int) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)), \
        torch.randn(rows, 64)


def test_bf16_mixed_halves_activations_and_keeps_param_bytes() -> None:
    """Known answer: under autocast each saved activation is bfloat16 (half), and each Linear after the first
    also saves its bfloat16 copy of the weight for the input's gradient (the first's input needs none)."""
    model, x = _stack(1024)
    fp32 = profile_model(model, x, warmup=0, repeats=1)
    mixed = profile_model(model, x, warmup=0, repeats=1, precision="bf16-mixed")
    assert (mixed.precision, mixed.dtype, mixed.features) == ("bf16-mixed", "float32", ("precision",))
    assert [x.param_bytes for x in mixed.layers] == [x.param_bytes for x in fp32.layers] == [64 * 65 * 4, 0] * 2 + [
        64 * 65 * 4]
    weight_copy = 64 * 64 * 2
    assert [x.activation_bytes for x in mixed.layers] == [
        a.activation_bytes // 2 + (weight_copy if i in (2, 4) else 0) for i, a in enumerate(fp32.layers)]
    assert sum(x.activation_bytes for x in mixed.layers) / sum(x.activation_bytes for x in fp32.layers) < 0.55
    assert [x.output_bytes for x in mixed.layers] == [x.output_bytes // 2 for x in fp32.layers]


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_by_block_on_meta_measures_as_the_whole_model_does(precision: str) -> None:
    """A model too big to build, one block at a time, under the precision: the same bytes per block as the whole
    model (a later block's input needs a gradient there too, so a Linear saves its bfloat16 weight)."""
    with torch.device("meta"):
        meta = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    whole, x = _stack(256)
    by_block = profile_model(meta, x, warmup=0, repeats=1, precision=precision)
    measured = profile_model(whole[:3], x, warmup=0, repeats=1, precision=precision)
    assert by_block.precision == precision
    assert [(a.activation_bytes, a.output_bytes) for a in by_block.layers] == \
        [(a.activation_bytes, a.output_bytes) for a in measured.layers]


def test_bf16_true_halves_param_bytes() -> None:
    model, x = _stack(8)
    fp32 = profile_model(model, x, warmup=0, repeats=1)
    true = profile_model(model.to(torch.bfloat16), x.bfloat16(), warmup=0, repeats=1, precision="bf16-true")
    assert (true.precision, true.dtype) == ("bf16-true", "bfloat16")
    assert [x.param_bytes for x in true.layers] == [x.param_bytes // 2 for x in fp32.layers]
    with pytest.raises(AutopartError, match="precision bf16-mixed keeps parameters in float32, but the model's are "
                                            "bfloat16"):
        profile_model(model, x.bfloat16(), warmup=0, repeats=1, precision="bf16-mixed")


def test_profile_and_plan_carry_precision_and_old_files_load(tmp_path: Path) -> None:
    old = json.loads(TINY.read_text())
    assert "precision" not in old
    assert Profile.from_dict(old).precision == "fp32"
    assert Profile.from_dict({**old, "dtype": "bfloat16"}).precision == "bf16-true"
    mixed = Profile.from_dict({**old, "precision": "bf16-mixed", "features": ["precision"]})
    saved = mixed.to_dict()
    assert saved["features"] == ["precision"] and saved["precision"] == "bf16-mixed"
    path = tmp_path / "bf16.json"
    mixed.to_json(path)
    out = tmp_path / "plan.json"
    made = run_cli_here("partition", str(path), "--stages", "2", "-o", str(out))
    assert made.returncode == 0, made.stderr
    data = json.loads(out.read_text())
    assert data["precision"] == "bf16-mixed" and data["features"] == ["precision"]
    assert Plan.from_json(out).precision == "bf16-mixed"
    old_plan = json.loads(GOLDEN_PLAN.read_text())
    assert "precision" not in old_plan and Plan.from_dict(old_plan).precision == "fp32"
    assert "precision" not in Plan.from_dict(old_plan).to_dict()
    with pytest.raises(AutopartError, match="precision: unknown precision 'fp8'"):
        Plan.from_dict({**old_plan, "precision": "fp8"})


@pytest.mark.slow
def test_profile_cli_precision_and_bad_dtypes(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    made = run_cli("profile", "gpt2-tiny", "--precision", "bf16-mixed", "--repeats", "1", "--warmup", "0",
                   "-o", str(out))
    assert made.returncode == 0, made.stderr[-2000:]
    assert "bf16-mixed)" in made.stderr and Profile.from_json(out).precision == "bf16-mixed"
    assert_one_line_error(run_cli("profile", "gpt2-tiny", "--dtype", "float16"),
                          "dtype float16 is not offered", "use precision fp16-mixed")
    assert_one_line_error(run_cli("profile", "gpt2-tiny", "--dtype", "bfloat16", "--precision", "bf16-true"),
                          "dtype bfloat16 and precision bf16-true both given")


@pytest.mark.slow
def test_train_with_another_precision_than_the_plans_is_refused(tmp_path: Path) -> None:
    plan = plan_for(f"{HELPERS}:tanh_mlp_spec", [3, 2], "GPipe", 2, tmp_path / "plan.json", precision="bf16-mixed")
    assert plan.precision == "bf16-mixed"
    result = run_cli("train", str(tmp_path / "plan.json"), "--model", f"{HELPERS}:tanh_mlp_spec", "--precision", "fp32")
    assert_one_line_error(result, "--precision fp32, but plan", "was made for bf16-mixed",
                          "autopart profile", "--precision fp32")


def _reference(spec: str, microbatches: int, steps: int, precision: str, lr: float
               ) -> tuple[list[float], dict[str, torch.Tensor]]:
    """One process: every micro-batch through all blocks under the precision's autocast, the mean loss's
    gradients (scaled, unscaled and the step skipped on inf/nan by torch's GradScaler for fp16-mixed), AdamW."""
    bundle = build_model(spec, 3)
    assert bundle.loss_fn is not None and bundle.data is not None
    data = list(bundle.data)
    prec = check_precision(precision)
    chain = chain_of(bundle.module, (data[0][0].tensor_split(microbatches)[0],), spec)
    whole = chain.stage_module(0, len(chain.blocks) - 1)
    optimizer = make_optimizer("adamw", list(bundle.module.parameters()), lr=lr)
    scaler = torch.amp.GradScaler("cpu", enabled=prec.scaler)
    losses = []
    for step in range(steps):
        inputs, target = data[step]
        optimizer.zero_grad()
        per_mb = []
        for x, t in zip(inputs.tensor_split(microbatches), target.tensor_split(microbatches)):
            with torch.autocast("cpu", dtype=getattr(torch, prec.dtype), enabled=prec.mixed):
                per_mb.append(bundle.loss_fn(whole(x), t))
        loss = torch.stack(per_mb).mean()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(float(loss.detach()))
    return losses, bundle.module.state_dict()


def _train(plan: Path, spec: str, tmp_path: Path, steps: int, lr: float) -> tuple[list[float], dict[str, torch.Tensor]]:
    report = tmp_path / "report.json"
    result = run_cli("train", str(plan), "--model", spec, "--steps", str(steps), "--lr", str(lr), "--seed", "3",
                     "--checkpoint", str(tmp_path / "ckpt"), "--report", str(report), "--threads", "1")
    assert result.returncode == 0, result.stderr[-3000:]
    return [float(v) for v in json.loads(report.read_text())["losses"]], merge_checkpoint(tmp_path / "ckpt")


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed"])
def test_a_mixed_plan_trains_mixed_on_two_ranks_as_one_process_does(precision: str, tmp_path: Path) -> None:
    """2 real ranks, 3 steps: losses and weights equal one process under the same autocast (and scaler), and
    differ from fp32's by far more than that, so autocast was on in the stages."""
    spec = f"{HELPERS}:tanh_mlp_spec"
    plan_for(spec, [3, 2], "1F1B", 2, tmp_path / "plan.json", precision=precision)
    losses, weights = _train(tmp_path / "plan.json", spec, tmp_path, 3, lr=0.01)
    expected, state = _reference(spec, 2, 3, precision, lr=0.01)
    fp32, _ = _reference(spec, 2, 3, "fp32", lr=0.01)
    assert losses == pytest.approx(expected, rel=1e-6)  # the same operations in the same dtypes: equal
    assert max(abs(a - b) / abs(b) for a, b in zip(losses, fp32)) > 1e-4  # and autocast changed them (~1e-3)
    for name, value in state.items():
        assert weights[name].dtype == torch.float32, name  # mixed: float32 master weights, saved as trained
        torch.testing.assert_close(weights[name], value, rtol=1e-6, atol=1e-6, msg=name)


@pytest.mark.slow
def test_fp16_mixed_skips_a_step_with_inf_gradients_on_every_rank(tmp_path: Path) -> None:
    """Step 1's input holds an inf: only stage 0's gradients are not finite. Every rank skips the step (the
    scaler's flag is all-reduced), so after it the weights of both stages are still the initial ones."""
    spec = f"{HELPERS}:inf_first_step_spec"
    plan_for(spec, [1, 1], "GPipe", 2, tmp_path / "plan.json", precision="fp16-mixed")
    losses, weights = _train(tmp_path / "plan.json", spec, tmp_path, 1, lr=0.1)
    initial = build_model(spec, 3).module.state_dict()
    assert all(map(lambda v: v == v and abs(v) < 1e6, losses)), losses  # reported unscaled and finite
    for name, value in initial.items():
        assert torch.equal(weights[name], value), name
    expected, _ = _reference(spec, 2, 1, "fp16-mixed", lr=0.1)
    assert losses == pytest.approx(expected, rel=1e-3)


@pytest.mark.slow
def test_a_bf16_true_plan_trains_in_bfloat16(tmp_path: Path) -> None:
    spec = f"{HELPERS}:tanh_mlp_spec"
    plan_for(spec, [3, 2], "GPipe", 2, tmp_path / "plan.json", precision="bf16-true")
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["precision"] == "bf16-true"
    losses, weights = _train(tmp_path / "plan.json", spec, tmp_path, 2, lr=0.01)
    assert all(v.dtype == torch.bfloat16 for v in weights.values())  # checkpoints keep the training dtype
    bundle = build_model(spec, 3)  # initialised in float32, then cast, as the ranks do
    bundle.module.to(torch.bfloat16)
    assert bundle.data is not None and bundle.loss_fn is not None
    x, t = bundle.data[0]
    first = torch.stack([bundle.loss_fn(bundle.module(a.bfloat16()), b) for a, b in zip(x.tensor_split(2),
                                                                                         t.tensor_split(2))]).mean()
    assert losses[0] == pytest.approx(float(first.detach()), rel=1e-2)


@pytest.mark.slow
def test_fp16_mixed_checkpoints_keep_the_scale_and_a_resumed_run_goes_on_from_it(tmp_path: Path) -> None:
    """The skipped first step halves the scale (2^16 -> 2^15); the checkpoint holds it, and a run resumed from
    it keeps it (a fresh scaler would be back at 2^16; none grows within 2000 steps)."""
    spec = f"{HELPERS}:inf_first_step_spec"
    plan_for(spec, [1, 1], "GPipe", 2, tmp_path / "plan.json", precision="fp16-mixed")
    ckpt = tmp_path / "ckpt"
    for steps in (1, 2):
        result = run_cli("train", str(tmp_path / "plan.json"), "--model", spec, "--steps", str(steps), "--lr", "0.1",
                         "--checkpoint", str(ckpt), "--threads", "1")
        assert result.returncode == 0, result.stderr[-3000:]
    for step in (1, 2):
        for stage in (0, 1):
            saved = torch.load(ckpt / f"step-00000{step}" / f"stage-{stage}.pt", weights_only=False)
            assert saved["scaler"]["scale"] == 2.0 ** 15, (step, stage)

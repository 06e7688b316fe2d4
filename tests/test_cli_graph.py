"""Any model, as a user runs it: `autopart graph`, and a U-Net and a Hugging Face GPT-2 profiled, partitioned
and trained from the command line, offline."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from autopart.formats.plan import Plan
from autopart.formats.profile import Profile
from autopart.measure.spec import load_model
from autopart.run.checkpoint import load_stages, merge_checkpoint, latest_complete
from tests.conftest import ROOT, assert_one_line_error, run_cli, run_cli_here

UNET = f"{ROOT / 'tests' / 'graph_models.py'}:unet"
HF = "hf:gpt2:n_layer=2,n_embd=32,n_head=2,n_positions=64"


@pytest.mark.slow
def test_graph_shows_each_cut_with_its_skips() -> None:
    shown = run_cli("graph", UNET)
    assert shown.returncode == 0, shown.stderr
    assert "captured with torch.export" in shown.stdout and "relu (down1, 2 KiB)" in shown.stdout
    data = json.loads(run_cli("graph", UNET, "--json").stdout)
    assert [(b["block"], b.get("main_bytes"), b.get("skip_bytes")) for b in data["blocks"]] == [
        ("down1", 2048, 0), ("down2", 1024, 2048), ("mid", 2048, 2048), ("up2", 4096, 0), ("up1", None, None)]


@pytest.mark.slow
def test_unet_from_a_file_profiles_partitions_and_trains(tmp_path: Path) -> None:
    profile, plan = tmp_path / "unet.json", tmp_path / "plan.json"
    made = run_cli("profile", UNET, "--threads", "1", "--repeats", "3", "-o", str(profile))
    assert made.returncode == 0, made.stderr
    assert [x.skip_bytes for x in Profile.from_json(profile).layers] == [0, 2048, 2048, 0, 0]
    assert run_cli_here("partition", str(profile), "--stages", "2", "--microbatches", "2", "-o", str(plan)).returncode == 0
    trained = run_cli("train", str(plan), "--model", UNET, "--steps", "3", "--checkpoint", str(tmp_path / "ckpt"))
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "step 3/3" in trained.stderr and "SYNTHETIC" in trained.stderr
    merged = merge_checkpoint(tmp_path / "ckpt")
    load_model(UNET).module.load_state_dict(merged)  # strict: the unpartitioned model's names


@pytest.mark.slow
def test_hf_gpt2_offline_trains_with_its_tied_embedding_equal_on_both_stages(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    profile, plan, ckpt = tmp_path / "gpt2.json", tmp_path / "plan.json", tmp_path / "ckpt"
    made = run_cli("profile", HF, "--input-shape", "2,32", "--threads", "1", "--repeats", "3", "-o", str(profile))
    assert made.returncode == 0, made.stderr
    assert Profile.from_json(profile).ties  # the LM head shares the token embedding
    assert run_cli_here("partition", str(profile), "--stages", "2", "--microbatches", "2", "-o", str(plan)).returncode == 0
    stages = Plan.from_json(plan).stages
    assert stages[0].blocks[0] == "transformer.wte" and stages[-1].blocks[-1] == "lm_head"
    trained = run_cli("train", str(plan), "--model", HF, "--steps", "2", "--lr", "3e-3", "--checkpoint", str(ckpt))
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "Python standard library" in trained.stderr and "step 2/2" in trained.stderr
    files = load_stages(latest_complete(ckpt) or ckpt)
    wte, head = files[0]["model"]["transformer.wte.weight"], files[-1]["model"]["lm_head.weight"]
    assert torch.equal(wte, head)  # summed gradients, same updates: the copies never drift
    fresh = load_model(HF).module
    assert not torch.equal(wte, fresh.get_parameter("transformer.wte.weight"))  # it trained
    fresh.load_state_dict(merge_checkpoint(ckpt))


def test_merge_refuses_copies_of_a_tied_weight_that_differ(tmp_path: Path) -> None:
    from autopart.run.checkpoint import mark_complete, save_stage

    weight = torch.ones(2, 2)
    save_stage(tmp_path, 1, 0, {"embed.weight": weight}, None, 0, [0])
    save_stage(tmp_path, 1, 1, {"head.weight": weight + 1}, None, 1, [1], {"head.weight": "embed.weight"})
    mark_complete(tmp_path, 1, 2)
    assert_one_line_error(run_cli("merge-checkpoint", str(tmp_path), "-o", str(tmp_path / "m.pt")),
                          "copies of 'embed.weight' differ", "max difference 1")


@pytest.mark.parametrize("spec, fragment", [
    ("hf:", "give a name after hf:"),
    ("hf:no-such-model-type", "transformers knows no model type 'no-such-model-type'"),
    ("hf:gpt2:n_layerz=2", "GPT2Config has no field 'n_layerz'"),
    ("hf:gpt2:n_layer", "is not FIELD=VALUE"),
])
def test_hf_spec_errors_name_what_is_wrong(spec: str, fragment: str) -> None:
    pytest.importorskip("transformers")
    from autopart.errors import AutopartError

    with pytest.raises(AutopartError, match=re.escape(fragment)):
        load_model(spec)


def test_an_hf_spec_error_is_one_line_from_the_command_line() -> None:
    pytest.importorskip("transformers")
    assert_one_line_error(run_cli("graph", "hf:gpt2:n_layerz=2"), "GPT2Config has no field 'n_layerz'")


@pytest.mark.slow
def test_keyword_inputs_profile_and_train_on_synthetic_data(tmp_path: Path) -> None:
    spec = f"{ROOT / 'tests' / 'graph_models.py'}:two_in_two_out_keywords"
    profile, plan = tmp_path / "p.json", tmp_path / "plan.json"
    assert run_cli_here("profile", spec, "--repeats", "1", "-o", str(profile)).returncode == 0
    assert Profile.from_json(profile).layers[0].skip_bytes == 4 * 1 * 4  # the keyword input "scale", needed last
    assert run_cli_here("partition", str(profile), "--stages", "2", "--microbatches", "2", "-o", str(plan)).returncode == 0
    trained = run_cli("train", str(plan), "--model", spec, "--steps", "2")
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert "SYNTHETIC" in trained.stderr and "step 2/2" in trained.stderr


def test_graph_of_a_chain_of_children_shows_each_output(capsys: pytest.CaptureFixture[str]) -> None:
    from autopart.cli import main

    assert main(["graph", "gpt2-tiny", "--json"]) == 0
    chain = json.loads(capsys.readouterr().out)
    assert not chain["captured"] and chain["blocks"][0]["main_bytes"] == 4 * 64 * 128 * 4


@pytest.mark.slow
def test_a_model_that_cannot_be_captured_is_one_line_from_the_command_line(tmp_path: Path) -> None:
    # torch.export prints the partial graph and warnings when it fails: none of that reaches the user
    model = tmp_path / "gate.py"
    model.write_text("import torch\n\n\nclass Gate(torch.nn.Module):\n    def forward(self, x):\n"
                     "        return x * 2 if x.sum() > 0 else x\n\n\nclass M(torch.nn.Module):\n"
                     "    def __init__(self):\n        super().__init__()\n        self.gate = Gate()\n"
                     "        self.out = torch.nn.Linear(4, 4)\n\n    def forward(self, x):\n"
                     "        return self.out(self.gate(x)) + x\n\n\ndef make():\n    return M(), torch.randn(2, 4)\n")
    assert_one_line_error(run_cli("graph", f"{model}:make"), "could not capture its forward in 'gate'",
                          "give an nn.Sequential")


def test_graph_shows_a_chain_with_a_data_dependent_branch_as_profile_takes_it(tmp_path: Path) -> None:
    """The way out a capture error suggests: an nn.Sequential whose children run in order, here one with an
    ``if`` on the values (no meta device, no capture can run it). graph shows its blocks; profile measures them."""
    spec = f"{ROOT / 'tests' / 'inplace_models.py'}:branchy_chain"
    shown = run_cli_here("graph", spec, "--json")
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert not data["captured"]
    assert [(b["block"], b.get("main_bytes")) for b in data["blocks"]] == [("0", 4 * 8 * 4), ("1", 4 * 8 * 4),
                                                                          ("2", None)]
    assert run_cli_here("graph", spec).returncode == 0
    profiled = run_cli_here("profile", spec, "--repeats", "1", "--warmup", "0", "-o", str(tmp_path / "p.json"))
    assert profiled.returncode == 0, profiled.stderr
    assert [layer.name for layer in Profile.from_json(tmp_path / "p.json").layers] == ["0", "1", "2"]


def test_graph_of_a_chain_the_meta_device_cannot_run_says_why() -> None:
    """Too big to build (4 TB of weights), so built on the meta device, where a data-dependent ``if`` has no
    values to look at: one line that says so."""
    spec = f"{ROOT / 'tests' / 'inplace_models.py'}:huge_branchy_chain"
    assert_one_line_error(run_cli_here("graph", spec),
                          f"model '{spec}' is built on the meta device (its weights need more than half the memory "
                          f"available), where its blocks cannot run: RuntimeError: Tensor.item() cannot be called "
                          f"on meta tensors")

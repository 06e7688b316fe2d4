"""Trained weights out: ``merge-checkpoint --format safetensors`` writes a folder that ``from_pretrained`` loads
(offline) and that equals the merged ``.pt``; tied weights written once; the config from the spec the run
recorded; the folder whole or not at all; the stage files mapped, not read whole."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from autopart.run.checkpoint import mark_complete, save_stage
from tests.conftest import ROOT, assert_one_line_error, run_cli, run_cli_here

GPT2 = "hf:gpt2:n_layer=2,n_embd=32,n_head=2,n_positions=32"
LLAMA = ("hf:llama:num_hidden_layers=2,hidden_size=32,intermediate_size=64,num_attention_heads=2,num_key_value_heads=1,"
         "max_position_embeddings=32,vocab_size=256")
UNET = f"{ROOT / 'tests' / 'graph_models.py'}:unet"

_TRAINED: dict[str, Path] = {}


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``trained(spec)``: the --checkpoint folder of 1 step of ``spec`` on 2 ranks (trained once per session)."""
    def train(spec: str) -> Path:
        if spec not in _TRAINED:
            folder = tmp_path_factory.mktemp("trained")
            profile, plan, ckpt = folder / "profile.json", folder / "plan.json", folder / "ckpt"
            made = run_cli_here("profile", spec, "--microbatch-size", "2", "--repeats", "1", "--warmup", "0",
                                "-o", str(profile))
            assert made.returncode == 0, made.stderr
            parted = run_cli_here("partition", str(profile), "--stages", "2", "--method", "parameters",
                                  "-o", str(plan))
            assert parted.returncode == 0, parted.stderr
            done = run_cli("train", str(plan), "--model", spec, "--steps", "1", "--checkpoint", str(ckpt))
            assert done.returncode == 0, done.stderr[-3000:]
            _TRAINED[spec] = ckpt
        return _TRAINED[spec]
    return train


def _merge(ckpt: Path, out: Path, *extra: str) -> str:
    merged = run_cli_here("merge-checkpoint", str(ckpt), "-o", str(out), *extra)
    assert merged.returncode == 0, merged.stderr
    return merged.stdout.strip()


def _safetensors_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for file in sorted(folder.glob("*.safetensors")) for k, v in load_file(file).items()}


@pytest.mark.slow
@pytest.mark.parametrize("spec, tied", [(GPT2, {"lm_head.weight": "transformer.wte.weight"}), (LLAMA, {})],
                         ids=["gpt2-tied", "llama"])
def test_from_pretrained_loads_the_folder_and_it_equals_the_merged_pt(
        trained: Any, spec: str, tied: dict[str, str], tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM

    from autopart.measure.hf import hf_config

    ckpt = trained(spec)
    _merge(ckpt, tmp_path / "merged.pt")
    said = _merge(ckpt, tmp_path / "out", "--format", "safetensors")
    assert said.startswith(f"wrote {tmp_path / 'out'}: 2 shards, ")
    assert "iB float32 (step 1); config.json" in said  # KiB or MiB: the size in the unit that fits
    for name, kept in tied.items():
        assert f"{name} tied to {kept}, left out" in said
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
        "model.safetensors.index.json"]
    expected = torch.load(tmp_path / "merged.pt")
    written = _safetensors_state(tmp_path / "out")
    assert set(written) == set(expected) - set(tied)  # a tied weight once, under the name save_pretrained keeps

    model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "out", output_loading_info=True,
                                                       local_files_only=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    state = model.state_dict()
    assert set(state) == set(expected)
    for name, tensor in expected.items():  # exactly: the tied head included, re-tied on load
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    for name, kept in tied.items():
        assert model.get_parameter(name) is model.get_parameter(kept)
    config = AutoConfig.from_pretrained(tmp_path / "out", local_files_only=True).to_dict()
    own = hf_config(spec).to_dict()
    ignored = {"architectures", "transformers_version", "dtype", "torch_dtype", "_name_or_path", "use_cache"}
    assert {k: v for k, v in config.items() if k not in ignored} == {k: v for k, v in own.items() if k not in ignored}
    assert config["architectures"] == [type(model).__name__] and config["dtype"] == "float32"
    assert config["use_cache"] and not own["use_cache"]  # trained without the KV cache, generates with it


@pytest.mark.slow
def test_a_model_that_is_not_a_transformers_one_is_written_as_the_pt_holds_it(trained: Any, tmp_path: Path) -> None:
    ckpt = trained(UNET)
    _merge(ckpt, tmp_path / "merged.pt")
    said = _merge(ckpt, tmp_path / "out", "--format", "safetensors")
    assert said.endswith("(step 1); weights only, no config.json")
    expected = torch.load(tmp_path / "merged.pt")
    written = _safetensors_state(tmp_path / "out")
    assert set(written) == set(expected) and all(torch.equal(written[k], v) for k, v in expected.items())
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(expected)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())


# --- without ranks: checkpoints written here ---------------------------------------------------------------------

def _tiny_gpt2(folder: Path) -> Any:
    """A tiny GPT-2 saved by transformers (tied head), a tokenizer file and a generation config beside it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=16, vocab_size=300,
                                       bos_token_id=0, eos_token_id=0))
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0"}\n')
    return model


def _checkpoint(root: Path, state: dict[str, torch.Tensor], aliases: dict[str, str], model: str | None,
                split: int) -> None:
    """A complete step 1 of two stages, the first ``split`` names in stage 0, as the ranks write it: each stage
    holds every name it uses (a tied head a copy of the embedding), the aliases of the tied names."""
    names = list(state)
    for stage, part in enumerate((names[:split], names[split:])):
        held = {k: state[k].clone() for k in part}
        save_stage(root, 1, stage, held, {"state": {}, "param_groups": []}, stage, [stage], aliases)
    mark_complete(root, 1, 2, model, "fp32" if model else None)


def test_an_hf_path_folder_gives_its_config_and_tokenizer_files(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM

    source = _tiny_gpt2(tmp_path / "tiny")
    state = source.state_dict()
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # the run named the folder relatively: the merge, from elsewhere, still finds it
    _checkpoint(Path("ckpt"), state, {"lm_head.weight": "transformer.wte.weight"}, "hf:../tiny", split=5)
    monkeypatch.chdir(tmp_path)
    said = _merge(work / "ckpt", tmp_path / "out", "--format", "safetensors")
    assert said.endswith("config.json, generation_config.json, tokenizer.json; "
                         "lm_head.weight tied to transformer.wte.weight, left out"), said
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "tiny" / name).read_bytes()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_bfloat16_weights_are_named_so_in_the_config(tmp_path: Path) -> None:
    """Under bf16-true the stage files hold bfloat16: the folder's config says so (as save_pretrained's would),
    so from_pretrained builds the model in bfloat16; the rest of hf:PATH's config.json is kept."""
    from transformers import AutoModelForCausalLM

    state = {k: v.bfloat16() for k, v in _tiny_gpt2(tmp_path / "tiny").state_dict().items()}
    _checkpoint(tmp_path / "ckpt", state, {"lm_head.weight": "transformer.wte.weight"}, f"hf:{tmp_path / 'tiny'}",
                split=5)
    said = _merge(tmp_path / "ckpt", tmp_path / "out", "--format", "safetensors")
    assert "KiB bfloat16 (step 1)" in said
    config, source = (json.loads((tmp_path / name / "config.json").read_text()) for name in ("out", "tiny"))
    assert source["dtype"] == "float32" and config == {**source, "dtype": "bfloat16"}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", local_files_only=True)
    assert loaded.dtype == torch.bfloat16
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())


def test_tied_names_of_any_other_model_are_written_once_under_the_first(tmp_path: Path) -> None:
    weight = torch.arange(6.0).reshape(3, 2)
    save_stage(tmp_path / "ckpt", 1, 0, {"embed.weight": weight, "b": torch.ones(2)}, None, 0, [0],
               {"spare.weight": "embed.weight", "head.weight": "embed.weight"})
    save_stage(tmp_path / "ckpt", 1, 1, {"head.weight": weight.clone()}, None, 1, [1],
               {"head.weight": "embed.weight", "spare.weight": "embed.weight"})
    mark_complete(tmp_path / "ckpt", 1, 2, "my_models.py:make", "fp32")
    said = _merge(tmp_path / "ckpt", tmp_path / "out", "--format", "safetensors")
    assert said.endswith("head.weight tied to embed.weight, left out; spare.weight tied to embed.weight, left out")
    assert "1 shard, 2 tensors" in said  # stage 1 holds only a tied copy: no shard of its own
    written = _safetensors_state(tmp_path / "out")
    assert sorted(written) == ["b", "embed.weight"] and torch.equal(written["embed.weight"], weight)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["model.safetensors"]


def test_a_checkpoint_that_records_no_model_needs_config(tmp_path: Path) -> None:
    source = _tiny_gpt2(tmp_path / "tiny")
    _checkpoint(tmp_path / "ckpt", source.state_dict(), {"lm_head.weight": "transformer.wte.weight"}, None, split=5)
    assert_one_line_error(run_cli_here("merge-checkpoint", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out"),
                                       "--format", "safetensors"),
                          "does not record its model (written by an older autopart): give --config FILE|hf:SPEC")
    assert not (tmp_path / "out").exists()
    said = _merge(tmp_path / "ckpt", tmp_path / "out", "--format", "safetensors",
                  "--config", str(tmp_path / "tiny" / "config.json"))
    assert "; config.json; lm_head.weight tied to transformer.wte.weight, left out" in said
    said = _merge(tmp_path / "ckpt", tmp_path / "alone", "--format", "safetensors", "--config", "none")
    assert "weights only, no config.json" in said
    assert_one_line_error(run_cli_here("merge-checkpoint", str(tmp_path / "ckpt"), "-o", str(tmp_path / "bad"),
                                       "--format", "safetensors", "--config", "hf:gpt2:n_layer=3,n_embd=16,n_head=2,"
                                       "n_positions=16,vocab_size=300"),
                          "does not fit hf:gpt2:n_layer=3", "it lacks transformer.h.2.attn.c_attn.bias")
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("config, fragment", [
    ("nosuch.json", "--config 'nosuch.json': no such file (give a config.json, hf:SPEC or none)"),
    ("bad.json", "--config 'bad.json' is not a transformers config: "),
    ("hf:nosuch", "model 'hf:nosuch': transformers knows no model type 'nosuch'"),
])
def test_a_config_that_cannot_be_read_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, config: str,
                                                  fragment: str) -> None:
    _checkpoint(tmp_path / "ckpt", {"a": torch.ones(3), "b": torch.zeros(2)}, {}, None, split=1)
    (tmp_path / "bad.json").write_text("{bad")
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(run_cli_here("merge-checkpoint", "ckpt", "-o", "out", "--format", "safetensors",
                                       "--config", config), fragment)
    assert not (tmp_path / "out").exists()
    assert_one_line_error(run_cli_here("merge-checkpoint", str(tmp_path / "ckpt"), "-o", str(tmp_path / "m.pt"),
                                       "--config", "none"), "--config is for --format safetensors")


def test_an_output_folder_that_exists_is_kept_unless_force(tmp_path: Path) -> None:
    _checkpoint(tmp_path / "ckpt", {"a": torch.ones(3), "b": torch.zeros(2)}, {}, "my.py:make", split=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert_one_line_error(run_cli_here("merge-checkpoint", str(tmp_path / "ckpt"), "-o", str(out),
                                       "--format", "safetensors"),
                          f"output folder '{out}' exists and is not empty (--force replaces it)")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    _merge(tmp_path / "ckpt", out, "--format", "safetensors", "--force")
    assert sorted(p.name for p in out.iterdir()) == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left beside it
    umask = os.umask(0)
    os.umask(umask)
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(0o666 & ~umask)}
    assert oct(out.stat().st_mode & 0o777) == oct(0o777 & ~umask)
    (tmp_path / "file").write_text("x")
    assert_one_line_error(run_cli_here("merge-checkpoint", str(tmp_path / "ckpt"), "-o", str(tmp_path / "file"),
                                       "--format", "safetensors"), "is a file, not a folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    _merge(tmp_path / "ckpt", empty, "--format", "safetensors")  # an empty folder is filled, as a user expects


def test_a_folder_whose_writing_fails_is_not_there_and_the_old_one_is_kept(tmp_path: Path) -> None:
    from autopart.formats.atomic import write_folder_atomic

    def half(folder: Path) -> None:
        (folder / "model-00001-of-00002.safetensors").write_bytes(b"x" * 100)
        raise KeyboardInterrupt  # Ctrl-C between two shards

    with pytest.raises(KeyboardInterrupt):
        write_folder_atomic(tmp_path / "new", half)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "model.safetensors").write_text("the old weights")
    with pytest.raises(KeyboardInterrupt):
        write_folder_atomic(tmp_path / "old", half, replace=True)
    assert [p.name for p in tmp_path.iterdir()] == ["old"]
    assert (tmp_path / "old" / "model.safetensors").read_text() == "the old weights"


def test_a_damaged_stage_file_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    _checkpoint(tmp_path / "ckpt", {"a": torch.ones(3), "b": torch.zeros(2)}, {}, "my.py:make", split=1)
    file = tmp_path / "ckpt" / "step-000001" / "stage-1.pt"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    assert_one_line_error(run_cli_here("merge-checkpoint", str(tmp_path / "ckpt"), "-o", str(tmp_path / "out"),
                                       "--format", "safetensors"),
                          f"checkpoint file '{file}' is damaged: RuntimeError: PytorchStreamReader failed")
    assert list(tmp_path.iterdir()) == [tmp_path / "ckpt"]


# --- memory: the stage files are mapped, one stage's tensors read at a time ------------------------------------

_PEAK = """
import sys
import torch, safetensors.torch
from autopart.cli import main


def status(field):
    with open("/proc/self/status") as lines:
        return next(int(line.split()[1]) * 1024 for line in lines if line.startswith(field))


with open("/proc/self/clear_refs", "w") as clear:
    clear.write("5")  # the peak (VmHWM) starts again from what is resident now
before = status("VmRSS:")
code = main(sys.argv[1:])
print(code, before, status("VmHWM:"))
"""


def _merge_peak_bytes(*args: str) -> int:
    """The merge's peak resident memory above what the interpreter held before it (a fresh process; Linux)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", _PEAK, "merge-checkpoint", *args], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    code, before, peak = (int(x) for x in done.stdout.split()[-3:])
    assert code == 0, done.stderr
    return peak - before


MODEL_MIB = 64


@pytest.mark.slow
def test_merging_reads_one_copy_of_the_weights_at_most(tmp_path: Path) -> None:
    """Two stages of 32 MiB of weights, each with twice that in optimizer state (AdamW's): reading the files
    whole (before) peaked at 3x the model and then copied it once more into a buffer; mapped, the .pt peaks at about
    the model (every tensor read once), the safetensors folder at about one stage."""
    model_bytes = MODEL_MIB * 2**20
    for stage in (0, 1):
        weights = {f"s{stage}.w{i}": torch.randn(2**20) for i in range(MODEL_MIB // 8)}  # 4 MiB each
        moments = {i: {"exp_avg": torch.randn(2**20), "exp_avg_sq": torch.randn(2**20)} for i in range(len(weights))}
        save_stage(tmp_path / "ckpt", 1, stage, weights, {"state": moments, "param_groups": []}, stage, [stage])
        del weights, moments
    mark_complete(tmp_path / "ckpt", 1, 2, "my.py:make", "fp32")
    pt = _merge_peak_bytes(str(tmp_path / "ckpt"), "-o", str(tmp_path / "m.pt"))
    folder = _merge_peak_bytes(str(tmp_path / "ckpt"), "-o", str(tmp_path / "out"), "--format", "safetensors")
    print(f"model {model_bytes / 2**20:.0f} MiB: merge peak +{pt / 2**20:.0f} MiB (pt), +{folder / 2**20:.0f} MiB "
          f"(safetensors)")
    assert pt < 1.3 * model_bytes
    assert folder < 0.8 * model_bytes

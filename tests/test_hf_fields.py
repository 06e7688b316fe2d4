"""hf:NAME:FIELD=VALUE is the config class's constructor called with those fields: every field derived from them
(head_dim, num_key_value_heads, layer_types ...) follows as it does for a transformers user, and the model built
is the constructor's (its parameter shapes; a merged checkpoint loads into it strictly)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from autopart.measure.hf import hf_config, hf_fields
from autopart.measure.spec import load_model
from tests.conftest import assert_one_line_error, run_cli_here

transformers = pytest.importorskip("transformers")


def _spec(model_type: str, fields: dict[str, Any]) -> str:
    return f"hf:{model_type}:" + ",".join(f"{key}={value}" for key, value in fields.items())


def _constructor(model_type: str) -> Any:
    return {"llama": transformers.LlamaConfig, "mistral": transformers.MistralConfig,
            "qwen2": transformers.Qwen2Config, "gpt2": transformers.GPT2Config}[model_type]


SMALL = {"num_hidden_layers": 2, "intermediate_size": 64, "vocab_size": 256, "max_position_embeddings": 64}
CASES = [
    ("llama", {"hidden_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2}),  # head_dim 32 (not 128)
    ("llama", {**SMALL, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1}),
    ("llama", {**SMALL, "hidden_size": 64, "num_attention_heads": 8, "rope_theta": 500000}),
    ("mistral", {"hidden_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2}),
    ("mistral", {**SMALL, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1}),
    ("qwen2", {"hidden_size": 128, "num_attention_heads": 4, "num_hidden_layers": 2}),
    ("qwen2", {**SMALL, "hidden_size": 32, "num_attention_heads": 2, "num_key_value_heads": 1}),  # layer_types: 2
    ("gpt2", {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 64}),
    ("gpt2", {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4}),  # GPT-2's other names
]
IDS = [f"{t}-{'-'.join(f'{k}{v}' for k, v in f.items() if k in ('hidden_size', 'n_embd', 'num_attention_heads', 'n_head', 'rope_theta'))}"
       for t, f in CASES]


@pytest.mark.parametrize("model_type, fields", CASES, ids=IDS)
def test_the_config_is_the_constructors(model_type: str, fields: dict[str, Any]) -> None:
    ours = hf_config(_spec(model_type, fields)).to_dict()
    theirs = _constructor(model_type)(**fields).to_dict()
    assert not ours.pop("use_cache") and theirs.pop("use_cache")  # trained without the KV cache
    assert ours == theirs


@pytest.mark.parametrize("model_type, fields", CASES, ids=IDS)
def test_the_model_has_the_constructors_parameter_shapes(model_type: str, fields: dict[str, Any]) -> None:
    with torch.device("meta"):
        ours = load_model(_spec(model_type, fields)).module
        theirs = transformers.AutoModelForCausalLM.from_config(_constructor(model_type)(**fields))
    assert {k: tuple(p.shape) for k, p in ours.named_parameters()} == \
        {k: tuple(p.shape) for k, p in theirs.named_parameters()}


def test_a_shrunk_llamas_attention_is_as_wide_as_the_model() -> None:
    """The issue's case: 128 wide, 4 heads: heads of 32 (not Llama-7B's 128), q_proj 128 x 128 (not 512 x 128)."""
    config = hf_config("hf:llama:hidden_size=128,num_attention_heads=4")
    assert (config.head_dim, config.num_key_value_heads) == (32, 4)
    with torch.device("meta"):
        model: Any = load_model("hf:llama:hidden_size=128,num_attention_heads=4,num_hidden_layers=1").module
    assert tuple(model.model.layers[0].self_attn.q_proj.weight.shape) == (128, 128)


def test_rope_theta_goes_where_the_constructor_puts_it() -> None:
    """transformers 5 keeps RoPE settings in ``rope_parameters``: ``LlamaConfig(rope_theta=500000)`` moves it
    there, and so does hf:llama:rope_theta=500000; the rotary frequencies are the constructor's model's."""
    fields = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
              "vocab_size": 256, "rope_theta": 500000}
    config = hf_config(_spec("llama", fields))
    assert config.rope_parameters == transformers.LlamaConfig(rope_theta=500000).rope_parameters
    assert config.rope_parameters["rope_theta"] == 500000
    built: Any = load_model(_spec("llama", fields)).module
    ours = built.model.rotary_emb.inv_freq
    theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).model.rotary_emb.inv_freq
    default = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**fields, "rope_theta": 10000}))
    assert torch.equal(ours, theirs) and not torch.equal(ours, default.model.rotary_emb.inv_freq)


def test_a_field_the_class_does_not_have_is_refused_though_its_constructor_would_keep_it() -> None:
    assert transformers.LlamaConfig(no_such_field=3).no_such_field == 3  # kept silently: nothing reads it
    assert_one_line_error(run_cli_here("graph", "hf:llama:no_such_field=3"), "LlamaConfig has no field "
                          "'no_such_field'")
    assert_one_line_error(run_cli_here("graph", "hf:llama:num_beams=4"), "LlamaConfig has no field 'num_beams'")


@pytest.mark.parametrize("spec, shown", [
    ("hf:gpt2:hidden_size=2.5", "hidden_size=2.5 does not fit GPT2Config: TypeError: Field 'n_embd' expected int"),
    ("hf:llama:rope_theta=fast", "rope_theta='fast' does not fit LlamaConfig: expected a number"),
    ("hf:llama:hidden_size=100,num_attention_heads=3",
     "LlamaConfig refuses hidden_size=100, num_attention_heads=3: ValueError: The hidden size (100) is not a "
     "multiple of the number of attention heads (3)."),
    ("hf:mistral:hidden_size=2,num_attention_heads=4",  # MistralConfig checks no multiple: its head_dim is 2 // 4
     "head_dim=0 follows from hidden_size=2, num_attention_heads=4, but head_dim sizes or counts part of the model "
     "and must be >= 1"),
])
def test_values_the_constructor_refuses_are_one_line(spec: str, shown: str) -> None:
    assert_one_line_error(run_cli_here("graph", spec), spec, shown)


TINY = {"num_hidden_layers": 1, "hidden_size": 32, "num_attention_heads": 2, "intermediate_size": 64,
        "vocab_size": 256, "max_position_embeddings": 32}


@pytest.mark.slow
def test_graph_says_which_fields_were_given_and_derived() -> None:
    spec = _spec("llama", TINY)
    given = ", ".join(f"{k}={v}" for k, v in TINY.items())
    shown = run_cli_here("graph", spec)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines()[0] == f"hf:llama with {given} (given); num_key_value_heads=2, head_dim=16 " \
                                           f"(derived)"
    data = json.loads(run_cli_here("graph", spec, "--json").stdout)
    assert data["fields"] == {"given": TINY, "derived": {"num_key_value_heads": 2, "head_dim": 16}}


def test_a_presets_fields_are_not_the_users() -> None:
    """hf:gpt2-medium gives no field: its preset's are kept apart (``preset``), so neither graph nor profile says
    any was given; a field given again, under either name, is the user's and leaves the preset's list."""
    medium = hf_fields("hf:gpt2-medium")
    assert medium.given == {} and medium.preset == {"n_layer": 24, "n_embd": 1024, "n_head": 16}
    assert medium.config.n_layer == 24 and medium.derived == {}
    assert medium.describe("hf:gpt2-medium") == "hf:gpt2-medium with n_layer=24, n_embd=1024, n_head=16 (preset)"
    for spec, key in (("hf:gpt2-medium:n_layer=2", "n_layer"), ("hf:gpt2-medium:num_hidden_layers=2",
                                                                  "num_hidden_layers")):
        shrunk = hf_fields(spec)
        assert shrunk.config.n_layer == 2 and shrunk.given == {key: 2}
        assert shrunk.describe(spec) == f"hf:gpt2-medium with n_embd=1024, n_head=16 (preset); {key}=2 (given)"
    plain = run_cli_here("graph", "hf:gpt2-medium:n_layer=1,n_embd=32,n_head=2,n_positions=32,vocab_size=256")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.splitlines()[0] == "hf:gpt2-medium with n_layer=1, n_embd=32, n_head=2, n_positions=32, " \
                                           "vocab_size=256 (given)"


@pytest.mark.slow
def test_profile_says_which_fields_were_given(tmp_path: Path) -> None:
    spec = _spec("llama", TINY)
    made = run_cli_here("profile", spec, "--repeats", "1", "--warmup", "0", "-o", str(tmp_path / "p.json"))
    assert made.returncode == 0, made.stderr
    assert "(given); num_key_value_heads=2, head_dim=16 (derived)\n" in made.stderr
    transformers.LlamaConfig(**TINY).save_pretrained(tmp_path / "tiny")
    plain = run_cli_here("graph", f"hf:{tmp_path / 'tiny'}")  # no fields given: no such line
    assert plain.returncode == 0 and plain.stdout.startswith(f"hf:{tmp_path / 'tiny'}: "), plain.stdout[:300]


def _save_folder(folder: Path, drop: tuple[str, ...] = ()) -> dict[str, Any]:
    transformers.LlamaConfig(**TINY).save_pretrained(folder)
    written = json.loads((folder / "config.json").read_text())
    kept = {k: v for k, v in written.items() if k not in drop}
    (folder / "config.json").write_text(json.dumps(kept))
    return kept


def test_a_folders_fields_are_rebuilt_through_the_constructor(tmp_path: Path) -> None:
    """hf:PATH:FIELDS is the class's constructor of config.json's fields and the spec's: a field the file names
    stays as it says (transformers 5 writes head_dim), one it leaves out follows the given ones."""
    written = _save_folder(tmp_path / "full")
    assert written["head_dim"] == 16
    full = hf_fields(f"hf:{tmp_path / 'full'}:hidden_size=64")
    assert full.config.head_dim == 16 and full.derived == {}
    older = _save_folder(tmp_path / "older", drop=("head_dim", "num_key_value_heads"))
    spec = f"hf:{tmp_path / 'older'}:hidden_size=64"
    fields = hf_fields(spec)
    theirs = transformers.LlamaConfig(**{**older, "hidden_size": 64}).to_dict()
    ours = fields.config.to_dict()
    ignored = ("use_cache", "_name_or_path")
    assert {k: v for k, v in ours.items() if k not in ignored} == {k: v for k, v in theirs.items() if k not in ignored}
    assert fields.config.head_dim == 32 and fields.derived == {"head_dim": 32}
    assert fields.describe(spec) == f"hf:{tmp_path / 'older'} with hidden_size=64 (given); head_dim=32 (derived)"
    assert hf_config(f"hf:{tmp_path / 'older'}").head_dim == 16  # no fields: the file as from_pretrained reads it


def test_a_merged_checkpoint_of_a_shrunk_llama_loads_into_the_constructors_model(tmp_path: Path) -> None:
    """Stage files of the model hf:llama:FIELDS builds (as the ranks write them), merged: the .pt loads strictly
    into ``LlamaForCausalLM(LlamaConfig(**FIELDS))``, and the safetensors folder's config is that config."""
    from autopart.run.checkpoint import mark_complete, save_stage

    fields = {**SMALL, "hidden_size": 128, "num_attention_heads": 4}
    spec = _spec("llama", fields)
    torch.manual_seed(0)
    state = load_model(spec).module.state_dict()
    names = list(state)
    for stage, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
        save_stage(tmp_path / "ckpt", 1, stage, {k: state[k] for k in part}, None, stage, [stage])
    mark_complete(tmp_path / "ckpt", 1, 2, spec, "fp32")
    for out, extra in (("merged.pt", ()), ("out", ("--format", "safetensors"))):
        merged = run_cli_here("merge-checkpoint", str(tmp_path / "ckpt"), "-o", str(tmp_path / out), *extra)
        assert merged.returncode == 0, merged.stderr
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields))
    model.load_state_dict(torch.load(tmp_path / "merged.pt"), strict=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (config["head_dim"], config["num_key_value_heads"]) == (32, 4)

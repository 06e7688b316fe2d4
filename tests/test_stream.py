"""Profiling one block at a time, for models too big to build: the model stays on the meta device, the
numbers match a whole-model profile, and identical blocks are measured once."""
from __future__ import annotations

import pytest
import torch

from autopart.measure.models.gpt2 import GPT2, GPT2Config
from autopart.measure.profiler import profile_model
from autopart.measure.stream import on_meta
from tests.conftest import assert_one_line_error, run_cli
from tests.graph_models import UNet

LLAMA = ("hf:llama:hidden_size=64,intermediate_size=128,num_hidden_layers=3,num_attention_heads=4,"
         "num_key_value_heads=2")


def _same_bytes(whole: object, parts: object) -> None:
    """Block by block, every byte count the same: sizes and saved storages do not depend on where the
    weights live, so a profile built on meta is exact (every block, none missing or extra)."""
    def sizes(profile: object) -> list[tuple[str, int, int, int, int]]:
        return [(x.name, x.param_bytes, x.activation_bytes, x.output_bytes, x.skip_bytes)
                for x in profile.layers]  # type: ignore[attr-defined]

    assert sizes(parts) == sizes(whole)


def test_a_chain_built_on_meta_profiles_like_the_whole_model() -> None:
    cfg = GPT2Config(vocab_size=300, context=32, n_layer=3, n_embd=32, n_head=2)
    x = torch.randint(0, 300, (2, 16))
    whole = profile_model(GPT2(cfg), x, name="g", warmup=0, repeats=1)
    with torch.device("meta"):
        meta = GPT2(cfg)
    parts = profile_model(meta, x, name="g", warmup=0, repeats=1)
    assert on_meta(meta)  # nothing was left materialised
    _same_bytes(whole, parts)
    assert [x.same_as for x in parts.layers] == ["", "", "h.0", "h.0", ""]  # embed, h.0, h.1, h.2, head


def test_a_captured_graph_on_meta_keeps_its_skips() -> None:
    x = torch.randn(2, 1, 8, 8)
    whole = profile_model(UNet(), x, name="u", warmup=0, repeats=1)
    with torch.device("meta"):
        meta = UNet()
    parts = profile_model(meta, x, name="u", warmup=0, repeats=1)
    _same_bytes(whole, parts)
    assert [x.skip_bytes for x in parts.layers] == [0, 2048, 2048, 0, 0]


@pytest.mark.slow
def test_hf_llama_by_block_from_the_command_line(tmp_path: object) -> None:
    pytest.importorskip("transformers")
    out = f"{tmp_path}/llama.json"
    made = run_cli("profile", LLAMA, "--build", "by-block", "--input-shape", "2,16", "--repeats", "1", "-o", out)
    assert made.returncode == 0, made.stderr
    assert "built on the meta device, measured one block at a time" in made.stderr
    assert "model.layers.1 (= model.layers.0)" in made.stdout
    from autopart.formats.profile import Profile

    layers = Profile.from_json(out).layers
    assert [x.same_as for x in layers] == ["", "", "model.layers.0", "model.layers.0", "", ""]
    assert Profile.from_json(out).loss_in_last_block


@pytest.mark.slow
def test_a_factory_that_cannot_build_on_meta_says_so(tmp_path: object) -> None:
    path = f"{tmp_path}/net.py"
    with open(path, "w") as f:
        f.write("import torch\ndef make():\n    m = torch.nn.Linear(4, 4)\n    m.weight.sum().item()\n"
                "    return m, torch.randn(2, 4)\n")
    assert_one_line_error(run_cli("profile", f"{path}:make", "--build", "by-block"), "raised")
    assert run_cli("profile", f"{path}:make", "--repeats", "1", "-o", f"{tmp_path}/p.json").returncode == 0

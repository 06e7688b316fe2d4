"""hf: specs, built offline: presets, overrides, and the data each kind of model learns from."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autopart.measure.hf import IGNORE_INDEX, causal_lm_loss, masked_lm_loss
from autopart.measure.spec import load_model
from autopart.run.data import training_data

pytest.importorskip("transformers")

BERT = "hf:bert-base-uncased:num_hidden_layers=2,hidden_size=32,num_attention_heads=2,intermediate_size=64"


def test_presets_and_overrides_build_on_the_meta_device_without_downloading() -> None:
    with torch.device("meta"):
        medium = load_model("hf:gpt2-medium")
        llama = load_model("hf:llama:num_hidden_layers=2")
    assert medium.module.config.n_layer == 24 and medium.module.config.n_embd == 1024
    assert llama.module.config.num_hidden_layers == 2 and llama.module.config.hidden_size == 4096
    assert medium.loss_fn is causal_lm_loss and medium.data_kind == "text"
    assert not medium.module.config.use_cache


def test_an_encoder_learns_masked_bytes() -> None:
    bundle = load_model(BERT)
    assert bundle.loss_fn is masked_lm_loss and bundle.data_kind == "masked-text"
    data = training_data(bundle, None, 4, (32,), seed=0, start_step=0)
    x, y = next(data.batches)
    masked = y != IGNORE_INDEX
    mask_id = bundle.module.config.vocab_size - 1
    assert 0.05 < float(masked.float().mean()) < 0.3  # about 15%
    assert bool((x[masked] == mask_id).all()) and bool((x[~masked] < 256).all()) and bool((y[masked] < 256).all())
    again = next(training_data(bundle, None, 4, (32,), seed=0, start_step=0).batches)
    assert torch.equal(again[0], x) and torch.equal(again[1], y)  # the data order is a function of the step
    loss = masked_lm_loss(bundle.module(x), y)
    assert loss.ndim == 0 and torch.isfinite(loss)


LLAMA = ("hf:llama:num_hidden_layers=2,hidden_size=32,intermediate_size=64,num_attention_heads=2,num_key_value_heads=1,"
         "max_position_embeddings=32,vocab_size=256")


def test_stages_hold_exactly_the_models_state_dict_keys() -> None:
    """Llama's rotary ``inv_freq`` is a non-persistent buffer: out of the model's state_dict, so out of every stage's
    (a captured stage would register it as a persistent one), and a merged checkpoint loads strictly."""
    from autopart.measure.blocks import GraphChain, chain_of

    bundle = load_model(LLAMA)
    chain = chain_of(bundle.module, bundle.example, LLAMA, bundle.input_names)
    assert isinstance(chain, GraphChain)
    n = len(chain.names)
    stages = [chain.stage_module(0, 1), chain.stage_module(2, n - 1)]
    keys = [k for stage in stages for k in stage.state_dict()]
    assert sorted(keys) == sorted(bundle.module.state_dict())
    assert any(name.endswith("rotary_emb.inv_freq") for name, _ in stages[0].named_buffers())  # still there, to run


@pytest.mark.parametrize("spec, shown", [
    ("hf:gpt2:n_layer=-1", "n_layer=-1"),
    ("hf:gpt2:n_layer=0", "n_layer=0"),
    ("hf:gpt2:n_head=0", "n_head=0"),
    ("hf:llama:hidden_size=-64", "hidden_size=-64"),
    ("hf:llama:num_key_value_heads=0", "num_key_value_heads=0"),
    ("hf:bert:intermediate_size=0", "intermediate_size=0"),
    ("hf:t5:d_model=0", "d_model=0"),
    ("hf:t5:relative_attention_num_buckets=0", "relative_attention_num_buckets=0"),
    ("hf:bart:encoder_ffn_dim=-1", "encoder_ffn_dim=-1"),
    ("hf:bart:max_position_embeddings=0", "max_position_embeddings=0"),
])
def test_a_size_or_count_below_one_is_one_line_naming_the_field(spec: str, shown: str) -> None:
    from tests.conftest import assert_one_line_error, run_cli_here

    assert_one_line_error(run_cli_here("graph", spec), spec, shown, "must be >= 1")


def test_a_value_of_the_wrong_type_is_one_line_naming_the_field() -> None:
    from tests.conftest import assert_one_line_error, run_cli_here

    assert_one_line_error(run_cli_here("graph", "hf:gpt2:n_layer=2.5"), "n_layer=2.5 does not fit GPT2Config",
                          "expected int, got float")


def test_fields_that_are_not_sizes_may_be_zero() -> None:
    with torch.device("meta"):
        bundle = load_model("hf:gpt2:n_layer=1,bos_token_id=0,eos_token_id=0,resid_pdrop=0")
    assert bundle.module.config.bos_token_id == 0 and bundle.module.config.n_layer == 1


T5 = "hf:t5:num_layers=2,num_decoder_layers=2,d_model=32,d_kv=16,d_ff=64,num_heads=2,vocab_size=256"
BART = ("hf:bart:encoder_layers=1,decoder_layers=1,d_model=32,encoder_attention_heads=2,decoder_attention_heads=2,"
        "encoder_ffn_dim=64,decoder_ffn_dim=64,max_position_embeddings=32,vocab_size=256")


@pytest.mark.parametrize("spec, head", [(T5, "T5ForConditionalGeneration"), (BART, "BartForConditionalGeneration")])
def test_an_encoder_decoder_learns_the_bytes_after_its_source(spec: str, head: str, tmp_path: Path) -> None:
    """Source: S bytes of the text; target: the L bytes after them; the decoder reads the target shifted right,
    led by the source's last byte. Known answer: on the bytes 0, 1, ..., 255, 0, 1, ... every byte is the last + 1."""
    from autopart.measure.hf import seq2seq_lm_loss

    bundle = load_model(spec)
    assert type(bundle.module).__name__ == head and bundle.data_kind == "seq2seq-text"
    assert bundle.loss_fn is seq2seq_lm_loss and bundle.input_names == ("input_ids", "decoder_input_ids")
    assert bundle.example is not None
    source_len, target_len = int(bundle.example[0].shape[1]), int(bundle.example[1].shape[1])
    text = tmp_path / "counting.bin"
    text.write_bytes(bytes(range(256)) * 64)
    data = training_data(bundle, str(text), 4, (source_len,), seed=0, start_step=0)
    assert data.tokens_per_sample == source_len + target_len
    (source, decoder_in), target = next(data.batches)
    assert source.shape == (4, source_len) and decoder_in.shape == target.shape == (4, target_len)
    following = (source[:, -1:] + 1 + torch.arange(target_len)) % 256
    assert torch.equal(target, following)
    assert torch.equal(decoder_in[:, 0], source[:, -1]) and torch.equal(decoder_in[:, 1:], target[:, :-1])
    assert not torch.equal(source[0], source[1])  # random windows
    out = bundle.module(input_ids=source, decoder_input_ids=decoder_in)
    loss = seq2seq_lm_loss(out, target)
    assert out.logits.shape[:2] == target.shape and loss.ndim == 0 and torch.isfinite(loss)

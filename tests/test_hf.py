"""hf: specs, built offline: presets, overrides, and the data each kind of model learns from."""
from __future__ import annotations

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
    from autopart.measure.blocks import chain_of

    bundle = load_model(LLAMA)
    chain = chain_of(bundle.module, bundle.example, LLAMA, bundle.input_names)
    assert chain.graph is not None
    n = len(chain.names)
    stages = [chain.stage_module(0, 1), chain.stage_module(2, n - 1)]
    keys = [k for stage in stages for k in stage.state_dict()]
    assert sorted(keys) == sorted(bundle.module.state_dict())
    assert any(name.endswith("rotary_emb.inv_freq") for name, _ in stages[0].named_buffers())  # still there, to run

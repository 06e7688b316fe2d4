"""Tiny Hugging Face models saved by ``transformers`` into a folder, sharded (``max_shard_size``), for the
``hf:PATH`` and ``--weights`` tests: a Llama, and a GPT-2 whose head is tied to its embedding (its
``save_pretrained`` keeps ``transformer.wte.weight`` only). Nothing is downloaded."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

SHARD = "100KB"
"""Small enough that every model here is saved in several shards."""


def tiny_llama() -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, use_cache=False)
    return LlamaForCausalLM(config)


def tiny_gpt2() -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=300, n_positions=64, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
    return GPT2LMHeadModel(config)  # no dropout: a pipelined step and one process draw no random numbers


MODELS = {"llama": tiny_llama, "gpt2": tiny_gpt2}


def save_model(kind: str, folder: Path, seed: int = 7) -> Path:
    """``kind``'s tiny model, seeded, saved with ``save_pretrained`` in shards into ``folder``."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = MODELS[kind]()
    model.save_pretrained(folder, max_shard_size=SHARD)
    assert (folder / "model.safetensors.index.json").is_file()
    return folder


def from_folder(folder: Path) -> Any:
    """What a ``transformers`` user loads from ``folder``, offline."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)


def save_bf16(kind: str, folder: Path, seed: int = 7) -> Path:
    """``kind``'s tiny model in bfloat16, saved in shards as Hub checkpoints often are (config.json: ``"dtype":
    "bfloat16"``)."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(seed)
    MODELS[kind]().to(torch.bfloat16).save_pretrained(folder, max_shard_size=SHARD)
    return folder


def as_published(folder: Path, out: Path, prefix: str, extra: dict[str, torch.Tensor]) -> Path:
    """``folder``'s model rewritten as the Hub's original files are: one ``model.safetensors`` whose names lack the
    base model's ``prefix`` (``gpt2``'s store ``h.0.attn.c_attn.weight``), with ``extra`` stale entries; and its
    config.json."""
    import shutil

    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("model-*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            tensors.update({key.removeprefix(prefix): handle.get_tensor(key) for key in handle.keys()})
    out.mkdir()
    save_file({**tensors, **extra}, out / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(folder / "config.json", out / "config.json")
    return out

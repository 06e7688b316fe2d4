"""Hugging Face models: ``hf:NAME[:FIELD=VALUE,...]`` from a config class, ``hf:PATH[:FIELD=VALUE,...]`` from a
folder that ``save_pretrained`` wrote.

    hf:gpt2                                   GPT-2 small (GPT2Config's defaults), causal LM
    hf:gpt2-medium                            the published sizes of GPT-2 and BERT are known by name
    hf:bert-base-uncased                      BERT base, masked LM
    hf:llama:num_hidden_layers=4,hidden_size=512,intermediate_size=1376
    hf:mistral                                any model type transformers knows (its config class's defaults)
    hf:t5:num_layers=2,d_model=64             encoder-decoders (T5, BART ...) as sequence-to-sequence LMs
    hf:./my-llama                             a local folder: its config.json (and, for train, its weights)
    hf:/models/gpt2:n_positions=256           a folder's config with fields changed

Nothing is downloaded. ``hf:NAME`` is built with ``from_config`` and its config
class's constructor called with the preset's fields and those given after the
name (a checkpoint's exact config cannot be fetched offline): as
``LlamaConfig(hidden_size=128, num_attention_heads=4)``, so every field derived
from them follows (``head_dim`` 32, ``num_key_value_heads`` 4); a field the
class does not have is refused (its constructor would keep it silently as an
attribute nothing reads), and ``rope_theta`` goes into ``rope_parameters`` as
the constructor puts it. ``hf:PATH`` (a path with a separator, starting
with ``.`` or ``~``, or an existing folder: :func:`hf_folder`) reads
``PATH/config.json`` as ``from_pretrained(PATH)`` does, offline; with fields,
the class's constructor gets config.json's fields and the spec's (a field the
file names stays as written; one it leaves out follows the given ones). ``profile`` and
``graph`` need only that, ``train`` also loads the folder's weights
(:mod:`autopart.run.weights`). Every model is built in float32, whatever
``dtype`` (``torch_dtype``) its config.json names (a Hub folder often says
bfloat16): the plan's precision decides what runs (bf16-true casts the
stages at train time, :mod:`autopart.formats.precision`), and weights saved
in another dtype are cast to the model's as they load. The KV cache is off
(``use_cache=False``).
Causal LMs learn next bytes of text, masked LMs masked bytes, and
encoder-decoders (``config.is_encoder_decoder``) the bytes that follow
their source text (all as token ids 0..255, which every vocabulary here
has); the loss is the usual cross-entropy on the logits. A field that sizes
or counts something (``n_layer``, ``hidden_size``, ``num_heads`` ...) must
be >= 1. Needs the ``transformers`` package (``pip install 'autopart[hf]'``).
"""
from __future__ import annotations

import dataclasses
import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from autopart.errors import AutopartError

__all__ = ["is_hf_spec", "hf_folder", "folder_config", "hf_config", "hf_fields", "HfFields", "hf_auto_class", "build_hf", "causal_lm_loss",
           "masked_lm_loss", "seq2seq_lm_loss", "MASKED_LM_TYPES", "IGNORE_INDEX"]

IGNORE_INDEX = -100
"""Targets the loss skips (positions that were not masked)."""

MASKED_LM_TYPES = ("bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta",
                   "camembert", "mpnet", "modernbert")
"""Encoder-only model types: trained as masked LMs; every other type as a causal LM."""

# Published sizes that differ from a config class's defaults (which are the base model's).
_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2": ("gpt2", {}),
    "gpt2-medium": ("gpt2", {"n_layer": 24, "n_embd": 1024, "n_head": 16}),
    "gpt2-large": ("gpt2", {"n_layer": 36, "n_embd": 1280, "n_head": 20}),
    "gpt2-xl": ("gpt2", {"n_layer": 48, "n_embd": 1600, "n_head": 25}),
    "distilgpt2": ("gpt2", {"n_layer": 6}),
    "bert-base-uncased": ("bert", {}),
    "bert-base-cased": ("bert", {"vocab_size": 28996}),
    "bert-large-uncased": ("bert", {"num_hidden_layers": 24, "hidden_size": 1024, "num_attention_heads": 16,
                                    "intermediate_size": 4096}),
    "llama": ("llama", {}),
}
_SEQ = 128

_SIZE_FIELD = re.compile(r"^(n|num|d)_|_num_|_(size|dim|layers|heads|positions|embeddings)$")
"""Config fields that size or count something (``n_layer``, ``num_heads``, ``d_model``, ``hidden_size``,
``encoder_ffn_dim``, ``max_position_embeddings`` ...): a model needs at least one of each."""


def is_hf_spec(spec: str) -> bool:
    return spec.startswith("hf:")


def hf_folder(spec: str) -> Path | None:
    """The local folder of an ``hf:PATH`` spec (a saved model: ``config.json``, its weights, maybe a tokenizer);
    None for ``hf:NAME``. PATH is a folder when it has a path separator, starts with ``.`` or ``~``, or names an
    existing folder here (``hf:gpt2`` is the name unless ``./gpt2`` exists)."""
    if not is_hf_spec(spec):
        return None
    name = spec.removeprefix("hf:").partition(":")[0]
    if not name:
        return None
    if "/" in name or "\\" in name or name.startswith((".", "~")) or Path(name).is_dir():
        return Path(name).expanduser()
    return None


def _value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _parse(spec: str) -> tuple[str, dict[str, Any]]:
    name, _, fields = spec.removeprefix("hf:").partition(":")
    if not name:
        raise AutopartError(f"model {spec!r}: give a name after hf:, e.g. hf:gpt2 or hf:llama:num_hidden_layers=4")
    overrides: dict[str, Any] = {}
    for item in filter(None, (f.strip() for f in fields.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip() or not value.strip():
            raise AutopartError(f"model {spec!r}: {item!r} is not FIELD=VALUE (e.g. n_layer=4)")
        key, parsed = key.strip(), _value(value.strip())
        if _SIZE_FIELD.search(key) and isinstance(parsed, int) and not isinstance(parsed, bool) and parsed < 1:
            raise AutopartError(f"model {spec!r}: {key}={parsed}, but {key} sizes or counts part of the model and "
                                f"must be >= 1")
        overrides[key] = parsed
    return name, overrides


def folder_config(spec: str, folder: Path) -> Any:
    """The config of a folder ``save_pretrained`` wrote, read offline as ``from_pretrained(folder)`` reads it
    (``AutoConfig.from_pretrained(folder, local_files_only=True)``); one-line errors for a folder that is not
    one."""
    import transformers
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    where = f"model {spec!r}: {str(folder)!r}"
    if not folder.exists():
        raise AutopartError(f"{where} does not exist")
    if not folder.is_dir():
        raise AutopartError(f"{where} is not a folder (hf:PATH is a folder save_pretrained wrote, with config.json)")
    file = folder / "config.json"
    if not file.is_file():
        raise AutopartError(f"{where} has no config.json (hf:PATH is a folder save_pretrained wrote)")
    try:
        fields = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AutopartError(f"{where}: cannot read config.json: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise AutopartError(f"{where}: config.json is not JSON: {str(exc).splitlines()[0]}") from None
    model_type = fields.get("model_type") if isinstance(fields, dict) else None
    if not isinstance(model_type, str) or not model_type:
        raise AutopartError(f"{where}: config.json has no \"model_type\" (e.g. \"gpt2\", \"llama\")")
    if model_type not in CONFIG_MAPPING:
        raise AutopartError(f"{where}: config.json's model_type {model_type!r} is not one transformers "
                            f"{transformers.__version__} knows")
    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # a field the config class refuses
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise AutopartError(f"{where}: its config.json does not load: {type(exc).__name__}: "
                            f"{lines[0] if lines else ''}") from None


def build_hf(spec: str) -> dict[str, Any]:
    """The model-spec mapping (module, example, loss_fn, data kind) of an ``hf:`` spec."""
    config = hf_config(spec)
    auto = hf_auto_class(config)
    seq2seq = bool(getattr(config, "is_encoder_decoder", False))
    masked = not seq2seq and config.model_type in MASKED_LM_TYPES
    try:
        module = auto.from_config(config, dtype=torch.float32)  # not config.json's dtype: the plan's precision runs
    except Exception as exc:
        raise AutopartError(f"model {spec!r}: building it from its config failed: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if vocab < 256:
        raise AutopartError(f"model {spec!r}: vocab_size {vocab} < 256, too small for byte-level text")
    positions = int(getattr(config, "max_position_embeddings", 0) or getattr(config, "n_positions", 0) or _SEQ)
    seq = min(_SEQ, positions)
    if seq2seq:  # the source, and the target shifted right one byte (decoder_input_ids): see seq2seq_lm_loss
        example = {"input_ids": torch.randint(0, 256, (1, seq)), "decoder_input_ids": torch.randint(0, 256, (1, seq))}
        return {"module": module.train(), "example": example, "loss_fn": seq2seq_lm_loss, "data_kind": "seq2seq-text"}
    return {"module": module.train(), "example": torch.randint(0, 256, (1, seq)),
            "loss_fn": masked_lm_loss if masked else causal_lm_loss, "data_kind": "masked-text" if masked else "text"}


def _logits(out: Any) -> torch.Tensor:
    logits = out.logits if hasattr(out, "logits") else out[0]
    assert isinstance(logits, torch.Tensor)
    return logits


def _token_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits at every position against the target ids there (:data:`IGNORE_INDEX`: none)."""
    logits = _logits(out)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def causal_lm_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the next-token logits against the next bytes."""
    return _token_loss(out, target)


def masked_lm_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy at the masked positions (the others are :data:`IGNORE_INDEX`)."""
    return _token_loss(out, target)


def seq2seq_lm_loss(out: Any, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the decoder's logits against the target bytes (the decoder was given them shifted right
    by one, so it predicts each from the source and the target bytes before it)."""
    return _token_loss(out, target)




def hf_config(spec: str) -> Any:
    """The ``transformers`` config of an ``hf:`` spec, without building the model: the config class of
    ``hf:NAME`` built with the preset's and the spec's fields (``LlamaConfig(hidden_size=128, ...)``: every field
    derived from them follows, ``head_dim`` included), or ``hf:PATH``'s ``config.json`` (read offline; with
    fields, rebuilt through its class's constructor from the file's fields and the spec's). ``use_cache`` off,
    as :func:`build_hf` sets it."""
    return hf_fields(spec).config


@dataclass(frozen=True)
class HfFields:
    """An ``hf:`` spec's config and what it says about its fields."""

    config: Any
    """The ``transformers`` config (``use_cache`` off)."""
    given: dict[str, Any]
    """The fields the spec named after the name, as written (a preset's are not among them)."""
    derived: dict[str, Any]
    """Fields the constructor derived from the preset's and the given ones: their values where they differ from
    the config built without them (the class's defaults, or the folder's config.json)."""
    preset: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The fields a named preset sets (``hf:gpt2-medium``: ``n_layer=24, ...``) that the spec does not give
    again; empty for a folder or a name without a preset."""

    def describe(self, spec: str) -> str:
        """One line: ``hf:llama with hidden_size=128, num_attention_heads=4 (given); head_dim=32 (derived)``;
        a preset's fields, when any, first: ``hf:gpt2-medium with n_embd=1024, n_head=16 (preset); n_layer=2
        (given)``."""
        name = spec.partition(":")[0] + ":" + spec.removeprefix("hf:").partition(":")[0]
        if not self.given and not self.preset:
            return f"{name} with its {'config.json' if hf_folder(spec) else 'defaults'} (no fields given)"
        parts = [f"{_fields_text(fields)} ({label})" for fields, label in
                 ((self.preset, "preset"), (self.given, "given"), (self.derived, "derived")) if fields]
        return f"{name} with {'; '.join(parts)}"


def _fields_text(fields: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value}" for key, value in fields.items())


_ROPE_LEGACY = ("rope_theta", "partial_rotary_factor")
"""Keys a config with ``rope_parameters`` takes in its constructor and moves into that dict (transformers 5)."""


def hf_fields(spec: str) -> HfFields:
    """The config of an ``hf:`` spec (see :func:`hf_config`), the fields given and the fields derived from
    them. One-line errors for a field the config class does not have, a value of the wrong type, fields the
    class refuses together, and a derived size below 1."""
    try:
        import transformers
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    except ImportError:
        raise AutopartError(f"model {spec!r} needs the transformers package: pip install 'autopart[hf]'") from None
    transformers.utils.logging.set_verbosity_error()
    name, overrides = _parse(spec)
    folder = hf_folder(spec)
    preset: dict[str, Any] = {}
    if folder is not None:
        base = folder_config(spec, folder)
        given = overrides
        config = _construct(spec, type(base), given, _folder_fields(folder)) if given else base
    else:
        model_type, named = _PRESETS.get(name.lower(), (name.lower(), {}))
        if model_type not in CONFIG_MAPPING:
            known = ", ".join(sorted(_PRESETS))
            raise AutopartError(f"model {spec!r}: transformers knows no model type {model_type!r} (named here: "
                                f"{known}; or any type transformers has, e.g. mistral, qwen2)")
        cls = CONFIG_MAPPING[model_type]
        given = overrides
        aliases: dict[str, str] = getattr(cls, "attribute_map", {})
        overridden = {aliases.get(key, key) for key in given}  # under either name (GPT-2's num_hidden_layers)
        preset = {key: value for key, value in named.items() if aliases.get(key, key) not in overridden}
        config = _construct(spec, cls, {**preset, **given})
        base = _construct(spec, cls, {}) if preset or given else config
    derived = _derived(spec, config, base, {**preset, **given})
    if hasattr(config, "use_cache"):
        config.use_cache = False
    return HfFields(config=config, given=given, derived=derived, preset=preset)


def _known_fields(cls: Any) -> set[str]:
    """The fields ``cls``'s constructor takes and keeps: its dataclass fields, their other names
    (``attribute_map``), settable properties, and the RoPE keys it moves into ``rope_parameters``. (Its
    constructor also takes any other name, silently, as a new attribute nothing reads.)"""
    names = {f.name for f in dataclasses.fields(cls)} | set(getattr(cls, "attribute_map", {}))
    names |= {key for key in dir(cls) if not key.startswith("_")
              and isinstance(inspect.getattr_static(cls, key), property) and inspect.getattr_static(cls, key).fset}
    if "rope_parameters" in names:
        names |= set(_ROPE_LEGACY)
    return names


def _construct(spec: str, cls: Any, fields: dict[str, Any], written: dict[str, Any] | None = None) -> Any:
    """``cls(**written, **fields)`` (``written``: a config.json's fields, taken as ``from_pretrained`` takes
    them), with one-line errors naming the field."""
    known = _known_fields(cls) if dataclasses.is_dataclass(cls) else None
    for key, value in fields.items():
        if known is not None and key not in known:
            raise AutopartError(f"model {spec!r}: {cls.__name__} has no field {key!r}")
        if key in _ROPE_LEGACY and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise AutopartError(f"model {spec!r}: {key}={value!r} does not fit {cls.__name__}: expected a number")
    names: dict[str, str] = getattr(cls, "attribute_map", {})
    try:  # under the field's own name: transformers sets another name (GPT-2's hidden_size) unchecked, last
        return cls(**{**(written or {}), **{names.get(key, key): value for key, value in fields.items()}})
    except Exception as exc:  # transformers checks each field's type, and the fields together, as it builds
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        last = lines[-1] if lines else type(exc).__name__
        named = re.search(r"field '(\w+)'", lines[0]) if lines else None
        other_names = {v: k for k, v in names.items()}
        said = named.group(1) if named else ""
        key = said if said in fields else other_names.get(said, said)
        if key in fields:
            raise AutopartError(f"model {spec!r}: {key}={fields[key]!r} does not fit {cls.__name__}: {last}") from None
        raise AutopartError(f"model {spec!r}: {cls.__name__} refuses {_fields_text(fields)}: {last}") from None


def _folder_fields(folder: Path) -> dict[str, Any]:
    """``config.json``'s fields as written (:func:`folder_config` checked that it reads)."""
    fields = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    assert isinstance(fields, dict)
    return fields


def _derived(spec: str, config: Any, base: Any, given: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``config`` that differ from ``base``'s other than those ``given`` (under either name)
    and ``use_cache``; one-line error for a derived size or count below 1."""
    names = getattr(type(config), "attribute_map", {})
    skip = {"use_cache", "transformers_version", "_name_or_path"} | set(given) | {names.get(k, k) for k in given}
    now, before = config.to_dict(), base.to_dict()
    derived = {key: value for key, value in now.items() if key not in skip and before.get(key) != value}
    for key, value in derived.items():
        if _SIZE_FIELD.search(key) and isinstance(value, int) and not isinstance(value, bool) and value < 1:
            raise AutopartError(f"model {spec!r}: {key}={value} follows from {_fields_text(given)}, but {key} "
                                f"sizes or counts part of the model and must be >= 1")
    return derived


def hf_auto_class(config: Any) -> Any:
    """The ``transformers`` auto class autopart trains a model of ``config`` as: a sequence-to-sequence, masked
    or causal LM (as :func:`build_hf` chooses)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    if getattr(config, "is_encoder_decoder", False):
        return AutoModelForSeq2SeqLM
    return AutoModelForMaskedLM if config.model_type in MASKED_LM_TYPES else AutoModelForCausalLM

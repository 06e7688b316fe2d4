"""Trained weights out: a merged checkpoint as a model folder of safetensors shards.

    ckpt = read_checkpoint("ckpt", mmap=True)
    done = write_safetensors(ckpt, "out", model_source(ckpt, None))

The folder is what ``transformers``' ``save_pretrained`` writes, so ``from_pretrained("out")`` loads it
offline for an ``hf:`` model: ``model.safetensors``, or one shard per stage
(``model-00001-of-00002.safetensors`` ...) and ``model.safetensors.index.json``; ``config.json``; and for
``hf:PATH`` the folder's ``generation_config.json`` and tokenizer files, so it is a complete model folder.
A tied weight is written once (safetensors refuses two names for one storage): under the name
``save_pretrained`` keeps for a ``transformers`` model (the embedding's; ``lm_head.weight`` is left out and
re-tied on load), under its first name for any other model. The stage files are mapped, and one stage's
tensors are read at a time, straight from the map into its shard.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from autopart.errors import AutopartError
from autopart.formats.atomic import write_folder_atomic, write_json_atomic
from autopart.run.checkpoint import MergedCheckpoint

__all__ = ["ModelSource", "Exported", "model_source", "write_safetensors", "COPIED_FILES"]

COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja")
"""What an ``hf:PATH`` folder holds beside its config and weights that the output folder gets too."""


@dataclass(frozen=True)
class ModelSource:
    """Which model a checkpoint holds, as far as writing it out needs: a ``transformers`` config (None for any
    other model) and where its ``config.json`` and tokenizer files come from."""

    config: Any
    """The ``transformers`` config, or None."""
    config_file: Path | None
    """A ``config.json`` to copy as it is (``hf:PATH``, ``--config FILE``); None: ``config`` is written."""
    folder: Path | None
    """The ``hf:PATH`` folder whose :data:`COPIED_FILES` come along."""
    said: str
    """Where the config came from, for messages."""


@dataclass(frozen=True)
class Exported:
    """What :func:`write_safetensors` wrote."""

    folder: Path
    shards: int
    tensors: int
    size_bytes: int
    dtypes: tuple[str, ...]
    left_out: dict[str, str]
    """Each tied name not written -> the name it is written under."""
    copied: tuple[str, ...]
    """The files beside the weights (``config.json``, the tokenizer's ...)."""


def model_source(ckpt: MergedCheckpoint, config: str | None) -> ModelSource:
    """The model of ``ckpt``: from ``config`` (``FILE`` a config.json, ``hf:SPEC``, or ``none`` for weights
    alone) when given, else from the spec the run recorded; a checkpoint that records none (older autopart)
    needs ``config``."""
    from autopart.measure.hf import hf_config, hf_folder, is_hf_spec

    spec = config if config is not None else ckpt.meta.get("model")
    if spec is None:
        raise AutopartError(f"checkpoint {str(ckpt.folder)!r} does not record its model (written by an older "
                            f"autopart): give --config FILE|hf:SPEC for a transformers model, or --config none "
                            f"to write the weights alone")
    if not isinstance(spec, str):
        raise AutopartError(f"checkpoint marker {str(ckpt.folder / 'COMPLETE')!r} is damaged: model is {spec!r}")
    if (config is not None and spec == "none") or (config is None and not is_hf_spec(spec)):
        return ModelSource(None, None, None, "")
    if not is_hf_spec(spec):
        file = Path(spec)
        if not file.is_file():
            raise AutopartError(f"--config {spec!r}: no such file (give a config.json, hf:SPEC or none)")
        return ModelSource(_read_config(file), file, None, f"--config {spec}")
    recorded = ckpt.meta.get("model_folder") if config is None else None
    local = Path(recorded) if isinstance(recorded, str) else hf_folder(spec)
    if local is not None:
        name, _, fields = spec.removeprefix("hf:").partition(":")
        if not (local / "config.json").is_file():
            raise AutopartError(f"model {spec!r}: {str(local / 'config.json')!r} is gone (give --config FILE|hf:SPEC)")
        whole = f"hf:{local}" + (f":{fields}" if fields else "")
        return ModelSource(hf_config(whole), None if fields else local / "config.json", local, spec)
    return ModelSource(hf_config(spec), None, None, spec)


def _read_config(file: Path) -> Any:
    import transformers
    from transformers import AutoConfig

    transformers.utils.logging.set_verbosity_error()  # its warnings about a config's fields are not ours to print
    try:
        return AutoConfig.from_pretrained(file, local_files_only=True)
    except Exception as exc:  # not JSON, no model_type, a type transformers does not know
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise AutopartError(f"--config {str(file)!r} is not a transformers config: "
                            f"{lines[0] if lines else type(exc).__name__}") from None


def _meta_model(source: ModelSource) -> torch.nn.Module:
    """The model of ``source.config`` on the meta device (no memory): its names, shapes and tied keys."""
    from autopart.measure.hf import hf_auto_class

    try:
        with torch.device("meta"):
            model: torch.nn.Module = hf_auto_class(source.config).from_config(source.config)
    except Exception as exc:
        raise AutopartError(f"model {source.said!r}: building it from its config failed: {type(exc).__name__}: "
                            f"{(str(exc).splitlines() or [''])[0]}") from None
    return model


def _check_fits(ckpt: MergedCheckpoint, model: torch.nn.Module, said: str) -> None:
    """The config's model has exactly the checkpoint's names and shapes."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - ckpt.state.keys())
    unexpected = sorted(ckpt.state.keys() - expected.keys())
    shapes = sorted(k for k in expected.keys() & ckpt.state.keys() if tuple(ckpt.state[k].shape) != expected[k])
    for what, names in (("lacks", missing), ("has names the config's model does not:", unexpected)):
        if names:
            more = f" (and {len(names) - 3} more)" if len(names) > 3 else ""
            raise AutopartError(f"checkpoint {str(ckpt.folder)!r} does not fit {said}: it {what} "
                                f"{', '.join(names[:3])}{more}")
    if shapes:
        k = shapes[0]
        raise AutopartError(f"checkpoint {str(ckpt.folder)!r} does not fit {said}: {k} is "
                            f"{list(ckpt.state[k].shape)}, the config's model has {list(expected[k])} "
                            f"({len(shapes)} such)")


def _left_out(ckpt: MergedCheckpoint, model: torch.nn.Module | None) -> dict[str, str]:
    """Each tied name not to write -> the name its weight is written under: what ``save_pretrained`` drops for
    a ``transformers`` model (its own rule, asked of the model), all but the first name otherwise."""
    if model is None:
        return {name: group[0] for group in ckpt.tied for name in group[1:]}
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    groups = [group for group in ckpt.tied if len(group) > 1]
    one = {name: ckpt.state[group[0]] for group in groups for name in group}  # each group: one tensor, as tied
    kept = remove_tied_weights_from_state_dict(one, model)  # type: ignore[arg-type]
    out = {}
    for group in groups:
        written = [n for n in group if n in kept]
        if len(written) != 1:
            raise AutopartError(f"checkpoint {str(ckpt.folder)!r}: the tied names {list(group)} do not match the "
                                f"config's tied weights")
        out.update({n: written[0] for n in group if n != written[0]})
    return out


def write_safetensors(ckpt: MergedCheckpoint, out: str | Path, source: ModelSource,
                      replace: bool = False) -> Exported:
    """Write ``ckpt`` into the folder ``out`` (atomically: whole or not at all; a non-empty ``out`` is refused
    unless ``replace``). Empties ``ckpt.state`` as it goes, one stage at a time, so each stage's map is let go."""
    from safetensors.torch import save_file

    model = _meta_model(source) if source.config is not None else None
    if model is not None:
        _check_fits(ckpt, model, source.said)
    left_out = _left_out(ckpt, model)
    stages = sorted({ckpt.stage_of[n] for n in ckpt.state.keys() - left_out.keys()})
    written = {n: s for n, s in ckpt.stage_of.items() if n not in left_out}
    files = {s: "model.safetensors" if len(stages) == 1 else f"model-{i + 1:05d}-of-{len(stages):05d}.safetensors"
             for i, s in enumerate(stages)}
    size = sum(ckpt.state[n].numel() * ckpt.state[n].element_size() for n in written)
    dtypes = tuple(sorted({str(ckpt.state[n].dtype).removeprefix("torch.") for n in written}))
    copied: list[str] = []

    def fill(folder: Path) -> None:
        for s in stages:
            names = sorted(n for n, held in written.items() if held == s)
            shard = {n: _dense(ckpt.state[n]) for n in names}
            try:
                save_file(shard, folder / files[s], metadata={"format": "pt"})
            except Exception as exc:  # safetensors' own errors (an I/O error among them) are not OSErrors
                if isinstance(exc, OSError):
                    raise
                raise AutopartError(f"cannot write {str(Path(out) / files[s])!r}: {type(exc).__name__}: "
                                    f"{(str(exc).strip().splitlines() or [''])[0]}") from None
            del shard
            for n in [n for n, held in ckpt.stage_of.items() if held == s]:
                ckpt.state.pop(n, None)  # the last reference to this stage's map
        if len(stages) > 1:
            write_json_atomic(folder / "model.safetensors.index.json",
                              {"metadata": {"total_size": size},
                               "weight_map": {n: files[written[n]] for n in sorted(written)}})
        if model is not None:
            _write_config(source, model, folder / "config.json", dtypes[0] if len(dtypes) == 1 else None)
            copied.append("config.json")
        for name in COPIED_FILES if source.folder is not None else ():
            if source.folder is not None and (source.folder / name).is_file():
                shutil.copyfile(source.folder / name, folder / name)
                copied.append(name)

    write_folder_atomic(out, fill, replace=replace)
    return Exported(Path(out), len(stages), len(written), size, dtypes, left_out, tuple(copied))


def _write_config(source: ModelSource, model: torch.nn.Module, path: Path, dtype: str | None) -> None:
    """``config.json`` with the dtype of the weights written (bfloat16 after bf16-true), as ``save_pretrained``
    records it: ``hf:PATH``'s own file copied as it is when its dtype is that one (or it names none)."""
    if source.config_file is not None:
        data = json.loads(source.config_file.read_text())
        named = data.get("dtype", data.get("torch_dtype"))
        if dtype is None or named is None or named == dtype:
            shutil.copyfile(source.config_file, path)
            return
        data.pop("torch_dtype", None)
        data["dtype"] = dtype
        path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        return
    config = source.config
    config.architectures = [type(model).__name__]
    if hasattr(config, "use_cache"):  # autopart trains without the KV cache; generating from the folder wants it
        config.use_cache = getattr(type(config)(), "use_cache", True)
    if dtype is not None:
        config.dtype = getattr(torch, dtype)
    config.to_json_file(path)


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """What safetensors takes: a contiguous tensor (a state dict's almost always are; a view is copied)."""
    return tensor if tensor.is_contiguous() else tensor.contiguous()


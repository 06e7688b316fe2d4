"""Reading a model's weights from files: safetensors (one file, or the shards ``save_pretrained`` writes with
``model.safetensors.index.json``), a ``torch.save``d state dict, or an autopart checkpoint folder.

    source = open_weights("my-llama")                   # lazy: nothing but the files' indexes is read yet
    keys = check_keys(source, model_names(model), "hf:my-llama")  # model name -> file key; every name, no other
    load_into(stage_module, source, keys)               # only this stage's tensors are read

Every rank reads only the tensors of its own stages: safetensors through
``safe_open`` per key (the handles stay open, no shard is read whole), state
dicts and checkpoint stage files mapped with ``mmap=True``. A tied parameter is
found under any of its names (GPT-2's ``save_pretrained`` keeps
``transformer.wte.weight`` and drops ``lm_head.weight``). The names are matched
once per source (:func:`check_keys`): exactly, except for ``transformers``
models, matched as ``from_pretrained`` matches them (with or without the base
model's prefix, and its lists of keys to ignore), so the files published on
the Hub load too (``gpt2``'s store ``h.0.attn.c_attn.weight`` and the stale
``h.0.attn.bias`` masks).
"""
from __future__ import annotations

import json
import re
import sys
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from autopart.errors import AutopartError

__all__ = ["WeightSource", "ModelNames", "KeyMap", "open_weights", "check_keys", "load_into", "model_names",
           "load_stage_weights", "folder_has_safetensors", "tie_note"]

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
_ZIP = b"PK\x03\x04"
_SHOWN = 3
"""Keys an error names before ``(and N more)``."""


class WeightSource(ABC):
    """Named tensors in files, read one at a time."""

    def __init__(self, path: Path, description: str) -> None:
        self.path = str(path)
        """The file or folder the names are reported against (an index file for shards)."""
        self.description = description
        """For messages: ``/x (safetensors, 3 shards)``."""

    @abstractmethod
    def keys(self) -> list[str]:
        """Every tensor's name, in the files' order."""

    @abstractmethod
    def shape(self, key: str) -> torch.Size:
        """The shape of ``key``'s tensor, without reading it."""

    @abstractmethod
    def read(self, key: str) -> torch.Tensor:
        """``key``'s tensor (read now, on the CPU)."""


class _Safetensors(WeightSource):
    """safetensors files, each opened once with ``safe_open`` and read per key."""

    def __init__(self, path: Path, description: str, files: Mapping[str, Path]) -> None:
        super().__init__(path, description)
        from safetensors import safe_open

        self._handles: dict[Path, Any] = {}
        for file in dict.fromkeys(files.values()):
            if not file.is_file():
                raise AutopartError(f"weights {self.path!r} name shard {file.name!r}, which is missing")
            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as exc:  # SafetensorError: a header that does not parse
                raise AutopartError(f"weights file {str(file)!r} is damaged or not safetensors: "
                                    f"{_first_line(exc)}") from None
        self._where: dict[str, Any] = {}
        held = {file: set(handle.keys()) for file, handle in self._handles.items()}
        for key, file in files.items():
            if key not in held[file]:
                raise AutopartError(f"weights {self.path!r} put {key!r} in {file.name!r}, which lacks it")
            self._where[key] = self._handles[file]

    def keys(self) -> list[str]:
        return list(self._where)

    def shape(self, key: str) -> torch.Size:
        return torch.Size(self._where[key].get_slice(key).get_shape())

    def read(self, key: str) -> torch.Tensor:
        try:
            tensor = self._where[key].get_tensor(key)
        except Exception as exc:  # data cut short after a good header
            raise AutopartError(f"weights {self.path!r}: cannot read {key!r}: {_first_line(exc)}") from None
        assert isinstance(tensor, torch.Tensor)
        return tensor


class _Tensors(WeightSource):
    """Tensors already mapped (``torch.load(..., mmap=True)``): read is a view until it is copied."""

    def __init__(self, path: Path, description: str, tensors: Mapping[str, torch.Tensor]) -> None:
        super().__init__(path, description)
        self._tensors = dict(tensors)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> torch.Size:
        return self._tensors[key].shape

    def read(self, key: str) -> torch.Tensor:
        return self._tensors[key]


def open_weights(path: str | Path) -> WeightSource:
    """The weights at ``path``: a safetensors file; a folder with ``model.safetensors`` or shards and
    ``model.safetensors.index.json``; a ``torch.save``d state dict; an autopart checkpoint folder (its latest
    complete step) or one of its ``step-NNNNNN`` folders. Only the files' indexes are read here."""
    base = Path(path).expanduser()
    if not base.exists():
        raise AutopartError(f"weights {str(base)!r} do not exist")
    if base.is_dir():
        if (base / _INDEX).is_file():
            return _sharded(base / _INDEX)
        if (base / _SINGLE).is_file():
            return _Safetensors(base / _SINGLE, f"{base / _SINGLE} (safetensors)", _file_keys(base / _SINGLE))
        return _checkpoint(base)
    if base.name.endswith(".index.json"):
        return _sharded(base)
    try:
        with open(base, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise AutopartError(f"weights {str(base)!r}: cannot read: {exc.strerror or exc}") from None
    if magic == _ZIP:
        return _state_dict(base)
    return _Safetensors(base, f"{base} (safetensors)", _file_keys(base))


def folder_has_safetensors(folder: Path) -> bool:
    """Whether ``folder`` holds ``model.safetensors`` or ``model.safetensors.index.json`` (what
    :func:`open_weights` reads of a ``save_pretrained`` folder)."""
    return (folder / _INDEX).is_file() or (folder / _SINGLE).is_file()


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _file_keys(file: Path) -> dict[str, Path]:
    """Every key of one safetensors file -> the file (reads its header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            return {key: file for key in handle.keys()}
    except Exception as exc:
        raise AutopartError(f"weights file {str(file)!r} is damaged or not safetensors (nor a torch.save archive): "
                            f"{_first_line(exc)}") from None


def _sharded(index: Path) -> WeightSource:
    try:
        content = json.loads(index.read_text(encoding="utf-8"))
    except OSError as exc:
        raise AutopartError(f"weights index {str(index)!r}: cannot read: {exc.strerror or exc}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise AutopartError(f"weights index {str(index)!r} is not JSON: {str(exc).splitlines()[0]}") from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in weight_map.items()):
        raise AutopartError(f"weights index {str(index)!r} has no \"weight_map\" of names to shard files")
    files = {key: index.parent / name for key, name in weight_map.items()}
    shards = len(set(files.values()))
    return _Safetensors(index, f"{index.parent} (safetensors, {shards} shard{'s' if shards != 1 else ''})", files)


def _state_dict(file: Path) -> WeightSource:
    try:
        content = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as exc:  # a damaged archive, or pickled objects weights_only refuses
        raise AutopartError(f"weights file {str(file)!r} does not load as a state dict: {_first_line(exc)}") from None
    if not isinstance(content, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in content.items()):
        kind = type(content).__name__
        raise AutopartError(f"weights file {str(file)!r} holds a {kind}, not a state dict (names -> tensors, as "
                            f"torch.save(model.state_dict(), FILE) writes)")
    return _Tensors(file, f"{file} (torch.save state dict)", content)


def _checkpoint(folder: Path) -> WeightSource:
    from autopart.run.checkpoint import latest_complete, load_stages

    step = folder if (folder / "COMPLETE").exists() else latest_complete(folder)
    if step is None:
        raise AutopartError(f"weights {str(folder)!r} holds no {_SINGLE}, {_INDEX}, nor a complete autopart "
                            f"checkpoint (step-NNNNNN/COMPLETE)")
    stages = load_stages(step, mmap=True)
    tensors: dict[str, torch.Tensor] = {}
    for stage in stages:
        for name, tensor in stage["model"].items():
            tensors.setdefault(name, tensor)
    count = len(stages)
    return _Tensors(step, f"{step} (autopart checkpoint, {count} stage{'s' if count != 1 else ''})", tensors)


@dataclass(frozen=True)
class ModelNames:
    """What weights for a model must hold (:func:`model_names`)."""

    shapes: Mapping[str, torch.Size]
    """Every ``state_dict`` name -> its shape."""
    aliases: Mapping[str, str]
    """Every other name of a tied parameter -> its first name."""
    prefix: str = ""
    """A ``transformers`` model's ``base_model_prefix`` (``transformer`` for GPT-2): a file's key may lack it or
    carry it where the model's name does not (the Hub's ``gpt2`` files store ``h.0.attn.c_attn.weight``). ""
    for other models: their names, exactly."""
    ignore_missing: tuple[str, ...] = ()
    """Patterns (``re.search``) of names that weights may lack: the model keeps them as built."""
    ignore_unexpected: tuple[str, ...] = ()
    """Patterns of keys that weights may have and the model does not (GPT-2's stale ``attn.bias`` masks)."""


@dataclass(frozen=True)
class KeyMap:
    """Where each of a model's names is in one source (:func:`check_keys`)."""

    keys: Mapping[str, str]
    """A model's name (a tied parameter under any of its names) -> the source's key."""
    kept: frozenset[str] = frozenset()
    """Names the source lacks that the model may keep as built (:attr:`ModelNames.ignore_missing`)."""


def model_names(module: nn.Module) -> ModelNames:
    """What :func:`check_keys` expects of ``module`` (on any device, meta included). A ``transformers`` model's
    names are matched as ``from_pretrained`` matches them: with or without its ``base_model_prefix``, and with its
    ``_keys_to_ignore_on_load_missing`` / ``_keys_to_ignore_on_load_unexpected`` (and the stale ``rotary_emb.inv_freq``
    and ``position_ids`` buffers that ``from_pretrained`` skips for models that have them); any other model's names
    exactly."""
    from autopart.run.stages import canonical_names

    shapes = {name: tensor.shape for name, tensor in module.state_dict(keep_vars=True).items()}
    aliases = {name: first for name, first in canonical_names(module).items() if name != first}
    if not _is_transformers_model(module):
        return ModelNames(shapes, aliases)
    buffers = [name for name, _ in module.named_buffers()]
    stale = [pattern for suffix, pattern in (("rotary_emb.inv_freq", r"rotary_emb\.inv_freq"),
                                             ("position_ids", r"(^|\.)position_ids$"))
             if any(name.endswith(suffix) for name in buffers)]
    return ModelNames(shapes, aliases, prefix=str(getattr(module, "base_model_prefix", "") or ""),
                      ignore_missing=_patterns(module, "_keys_to_ignore_on_load_missing"),
                      ignore_unexpected=_patterns(module, "_keys_to_ignore_on_load_unexpected") + tuple(stale))


def _is_transformers_model(module: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # a model built by it has imported it
    return transformers is not None and isinstance(module, transformers.PreTrainedModel)


def _patterns(module: nn.Module, attribute: str) -> tuple[str, ...]:
    """A ``transformers`` model's ignore list (``post_init`` gathers its children's into it), sorted."""
    return tuple(sorted(str(pattern) for pattern in getattr(module, attribute, None) or ()))


def _matcher(patterns: Sequence[str]) -> Callable[[str], bool]:
    if not patterns:
        return lambda name: False
    compiled = re.compile("|".join(f"({pattern})" for pattern in patterns))
    return lambda name: compiled.search(name) is not None


def _model_name(key: str, names: ModelNames) -> str:
    """The model's name for a source's ``key``: the key with the base-model prefix taken off or put on where
    that is a name the model has (``from_pretrained``'s order), else the key itself."""
    prefix = names.prefix
    if prefix:
        if key.startswith(prefix + ".") and key[len(prefix) + 1:] in names.shapes:
            return key[len(prefix) + 1:]
        if f"{prefix}.{key}" in names.shapes:
            return f"{prefix}.{key}"
    return key


def _match(source: WeightSource, names: ModelNames) -> tuple[dict[str, str], list[str]]:
    """Every model name the source has a tensor for (a tied parameter's other names included) -> the source's
    key; and the source's keys that are no name of the model's, less those it ignores."""
    ignored = _matcher(names.ignore_unexpected)
    known = set(names.shapes) | set(names.aliases) | set(names.aliases.values())
    found: dict[str, str] = {}
    unexpected = []
    for key in source.keys():
        name = _model_name(key, names)
        if name in known:
            found.setdefault(name, key)
        elif not ignored(key):
            unexpected.append(key)
    for group in _tie_groups(names):
        held = next((found[n] for n in group if n in found), None)
        if held is not None:
            found.update({n: held for n in group})  # one key for every name: each rank starts from one value
    return found, unexpected


def _tie_groups(names: ModelNames) -> list[list[str]]:
    """Every tied parameter's names, its first name (the model's order) first."""
    groups: dict[str, list[str]] = {}
    for name, first in names.aliases.items():
        groups.setdefault(first, [first]).append(name)
    return list(groups.values())


def tie_note(source: WeightSource, names: ModelNames) -> str | None:
    """A note when ``source`` holds a tied parameter under several of its names with different values (shapes
    compared first; values read only for those keys): only the first name's is loaded, the parameter stays tied
    (``transformers`` 5.24's ``from_pretrained`` instead unties the two when both keys are in the files). For the
    launcher's check: ranks do not read the other copies."""
    keys: dict[str, str] = {}
    for key in source.keys():
        keys.setdefault(_model_name(key, names), key)
    for group in _tie_groups(names):
        held = [keys[name] for name in group if name in keys]
        if len(held) < 2:
            continue
        kept = held[0]
        differ = [key for key in held[1:] if source.shape(key) != source.shape(kept)
                  or not torch.equal(source.read(key), source.read(kept))]
        if differ:
            return (f"note: weights {source.path} hold tied parameter {group[0]!r} under {len(held)} names with "
                    f"different values ({_some([kept, *differ])}): the model ties them, so every stage starts from "
                    f"{kept!r}'s (transformers' from_pretrained unties them)")
    return None


def _some(keys: Sequence[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:_SHOWN])
    return shown + (f" (and {len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def _count(keys: Sequence[str]) -> str:
    return f"{len(keys)} key{'s' if len(keys) != 1 else ''}"


def check_keys(source: WeightSource, names: ModelNames, model: str) -> KeyMap:
    """Where each of the model's ``names`` is in ``source``; refused in one line when the weights do not fit the
    model: keys missing (a tied parameter counts as present under any of its names), keys the model does not
    have, or shapes that differ (weights for another config)."""
    found, unexpected = _match(source, names)
    may_lack = _matcher(names.ignore_missing)
    absent = [name for name in names.shapes if name not in found]
    missing = [name for name in absent if not may_lack(name)]
    problems = []
    if missing:
        problems.append(f"{_count(missing)} of model {model!r} missing from {source.path}: {_some(missing)}")
    if unexpected:
        problems.append(f"{_count(unexpected)} in {source.path} that model {model!r} does not have: "
                        f"{_some(unexpected)}")
    if problems:
        raise AutopartError("; ".join(problems))
    wrong = [(name, shape, source.shape(found[name])) for name, shape in names.shapes.items()
             if name in found and source.shape(found[name]) != shape]
    if wrong:
        name, ours, theirs = wrong[0]
        more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise AutopartError(f"weights {source.path} do not fit model {model!r} (another config?): "
                            f"{found[name]!r} is {list(theirs)} there but {list(ours)} in the model{more}")
    return KeyMap(found, frozenset(absent))


def load_into(module: nn.Module, source: WeightSource, keys: KeyMap) -> None:
    """Copy every entry of ``module.state_dict()`` from ``source`` where ``keys`` (:func:`check_keys`) finds it
    (a stage module uses the unpartitioned model's names), cast to the module's dtype, on its device; a name the
    model may lack stays as built, as do non-persistent buffers (not in a state_dict). Only the tensors the
    module has are read."""
    with torch.no_grad():
        for name, target in module.state_dict(keep_vars=True).items():
            key = keys.keys.get(name)
            if key is None:
                if name in keys.kept:
                    continue
                raise AutopartError(f"weights {source.path} have no {name!r}")
            value = source.read(key)
            if value.shape != target.shape:
                raise AutopartError(f"weights {source.path} do not fit: {key!r} is {list(value.shape)} there but "
                                    f"{list(target.shape)} in the model")
            target.copy_(value)


def load_stage_weights(path: str | Path, model: nn.Module, stages: Sequence[nn.Module], spec: str) -> WeightSource:
    """Check the weights at ``path`` against the whole ``model`` (meta is enough) and load each of this rank's
    ``stages`` from them; the source, for its description."""
    source = open_weights(path)
    keys = check_keys(source, model_names(model), spec)
    for module in stages:
        load_into(module, source, keys)
    return source

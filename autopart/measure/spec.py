"""Load a model from a spec: a built-in name, ``pkg.mod:factory`` or ``path/file.py:factory``.

The factory contract is in docs/formats.md: it returns an ``nn.Module``, a tuple
``(module, example)``, or a mapping with ``module``, ``example`` and optionally
``loss_fn`` and ``data``. Every way a spec can fail becomes an AutopartError.
"""
from __future__ import annotations

import importlib
import importlib.util
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from autopart.errors import AutopartError
from autopart.measure.hf import build_hf, is_hf_spec
from autopart.measure.models.registry import BUILTINS

__all__ = ["Example", "LossFn", "ModelBundle", "call_model", "load_model", "parse_shape", "parse_dtype",
           "require_parameters", "shape_example"]

Example = tuple[torch.Tensor, ...]
"""One micro-batch of inputs, as positional arguments."""
LossFn = Callable[[Any, torch.Tensor], torch.Tensor]
"""``loss_fn(output, target)``: the last stage's loss for one micro-batch."""


@dataclass(frozen=True)
class ModelBundle:
    """What a model spec gives: the module and what is needed to run it."""

    name: str
    module: nn.Module
    example: Example | None
    """One micro-batch of inputs, in order; None when the factory gave none."""
    loss_fn: LossFn | None = None
    data: Iterable[Any] | None = None
    builtin: bool = False
    input_names: tuple[str, ...] | None = None
    """When the example was given as keyword inputs: their names, in the order of ``example``
    (the model is then called as ``module(**dict(zip(input_names, example)))``)."""
    data_kind: str | None = None
    """What autopart trains it on when the factory gives no data: "text" (next byte), "masked-text"
    (masked bytes) or "digits" (scikit-learn's images); None: the factory's data, or synthetic."""


def _load_factory(spec: str) -> Callable[[], Any]:
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        known = ", ".join(BUILTINS)
        raise AutopartError(f"unknown model {spec!r}: not a built-in ({known}) nor 'hf:NAME', 'pkg.mod:factory' "
                            f"or 'path/file.py:factory'")
    path = Path(target)
    by_path = target.endswith(".py") or "/" in target or "\\" in target
    if path.is_dir() and (by_path or not (path / "__init__.py").is_file()):  # a package named as pkg is a module
        raise AutopartError(f"model spec {spec!r} names a folder, {target!r}, not a .py file or a module: give "
                            f"path/file.py:factory or pkg.mod:factory")
    if by_path:
        if not path.is_file():
            raise AutopartError(f"model file {target!r} does not exist")
        mod_name = f"_autopart_user_{abs(hash(str(path.resolve())))}"
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        if module_spec is None or module_spec.loader is None:
            raise AutopartError(f"cannot import model file {target!r}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        folder = str(path.resolve().parent)
        if folder not in sys.path:  # as `python file.py` does: the file imports the modules beside it,
            sys.path.insert(0, folder)  # at import time or when the factory runs
        try:
            module_spec.loader.exec_module(module)
        except SystemExit as exc:
            raise AutopartError(f"importing {target!r} called {_exit_call(exc)}") from None
        except Exception as exc:
            raise AutopartError(f"importing {target!r} raised {type(exc).__name__}: {_first_line(exc)}") from None
    else:
        try:
            module = importlib.import_module(target)
        except SystemExit as exc:
            raise AutopartError(f"importing {target!r} called {_exit_call(exc)}") from None
        except ModuleNotFoundError as exc:
            raise AutopartError(f"cannot import module {target!r}: {_first_line(exc)}") from None
        except Exception as exc:
            raise AutopartError(f"importing {target!r} raised {type(exc).__name__}: {_first_line(exc)}") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise AutopartError(f"{target!r} has no attribute {attr!r}")
    if not callable(factory):
        raise AutopartError(f"{spec!r} is not callable")
    return factory  # type: ignore[no-any-return]


def _exit_call(exc: SystemExit) -> str:
    """``sys.exit(3)``, ``sys.exit('no GPU')`` or ``sys.exit()``, as the code called it."""
    return "sys.exit()" if exc.code is None else f"sys.exit({exc.code!r})"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _as_example(value: Any, spec: str) -> tuple[Example, tuple[str, ...] | None]:
    """The example's tensors in order, and their keyword names when it was a mapping."""
    if isinstance(value, torch.Tensor):
        return (value,), None
    if isinstance(value, (tuple, list)) and value and all(isinstance(v, torch.Tensor) for v in value):
        return tuple(value), None
    if isinstance(value, Mapping) and value and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                    for k, v in value.items()):
        return tuple(value.values()), tuple(value.keys())
    raise AutopartError(f"model {spec!r}: example must be a tensor, a tuple of tensors or a mapping of keyword "
                        f"inputs to tensors, got {type(value).__name__}")


def call_model(module: nn.Module, inputs: Sequence[torch.Tensor], input_names: Sequence[str] | None) -> Any:
    """``module(*inputs)``, or with keyword inputs when the example had names."""
    if input_names:
        return module(**dict(zip(input_names, inputs)))
    return module(*inputs)


def load_model(spec: str) -> ModelBundle:
    """Build the model named by ``spec`` (see the module docstring)."""
    builtin = spec in BUILTINS
    if is_hf_spec(spec):
        factory: Callable[[], Any] = lambda: build_hf(spec)  # noqa: E731
    else:
        factory = BUILTINS[spec] if builtin else _load_factory(spec)
    try:
        made = factory()
    except AutopartError:
        raise
    except SystemExit as exc:  # the factory's own "cannot build here": a line, not a silent exit
        raise AutopartError(f"model factory {spec!r} called {_exit_call(exc)}") from None
    except Exception as exc:
        raise AutopartError(f"model factory {spec!r} raised {type(exc).__name__}: {_first_line(exc)}") from None
    module: Any
    example: Example | None = None
    loss_fn = data = None
    data_kind: str | None = None
    names: tuple[str, ...] | None = None
    if isinstance(made, nn.Module):
        module = made
    elif isinstance(made, tuple) and len(made) == 2:
        module, (example, names) = made[0], _as_example(made[1], spec)
    elif isinstance(made, Mapping):
        if "module" not in made:
            raise AutopartError(f"model factory {spec!r} returned a mapping without 'module'")
        module = made["module"]
        if made.get("example") is not None:
            example, names = _as_example(made["example"], spec)
        loss_fn, data, data_kind = made.get("loss_fn"), made.get("data"), made.get("data_kind")
        if loss_fn is not None and not callable(loss_fn):
            raise AutopartError(f"model factory {spec!r}: loss_fn is not callable")
    else:
        raise AutopartError(f"model factory {spec!r} returned {type(made).__name__}; expected an nn.Module, "
                            f"(module, example) or a mapping with 'module'")
    if not isinstance(module, nn.Module):
        raise AutopartError(f"model factory {spec!r} returned {type(module).__name__} as module, not an nn.Module")
    return ModelBundle(name=spec, module=module, example=example, loss_fn=loss_fn, data=data, builtin=builtin,
                       input_names=names, data_kind=data_kind)


def require_parameters(bundle: ModelBundle) -> None:
    """Refuse a model with no parameters: there is nothing to train (a stage of such blocks in a model that
    has some is fine; it runs with nothing to update)."""
    if next(iter(bundle.module.parameters()), None) is None:
        raise AutopartError(f"model {bundle.name!r} has no parameters: nothing to train")


def parse_shape(text: str) -> tuple[int, ...]:
    """``"8,1024"`` -> ``(8, 1024)``; every dimension a positive integer."""
    if re.fullmatch(r"\s*\d+(\s*x\s*\d+)+\s*", text):
        text = text.replace("x", ",")
    parts = [p.strip() for p in text.split(",")]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise AutopartError(f"input shape {text!r} is not a list of integers like 8,1024") from None
    if not shape or any(d < 1 for d in shape):
        raise AutopartError(f"input shape {text!r} must have at least one dimension, all >= 1")
    return shape


_DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "float64": torch.float64, "double": torch.float64,
    "int64": torch.int64, "long": torch.int64, "int32": torch.int32, "int": torch.int32,
    "bool": torch.bool,
}


def parse_dtype(text: str) -> torch.dtype:
    try:
        return _DTYPES[text.lower()]
    except KeyError:
        raise AutopartError(f"unknown dtype {text!r}; known: {', '.join(_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _random(shape: Sequence[int], dtype: torch.dtype, like: torch.Tensor | None) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(*shape).to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, tuple(shape)).bool()
    high = int(like.max()) + 1 if like is not None and like.numel() and not like.is_meta else 2
    return torch.randint(0, max(high, 1), tuple(shape), dtype=dtype)


def shape_example(bundle: ModelBundle, input_shape: tuple[int, ...] | None = None,
                  input_dtype: torch.dtype | None = None, microbatch_size: int | None = None) -> Example:
    """One micro-batch for ``bundle``: its own example, reshaped as asked.

    ``input_shape`` replaces the first input's shape (random values in the
    example's range; ids stay valid); ``microbatch_size`` replaces the first
    dimension of every input.
    """
    example = bundle.example
    if example is None and input_shape is None:
        raise AutopartError(f"model {bundle.name!r} gives no example input; pass --input-shape (and --input-dtype)")
    if input_shape is not None:
        first = example[0] if example else None
        dtype = input_dtype or (first.dtype if first is not None else torch.float32)
        example = (_random(input_shape, dtype, first),) + tuple(example[1:] if example else ())
    elif input_dtype is not None and example is not None:
        example = (_random(example[0].shape, input_dtype, example[0]),) + example[1:]
    assert example is not None
    if microbatch_size is not None:
        if microbatch_size < 1:
            raise AutopartError(f"micro-batch size must be >= 1, got {microbatch_size}")
        example = tuple(
            t if t.dim() == 0 else _random((microbatch_size, *t.shape[1:]), t.dtype, t) for t in example
        )
    return example

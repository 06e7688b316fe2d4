"""Build a model with its parameters on the meta device and its buffers real, and notice a factory that sets weights.

    with parameters_on_meta() as moved:
        model = Model()          # no memory for the weights; a buffer computed in __init__ keeps its values
    # moved: the ids of the parameters it put on meta (a parameter made on meta by the model itself is not one)

Every parameter goes to the meta device as it is registered (``nn.Module.register_parameter``, which
``module.weight = nn.Parameter(...)`` calls), so a module's own ``reset_parameters`` then runs on meta, for
free. Buffers are left alone: a table computed in ``__init__`` (a sinusoidal position encoding, rotary
frequencies) keeps its values, which nothing could compute again after ``to_empty``.

A factory that sets weights itself once the model is made (``model.load_state_dict(torch.load(...))``, as
torchvision's and timm's pretrained builders do, ``nn.init.zeros_(model.head.weight)``, ``p.data.fill_(...)``, a
real parameter assigned or loaded with ``assign=True``) would write into meta tensors, and its values would be
lost: the first such write stops the factory with :class:`SetsWeights`. A write is the model's own construction,
which autopart runs again per stage, when it happens inside an ``nn.Module``'s ``reset_parameters`` or
``_init_weights`` (or ``transformers``' ``post_init``, ``init_weights``, ``initialize_weights``, ``tie_weights``
of a model with ``_init_weights``), unless it is a ``load_state_dict``: loaded values are never the model's own
initialisation. A write in a module's ``__init__`` outside those (nanoGPT's scaled ``c_proj`` after
``apply(_init_weights)``, ``nn.MultiheadAttention``'s ``_reset_parameters``) stands unless construction writes
that parameter again later (``transformers``' ``post_init`` overwrites what ``Conv1D.__init__`` drew); one still
standing when the factory returns stops it too. A parameter made in an ``__init__`` is its creation, not a write.
Writes are found by the storage they touch (a view, ``.data`` or ``.detach()`` of a parameter shares it), at the
dispatcher (``TorchDispatchMode``: any operator whose schema writes an argument), plus ``.data =`` (a
``TorchFunctionMode``, since it is no operator); a ``copy.deepcopy`` of a moved parameter is watched too.

A device move at the end of a factory (``model.to("cpu")``, ``.cuda()``, ``.cpu()``) leaves a meta tensor on
meta (whoever gives it storage puts it on its device), and a dtype cast stays a meta cast: the rank then
materialises it in that dtype (:func:`on_meta_device` does the same under ``torch.device("meta")``).

The meta half mirrors ``accelerate.init_empty_weights(include_buffers=False)`` (``accelerate.big_modeling``);
it is written here rather than imported because accelerate would add huggingface_hub, psutil and pyyaml to
every install of autopart for one context manager.
"""
from __future__ import annotations

import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SetsWeights", "WeightWrite", "on_meta_device", "parameters_on_meta"]

_CONSTRUCTION = frozenset({"reset_parameters", "_init_weights"})
"""Methods of an ``nn.Module`` whose writes are its construction: autopart runs them per stage."""
_HF_INIT = frozenset({"post_init", "init_weights", "initialize_weights", "_initialize_weights", "tie_weights"})
"""``transformers``' methods that run ``_init_weights`` (and tie): construction on a model that has it."""
_LOADS = frozenset({"load_state_dict", "_load_from_state_dict"})
_MOVES = frozenset({"to", "cuda", "cpu"})
"""``Tensor`` methods a factory's ``model.to(...)`` / ``.cuda()`` / ``.cpu()`` calls on each parameter."""
_TORCH = os.path.dirname(torch.__file__) + os.sep
_HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # autopart's own files


@dataclass(frozen=True)
class WeightWrite:
    """A factory's write of values into a parameter on the meta device, outside the model's own construction."""

    how: str
    """``load_state_dict``, the operator (``copy_``, ``zero_``, ``fill_``, ...), ``.data =`` or ``assigned``."""
    parameter: str
    """Its name in the largest module the factory's code holds (``fc.weight``), else its module's class and name."""
    where: str
    """``file.py:LINE`` of the call that led to the write: in ``inside`` where set, else in the factory autopart
    called."""
    inside: str = ""
    """The module method the write is in, outside ``reset_parameters`` / ``_init_weights`` (``GPT.__init__``), or
    "" when it is the factory's own code."""


class SetsWeights(BaseException):
    """Raised out of the factory at its first :class:`WeightWrite` (a ``BaseException``, so that the factory's own
    ``except Exception`` does not swallow it)."""

    def __init__(self, write: WeightWrite) -> None:
        super().__init__(f"{write.how} into {write.parameter!r} at {write.where}")
        self.write = write


def _self_module(frame: FrameType) -> nn.Module | None:
    code = frame.f_code
    if not code.co_varnames or code.co_varnames[0] != "self":
        return None
    value = frame.f_locals.get("self")
    return value if isinstance(value, nn.Module) else None


def _loaded_or_made(frame: FrameType | None) -> tuple[str | None, FrameType | None]:
    """What the innermost module method on the stack makes of a write: ``(None, None)`` when it is the model's
    construction autopart runs per stage (see the module docstring); ``("load_state_dict", None)`` for a load;
    ``("", frame)`` for a write in a module's ``__init__`` (the frame of that ``__init__``) and ``("", None)``
    for the factory's own code."""
    while frame is not None:
        name = frame.f_code.co_name
        if name in _LOADS or name in _CONSTRUCTION or name in _HF_INIT or name == "__init__":
            module = _self_module(frame)
            if module is not None:
                if name in _LOADS:
                    return "load_state_dict", None
                if name == "__init__":
                    return "", frame
                if name in _CONSTRUCTION or callable(getattr(module, "_init_weights", None)):
                    return None, None
        frame = frame.f_back
    return "", None


def _describe(param: nn.Parameter, frame: FrameType | None, owners: dict[int, str]) -> tuple[str, str]:
    """The parameter's name (in the largest module a frame of the factory's code holds, else its module's class and
    name) and the line of the factory that led to the write: the outermost frame of the code autopart called (the
    frames from the write out to the first of autopart's own, less torch's)."""
    where, best, size, inside = "", owners.get(id(param), "a parameter"), -1, False
    while frame is not None:
        file = frame.f_code.co_filename
        if file.startswith(_HERE) and inside:
            break  # back in autopart (load_model): the factory's frames are done
        if not file.startswith((_TORCH, _HERE)):
            inside, where = True, f"{os.path.basename(file)}:{frame.f_lineno}"
            for value in list(frame.f_locals.values()):
                if isinstance(value, nn.Module):
                    named = {id(p): n for n, p in value.named_parameters(remove_duplicate=False)}
                    if id(param) in named and len(named) > size:
                        best, size = named[id(param)], len(named)
        frame = frame.f_back
    return best, where or "?"


def _written(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Iterator[torch.Tensor]:
    """The tensors an operator writes into (its schema's ``Tensor(a!)`` arguments, lists of them included)."""
    schema = func._schema
    for index, arg in enumerate(schema.arguments):
        if arg.alias_info is None or not arg.alias_info.is_write:
            continue
        value = args[index] if index < len(args) else kwargs.get(arg.name)
        for tensor in (value if isinstance(value, (list, tuple)) else (value,)):
            if isinstance(tensor, torch.Tensor):
                yield tensor


class _Watch:
    """The parameters moved to meta, by the storage they share with their views, and the check of a write."""

    def __init__(self, writes_kept: bool = True) -> None:
        self.writes_kept = writes_kept
        """False: writes are let go (their values are lost on meta), none stops the factory."""
        self.params: dict[int, nn.Parameter] = {}
        self.owners: dict[int, str] = {}
        self.standing: dict[int, WeightWrite] = {}
        """Writes in a module's ``__init__`` not yet overwritten by construction, by the ``id`` of the parameter."""

    def add(self, param: nn.Parameter, module: nn.Module, name: str) -> None:
        self.params[param.untyped_storage()._cdata] = param
        self.owners[id(param)] = f"{type(module).__name__}.{name}"

    def copied(self, source: nn.Parameter, copy: nn.Parameter) -> None:
        """``copy.deepcopy`` of a moved parameter (``nn.TransformerEncoder`` clones its layer so): the copy is
        watched as its source, and carries the source's standing write."""
        self.params[copy.untyped_storage()._cdata] = copy
        self.owners[id(copy)] = self.owners[id(source)]
        if id(source) in self.standing:
            self.standing[id(copy)] = self.standing[id(source)]

    def check(self, tensor: torch.Tensor, how: str) -> None:
        if not tensor.is_meta:
            return
        param = self.params.get(tensor.untyped_storage()._cdata)
        if param is not None:
            self.fire(param, how)

    def rekey(self, param: torch.Tensor) -> None:
        """A moved parameter given new meta storage (``param.data =`` of a dtype cast) stays watched."""
        if isinstance(param, nn.Parameter) and id(param) in self.owners and param.is_meta:
            self.params[param.untyped_storage()._cdata] = param

    def fire(self, param: nn.Parameter, how: str) -> None:
        """A write into a moved parameter: construction overwrites what an ``__init__`` wrote before it; a write
        in an ``__init__`` stands until then (:meth:`first_standing`); any other is raised at once."""
        if not self.writes_kept:
            return
        frame = sys._getframe(2)
        kind, init = _loaded_or_made(frame)
        if kind is None:
            self.standing.pop(id(param), None)
            return
        if init is not None and how == "assigned":
            return  # a parameter made in an __init__: its creation, not a write
        name, where = _describe(param, frame, self.owners)
        if init is None:
            raise SetsWeights(WeightWrite(how=kind or how, parameter=name, where=where))
        module = _self_module(init)
        self.standing.pop(id(param), None)  # the latest write into it is the one that stands
        self.standing[id(param)] = WeightWrite(
            how=how, parameter=name, where=f"{os.path.basename(init.f_code.co_filename)}:{init.f_lineno}",
            inside=f"{type(module).__name__}.__init__")

    def first_standing(self) -> None:
        """Raises :class:`SetsWeights` for the first write in an ``__init__`` that nothing autopart runs per stage
        overwrote: its value would be lost."""
        if self.standing:
            raise SetsWeights(next(iter(self.standing.values())))


class _Writes(TorchDispatchMode):
    def __init__(self, watch: _Watch) -> None:
        super().__init__()
        self.watch = watch

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func._schema.is_mutable:
            for tensor in _written(func, args, kwargs):
                self.watch.check(tensor, func.__name__.split(".")[0])
        return func(*args, **kwargs)


class _DataSet(TorchFunctionMode):
    def __init__(self, watch: _Watch) -> None:
        super().__init__()
        self.watch = watch

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if getattr(func, "__self__", None) is torch._C.TensorBase.data and func.__name__ == "__set__" \
                and len(args) == 2 and isinstance(args[1], torch.Tensor):
            if not args[1].is_meta:
                self.watch.check(args[0], ".data =")
            out = func(*args, **kwargs)
            self.watch.rekey(args[0])
            return out
        return _stay_on_meta(func, args, kwargs)


def _stay_on_meta(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``func(*args, **kwargs)``, except that a device move (``.to(device)``, ``.cuda()``, ``.cpu()``) of a meta
    tensor keeps it on meta (it has no values to move; whoever gives it storage puts it on its device), with a
    dtype cast kept."""
    if func.__name__ in _MOVES and getattr(func, "__objclass__", None) is torch._C.TensorBase and args \
            and isinstance(args[0], torch.Tensor) and args[0].is_meta:
        dtype = torch._C._nn._parse_to(*args[1:], **kwargs)[1] if func.__name__ == "to" else None
        return args[0] if dtype is None else args[0].to(dtype=dtype)
    return func(*args, **kwargs)


class _MovesStay(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        return _stay_on_meta(func, args, kwargs or {})


@contextmanager
def on_meta_device() -> Iterator[None]:
    """``torch.device("meta")`` for a model's names and shapes, where a factory's ``model.to("cpu")``,
    ``.cuda()`` or ``.cpu()`` keeps the tensors on meta instead of failing (``Cannot copy out of meta
    tensor``)."""
    with torch.device("meta"), _MovesStay():
        yield


@contextmanager
def parameters_on_meta(writes_kept: bool = True) -> Iterator[set[int]]:
    """Within it, every parameter a module registers is moved to the meta device (its class, ``requires_grad``
    and attributes kept); buffers stay where they are made; a write of values into a moved parameter outside the
    model's construction raises :class:`SetsWeights` (see the module docstring). Yields the set of the ``id`` of
    each parameter it moved, filled as they are registered. ``writes_kept=False``: writes are let go instead (every
    weight is to come from a file)."""
    original = nn.Module.register_parameter
    moved: set[int] = set()
    watch = _Watch(writes_kept)

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        made = self._parameters[name]
        if made is not None and not made.is_meta:
            watch.fire(made, "assigned")  # a real parameter put in after construction (assign=True loads too)
            kwargs = dict(made.__dict__)
            kwargs["requires_grad"] = made.requires_grad
            self._parameters[name] = on_meta = type(made)(made.to(torch.device("meta")), **kwargs)
            moved.add(id(on_meta))
            watch.add(on_meta, self, name)

    original_copy = nn.Parameter.__deepcopy__

    def deepcopy(self: nn.Parameter, memo: dict[int, Any]) -> nn.Parameter:
        copied: nn.Parameter = original_copy(self, memo)
        if id(self) in moved and copied.is_meta:
            moved.add(id(copied))
            watch.copied(self, copied)
        return copied

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    nn.Parameter.__deepcopy__ = deepcopy  # type: ignore[method-assign,assignment]
    try:
        with _DataSet(watch), _Writes(watch), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*non-meta parameter in the checkpoint to a meta parameter")
            yield moved
            watch.first_standing()
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]
        nn.Parameter.__deepcopy__ = original_copy  # type: ignore[method-assign]

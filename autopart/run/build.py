"""Each rank builds only its own stages, with the weights a whole-model build gives.

    bundle = build_model("gpt2-tiny", seed=0)      # one process: the whole model, the weights every run starts from

A rank of ``autopart train`` builds the model with its parameters on the meta device and its buffers real
(:func:`autopart.measure.empty.parameters_on_meta`), cuts it (a graph is captured on meta), and gives real
storage only to its own stages' tensors (:func:`materialise`), which :func:`fill_stage` then fills.

The initialisation is the model's own, per module, and the same whatever the split: every module that holds one
of the stage's parameters (in it or below it) is initialised in post-order (children first, as ``nn.Module.apply`` and
``transformers``' ``initialize_weights`` go), each from its own seed, ``crc32`` of (seed, its name in the
model). A module is initialised by the nearest module at or above it that has an ``_init_weights(module)``
method (every ``transformers`` model has one; so can yours), else by its own ``reset_parameters()``. A tied
parameter is one tensor, held by every module that uses it, so every rank that holds a copy draws the same
values. A parameter that no ``reset_parameters`` (of its module or one above it) and no ``_init_weights``
covers would be left uninitialised: such a model (:func:`uncovered_parameter`) is built whole on every rank,
from the seed, with the weights its factory draws, and the run says so.
"""
from __future__ import annotations

import functools
import sys
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from autopart.errors import AutopartError
from autopart.measure.blocks import Chain, GraphChain, chain_of
from autopart.measure.empty import SetsWeights, WeightWrite, parameters_on_meta
from autopart.measure.spec import ModelBundle, load_model
from autopart.measure.stream import load_with_weights, retarget
from autopart.run.shapes import NeedsValues

__all__ = ["DrawsNeedValues", "RankBuild", "buffers_to_meta", "build_for_rank", "build_model", "cut_on_meta",
           "fill_stage", "initialise", "materialise", "materialise_stage", "module_seed", "replace_tensors", "uncovered_parameter"]


@dataclass(frozen=True)
class RankBuild:
    """A model as a rank builds it: on meta (``empty``), or whole (``note`` says why)."""

    bundle: ModelBundle
    empty: bool
    """Parameters on the meta device, buffers real: only the rank's stages get storage."""
    note: str | None = None


def module_seed(seed: int, name: str) -> int:
    """The seed module ``name`` (its name in the model; "" for the root) is initialised from: stable across
    processes and Python versions (``crc32``, not ``hash``)."""
    return zlib.crc32(f"{seed}:{name}".encode())


def _initialiser(module: nn.Module) -> Callable[[nn.Module], None] | None:
    init = getattr(module, "_init_weights", None)
    return init if callable(init) else None


def uncovered_parameter(root: nn.Module) -> tuple[str, str] | None:
    """The first parameter nothing initialises (its name, and its module's class), or None: no module at or
    above it has ``reset_parameters`` and none has ``_init_weights``."""
    owners: dict[int, str] = {}

    def walk(module: nn.Module, prefix: str, covered: bool) -> Iterator[tuple[str, str]]:
        covered = covered or _initialiser(module) is not None or callable(getattr(module, "reset_parameters", None))
        for name, param in module._parameters.items():
            if param is None or id(param) in owners:
                continue
            owners[id(param)] = prefix + name
            if not covered:
                yield prefix + name, type(module).__name__
        for child_name, child in module._modules.items():
            if child is not None:
                yield from walk(child, f"{prefix}{child_name}.", covered)

    return next(walk(root, "", False), None)


def _post_order(module: nn.Module, name: str, init: Callable[[nn.Module], None] | None, seen: set[int]
                ) -> Iterator[tuple[str, nn.Module, Callable[[nn.Module], None] | None]]:
    if id(module) in seen:
        return
    seen.add(id(module))
    init = _initialiser(module) or init
    for child_name, child in module._modules.items():
        if child is not None:
            yield from _post_order(child, f"{name}.{child_name}" if name else child_name, init, seen)
    yield name, module, init


_REPLAYED = frozenset({"normal_", "uniform_", "bernoulli_", "exponential_", "random_", "log_normal_", "cauchy_",
                       "geometric_", "normal", "rand", "randn", "randint", "randperm", "rand_like", "randn_like",
                       "randint_like", "bernoulli"})
"""Random operators whose draws from the generator depend on their tensors' shapes, strides and dtypes (and scalar
arguments) only, never on their values: a draw into a meta tensor is replayed on the CPU with the same count.
``torch.nn.init``'s ``normal_``, ``uniform_``, ``kaiming_*`` and ``xavier_*`` come down to these; its
``trunc_normal_``, ``orthogonal_`` and ``sparse_`` return at once on a meta tensor (see :data:`_SKIP_META`)."""
_SKIP_META = ("_no_grad_trunc_normal_", "orthogonal_", "sparse_")
"""``torch.nn.init``'s functions that draw nothing for a meta tensor (they return before drawing), and whose draws
cannot be replayed operator by operator anyway (``trunc_normal_`` rejects and redraws by the values it drew;
``orthogonal_`` draws, then QR; ``sparse_`` draws, then ``randperm`` per column): for a meta tensor each is run
whole on a CPU tensor of its shape, strides and dtype, whose values are the very draws a whole build makes, so
its redraws are the same too (:func:`_init_functions_replayed`)."""


@contextmanager
def _init_functions_replayed(cpu: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """While it lasts, each of :data:`_SKIP_META` called on a meta tensor runs on ``cpu(tensor)`` instead (then
    freed): by its name in ``torch.nn.init`` (``trunc_normal_`` calls ``_no_grad_trunc_normal_`` so) and in
    ``transformers``' table of them where it is imported. A copy imported by name before (``from torch.nn.init
    import orthogonal_``) is not seen: it draws nothing for a meta tensor, as before."""
    init = torch.nn.init
    tables: list[dict[str, Any]] = [vars(init)]
    hf = sys.modules.get("transformers.initialization")
    table = getattr(hf, "TORCH_INIT_FUNCTIONS", None)
    if isinstance(table, dict):
        tables.append(table)
    saved: list[tuple[dict[str, Any], str, Any]] = []

    def replayed(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        @functools.wraps(original)
        def run(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if not tensor.is_meta:
                return original(tensor, *args, **kwargs)
            original(cpu(tensor), *args, **kwargs)  # the same draws, on the CPU; the values are dropped
            return tensor
        return run

    for where in tables:
        saved += [(where, name, where[name]) for name in _SKIP_META if callable(where.get(name))]
    try:
        for where, name, original in saved:
            where[name] = replayed(original)
        yield
    finally:
        for where, name, original in reversed(saved):
            where[name] = original


class DrawsNeedValues(NeedsValues):
    """A stage's initialisation draws for a tensor on the meta device as many numbers as its values say: found on
    the ranks whose stages it initialises, so only they build the whole model."""


class _DrawsReplayed(TorchDispatchMode):
    """Every random operator on a meta tensor run again on CPU tensors of the same shape, strides and dtype (freed
    at once: the peak is one tensor), so that the CPU generator advances exactly as it does in a whole build,
    where those tensors are real. ``dtypes``: the dtype a whole build draws a parameter in, by the ``_cdata`` of
    its meta storage, where it differs from its meta one (a bf16-true run casts the model on meta first). A
    random operator whose draws depend on values (``poisson``, ``multinomial``, ...) raises :class:`NeedsValues`."""

    def __init__(self, dtypes: Mapping[int, torch.dtype]) -> None:
        super().__init__()
        self.dtypes = dtypes

    def cpu(self, t: torch.Tensor, written: bool = True) -> torch.Tensor:
        """A CPU tensor of ``t``'s shape, strides and dtype (the whole build's): uninitialised where it is drawn
        into, else zeros."""
        dtype = self.dtypes.get(t.untyped_storage()._cdata, t.dtype)
        made = torch.empty_strided(t.shape, t.stride(), dtype=dtype, device="cpu")
        return made if written else made.zero_()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if torch.Tag.nondeterministic_seeded not in func.tags:
            return out
        leaves = pytree.tree_leaves((args, kwargs, out))
        if not any(isinstance(t, torch.Tensor) and t.is_meta for t in leaves):
            return out  # drawn for real
        name = func.__name__.split(".")[0]
        if name not in _REPLAYED:
            raise DrawsNeedValues(f"the model's initialisation draws {name} (as many draws as its values say) for a "
                                  f"tensor on the meta device")
        written = {id(args[0])} if func._schema.is_mutable and args else set()  # the tensor drawn into

        def cpu(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.is_meta:
                return self.cpu(value, id(value) in written)
            if isinstance(value, torch.device) and value.type == "meta":
                return torch.device("cpu")
            return value

        cpu_args, cpu_kwargs = pytree.tree_map(cpu, (args, kwargs))
        func(*cpu_args, **cpu_kwargs)  # the same draws, on the CPU; the result is dropped
        return out


def initialise(root: nn.Module, seed: int, params: Iterable[torch.Tensor] | None = None,
               dtypes: Mapping[int, torch.dtype] | None = None) -> None:
    """The model's own initialisation of every module that holds one of ``params`` (in it or below it; None:
    every real, not meta, parameter), each from :func:`module_seed` (see the module docstring): the same values
    whichever of them are real. A module's initialisation that also draws for tensors still on the meta device (a
    container's ``reset_parameters`` over its children, a root ``_init_weights`` that draws for a child) draws
    for them on the CPU all the same (:class:`_DrawsReplayed`), so the random stream is where a whole build has it
    when this rank's own parameters are drawn. ``dtypes``: a parameter's dtype by ``id`` where its initialisation
    runs in another one (:func:`materialise`'s)."""
    wanted = {id(p) for p in (params if params is not None else root.parameters()) if not p.is_meta}
    by_storage = {p.untyped_storage()._cdata: dtypes[id(p)] for p in root.parameters()
                  if p.is_meta and dtypes is not None and id(p) in dtypes and dtypes[id(p)] != p.dtype}
    replay = _DrawsReplayed(by_storage)
    with torch.no_grad(), replay, _init_functions_replayed(replay.cpu):
        for name, module, init in _post_order(root, "", None, set()):
            if not any(id(p) in wanted for p in module.parameters()):
                continue
            torch.manual_seed(module_seed(seed, name))
            if init is not None:
                init(module)
            else:
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()


def materialise(tensors: Sequence[torch.Tensor], trees: Sequence[nn.Module], device: torch.device,
                dtypes: Mapping[int, torch.dtype] | None = None) -> dict[int, torch.Tensor]:
    """Real, uninitialised storage on ``device`` for each meta tensor of ``tensors`` (a parameter stays a
    parameter), put in its place in every module of ``trees`` that holds it, so a tied parameter stays one
    tensor. ``dtypes``: a tensor's dtype by ``id`` where it is to differ from its meta one. Old id -> new."""
    made: dict[int, torch.Tensor] = {}
    for t in tensors:
        if id(t) in made or not t.is_meta:
            continue
        dtype = (dtypes or {}).get(id(t), t.dtype)
        real = torch.empty(t.shape, dtype=dtype, device=device)
        made[id(t)] = nn.Parameter(real, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else real
    replace_tensors(trees, made)
    return made


def replace_tensors(trees: Sequence[nn.Module], made: Mapping[int, torch.Tensor]) -> None:
    """Put ``made[id(old)]`` in place of every parameter or buffer ``old`` that a module of ``trees`` holds."""
    seen: set[int] = set()
    for tree in trees:
        for module in tree.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            for store in (module._parameters, module._buffers):
                for key, value in store.items():
                    if value is not None and id(value) in made:
                        store[key] = made[id(value)]  # type: ignore[assignment]


def fill_stage(stage: nn.Module, root: nn.Module, seed: int, dtypes: Mapping[int, torch.dtype] | None = None) -> None:
    """Values for a stage's parameters, its storage already real (:func:`materialise`): the model's own
    initialisation of the modules that hold them (:func:`initialise`). The one place a stage's weights come
    from (weights loaded from a file are to be put in here). ``dtypes``: as :func:`initialise`'s."""
    initialise(root, seed, stage.parameters(), dtypes)


def buffers_to_meta(root: nn.Module) -> dict[str, torch.Tensor]:
    """Every buffer's value by each of its names in the model, the buffers then moved to the meta device: a graph
    is captured with everything on meta, and each stage gets its buffers' values back when it is materialised."""
    kept = dict(root.named_buffers(remove_duplicate=False))
    root.to(torch.device("meta"))
    return kept


def cut_on_meta(root: nn.Module, example: tuple[torch.Tensor, ...], spec: str, input_names: Sequence[str] | None,
                device: torch.device, names: Sequence[str] | None = None) -> Chain:
    """The blocks of a model wholly on the meta device, cut (a graph captured) on the meta example; a captured
    graph's operations that name the meta device (``arange(device=meta)``) then name ``device``.

    On meta, whether a model's top-level children reproduce its forward can be checked on shapes only (a skip
    connection or an operation between children goes unseen), so a model that is not an ``nn.Sequential`` is
    captured, and its children are taken only where that fails or where their names, not the graph's, are the
    ``names`` the plan was made with (a captured chain computes what its children do, under the same names)."""
    meta = tuple(t.to("meta") for t in example)
    if input_names or isinstance(root, nn.Sequential):
        chain = chain_of(root, meta, spec, input_names)
    else:
        chain = chain_of(root, meta, spec)  # its children where they pass on shapes, else captured
        if not chain.captured:
            from autopart.measure.capture import capture
            from autopart.measure.cutpoints import graph_blocks

            try:
                graph: Chain | None = GraphChain(root, graph_blocks(capture(root, meta, None, name=spec), root), meta)
            except AutopartError:
                graph = None  # cannot be captured: its children, as they passed
            if graph is not None and (names is None or list(names) == graph.names or list(names) != chain.names):
                chain = graph
    program = getattr(getattr(chain, "graph", None), "graph", None)
    if program is not None:
        retarget(program.module, device)
        chain.reload_blocks()
    return chain


def materialise_stage(stage: nn.Module, chain: Chain, root: nn.Module, buffers: Mapping[str, torch.Tensor],
                       drawn: Mapping[int, torch.dtype], dtype: torch.dtype | None, device: torch.device,
                       seed: int) -> None:
    """Storage for one stage built on the meta device, its buffers' values back (by their names in the model) and
    its parameters filled (:func:`fill_stage`) on the CPU, where :func:`build_model` draws them too, then moved to
    ``device`` and cast to ``dtype``; every module that holds one of its tensors (the model, the captured graph,
    the blocks) holds the real one."""
    trees: list[nn.Module] = [root, chain.root, stage, *(block for _, block in chain.blocks)]
    graph = getattr(getattr(chain, "graph", None), "graph", None)
    if graph is not None:
        trees.append(graph.module)
    made = materialise(list(stage.parameters()), trees, torch.device("cpu"), drawn)
    values: dict[int, torch.Tensor] = {}
    for name, buffer in stage.named_buffers(remove_duplicate=False):
        if buffer.is_meta and id(buffer) not in values:
            if name not in buffers:
                raise AutopartError(f"buffer {name!r} of the model has no value to materialise it with")
            values[id(buffer)] = buffers[name].to(device, copy=True)
    replace_tensors(trees, values)
    fill_stage(stage, root, seed, drawn)
    if device.type != "cpu" or dtype is not None:
        moved: dict[int, torch.Tensor] = {}
        for p in made.values():
            value = p.detach().to(device, dtype if dtype is not None and p.is_floating_point() else p.dtype)
            moved[id(p)] = nn.Parameter(value, requires_grad=p.requires_grad)
        replace_tensors(trees, moved)


def _note(spec: str, write: WeightWrite) -> str:
    if write.inside:
        return (f"note: {write.inside!r} writes {write.parameter!r} outside reset_parameters/_init_weights "
                f"({write.where}): every rank builds the whole model to keep it; move the write into _init_weights or "
                f"reset_parameters, or give every weight with --weights FILE, to build only each rank's stages")
    return (f"note: model factory {spec!r} sets weights itself ({write.how} into {write.parameter!r} at "
            f"{write.where}): every rank builds the whole model to keep them; give them with --weights FILE (the "
            f"factory may go on loading them: its own writes are then ignored) to build only each rank's stages")


def _empty(spec: str, seed: int, weights: bool = False) -> ModelBundle | str:
    """The model with its parameters on the meta device, or why it cannot be built so (the note): a write of
    weights that would be lost (:class:`autopart.measure.empty.SetsWeights`), an error the factory raises with
    its parameters on meta (a bad spec too: the whole build then raises it as it is), or a tensor it put on meta
    itself (``weight_norm`` and other parametrizations make their parameters from the meta weight). ``weights``:
    every parameter will come from a file, so the factory's own writes are let go (lost on meta)."""
    torch.manual_seed(seed)
    try:
        with parameters_on_meta(writes_kept=not weights) as moved:
            bundle = load_model(spec)
    except SetsWeights as stop:
        return _note(spec, stop.write)
    except Exception as error:  # noqa: BLE001 - any failure on meta: the whole build, which raises it if it is not that
        said = str(error) if isinstance(error, AutopartError) else f"{type(error).__name__}: {error}"
        return (f"note: model factory {spec!r} fails with its parameters on the meta device "
                f"({' '.join(said.split())[:200]}): every rank builds the whole model")
    module = bundle.module
    made = next((name for name, p in module.named_parameters() if p.is_meta and id(p) not in moved), None)
    if made is None:
        made = next((name for name, b in module.named_buffers() if b.is_meta), None)
    if made is not None:
        return (f"note: model factory {spec!r} makes {made!r} from a parameter on the meta device (a "
                f"parametrization such as weight_norm): every rank builds the whole model")
    return bundle


def build_for_rank(spec: str, seed: int, whole: str | None = None, weights: bool = False) -> RankBuild:
    """The model as a rank of ``autopart train`` builds it (see the module docstring); ``whole``: why this rank
    builds the whole model instead (with :func:`build_model`'s weights), said as the note. ``weights``: every
    parameter will be loaded from a file (``--weights``, whose keys are checked to cover them), so neither a
    factory's own writes of weights nor a parameter nothing initialises needs the whole model built: only a
    factory that cannot run with its parameters on meta does."""
    if whole is not None:
        note = whole if whole.startswith("note: ") else \
            f"note: {whole}, on the meta device: every rank builds the whole model"
        return RankBuild(build_model(spec, seed), empty=False, note=note)
    bundle = _empty(spec, seed, weights)
    if isinstance(bundle, str):
        torch.manual_seed(seed)
        return RankBuild(load_with_weights(spec), empty=False, note=bundle)
    if not any(p.is_meta for p in bundle.module.parameters()):  # a factory that builds its own way
        return RankBuild(bundle, empty=False)
    uncovered = None if weights else uncovered_parameter(bundle.module)
    if uncovered is None:
        return RankBuild(bundle, empty=True)
    name, kind = uncovered
    torch.manual_seed(seed)
    return RankBuild(load_with_weights(spec), empty=False, note=(
        f"note: parameter {name!r} ({kind}) has no initialisation autopart can run per stage (no reset_parameters "
        f"at or above it, no _init_weights on the model): every rank builds the whole model; give {kind} a "
        f"reset_parameters(), or give every weight with --weights FILE, to build only each rank's stages"))


def build_model(spec: str, seed: int = 0, device: torch.device | str = "cpu") -> ModelBundle:
    """The whole model named by ``spec``, with the weights every ``autopart train --seed SEED`` run starts
    from (each rank builds only its own stages of it): the reference a pipelined run equals."""
    built = build_for_rank(spec, seed)
    root = built.bundle.module
    if not built.empty:
        return replace(built.bundle, module=root.to(device))
    materialise(list(root.parameters()), [root], torch.device("cpu"))
    fill_stage(root, root, seed)
    root.to(device)
    return built.bundle

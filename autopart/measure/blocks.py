"""Cut a module into an ordered chain of blocks, the units a pipeline stage is made of.

An ``nn.Sequential`` is flattened recursively: each child that is not itself a
Sequential becomes a block named by its module path (``h.3``), so a model
built as ``Sequential(embed, Sequential(*layers), head)`` gives ``embed``,
``h.0`` ... ``head``. Any other module is cut into its top-level children,
which must reproduce its forward when run in order; that is checked on the
example. Any other model is captured as a graph (:mod:`autopart.measure.capture`)
and cut at module boundaries (:mod:`autopart.measure.cutpoints`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import torch
from torch import nn

from autopart.errors import AutopartError
from autopart.measure.entry import BlockEntry, EnterBlock, contiguous_grad
from autopart.torch_compat import own_children, pytree

if TYPE_CHECKING:
    from autopart.measure.cutpoints import Boundary, GraphBlocks

__all__ = ["NamedBlock", "EnterBlock", "BlockEntry", "Chain", "ChildrenChain", "GraphChain", "StageModule",
           "FlatOutput", "chain_of", "children_chain", "split_blocks", "run_chain", "check_chain", "call_block", "check_sendable",
           "tensors_of", "contiguous_grad", "stage_inputs", "cannot_run"]

NamedBlock = tuple[str, nn.Module]
"""A block and its name in the model (``"h.3"``)."""

def _flatten(prefix: str, module: nn.Module, out: list[NamedBlock]) -> None:
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            _flatten(f"{path}.", child, out)
        else:
            out.append((path, child))


def split_blocks(module: nn.Module) -> list[NamedBlock]:
    """The chain of blocks of ``module``, in execution order."""
    blocks: list[NamedBlock] = []
    _flatten("", module, blocks)
    if not blocks:
        raise AutopartError(f"{type(module).__name__} has no child modules to cut into blocks")
    return blocks


def call_block(block: nn.Module, inputs: Any) -> Any:
    """Call a block on the previous block's output (a tuple is spread into arguments)."""
    if isinstance(inputs, tuple):
        return block(*inputs)
    return block(inputs)


def stage_inputs(value: Any) -> Any:
    """What a stage's first block gets of the inputs it received (a tensor or a tuple): each floating tensor
    through :func:`contiguous_grad`. A received input is a leaf that requires grad, and a block starting
    with an in-place op (``ReLU(inplace=True)``) could not run on a leaf."""
    if isinstance(value, torch.Tensor):
        return contiguous_grad(value) if value.is_floating_point() else value
    if isinstance(value, tuple):
        return tuple(stage_inputs(v) for v in value)
    return value


def cannot_run(name: str, example: Sequence[torch.Tensor], exc: BaseException) -> AutopartError:
    """The one line for a model that fails on its example input: the input's shape and what failed."""
    shapes = [list(t.shape) for t in example]
    text = str(exc).splitlines()[0] if str(exc) else ""
    return AutopartError(f"model {name!r} cannot run input of shape {shapes[0] if len(shapes) == 1 else shapes}: "
                         f"{type(exc).__name__}: {text}")


def run_chain(blocks: Sequence[NamedBlock], example: tuple[torch.Tensor, ...]) -> Any:
    out: Any = example if len(example) > 1 else example[0]
    for _, block in blocks:
        out = call_block(block, out)
    return out


def tensors_of(value: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) tuple, list or dict of block outputs."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_of(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in tensors_of(v)]
    return []


def check_chain(module: nn.Module, blocks: Sequence[NamedBlock], example: tuple[torch.Tensor, ...], name: str) -> None:
    """Raise unless running ``blocks`` in order gives what ``module(*example)`` gives.

    Runs in eval mode without gradients (deterministic), restoring every
    submodule's mode afterwards. Nothing to check for an ``nn.Sequential``; on
    the meta device only shapes can be compared.
    """
    if isinstance(module, nn.Sequential):
        return
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.no_grad():
            # copies: a model may change its input in place
            expected = tensors_of(module(*[t.clone() for t in example]))
            got = tensors_of(run_chain(blocks, tuple(t.clone() for t in example)))
    except Exception as exc:
        raise AutopartError(
            f"model {name!r}: running its top-level children in order failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); it is not a chain of blocks"
        ) from None
    finally:
        for m, training in modes.items():
            m.training = training
    same = len(expected) == len(got) and all(
        a.shape == b.shape and (a.is_meta or torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5))
        for a, b in zip(expected, got)
    )
    if not same:
        raise AutopartError(
            f"model {name!r}: its top-level children run in order do not reproduce its forward; "
            f"give an nn.Sequential (blocks: {', '.join(n for n, _ in blocks)})"
        )


class FlatOutput:
    """The model's output as PyTorch's pipelining runtime carries a stage's output (a tensor or a tuple of
    tensors), and back: the last block of a chain may return a dict, a ModelOutput, nested tuples or
    non-tensor values, which are flattened (``torch.utils._pytree``) after the last stage and rebuilt before
    the user's loss sees them, as a captured graph's output is.

    Note: the loss follows its micro-batch's forward on the last stage's rank in every schedule, so the
    structure (and any non-tensor leaves) of the latest forward is the one rebuilt.
    """

    def __init__(self) -> None:
        self.spec: pytree.TreeSpec | None = None
        self.leaves: list[Any] = []

    def flatten(self, out: Any) -> Any:
        """``out`` as a tensor or a tuple of tensors (unchanged when it is one already)."""
        if isinstance(out, torch.Tensor) or (type(out) is tuple and all(isinstance(t, torch.Tensor) for t in out)):
            self.spec = None
            return out
        self.leaves, self.spec = pytree.tree_flatten(out)
        return tuple(leaf for leaf in self.leaves if isinstance(leaf, torch.Tensor))

    def rebuild(self, flat: Any) -> Any:
        """The output :meth:`flatten` was given, with the tensors the runtime passed on."""
        if self.spec is None or not isinstance(flat, (torch.Tensor, tuple, list)):  # not what flatten gave
            return flat
        tensors = iter(flat if isinstance(flat, (tuple, list)) else (flat,))
        leaves = [next(tensors) if isinstance(leaf, torch.Tensor) else leaf for leaf in self.leaves]
        return pytree.tree_unflatten(leaves, self.spec)


class StageModule(nn.Module):
    """Blocks of one stage of a chain of modules, run in order; submodule paths are the original model's
    (``h.3``), so the stage's ``state_dict`` keys are the unpartitioned model's. The last stage returns its
    output through ``output`` (:class:`FlatOutput`)."""

    def __init__(self, root: nn.Module, block_names: Sequence[str], enter: EnterBlock | None = None,
                 first: int = 0, output: FlatOutput | None = None) -> None:
        super().__init__()
        self.block_names = list(block_names)
        self.enter = enter
        """Called with each block's index in the chain (``first`` + its place here) just before it runs."""
        self.first = first
        self.output = output
        for name in self.block_names:
            parent: nn.Module = self
            *path, leaf = name.split(".")
            for part in path:
                if part not in own_children(parent):
                    parent.add_module(part, nn.Module())
                child = own_children(parent)[part]
                assert child is not None
                parent = child
            parent.add_module(leaf, root.get_submodule(name))

    def forward(self, *args: Any) -> Any:
        out: Any = stage_inputs(args if len(args) > 1 else args[0])
        for i, name in enumerate(self.block_names):
            if self.enter is not None:
                self.enter(self.first + i)
            out = call_block(self.get_submodule(name), out)
        if self.output is not None:
            return self.output.flatten(out)
        check_sendable(out, self.block_names[-1], self.get_submodule(self.block_names[-1]))
        return out


def _kind(value: Any) -> str:
    return "Tensor" if isinstance(value, torch.Tensor) else type(value).__name__  # a FakeTensor too


def check_sendable(out: Any, name: str, block: nn.Module) -> None:
    """What crosses the cut after block ``name``: PyTorch's pipelining sends a tensor or a tuple of tensors, and
    nothing else (a number in a tuple, a dict, None); said as the block and what it returned."""
    values = out if isinstance(out, (tuple, list)) else (out,)
    if isinstance(out, torch.Tensor) or (values and all(isinstance(v, torch.Tensor) for v in values)):
        return
    what = (f"a {type(out).__name__} of ({', '.join(_kind(v) for v in values)})"
            if isinstance(out, (tuple, list)) else f"a {type(out).__name__}")
    raise AutopartError(f"block {name!r} ({type(block).__name__}) returns {what}, which cannot cross the cut after "
                        f"it: PyTorch's pipelining sends only tensors between stages; return only tensors from it")


LossFn = Callable[[Any, Any], torch.Tensor]


class Chain(ABC):
    """A model as an ordered chain of blocks, of one of two kinds: :class:`ChildrenChain` (its children) or
    :class:`GraphChain` (its captured graph cut at module boundaries). Callers use what both kinds implement."""

    captured: ClassVar[bool]
    """Whether the chain is a captured graph (said in ``autopart graph``; ``--meta-init`` needs children)."""
    description: ClassVar[str]
    """How the model was cut, in words."""
    qualified_parameters: ClassVar[bool]
    """Whether a block's own parameter names are already the model's (a graph block's are)."""

    def __init__(self, root: nn.Module, blocks: list[NamedBlock], example: tuple[Any, ...]) -> None:
        self.root = root
        self.blocks = blocks
        """(name, module) per block."""
        self.example = example
        """The micro-batch the chain was cut (and captured) on: the shapes and dtypes a stage's inputs have."""

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.blocks]

    @abstractmethod
    def stage_module(self, first: int, last: int, enter: EnterBlock | None = None) -> nn.Module:
        """Blocks ``first``..``last`` as one module whose ``state_dict`` has the model's own names; with
        ``enter``, it is called with each block's index just before that block runs."""

    @abstractmethod
    def reload_blocks(self) -> None:
        """Take each block from ``root`` again, after modules in it were swapped (a block may be one of them;
        a graph block calls the modules ``root`` holds when it is built)."""

    @abstractmethod
    def model_loss(self, loss_fn: LossFn) -> LossFn:
        """``loss_fn(output, target)`` for what the last stage returns: the model's output flattened, which is
        rebuilt (a dict, a ModelOutput ...) before the user's loss sees it."""

    @abstractmethod
    def block_loss(self, loss_fn: LossFn) -> LossFn:
        """``loss_fn(output, target)`` for what the last of :attr:`blocks` returns, run as a block."""

    @abstractmethod
    def crossing_bytes(self) -> list[tuple[int, int]]:
        """(main path, skips) bytes at each cut known without running the model: a captured graph's; none
        for a chain of children."""

    @abstractmethod
    def crossings(self) -> list[Boundary]:
        """What crosses each cut between blocks (one fewer than blocks). A chain of children runs its blocks to
        know: what a block raises is raised."""

    @abstractmethod
    def parameter_names(self, first: int, last: int) -> list[str]:
        """The model's names of every parameter of blocks ``first``..``last``, a shared one under each name."""

    @abstractmethod
    def operations(self, index: int) -> list[tuple[str, str]]:
        """What block ``index`` runs: (operation, output shape) per graph node, or (module type, "") per
        module of a block that is a child."""

    @abstractmethod
    def block_facts(self, index: int) -> dict[str, Any]:
        """What only this kind of chain knows about block ``index``, for ``autopart graph``'s row."""

    @abstractmethod
    def cut_points(self) -> list[tuple[str, str, int]]:
        """(operation, module it ran in, bytes crossing a cut after it) for every place the model can be cut
        (a captured graph's operations; none for a chain of children)."""

    @abstractmethod
    def recomputed(self) -> set[str]:
        """Input-only values each stage recomputes instead of receiving (a captured graph's)."""


class ChildrenChain(Chain):
    """A chain of the model's children (flattened through ``nn.Sequential``), run in order as modules."""

    captured = False
    description = "a chain of its children (no capture)"
    qualified_parameters = False

    def __init__(self, root: nn.Module, blocks: list[NamedBlock], example: tuple[Any, ...]) -> None:
        super().__init__(root, blocks, example)
        self.output = FlatOutput()
        """How the last stage returns the model's output, and how the loss gets it back."""

    def stage_module(self, first: int, last: int, enter: EnterBlock | None = None) -> nn.Module:
        return StageModule(self.root, self.names[first: last + 1], enter, first,
                           self.output if last == len(self.blocks) - 1 else None)

    def reload_blocks(self) -> None:
        self.blocks = [(name, self.root.get_submodule(name)) for name, _ in self.blocks]

    def model_loss(self, loss_fn: LossFn) -> LossFn:
        output = self.output
        return lambda flat, target: loss_fn(output.rebuild(flat), target)

    def block_loss(self, loss_fn: LossFn) -> LossFn:
        return loss_fn  # the last child returns the model's output as it is

    def crossing_bytes(self) -> list[tuple[int, int]]:
        return []

    def crossings(self) -> list[Boundary]:
        """Each block's output (one forward on :attr:`example`, in eval mode, no gradients)."""
        from autopart.measure.cutpoints import Boundary, Crossing

        modes = {m: m.training for m in self.root.modules()}
        out: list[Boundary] = []
        example = self.example
        try:
            self.root.eval()
            with torch.no_grad():
                value: Any = tuple(t.clone() for t in example) if len(example) > 1 else example[0].clone()
                for block_name, block in self.blocks[:-1]:
                    value = call_block(block, value)
                    size = sum(t.numel() * t.element_size() for t in tensors_of(value))
                    out.append(Boundary(after=block_name, main=(Crossing("output", block_name, size),), skips=()))
        finally:
            for m, training in modes.items():
                m.training = training
        return out

    def parameter_names(self, first: int, last: int) -> list[str]:
        return [f"{name}.{p}" for name, block in self.blocks[first: last + 1]
                for p, _ in block.named_parameters(remove_duplicate=False)]

    def operations(self, index: int) -> list[tuple[str, str]]:
        return [(type(m).__name__, "") for m in self.blocks[index][1].modules()]

    def block_facts(self, index: int) -> dict[str, Any]:
        return {}

    def cut_points(self) -> list[tuple[str, str, int]]:
        return []

    def recomputed(self) -> set[str]:
        return set()


class GraphChain(Chain):
    """A captured graph cut at module boundaries: each block is a graph module taking the values live before
    it and returning those live after it."""

    captured = True
    description = "captured with torch.export, cut at module boundaries"
    qualified_parameters = True

    def __init__(self, root: nn.Module, graph: GraphBlocks, example: tuple[Any, ...]) -> None:
        super().__init__(root, [(n, graph.stage_module(i, i)) for i, n in enumerate(graph.names)], example)
        self.graph = graph
        """The captured graph and its cuts."""

    def stage_module(self, first: int, last: int, enter: EnterBlock | None = None) -> nn.Module:
        return self.graph.stage_module(first, last, enter)

    def reload_blocks(self) -> None:
        self.blocks = [(name, self.graph.stage_module(i, i)) for i, (name, _) in enumerate(self.blocks)]

    def model_loss(self, loss_fn: LossFn) -> LossFn:
        spec = self.graph.graph.out_spec

        def loss(flat: Any, target: Any) -> torch.Tensor:
            leaves = list(flat) if isinstance(flat, (tuple, list)) else [flat]
            return loss_fn(pytree.tree_unflatten(leaves, spec), target)

        return loss

    def block_loss(self, loss_fn: LossFn) -> LossFn:
        return self.model_loss(loss_fn)  # the last block returns the flattened output, as the last stage does

    def crossing_bytes(self) -> list[tuple[int, int]]:
        return [(b.main_bytes, b.skip_bytes) for b in self.graph.boundaries]

    def crossings(self) -> list[Boundary]:
        """The live sets: the main path and the skips."""
        return self.graph.boundaries

    def parameter_names(self, first: int, last: int) -> list[str]:
        return self.graph.parameter_names(first, last)

    def operations(self, index: int) -> list[tuple[str, str]]:
        start, end = self.graph.spans[index]
        return [(str(n.target), str(getattr(n.meta.get("val"), "shape", "")))
                for n in self.graph.graph.nodes[start:end]]

    def block_facts(self, index: int) -> dict[str, Any]:
        start, end = self.graph.spans[index]
        return {"operations": end - start}

    def cut_points(self) -> list[tuple[str, str, int]]:
        return [(node.name, self.graph.graph.module_of(node), size)
                for node, size in zip(self.graph.graph.nodes, self.graph.cuts)]

    def recomputed(self) -> set[str]:
        return self.graph.recomputed


def children_chain(module: nn.Module, example: tuple[Any, ...], name: str) -> ChildrenChain:
    """The blocks of ``module`` as its (flattened) children, no capture; :class:`AutopartError` unless they
    reproduce its forward on ``example`` (on the meta device: its shapes)."""
    blocks = split_blocks(module)
    check_chain(module, blocks, tuple(example), name)
    return ChildrenChain(module, blocks, tuple(example))


def chain_of(module: nn.Module, example: tuple[Any, ...], name: str,
             input_names: Sequence[str] | None = None) -> Chain:
    """The blocks of ``module``: the flattened children of an ``nn.Sequential``, the top-level children
    when they reproduce its forward (the fast path, no capture), or else its ``torch.export`` graph.

    With ``input_names`` the model takes the example as keyword inputs (always captured); its blocks
    then take them in that order, positionally.
    """
    if not input_names:
        try:
            return children_chain(module, example, name)
        except AutopartError:
            pass
    from autopart.measure.capture import capture
    from autopart.measure.cutpoints import graph_blocks

    args, kwargs = ((), dict(zip(input_names, example))) if input_names else (tuple(example), None)
    graph = graph_blocks(capture(module, args, kwargs, name=name), module)
    return GraphChain(module, graph, tuple(example))

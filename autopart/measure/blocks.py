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

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch
from torch import nn

from autopart.errors import AutopartError
from autopart.torch_compat import own_children, pytree

if TYPE_CHECKING:
    from autopart.measure.cutpoints import GraphBlocks

__all__ = ["NamedBlock", "EnterBlock", "BlockEntry", "Chain", "StageModule", "FlatOutput", "chain_of", "split_blocks",
           "run_chain", "check_chain", "call_block", "check_sendable", "tensors_of", "contiguous_grad", "stage_inputs",
           "cannot_run"]

NamedBlock = tuple[str, nn.Module]
"""A block and its name in the model (``"h.3"``)."""

EnterBlock = Callable[[int], None]
"""Called with a block's index in the chain just before the block runs (to give it its own random stream)."""


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


class _ContiguousGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        # A detached alias: the same storage, but to autograd a new tensor made by this function, not a view
        # of the input (returning ``x`` or a view of it would be one: an in-place op after it is then refused).
        return x.detach()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def contiguous_grad(x: torch.Tensor) -> torch.Tensor:
    """``x``'s values (its storage, no copy) as a tensor autograd made, neither a leaf nor a view, so an
    in-place op may follow; its gradient is made contiguous backward (gloo sends only contiguous tensors,
    and a ``cat`` backward gives strided ones)."""
    return _ContiguousGrad.apply(x)  # type: ignore[no-any-return]


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


class BlockEntry(nn.Module):
    """A graph node that calls ``enter(block)`` where a block's operations begin (a stage of a captured graph
    runs its blocks as one graph, not as modules); no parameters, no buffers, nothing in ``state_dict``."""

    def __init__(self, enter: EnterBlock, block: int) -> None:
        super().__init__()
        self.enter, self.block = enter, block

    def forward(self) -> None:
        self.enter(self.block)


LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass(eq=False)
class Chain:
    """A model as an ordered chain of blocks: its children, or its captured graph cut at module boundaries."""

    root: nn.Module
    blocks: list[NamedBlock]
    """(name, module) per block; a graph block takes the values live before it and returns those live after."""
    graph: GraphBlocks | None = None
    """The captured graph and its cuts, when the model is not a chain of its children."""
    example: tuple[Any, ...] = ()
    """The micro-batch the chain was cut (and captured) on: the shapes and dtypes a stage's inputs have."""
    output: FlatOutput = field(default_factory=FlatOutput, repr=False)
    """How the last stage of a chain of children returns the model's output, and how the loss gets it back."""

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self.blocks]

    def stage_module(self, first: int, last: int, enter: EnterBlock | None = None) -> nn.Module:
        """Blocks ``first``..``last`` as one module whose ``state_dict`` has the model's own names; with
        ``enter``, it is called with each block's index just before that block runs."""
        if self.graph is not None:
            return self.graph.stage_module(first, last, enter)
        return StageModule(self.root, self.names[first: last + 1], enter, first,
                           self.output if last == len(self.blocks) - 1 else None)

    def reload_blocks(self) -> None:
        """Take each block from ``root`` again, after modules in it were swapped (a block may be one of them;
        a graph block calls the modules ``root`` holds when it is built)."""
        graph = self.graph
        self.blocks = [(name, self.root.get_submodule(name) if graph is None else graph.stage_module(i, i))
                       for i, (name, _) in enumerate(self.blocks)]

    def model_loss(self, loss_fn: LossFn) -> LossFn:
        """``loss_fn(output, target)`` for what the last block returns: a graph, and the last stage of a chain
        of children, return the model's output flattened, which is rebuilt (a dict, a ModelOutput ...)
        before the user's loss sees it."""
        if self.graph is None:
            output = self.output
            return lambda flat, target: loss_fn(output.rebuild(flat), target)
        spec = self.graph.graph.out_spec

        def loss(flat: Any, target: Any) -> torch.Tensor:
            leaves = list(flat) if isinstance(flat, (tuple, list)) else [flat]
            return loss_fn(pytree.tree_unflatten(leaves, spec), target)

        return loss

    def crossing_bytes(self) -> list[tuple[int, int]] | None:
        """(main path, skips) bytes at each cut of a captured graph; None for a chain of children."""
        if self.graph is None:
            return None
        return [(b.main_bytes, b.skip_bytes) for b in self.graph.boundaries]


def chain_of(module: nn.Module, example: tuple[Any, ...], name: str,
             input_names: Sequence[str] | None = None) -> Chain:
    """The blocks of ``module``: the flattened children of an ``nn.Sequential``, the top-level children
    when they reproduce its forward (the fast path, no capture), or else its ``torch.export`` graph.

    With ``input_names`` the model takes the example as keyword inputs (always captured); its blocks
    then take them in that order, positionally.
    """
    if not input_names:
        try:
            blocks = split_blocks(module)
            check_chain(module, blocks, tuple(example), name)
            return Chain(module, blocks, example=tuple(example))
        except AutopartError:
            pass
    from autopart.measure.capture import capture
    from autopart.measure.cutpoints import graph_blocks

    args, kwargs = ((), dict(zip(input_names, example))) if input_names else (tuple(example), None)
    graph = graph_blocks(capture(module, args, kwargs, name=name), module)
    return Chain(module, [(n, graph.stage_module(i, i)) for i, n in enumerate(graph.names)], graph, tuple(example))

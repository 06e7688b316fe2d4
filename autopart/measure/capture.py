"""Capture any module's forward as a graph of operations with ``torch.export`` (non-strict).

    graph = capture(module, example)          # example: a tuple of tensors, or (args, kwargs)
    graph.dag                                 # networkx DiGraph: node name -> node name, with "bytes"
    graph.nodes                               # the operations in execution order

Every operation keeps the module it came from (``nn_module_stack``): the
blocks that :mod:`autopart.measure.cutpoints` makes follow module boundaries.
``graph.module`` is ``ExportedProgram.module()``: it shares the original
module's parameters and buffers, so what runs from it trains the user's
weights. The graph is specialised to the example's shapes and to training mode.

A model that cannot be captured (data-dependent control flow, an input
type export does not know) is one line naming the module whose forward was
running when capture failed.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import networkx as nx
import torch
from torch import fx, nn

from autopart.errors import AutopartError
from autopart.torch_compat import pytree

__all__ = ["ModelGraph", "capture", "value_bytes"]


@dataclass(frozen=True, eq=False)
class ModelGraph:
    module: fx.GraphModule
    """The captured program, sharing the original parameters (``ExportedProgram.module()``)."""
    nodes: tuple[fx.Node, ...]
    """The operations in execution order: no placeholders, parameters, guards or output."""
    inputs: tuple[fx.Node, ...]
    """The placeholders: one per flattened model input."""
    outputs: tuple[fx.Node | None, ...]
    """What the model returns, flattened (None where an output is not a node, e.g. a constant)."""
    out_spec: pytree.TreeSpec
    """How to rebuild the model's output (a tuple, a ModelOutput, ...) from ``outputs``."""
    dag: nx.DiGraph
    """Data flow between operations and inputs; each edge carries the producer's ``bytes``."""

    def module_of(self, node: fx.Node) -> str:
        """The innermost module the operation ran in (``"transformer.h.3.attn"``), or ``""`` for the top level."""
        stack = node.meta.get("nn_module_stack") or {}
        return str(list(stack.values())[-1][0]) if stack else ""

    def module_stack(self, node: fx.Node) -> list[str]:
        """Every module the operation ran in, outermost first."""
        return [str(path) for path, _ in (node.meta.get("nn_module_stack") or {}).values()]


def value_bytes(node: fx.Node) -> int:
    """Bytes of the tensor(s) an operation produces (from export's fake values)."""
    total = 0
    for v in pytree.tree_leaves(node.meta.get("val")):
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
    return total


@contextlib.contextmanager
def _module_trail(root: nn.Module) -> Iterator[list[str]]:
    """The names of the modules whose forward is running, innermost last (for error messages)."""
    names = {m: (n or type(root).__name__) for n, m in root.named_modules()}
    stack: list[str] = []

    def pre(module: nn.Module, _: Any) -> None:
        stack.append(names.get(module, type(module).__name__))

    def post(module: nn.Module, _: Any, __: Any) -> None:
        if stack:
            stack.pop()

    handles = [nn.modules.module.register_module_forward_pre_hook(pre),
               nn.modules.module.register_module_forward_hook(post)]
    try:
        yield stack
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def _quiet_torch_logs() -> Iterator[None]:
    """torch.export logs warnings (on loggers whose levels torch sets itself) and prints whole graphs to
    stderr when it fails; the one-line error says what matters."""
    before = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logging.disable(before)


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None,
            name: str = "model") -> ModelGraph:
    """Export ``module`` on one micro-batch (``args``, ``kwargs``) in training mode."""
    with _module_trail(module) as trail, warnings.catch_warnings(), _quiet_torch_logs():
        warnings.simplefilter("ignore")
        was = module.training
        module.train()
        try:
            ep = torch.export.export(module, tuple(args), kwargs or {}, strict=False)
        except Exception as exc:
            inside = f"in {trail[-1]!r} " if trail else ""
            raise AutopartError(
                f"model {name!r}: torch.export could not capture its forward {inside}({type(exc).__name__}: "
                f"{_first_line(exc)[:200]}); give an nn.Sequential whose children run in order (each child is "
                f"then one block, run as it is, with no capture)") from None
        finally:
            module.train(was)
    gm = ep.module()
    return _graph_of(gm, ep.call_spec.out_spec)


def _graph_of(gm: fx.GraphModule, out_spec: pytree.TreeSpec | None) -> ModelGraph:
    inputs, nodes = [], []
    outputs: tuple[fx.Node | None, ...] = ()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            inputs.append(node)
        elif node.op == "output":
            outputs = tuple(a if isinstance(a, fx.Node) else None for a in pytree.tree_leaves(node.args[0]))
        elif node.op == "get_attr" or (node.op == "call_module" and str(node.target).startswith("_guards")):
            continue
        else:
            nodes.append(node)
    dag = nx.DiGraph()
    for node in inputs + nodes:
        dag.add_node(node.name)
        for src in node.all_input_nodes:
            if src.op in ("placeholder", "call_function", "call_method", "call_module"):
                dag.add_edge(src.name, node.name, bytes=value_bytes(src))
    assert out_spec is not None
    return ModelGraph(module=gm, nodes=tuple(nodes), inputs=tuple(inputs), outputs=outputs, out_spec=out_spec,
                      dag=dag)

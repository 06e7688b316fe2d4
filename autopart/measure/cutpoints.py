"""Where a captured graph can be cut, what crosses each cut, and the chain of blocks between cuts.

    blocks = graph_blocks(capture(model, example), model)
    blocks.names                    # ["transformer.wte", "transformer.wpe", "transformer.h.0", ..., "lm_head"]
    blocks.boundaries[3]            # what crosses the cut after block 3: main path and skips, with bytes
    blocks.stage_module(2, 5)       # blocks 2..5 as one GraphModule: live set in, live set out

Note: blocks follow the module tree. Operations are grouped by the module
they ran in, descending through containers of repeated layers (a ModuleList
of transformer layers, a Sequential of bottlenecks) and through modules that
hold such a stack, so ``transformer.h.3`` or ``down2`` is one block; code
between modules joins the block before it, and blocks without parameters
(activations, pooling, dropout) join their neighbour. Every cut between two
blocks is then a valid cut point of the graph, and what crosses it is the
*live set*: every value made before the cut (or a model input) that an
operation after it needs. The value made by the block just before the cut is
the main path; the others are skips.

Values computed from the model inputs alone, with no parameter and no
randomness (attention masks, position ids, rotary tables), are not sent:
each stage that needs them recomputes them from the inputs, which then cross
instead when that is fewer bytes.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Sequence

import torch
from torch import fx, nn

from autopart.measure.entry import BlockEntry, EnterBlock, contiguous_grad
from autopart.measure.capture import ModelGraph, value_bytes
from autopart.torch_compat import BatchNormBase, non_persistent_buffers

__all__ = ["Crossing", "Boundary", "GraphBlocks", "graph_blocks", "contiguous_grad"]


@dataclass(frozen=True)
class Crossing:
    """One value that crosses a cut."""

    name: str
    """The graph node (``relu_1``) or model input (``input_ids``)."""
    made_by: str
    """The block that computes it, or ``"input"`` for a model input."""
    bytes: int


@dataclass(frozen=True)
class Boundary:
    """The cut after one block."""

    after: str
    main: tuple[Crossing, ...]
    """Values the block just before the cut made."""
    skips: tuple[Crossing, ...]
    """Values made by earlier blocks, or model inputs, that a later block needs."""

    @property
    def main_bytes(self) -> int:
        return sum(c.bytes for c in self.main)

    @property
    def skip_bytes(self) -> int:
        return sum(c.bytes for c in self.skips)


@dataclass(frozen=True, eq=False)
class GraphBlocks:
    """A captured model as an ordered chain of blocks."""

    graph: ModelGraph
    names: list[str]
    spans: list[tuple[int, int]]
    """Each block's operations: ``graph.nodes[first:end]``."""
    recomputed: set[str]
    """Input-only values every stage recomputes instead of receiving."""
    live: list[list[str]]
    """``live[b]``: the values crossing the cut after block b, in a fixed order (the last: the model outputs)."""
    aliases: dict[str, list[str]] = field(default_factory=dict)
    """Every name of a parameter or buffer the model shares between modules (tied weights), by each name."""
    cuts: list[int] = field(default_factory=list)
    """Bytes crossing a cut after each operation (``graph.nodes[p]``): every place the graph can be cut."""
    by_name: dict[str, fx.Node] = field(default_factory=dict)
    """Every node of the captured program by name (placeholders and parameters included)."""
    root: nn.Module | None = None
    """The model that was captured: its BatchNorm layers run in the stages as the modules they are."""

    @property
    def boundaries(self) -> list[Boundary]:
        """The cuts between blocks (one fewer than blocks)."""
        made = self._made_by()
        out = []
        for b in range(len(self.names) - 1):
            crossing = [Crossing(v, made[v], value_bytes(self._node(v))) for v in self.live[b]]
            out.append(Boundary(after=self.names[b], main=tuple(c for c in crossing if c.made_by == self.names[b]),
                                skips=tuple(c for c in crossing if c.made_by != self.names[b])))
        return out

    def inputs_of(self, first: int) -> list[str]:
        """What a stage starting at block ``first`` receives, in order."""
        return [n.name for n in self.graph.inputs] if first == 0 else self.live[first - 1]

    def stage_module(self, first: int, last: int, enter: EnterBlock | None = None) -> fx.GraphModule:
        """Blocks ``first``..``last`` as one module: ``forward(*inputs_of(first))`` returns the live set after
        ``last`` as a tuple (the flattened model outputs when ``last`` is the last block).

        Parameters and buffers are the original module's, under its own names (``transformer.h.3.attn.c_attn.weight``).
        With ``enter``, a node calls ``enter(b)`` where block ``b``'s own operations begin (a :class:`BlockEntry`).
        """
        start, end = self.spans[first][0], self.spans[last][1]
        own = set(n.name for n in self.graph.nodes[start:end])
        graph = fx.Graph()
        env: dict[str, fx.Node] = {}
        for name in self.inputs_of(first):
            placeholder = graph.placeholder(name)
            placeholder.meta = dict(self._node(name).meta)
            value = placeholder.meta.get("val")
            floating = isinstance(value, torch.Tensor) and value.is_floating_point()
            # a received input is a leaf: the stage's ops see a non-leaf alias (an in-place op may come first),
            # whose gradient is made contiguous on its way out (gloo sends only contiguous tensors)
            env[name] = graph.call_function(contiguous_grad, (placeholder,)) if floating else placeholder
            env[name].meta = placeholder.meta
        wanted = list(self.graph.nodes[start:end])
        outs = [self._node(v) for v in self.live[last]]
        needed = self._recompute_closure(wanted, own) | self._recompute_closure(outs, own, direct=True)
        starts = {self.spans[b][0]: b for b in range(first, last + 1)} if enter is not None else {}
        entries: dict[str, Any] = {}
        recomputed = [(-1, n) for n in self.graph.nodes if n.name in needed and n.name not in own]
        for position, node in recomputed + list(enumerate(wanted, start)):
            if position in starts:
                target = f"autopart_enter_block_{starts[position]}"
                assert enter is not None
                entries[target] = BlockEntry(enter, starts[position])
                graph.call_module(target)
            module = self.graph.module_of(node)
            env[node.name] = graph.node_copy(node, lambda arg: self._arg(arg, env, graph, module))
        graph.output(tuple(graph.call_method("contiguous", (self._arg(v, env, graph),))
                           if isinstance(v.meta.get("val"), torch.Tensor) else self._arg(v, env, graph) for v in outs))
        layers = _batchnorm_as_modules(graph, self.root) if self.root is not None else {}
        graph.lint()
        attrs: dict[str, Any] = {str(n.target): attrgetter(str(n.target))(self.graph.module)
                                 for n in graph.nodes if n.op == "get_attr"}
        stage = fx.GraphModule({**attrs, **layers, **entries}, graph, class_name=f"Stage_{first}_{last}")
        _keep_non_persistent(stage, self.graph.module, attrs)
        return stage

    def parameter_names(self, first: int, last: int) -> list[str]:
        """The names under which blocks ``first``..``last`` hold parameters (as :meth:`stage_module` names them)."""
        return [n for n, _ in self.stage_module(first, last).named_parameters(remove_duplicate=False)]

    # ---- internals ----

    def _node(self, name: str) -> fx.Node:
        return self.by_name[name]

    def _arg(self, arg: fx.Node, env: dict[str, fx.Node], graph: fx.Graph, module: str = "") -> fx.Node:
        if arg.op == "get_attr":
            target = self._alias(str(arg.target), module)
            key = f"get_attr:{target}"
            if key not in env:
                env[key] = graph.get_attr(target)
                env[key].meta = dict(arg.meta)
            return env[key]
        if arg.name in env:
            return env[arg.name]
        raise AssertionError(f"value {arg.name} reaches a stage that neither receives nor computes it")

    def _alias(self, target: str, module: str) -> str:
        """The name a shared parameter has in the module that uses it (``transformer.wte.weight`` for the
        embedding, ``lm_head.weight`` for the head), so every stage's ``state_dict`` says what the model says."""
        names = self.aliases.get(target)
        if not names:
            return target
        inside = [n for n in names if module == n.rsplit(".", 1)[0] or module.startswith(n.rsplit(".", 1)[0] + ".")]
        return max(inside, key=len) if inside else target

    def _recompute_closure(self, nodes: Sequence[fx.Node], own: set[str], direct: bool = False) -> set[str]:
        """The recomputed values (and what they are computed from) that ``nodes`` use (or, ``direct``, are)
        but that are not made among ``own``."""
        todo = [a for n in nodes for a in ([n] if direct else n.all_input_nodes)
                if a.name in self.recomputed and a.name not in own]
        found: set[str] = set()
        while todo:
            node = todo.pop()
            if node.name in found:
                continue
            found.add(node.name)
            todo += [a for a in node.all_input_nodes if a.op not in ("placeholder", "get_attr")]
        return found

    def _made_by(self) -> dict[str, str]:
        made = {n.name: "input" for n in self.graph.inputs}
        for name, (start, end) in zip(self.names, self.spans):
            for n in self.graph.nodes[start:end]:
                made[n.name] = name
        return made


def _keep_non_persistent(stage: fx.GraphModule, model: nn.Module, attrs: dict[str, Any]) -> None:
    """Buffers the model keeps out of its ``state_dict`` (rotary tables, causal masks) stay out of the stage's:
    ``fx.GraphModule`` registers every tensor it is given as a persistent buffer."""
    for target, tensor in attrs.items():
        path, _, leaf = target.rpartition(".")
        if leaf in non_persistent_buffers(model.get_submodule(path)):
            stage.get_submodule(path).register_buffer(leaf, tensor, persistent=False)


def _repeated(module: nn.Module) -> bool:
    """A container whose children are layers of one kind (a stack to cut between)."""
    children = list(module.children())
    if not isinstance(module, (nn.ModuleList, nn.Sequential, nn.ModuleDict)) or len(children) < 2:
        return False
    kinds = Counter(type(c) for c in children)
    return kinds.most_common(1)[0][1] >= 2


def _descend(root: nn.Module) -> set[str]:
    """Module paths to look inside of: stacks of repeated layers and every module that holds one."""
    out = {""}
    for path, module in root.named_modules():
        if _repeated(module):
            parts = path.split(".") if path else []
            out |= {".".join(parts[:i]) for i in range(len(parts) + 1)}
    return out


def _unit(stack: list[str], descend: set[str]) -> str | None:
    """The block an operation belongs to: the outermost module on its stack not to look inside of."""
    for path in stack:
        if path not in descend:
            return path
    return None


def _uses_parameters(node: fx.Node, params: set[str]) -> bool:
    return any(a.op == "get_attr" and str(a.target) in params for a in node.all_input_nodes)


def _random(node: fx.Node) -> bool:
    tags = getattr(node.target, "tags", ())
    return torch.Tag.nondeterministic_seeded in tags


def _recomputable(graph: ModelGraph, params: set[str]) -> dict[str, set[str]]:
    """Values made from model inputs alone: value -> the model inputs it needs."""
    out: dict[str, set[str]] = {}
    for node in graph.nodes:
        if _uses_parameters(node, params) or _random(node) or not node.users:
            continue
        sources: set[str] = set()
        ok = True
        for a in node.all_input_nodes:
            if a.op == "placeholder":
                sources.add(a.name)
            elif a.op == "get_attr":
                continue
            elif a.name in out:
                sources |= out[a.name]
            else:
                ok = False
                break
        if ok:
            out[node.name] = sources
    return out


def graph_blocks(graph: ModelGraph, root: nn.Module) -> GraphBlocks:
    """Cut ``graph`` (captured from ``root``) into blocks along module boundaries, with each cut's live set."""
    params = {n for n, _ in root.named_parameters(remove_duplicate=False)}
    sources = _recomputable(graph, params)
    recomputed = _cheaper_to_recompute(graph, sources)
    cuts = cut_bytes(graph, recomputed, sources)
    units = _place_glue([_unit(graph.module_stack(n), _descend(root)) for n in graph.nodes], cuts)
    runs: list[list[Any]] = []  # [unit, start, end, has_params]
    for i, (node, unit) in enumerate(zip(graph.nodes, units)):
        if runs and unit == runs[-1][0]:
            runs[-1][2] = i + 1
        else:
            runs.append([unit, i, i + 1, False])
        runs[-1][3] = runs[-1][3] or _uses_parameters(node, params)
    merged: list[list[Any]] = []
    for run in runs:  # blocks without parameters join the block before (or, first of all, the one after)
        if merged and not run[3]:
            merged[-1][2] = run[2]
        elif merged and not merged[-1][3]:
            merged[-1] = [run[0], merged[-1][1], run[2], True]
        else:
            merged.append(run)
    seen: Counter[str] = Counter()
    names = []
    for run in merged:
        base = run[0] or "input"
        seen[base] += 1
        names.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
    spans = [(r[1], r[2]) for r in merged]
    return GraphBlocks(graph=graph, names=names, spans=spans, recomputed=recomputed,
                       live=_live_sets(graph, recomputed, spans, sources), aliases=_aliases(root),
                       by_name={n.name: n for n in graph.module.graph.nodes}, cuts=cuts, root=root)


def _liveness(graph: ModelGraph, recomputed: set[str], sources: dict[str, set[str]]
              ) -> tuple[dict[str, int], dict[str, int]]:
    """Where each value a cut may carry is made (-1: a model input) and the last operation that needs it
    (``len(graph.nodes)``: the output). A recomputed value is never carried: the model inputs it is made
    from are, up to its last use."""
    n = len(graph.nodes)
    made = {node.name: -1 for node in graph.inputs}
    made.update({node.name: i for i, node in enumerate(graph.nodes)})
    last: dict[str, int] = {}

    def use(value: fx.Node, at: int) -> None:
        if value.name in recomputed:
            for s in sources.get(value.name, ()):
                last[s] = max(last.get(s, -1), at)
        elif value.name in made:
            last[value.name] = max(last.get(value.name, -1), at)

    for i, node in enumerate(graph.nodes):
        for a in node.all_input_nodes:
            use(a, i)
    for value in graph.outputs:
        if value is not None:
            use(value, n)
    return made, last


def cut_bytes(graph: ModelGraph, recomputed: set[str], sources: dict[str, set[str]]) -> list[int]:
    """Every place the graph can be cut, in operation order: the bytes that cross a cut after operation p
    (every value made at or before p, or a model input, that an operation after p or the output needs)."""
    n = len(graph.nodes)
    made, last = _liveness(graph, recomputed, sources)
    by_name = {node.name: node for node in (*graph.inputs, *graph.nodes)}
    diff = [0] * (n + 1)
    for name, until in last.items():
        start = max(made[name], 0)
        if until > start:
            size = value_bytes(by_name[name])
            diff[start] += size
            diff[until] -= size
    crossing, running = [], 0
    for p in range(n):
        running += diff[p]
        crossing.append(running)
    return crossing


def _place_glue(units: list[str | None], cuts: list[int]) -> list[str | None]:
    """Code between two modules' blocks (no module of its own) goes before or after the cut between them,
    wherever the fewest bytes cross (ties: it joins the block before)."""
    out = list(units)
    i, n = 0, len(units)
    while i < n:
        if out[i] is not None:
            i += 1
            continue
        end = i
        while end < n and out[end] is None:
            end += 1
        before = out[i - 1] if i > 0 else None
        after = out[end] if end < n else None
        if before is None or after is None:
            fill = after if before is None else before
            out[i:end] = [fill] * (end - i)
        else:  # cut after position c: i-1 (all glue after) .. end-1 (all glue before)
            c = min(range(i - 1, end), key=lambda p: (cuts[p], -p))
            out[i: c + 1] = [before] * (c + 1 - i)
            out[c + 1: end] = [after] * (end - c - 1)
        i = end
    return out


def _aliases(root: nn.Module) -> dict[str, list[str]]:
    by_tensor: dict[int, list[str]] = {}
    for name, tensor in list(root.named_parameters(remove_duplicate=False)) + list(
            root.named_buffers(remove_duplicate=False)):
        by_tensor.setdefault(id(tensor), []).append(name)
    return {name: names for names in by_tensor.values() if len(names) > 1 for name in names}


def _cheaper_to_recompute(graph: ModelGraph, sources: dict[str, set[str]]) -> set[str]:
    """The input-only values each stage recomputes: those whose inputs are no more bytes than they are."""
    inputs = {n.name: n for n in graph.inputs}
    nodes = {n.name: n for n in graph.nodes}
    return {name for name, needs in sources.items()
            if sum(value_bytes(inputs[s]) for s in needs) <= value_bytes(nodes[name])}


def _live_sets(graph: ModelGraph, recomputed: set[str], spans: Sequence[tuple[int, int]],
               sources: dict[str, set[str]]) -> list[list[str]]:
    """For every block (``spans``: its operations), the values live after it (made before its end, needed
    after it), model inputs first, then in operation order; after the last block, the model's outputs."""
    made, last = _liveness(graph, recomputed, sources)
    order = {n.name: i for i, n in enumerate(graph.inputs)}
    order.update({n.name: len(graph.inputs) + i for i, n in enumerate(graph.nodes)})
    live = [sorted((v for v, until in last.items() if made[v] < end <= until), key=order.__getitem__)
            for _, end in spans]
    live[-1] = [o.name for o in graph.outputs if o is not None]
    return live


def _batchnorm_as_modules(graph: fx.Graph, root: nn.Module) -> dict[str, nn.Module]:
    """Each ``aten.batch_norm`` on a BatchNorm layer's own statistics becomes a call of the layer itself (the
    one ``root`` holds now: a deferred one, if swapped), which also counts its batches, so the captured count
    (``num_batches_tracked.add_(1)``) goes; returns the layers by path.

    The capture fixed the layer's training mode, momentum (and ``momentum=None``'s factor) at trace time; a
    module call keeps them live, and lets :mod:`autopart.measure.batchnorm` swap it.
    """
    layers: dict[str, nn.Module] = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.batch_norm.default:
            continue
        mean = node.args[3]
        if not (isinstance(mean, fx.Node) and mean.op == "get_attr" and str(mean.target).endswith(".running_mean")):
            continue
        path = str(mean.target).removesuffix(".running_mean")
        try:
            layer = root.get_submodule(path)
        except AttributeError:
            continue
        if not isinstance(layer, BatchNormBase):
            continue
        with graph.inserting_before(node):
            call = graph.call_module(path, (node.args[0],))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
        layers[path] = layer
    for node in list(graph.nodes):
        target = str(node.target)
        if node.op == "get_attr" and target.rsplit(".", 1)[0] in layers:
            for user in list(node.users):
                if user.op == "call_function" and user.target is torch.ops.aten.add_.Tensor and not user.users:
                    graph.erase_node(user)  # the captured batch count
            if not node.users:
                graph.erase_node(node)
    return layers



"""Where each (replica, pipeline rank) of a data-parallel x pipeline plan runs on a cluster.

A plan of ``D`` replicas of a ``K``-rank pipeline is a ``D x K`` grid; :func:`place` maps its cells onto the
cluster's ``D * K`` global ranks (torchrun's numbering, node after node), so that the busiest traffic stays
inside a node where it can.

**Objective.** Each device's communication time per step is

* its pipeline traffic: for each pipeline boundary it sits on (``r-1|r`` and ``r|r+1``), the bytes one
  replica sends across it per step (both directions, every micro-batch) over the link to its neighbour;
* plus its share of its data-parallel ring all-reduce: a ring over ``D`` devices sends and receives
  ``2 (D - 1) / D x grad_bytes`` per device, at the slowest link the ring crosses (inter-node when the group
  spans nodes, intra-node when a node holds two of its members: a ring that visits node after node
  crosses both).

:func:`place` minimises the slowest device's time, then the total over devices, then prefers the simplest
layout (the earliest in the list below). Links depend only on whether two ranks share a node, so which rank
inside a node a cell gets does not matter: only which node.

**Layouts tried** (the "mesh-aligned" family). The grid is cut into tiles of ``a`` replicas x ``b``
consecutive pipeline ranks (``a | D``, ``b | K``); tiles are numbered replica-major or rank-major, the cells
inside a tile the same way, and global ranks are handed out in that order, filling node after node. Every
``(a, b)`` is tried, not only ``a * b = devices per node``: a tile smaller than a node packs several tiles
into it, a larger one spans nodes (orders that put the same cells together in every node are tried once).
Among them:

* replica-major, ``rank = replica * K + pipeline_rank`` (``a = 1, b = K``): pipelines inside nodes,
  replicas across (what torchtitan does when the pipeline fits a node, and the plan's default order);
* rank-major, ``rank = pipeline_rank * D + replica`` (``a = D, b = 1``): data-parallel groups inside nodes,
  the pipeline across (torchtitan's default mesh order, pp outermost);
* ``a x b`` blocks with ``a * b`` = devices per node: each node holds ``a`` replicas' worth of ``b``
  consecutive pipeline ranks.

Also tried: the same tilings of the pipeline without its first, its last, or both end ranks, each end rank's
``D`` replicas on consecutive ranks of their own (the embedding's and the head's data-parallel groups in as
few nodes as they fit, as their gradients are often the largest); and when nodes cut through tiles (a node
size that neither holds whole tiles nor is made of them: 3 devices per node, 2 x 2 tiles), every shift of the
ranks around the cluster by less than a node; and when ``D`` is below the node size but does not divide it
(3 replicas, 4 devices per node), each node holding whole data-parallel groups of the ranks with the most
gradient bytes and, in its other places, replicas of the lightest ranks.

**How good.** ``tests/test_placement.py`` compares :func:`place` with every way to put the cells on nodes, on every
cluster of up to 8 devices (1x1 ... 1x8, 2x2, 2x3, 2x4, 4x2, 3x2 ... 8x1) and every ``(K, D)``: the slowest device's
time is the brute force's minimum whenever the pipeline's boundaries carry equal bytes, whatever each rank's
gradient bytes (a model of identical blocks: a transformer's layers carry the same activations, while the end stages
hold the embedding and the head), on clusters whose links inside a node are at least as fast as between nodes (free
counts as fastest). A one-off run of the same brute force on 9 to 16 devices (nodes x devices 3x3, 2x5, 5x2, 2x6,
3x4, 4x3, 6x2, 2x8; 240 random cases) found no better placement either (it needed the heaviest groups whole, above,
for 3x4). Elsewhere :func:`place` is never worse than replica-major or rank-major, which it tries, but not always
optimal. With unequal boundary bytes the family is not optimal: the best grouping of one pipeline's ranks into nodes
may put ranks that are not neighbours together to keep two heavy boundaries inside nodes (3 nodes x 2 devices, one
pipeline of 6, boundaries ``[1, 100, 2, 0, 100]`` bytes: ``{1, 2} {4, 5} {0, 3}``); with a node slower inside than
its network, a 2 x 2 grid on 2 nodes of 2 is best placed diagonally, which no tiling is.

Pure: numpy, no torch. Every candidate is scored with whole-array operations: the 11 ``(K, D)`` of 1,024
devices (128 nodes x 8) take under 0.2 s of CPU together.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from autopart.errors import AutopartError
from autopart.formats.cluster import Cluster

__all__ = ["Placement", "place", "communication_s", "layout_ranks"]


@dataclass(frozen=True)
class Placement:
    """Where each replica's pipeline ranks run, and the links their traffic crosses."""

    ranks: tuple[tuple[int, ...], ...]
    """``ranks[replica][pipeline_rank]`` -> global rank (a plan's ``placement``)."""
    pipeline_bytes_per_s: tuple[float | None, ...]
    """Per pipeline boundary ``r|r+1`` (K - 1 entries): the slowest link any replica's boundary crosses;
    None: free."""
    replica_bytes_per_s: tuple[float | None, ...]
    """Per pipeline rank (K entries): the slowest link its data-parallel ring crosses, for a ring that visits
    node after node (between nodes when the group spans nodes, inside one when a node holds two of its members);
    None: free (or D = 1)."""
    layout: str
    """One line saying how (``pipelines inside nodes, replicas across``)."""


def divisors(n: int) -> list[int]:
    """Every divisor of ``n``, in increasing order."""
    return [i for i in range(1, n + 1) if n % i == 0]


def layout_ranks(replicas: int, num_ranks: int, a: int, b: int, tiles_by_replica: bool,
                 cells_by_replica: bool) -> np.ndarray:
    """The ``replicas x num_ranks`` grid of global ranks of one mesh-aligned layout: tiles of ``a`` replicas
    x ``b`` pipeline ranks, tiles and the cells inside them numbered
    replica-major (``True``) or rank-major (``False``)."""
    d = np.arange(replicas)[:, None]
    r = np.arange(num_ranks)[None, :]
    tiles_d, tiles_k = replicas // a, num_ranks // b
    tile = (d // a) * tiles_k + r // b if tiles_by_replica else (r // b) * tiles_d + d // a
    cell = (d % a) * b + r % b if cells_by_replica else (r % b) * a + d % a
    return np.asarray(tile * (a * b) + cell, dtype=np.int64)


def _inverse(bandwidth: float | None) -> float:
    """Seconds per byte over a link; 0 when it is free."""
    return 0.0 if bandwidth is None else 1.0 / bandwidth


def _times(cluster: Cluster, nodes: np.ndarray, send: np.ndarray, grad: np.ndarray) -> np.ndarray:
    """Each cell's communication seconds per step when cell ``(d, r)`` sits on node ``nodes[d, r]``."""
    replicas, num_ranks = nodes.shape
    intra, inter = _inverse(cluster.intra_node_bytes_per_s), _inverse(cluster.inter_node_bytes_per_s)
    times = np.zeros(nodes.shape)
    if num_ranks > 1:
        link = np.where(nodes[:, 1:] == nodes[:, :-1], intra, inter) * send[None, :]
        times[:, 1:] += link
        times[:, :-1] += link
    if replicas > 1:
        ordered = np.sort(nodes, axis=0)
        spans = ordered[0] != ordered[-1]
        shares = (ordered[1:] == ordered[:-1]).any(axis=0)
        per_byte = np.maximum(np.where(spans, inter, 0.0), np.where(shares, intra, 0.0))
        times += (2 * (replicas - 1) / replicas * grad * per_byte)[None, :]
    return times


def _check(cluster: Cluster, num_ranks: int, replicas: int, send_bytes: Sequence[float],
           grad_bytes: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    if num_ranks < 1 or replicas < 1:
        raise AutopartError(f"cannot place {replicas} replicas x {num_ranks} pipeline ranks: both must be >= 1")
    if num_ranks * replicas != cluster.num_devices:
        raise AutopartError(f"{replicas} replicas x {num_ranks} pipeline ranks = {replicas * num_ranks} devices, "
                            f"the cluster has {cluster.num_devices} ({cluster.nodes} x {cluster.devices_per_node})")
    if len(send_bytes) != num_ranks - 1 or len(grad_bytes) != num_ranks:
        raise AutopartError(f"placing {num_ranks} pipeline ranks needs {num_ranks - 1} boundaries' send bytes and "
                            f"{num_ranks} ranks' gradient bytes, got {len(send_bytes)} and {len(grad_bytes)}")
    send, grad = np.asarray(send_bytes, dtype=float), np.asarray(grad_bytes, dtype=float)
    if not (np.isfinite(send).all() and np.isfinite(grad).all() and (send >= 0).all() and (grad >= 0).all()):
        raise AutopartError(f"bytes to place must be finite and >= 0, got send {list(send_bytes)}, "
                            f"gradients {list(grad_bytes)}")
    return send, grad


def communication_s(cluster: Cluster, ranks: Sequence[Sequence[int]], send_bytes: Sequence[float],
                    grad_bytes: Sequence[float]) -> tuple[float, float]:
    """(slowest device's, total over devices) communication seconds per step of the placement ``ranks``
    (``ranks[replica][pipeline_rank]`` -> global rank): the objective :func:`place` minimises."""
    grid = np.asarray([list(row) for row in ranks], dtype=object)
    if grid.ndim != 2 or sorted(grid.ravel().tolist()) != list(range(cluster.num_devices)):
        raise AutopartError(f"placement {[list(row) for row in ranks]} does not number the cluster's "
                            f"{cluster.num_devices} ranks once each in equal rows")
    grid = grid.astype(np.int64)
    send, grad = _check(cluster, grid.shape[1], grid.shape[0], send_bytes, grad_bytes)
    times = _times(cluster, grid // cluster.devices_per_node, send, grad)
    return float(times.max()), float(times.sum())


def _tilings(replicas: int, num_ranks: int, per_node: int) -> Iterator[tuple[np.ndarray, bool, str]]:
    """Every tiling of a ``replicas x num_ranks`` grid that puts different sets of cells together in a node,
    simplest first: replica-major, rank-major, then the tiles. Each with whether nodes hold whole tiles or
    tiles whole nodes (then shifting the ranks around the cluster gains nothing)."""
    yield layout_ranks(replicas, num_ranks, 1, num_ranks, True, True), True, "replica-major"
    yield layout_ranks(replicas, num_ranks, replicas, 1, True, True), True, "rank-major"
    for a in divisors(replicas):
        for b in divisors(num_ranks):
            size = a * b
            aligned = size % per_node == 0 or per_node % size == 0
            for cells_by_replica in (True, False):
                if aligned and size <= per_node and not cells_by_replica:
                    continue  # a tile inside one node: the order of its cells changes no node
                line = b if cells_by_replica else a
                if aligned and size > per_node and (line % per_node == 0 or per_node % line == 0):
                    continue  # each node is an (a', b') block with a' * b' = per_node: tried as that tile
                for tiles_by_replica in (True, False):
                    if aligned and size >= per_node and not tiles_by_replica:
                        continue  # whole nodes per tile: the tiles' order changes no node
                    grid = layout_ranks(replicas, num_ranks, a, b, tiles_by_replica, cells_by_replica)
                    order = ("replica" if tiles_by_replica else "rank") + "-major tiles"
                    inside = "replica" if cells_by_replica else "rank"
                    yield grid, aligned, f"{order} of {a} x {b} ({inside}-major inside)"


_ENDS = ((True, False, "the first"), (False, True, "the last"), (True, True, "the first and the last"))


def _heaviest_groups_whole(replicas: int, num_ranks: int, per_node: int, grad: np.ndarray) -> np.ndarray:
    """Each node holds ``per_node // replicas`` whole data-parallel groups, of the ranks with the most gradient
    bytes (in pipeline order), and fills its other places with the replicas of the lightest ranks, one after
    another (for ``replicas < per_node`` that does not divide it: 3 replicas on nodes of 4)."""
    whole_per_node = per_node // replicas
    nodes = num_ranks * replicas // per_node
    by_weight = sorted(range(num_ranks), key=lambda r: (-grad[r], r))
    whole = sorted(by_weight[:nodes * whole_per_node])
    spread = iter([(d, r) for r in sorted(by_weight[nodes * whole_per_node:]) for d in range(replicas)])
    grid = np.empty((replicas, num_ranks), dtype=np.int64)
    rank = 0
    for node in range(nodes):
        for r in whole[node * whole_per_node:(node + 1) * whole_per_node]:
            grid[:, r] = np.arange(rank, rank + replicas)
            rank += replicas
        while rank < (node + 1) * per_node:
            grid[next(spread)] = rank
            rank += 1
    return grid


def _candidates(replicas: int, num_ranks: int, per_node: int,
                grad: np.ndarray) -> Iterator[tuple[np.ndarray, Sequence[int], str]]:
    """Every layout tried, simplest first, with the shifts of its ranks around the cluster to try: the
    tilings of the whole grid; the tilings of the pipeline without its first and/or last rank, whose
    replicas take consecutive ranks of their own (an end rank's data-parallel group in as few nodes as it fits:
    the embedding and the head often hold the most gradient bytes); and, when a node holds some groups of
    replicas but not a whole number, the heaviest ranks' groups whole and the lightest spread."""
    for grid, aligned, name in _tilings(replicas, num_ranks, per_node):
        yield grid, (0,) if aligned else range(per_node), name
    column = np.arange(replicas, dtype=np.int64)
    # one replica: an end rank alone is a tiling already; two ranks: both alone is rank-major
    for first, last, which in _ENDS if replicas > 1 and num_ranks > 2 else ():
        lo, hi = int(first), num_ranks - int(last)
        for middle, aligned, name in _tilings(replicas, hi - lo, per_node):
            grid = np.empty((replicas, num_ranks), dtype=np.int64)
            grid[:, lo:hi] = middle + lo * replicas
            if first:
                grid[:, 0] = column
            if last:
                grid[:, -1] = column + (num_ranks - 1) * replicas
            # aligned: the shifts that start the middle, or the last rank's group, on a node
            starts = {(-lo * replicas) % per_node, (-hi * replicas) % per_node}
            offsets = sorted(starts) if aligned else range(per_node)
            yield grid, offsets, f"{name}, {which} pipeline rank's replicas together"
    if 1 < replicas < per_node and per_node % replicas and num_ranks * replicas > per_node:
        yield (_heaviest_groups_whole(replicas, num_ranks, per_node, grad), (0,),
               "the heaviest ranks' data-parallel groups whole, the lightest's spread")


def _spans(groups: np.ndarray) -> tuple[int, int]:
    """(fewest, most) nodes any one of ``groups`` (rows) lies across."""
    counts = [len(set(group.tolist())) for group in groups]
    return min(counts), max(counts)


def _across(what: str, spans: tuple[int, int]) -> str:
    """``each pipeline across 2 nodes`` or ``data-parallel groups across 1 to 3 nodes``."""
    fewest, most = spans
    return f"each {what} across {most} nodes" if fewest == most else f"{what}s across {fewest} to {most} nodes"


def _describe(cluster: Cluster, nodes: np.ndarray, name: str) -> str:
    """One line: how the pipelines and the data-parallel groups lie across nodes, and the layout's name."""
    replicas, num_ranks = nodes.shape
    pipelines, rings = _spans(nodes), _spans(nodes.T)
    if cluster.nodes == 1:
        where = "one node"
    elif replicas == 1:
        where = f"one pipeline across {cluster.nodes} nodes"
    elif num_ranks == 1:
        where = f"no pipeline, {replicas} replicas across {cluster.nodes} nodes"
    elif pipelines[1] == 1:
        where = "pipelines inside nodes, replicas across"
    elif rings[1] == 1:
        where = "data-parallel groups inside nodes, pipelines across"
    else:
        where = f"{_across('pipeline', pipelines)}, {_across('data-parallel group', rings)}"
    return f"{where}: {name}"


def place(cluster: Cluster, num_ranks: int, replicas: int, send_bytes: Sequence[float],
          grad_bytes: Sequence[float]) -> Placement:
    """Place ``replicas`` copies of a ``num_ranks``-rank pipeline on ``cluster`` (which must have exactly
    ``replicas * num_ranks`` devices). ``send_bytes[b]``: bytes one replica sends across boundary ``b|b+1`` per
    step; ``grad_bytes[r]``: gradient bytes pipeline rank ``r``'s data-parallel group all-reduces per step."""
    send, grad = _check(cluster, num_ranks, replicas, send_bytes, grad_bytes)
    best: tuple[float, float, np.ndarray, str] | None = None
    per_node, devices = cluster.devices_per_node, cluster.num_devices
    seen: set[bytes] = set()
    for order, offsets, name in _candidates(replicas, num_ranks, per_node, grad):
        for offset in offsets if cluster.nodes > 1 else (0,):
            grid = (order + offset) % devices
            nodes = grid // per_node
            key = nodes.tobytes()
            if key in seen:
                continue
            seen.add(key)
            times = _times(cluster, nodes, send, grad)
            slowest, total = float(times.max()), float(times.sum())
            if best is None or _better(slowest, total, best[0], best[1]):
                best = (slowest, total, grid, name + (f", ranks shifted by {offset}" if offset else ""))
    assert best is not None
    grid = best[2]
    nodes = grid // cluster.devices_per_node
    ranks = tuple(tuple(int(g) for g in row) for row in grid)
    same = nodes[:, 1:] == nodes[:, :-1]
    pipeline = tuple(_slowest(cluster, bool(same[:, b].any()), bool((~same[:, b]).any()))
                     for b in range(num_ranks - 1))
    ordered = np.sort(nodes, axis=0)
    shares, spans = (ordered[1:] == ordered[:-1]).any(axis=0), ordered[0] != ordered[-1]
    rings = tuple(_slowest(cluster, bool(shares[r]), bool(spans[r])) for r in range(num_ranks))
    return Placement(ranks=ranks, pipeline_bytes_per_s=pipeline, replica_bytes_per_s=rings,
                     layout=_describe(cluster, nodes, best[3]))


_REL = 1e-9
"""Two layouts whose times differ by less than this (relative) tie: rounding must not pick a stranger one."""


def _better(slowest: float, total: float, best_slowest: float, best_total: float) -> bool:
    if slowest < best_slowest - _REL * max(abs(best_slowest), 1e-300):
        return True
    if slowest > best_slowest + _REL * max(abs(best_slowest), 1e-300):
        return False
    return total < best_total - _REL * max(abs(best_total), 1e-300)


def _slowest(cluster: Cluster, intra: bool, inter: bool) -> float | None:
    """The slowest of the links used (``intra``: one inside a node, ``inter``: one between nodes); None when
    every one is free, or none is used."""
    links = [x for x, used in ((cluster.intra_node_bytes_per_s, intra), (cluster.inter_node_bytes_per_s, inter))
             if used and x is not None]
    return min(links) if links else None

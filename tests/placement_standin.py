"""A minimal stand-in for Part A's ``autopart.core.placement.place`` (issue 20), for the planner's tests
until that module is merged: of two layouts, pipelines inside nodes (replica-major ranks) or replicas
inside nodes (pipeline-major), the one whose traffic takes less time on the links it crosses."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from autopart.formats.cluster import Cluster


@dataclass(frozen=True)
class Placement:
    ranks: tuple[tuple[int, ...], ...]
    pipeline_bytes_per_s: tuple[float | None, ...]
    replica_bytes_per_s: tuple[float | None, ...]
    layout: str


def _slowest(links: list[float | None]) -> float | None:
    finite = [b for b in links if b is not None]
    return min(finite) if finite else None


def _links(cluster: Cluster, ranks: list[list[int]]) -> tuple[tuple[float | None, ...], tuple[float | None, ...]]:
    d, k = len(ranks), len(ranks[0])
    pipe = tuple(_slowest([cluster.link_bytes_per_s(row[r], row[r + 1]) for row in ranks]) for r in range(k - 1))
    ring = tuple(_slowest([cluster.link_bytes_per_s(ranks[i][r], ranks[(i + 1) % d][r]) for i in range(d)])
                 if d > 1 else None for r in range(k))
    return pipe, ring


def place(cluster: Cluster, num_ranks: int, replicas: int, send_bytes: Sequence[float],
          grad_bytes: Sequence[float]) -> Placement:
    k, d = num_ranks, replicas
    options = [("pipelines inside nodes, replicas across", [[i * k + r for r in range(k)] for i in range(d)]),
               ("replicas inside nodes, pipelines across", [[r * d + i for r in range(k)] for i in range(d)])]
    best: tuple[float, Placement] | None = None
    for layout, ranks in options:
        pipe, ring = _links(cluster, ranks)
        cost = sum(b / bw for b, bw in zip(send_bytes, pipe) if bw) \
            + sum(2 * (d - 1) / d * g / bw for g, bw in zip(grad_bytes, ring) if bw)
        if best is None or cost < best[0]:
            best = (cost, Placement(tuple(tuple(r) for r in ranks), pipe, ring, layout))
    assert best is not None
    return best[1]

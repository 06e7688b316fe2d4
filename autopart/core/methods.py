"""The split methods by name: what ``autopart partition --method`` offers and :func:`split` runs.

    split(problem, "exact")               # smallest predicted step (autopart.core.fastest)
    split(problem, "bottleneck")          # smallest slowest stage (autopart.core.partition)

Pure (numpy, no torch). The registry sits above both the bottleneck family
(:mod:`autopart.core.partition`) and the exact search that builds on it
(:mod:`autopart.core.fastest`), so neither imports the other back.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Callable, Mapping

from autopart.core.costmodel import Problem
from autopart.core.fastest import split_fastest
from autopart.core.partition import Split, split_bottleneck, split_minvar, split_parameters, split_uniform
from autopart.errors import AutopartError

__all__ = ["METHODS", "split"]

METHODS: Mapping[str, Callable[[Problem], Split]] = MappingProxyType({
    "exact": split_fastest, "bottleneck": split_bottleneck, "minvar": split_minvar, "uniform": split_uniform,
    "parameters": split_parameters,
})
"""Method name -> the function that splits a problem that way; ``exact`` first, the default."""


def split(p: Problem, method: str = "exact") -> Split:
    """``p``'s blocks split by ``method`` (a key of :data:`METHODS`)."""
    try:
        fn = METHODS[method]
    except KeyError:
        raise AutopartError(f"unknown method {method!r}; known: {', '.join(METHODS)}") from None
    return fn(p)

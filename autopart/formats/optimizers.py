"""The optimizers a plan can name, and the copies of the parameters each keeps (standard library only).

The one table: the cost model prices memory from it, a plan's validation checks
names against it, the CLI offers its names, the profiler times every one of them,
and :func:`autopart.measure.optimizers.make_optimizer` builds them under the same names.
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from autopart.errors import AutopartError

__all__ = ["OPTIMIZER_STATES", "DEFAULT_OPTIMIZER", "optimizer_states", "check_optimizer"]

OPTIMIZER_STATES: Mapping[str, int] = MappingProxyType({"adam": 2, "adamw": 2, "sgd-momentum": 1, "sgd": 0})
"""Optimizer name -> copies of the parameters its state holds (Adam's two moments, SGD's momentum buffer)."""

DEFAULT_OPTIMIZER = "adamw"
"""What a plan assumes when it names none, and what ``autopart partition`` picks by default."""


def check_optimizer(name: str, where: str = "optimizer") -> str:
    """``name`` when the table knows it, else an :class:`AutopartError` naming ``where`` and the known names."""
    if name not in OPTIMIZER_STATES:
        raise AutopartError(f"{where} is {name!r}; known: {', '.join(OPTIMIZER_STATES)}")
    return name


def optimizer_states(name: str) -> int:
    """Copies of the parameters optimizer ``name`` keeps (:data:`OPTIMIZER_STATES`)."""
    return OPTIMIZER_STATES[check_optimizer(name)]

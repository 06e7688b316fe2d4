"""The torch optimizers behind the names in :data:`autopart.formats.optimizers.OPTIMIZER_STATES`.

    optimizer = make_optimizer(plan.optimizer, stage.parameters(), lr=1e-3)

What the profiler times and what ``autopart train`` steps, so both run the same thing.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch

from autopart.formats.optimizers import check_optimizer

__all__ = ["make_optimizer"]

_Groups = list[dict[str, Any]]

_BUILDERS: Mapping[str, Callable[[_Groups, float], torch.optim.Optimizer]] = {
    "adam": lambda groups, lr: torch.optim.Adam(groups, lr=lr),
    "adamw": lambda groups, lr: torch.optim.AdamW(groups, lr=lr),
    "sgd-momentum": lambda groups, lr: torch.optim.SGD(groups, lr=lr, momentum=0.9),
    "sgd": lambda groups, lr: torch.optim.SGD(groups, lr=lr, momentum=0.0),
}
"""One per name in the table (``tests/test_profiler.py`` checks each keeps the table's copies of state)."""


def make_optimizer(name: str, params: Iterable[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    """The optimizer a plan names (``adam``, ``adamw``, ``sgd-momentum`` with momentum 0.9, ``sgd``), over
    ``params`` as one group; no parameters (a stage of activations only) give one with nothing to update."""
    groups: _Groups = [{"params": list(params)}]  # torch refuses a bare empty list, not an empty group
    return _BUILDERS[check_optimizer(name)](groups, lr)

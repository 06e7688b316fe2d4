"""Build a model with its parameters on the meta device and its buffers real.

    with parameters_on_meta() as moved:
        model = Model()          # no memory for the weights; a buffer computed in __init__ keeps its values
    # moved: the ids of the parameters it put on meta (a parameter made on meta by the model itself is not one)

Every parameter goes to the meta device as it is registered (``nn.Module.register_parameter``, which
``module.weight = nn.Parameter(...)`` calls), so a module's own ``reset_parameters`` then runs on meta, for
free. Buffers are left alone: a table computed in ``__init__`` (a sinusoidal position encoding, rotary
frequencies) keeps its values, which nothing could compute again after ``to_empty``.

This mirrors ``accelerate.init_empty_weights(include_buffers=False)`` (``accelerate.big_modeling.init_on_device``);
it is written here rather than imported because accelerate would add huggingface_hub, psutil and pyyaml to
every install of autopart for one context manager.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

__all__ = ["parameters_on_meta"]


@contextmanager
def parameters_on_meta() -> Iterator[set[int]]:
    """Within it, every parameter a module registers is moved to the meta device (its class, ``requires_grad``
    and attributes kept); buffers stay where they are made. Yields the set of the ``id`` of each parameter it
    moved, filled as they are registered."""
    original = nn.Module.register_parameter
    moved: set[int] = set()

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        made = self._parameters[name]
        if made is not None and not made.is_meta:
            kwargs = dict(made.__dict__)
            kwargs["requires_grad"] = made.requires_grad
            self._parameters[name] = on_meta = type(made)(made.to(torch.device("meta")), **kwargs)
            moved.add(id(on_meta))

    nn.Module.register_parameter = register  # type: ignore[method-assign,assignment]
    try:
        yield moved
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]

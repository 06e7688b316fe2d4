"""Cut a module into an ordered chain of blocks, the units a pipeline stage is made of.

An ``nn.Sequential`` is flattened recursively: each child that is not itself a
Sequential becomes a block named by its module path (``h.3``), so a model
built as ``Sequential(embed, Sequential(*layers), head)`` gives ``embed``,
``h.0`` ... ``head``. Any other module is cut into its top-level children,
which must reproduce its forward when run in order; that is checked on the
example. General graphs (skips, branches) come later.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from autopart.errors import AutopartError

__all__ = ["Block", "split_blocks", "run_chain", "check_chain", "call_block", "tensors_of"]

Block = tuple[str, nn.Module]


def _flatten(prefix: str, module: nn.Module, out: list[Block]) -> None:
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            _flatten(f"{path}.", child, out)
        else:
            out.append((path, child))


def split_blocks(module: nn.Module) -> list[Block]:
    """The chain of blocks of ``module``, in execution order."""
    blocks: list[Block] = []
    _flatten("", module, blocks)
    if not blocks:
        raise AutopartError(f"{type(module).__name__} has no child modules to cut into blocks")
    return blocks


def call_block(block: nn.Module, inputs: Any) -> Any:
    """Call a block on the previous block's output (a tuple is spread into arguments)."""
    if isinstance(inputs, tuple):
        return block(*inputs)
    return block(inputs)


def run_chain(blocks: Sequence[Block], example: tuple[torch.Tensor, ...]) -> Any:
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


def check_chain(module: nn.Module, blocks: Sequence[Block], example: tuple[torch.Tensor, ...], name: str) -> None:
    """Raise unless running ``blocks`` in order gives what ``module(*example)`` gives.

    Runs in eval mode without gradients (deterministic), restoring every
    submodule's mode afterwards. Nothing to check for an ``nn.Sequential``.
    """
    if isinstance(module, nn.Sequential):
        return
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        with torch.no_grad():
            expected = tensors_of(module(*example))
            got = tensors_of(run_chain(blocks, example))
    except Exception as exc:
        raise AutopartError(
            f"model {name!r}: running its top-level children in order failed ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); it is not a chain of blocks"
        ) from None
    finally:
        for m, training in modes.items():
            m.training = training
    same = len(expected) == len(got) and all(
        a.shape == b.shape and torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5)
        for a, b in zip(expected, got)
    )
    if not same:
        raise AutopartError(
            f"model {name!r}: its top-level children run in order do not reproduce its forward; "
            f"give an nn.Sequential (blocks: {', '.join(n for n, _ in blocks)})"
        )

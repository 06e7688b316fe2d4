"""A training precision (:mod:`autopart.formats.precision`) in torch terms: its dtypes and its autocast.

    with autocast(check_precision("bf16-mixed"), device):   # the forward and the loss, as train runs them
        loss = loss_fn(stage(x), target)

Shared by the profiler (which measures under the precision) and the runtime (which trains under it), so both
compute a forward the same way.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

from autopart.formats.precision import Precision

__all__ = ["autocast", "cast_dtype", "compute_dtype", "floating_in", "param_dtype"]


def compute_dtype(precision: Precision) -> torch.dtype:
    """The dtype the forward computes in."""
    return getattr(torch, precision.dtype)  # type: ignore[no-any-return]


def param_dtype(precision: Precision) -> torch.dtype:
    """The dtype of the parameters, their gradients and the optimizer state."""
    return getattr(torch, precision.param_dtype)  # type: ignore[no-any-return]


def cast_dtype(precision: Precision) -> torch.dtype | None:
    """The dtype a true precision casts the model and its floating inputs to (bf16-true's bfloat16); None: the
    model keeps float32 weights (fp32, and a mixed precision, which autocasts each forward instead)."""
    return None if precision.param_dtype == "float32" else param_dtype(precision)


def floating_in(inputs: tuple[torch.Tensor, ...], dtype: torch.dtype | None) -> tuple[torch.Tensor, ...]:
    """Floating inputs in ``dtype`` (a true precision's; None: as they are), the others (token ids) as they are."""
    return tuple(x.to(dtype) if dtype is not None and x.is_floating_point() else x for x in inputs)


def autocast(precision: Precision, device: torch.device) -> ContextManager[object]:
    """``torch.autocast`` in the precision's dtype on ``device``'s type for a mixed precision; nothing for the
    others (fp32, and a true precision, whose model is cast instead)."""
    if not precision.mixed:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=compute_dtype(precision))

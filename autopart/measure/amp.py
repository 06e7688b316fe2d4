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

__all__ = ["autocast", "compute_dtype", "param_dtype"]


def compute_dtype(precision: Precision) -> torch.dtype:
    """The dtype the forward computes in."""
    return getattr(torch, precision.dtype)  # type: ignore[no-any-return]


def param_dtype(precision: Precision) -> torch.dtype:
    """The dtype of the parameters, their gradients and the optimizer state."""
    return getattr(torch, precision.param_dtype)  # type: ignore[no-any-return]


def autocast(precision: Precision, device: torch.device) -> ContextManager[object]:
    """``torch.autocast`` in the precision's dtype on ``device``'s type for a mixed precision; nothing for the
    others (fp32, and a true precision, whose model is cast instead)."""
    if not precision.mixed:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=compute_dtype(precision))

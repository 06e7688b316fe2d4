"""Training precisions: the one table of their names, dtypes, and how each runs.

    check_precision("bf16-mixed").dtype          # "bfloat16": what autocast computes in
    check_precision("bf16-mixed").param_dtype    # "float32": the master weights, gradients, optimizer state
    precision_of_dtype("bfloat16", "--dtype")    # "bf16-true": what the old --dtype flag meant

Pure standard library (the planner imports no torch). The names are PyTorch Lightning's and torchtitan's:

- ``fp32``: everything in float32.
- ``bf16-mixed`` / ``fp16-mixed``: float32 parameters, gradients and optimizer state; each stage's forward
  and the loss run under ``torch.autocast`` in bfloat16 / float16, so activations are mostly low precision.
  fp16-mixed also scales the loss with a gradient scaler (float16 gradients underflow without it).
- ``bf16-true``: parameters, activations, gradients and optimizer state all in bfloat16.
"""
from __future__ import annotations

from dataclasses import dataclass

from autopart.errors import AutopartError

__all__ = ["Precision", "PRECISIONS", "DEFAULT_PRECISION", "check_precision", "precision_of_dtype",
           "precision_of_old_file"]


@dataclass(frozen=True)
class Precision:
    """One training precision."""

    name: str
    dtype: str
    """The dtype the forward computes in (torch's name without ``torch.``)."""
    mixed: bool
    """float32 parameters with the forward under autocast in ``dtype`` (else the model is cast to ``dtype``)."""
    scaler: bool
    """The loss is scaled, the gradients unscaled before the optimizer step (a gradient scaler)."""

    @property
    def param_dtype(self) -> str:
        """The dtype of the parameters, their gradients and the optimizer state."""
        return "float32" if self.mixed else self.dtype


PRECISIONS: dict[str, Precision] = {p.name: p for p in (
    Precision("fp32", "float32", mixed=False, scaler=False),
    Precision("bf16-mixed", "bfloat16", mixed=True, scaler=False),
    Precision("bf16-true", "bfloat16", mixed=False, scaler=False),
    Precision("fp16-mixed", "float16", mixed=True, scaler=True),
)}
DEFAULT_PRECISION = "fp32"

_OF_DTYPE = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16-true"}
"""The old ``--dtype`` values (parameters in that dtype) as precisions."""


def check_precision(name: str, where: str = "--precision") -> Precision:
    """The precision called ``name``; an unknown name is an :class:`AutopartError` listing the known ones."""
    if name not in PRECISIONS:
        raise AutopartError(f"{where}: unknown precision {name!r}; known: {', '.join(PRECISIONS)}")
    return PRECISIONS[name]


def precision_of_dtype(dtype: str, where: str = "--dtype") -> str:
    """The precision that a parameter dtype alone meant (``--dtype``, a profile from before precisions):
    float32 is fp32, bfloat16 bf16-true; float16 is refused (float16 trains only mixed, with a scaler)."""
    name = dtype.removeprefix("torch.")
    if name in ("float16", "half"):
        raise AutopartError(f"{where} float16 is not offered (float16 parameters do not train without a "
                            f"gradient scaler): use --precision fp16-mixed")
    if name not in _OF_DTYPE:
        raise AutopartError(f"{where} {dtype!r} is not a training dtype; use --precision "
                            f"{'|'.join(PRECISIONS)}")
    return _OF_DTYPE[name]


def precision_of_old_file(dtype: str) -> str:
    """The precision of a profile from before precisions were recorded, from its parameter ``dtype``: bfloat16
    is bf16-true, float16 fp16-mixed (its activations were measured in float16, the only float16 precision
    offered), anything else fp32 (the runtime trained it as built)."""
    return {"bfloat16": "bf16-true", "float16": "fp16-mixed"}.get(dtype.removeprefix("torch."), DEFAULT_PRECISION)

"""Per-block costs at a micro-batch size the profile did not measure, from a fit over the ones it did.

    scaled, how = scale_profile(profile, microbatch_size=16)

Times (a block's forward, backward, input gradient and, for the last block,
its loss's) are fitted per block as ``a + c * b**p`` (a, c >= 0,
0.5 <= p <= 1.5) with scipy's ``curve_fit`` when three or more sizes were measured, as
``a + c * b`` (non-negative least squares) with two, and assumed
proportional to ``b`` with one. The constant ``a`` is each micro-batch's fixed
overhead, which is what makes very many small micro-batches slow. Bytes
(activations, outputs, input) are fitted as ``a + c * b``; parameters do not
change. A measured size is used as measured. Pure: scipy and numpy, no torch.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Sequence

import numpy as np

from autopart.errors import AutopartError
from autopart.formats.profile import Profile

__all__ = ["scale_profile", "fit_curve"]


def _affine(sizes: np.ndarray, values: np.ndarray) -> tuple[float, float]:
    from scipy.optimize import nnls

    coef, _ = nnls(np.column_stack([np.ones_like(sizes), sizes]), values)
    return float(coef[0]), float(coef[1])


def fit_curve(sizes: Sequence[int], values: Sequence[float]) -> tuple[float, float, float]:
    """(a, c, p) of ``a + c * b**p`` through the measured points."""
    b = np.asarray(sizes, dtype=float)
    y = np.asarray(values, dtype=float)
    if b.size == 1:
        return 0.0, float(y[0] / b[0]), 1.0
    a, c = _affine(b, y)
    if b.size == 2 or not np.any(y > 0):
        return a, c, 1.0
    from scipy.optimize import curve_fit

    def model(x: np.ndarray, a_: float, c_: float, p_: float) -> np.ndarray:
        return a_ + c_ * np.power(x, p_)

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            (fa, fc, fp), _ = curve_fit(model, b, y, p0=(max(a, 0.0), max(c, 1e-12), 1.0),
                                        bounds=([0.0, 0.0, 0.5], [np.inf, np.inf, 1.5]), maxfev=2000)
    except (RuntimeError, ValueError):
        return a, c, 1.0
    return float(fa), float(fc), float(fp)


def _at(sizes: Sequence[int], values: Sequence[float], target: int, power: bool) -> float:
    if power:
        a, c, p = fit_curve(sizes, values)
    elif len(sizes) == 1:
        a, c, p = 0.0, values[0] / sizes[0], 1.0
    else:
        a, c = _affine(np.asarray(sizes, dtype=float), np.asarray(values, dtype=float))
        p = 1.0
    return max(0.0, a + c * target ** p)


def scale_profile(profile: Profile, microbatch_size: int) -> tuple[Profile, str]:
    """The profile's blocks at ``microbatch_size``, and a sentence saying how the numbers were obtained."""
    if microbatch_size < 1:
        raise AutopartError(f"micro-batch size must be >= 1, got {microbatch_size}")
    measured = profile.sizes()
    if microbatch_size in measured:
        if microbatch_size == profile.microbatch_size:
            return profile, "measured"
        return dataclasses.replace(profile, microbatch_size=microbatch_size, layers=measured[microbatch_size],
                                   sample_shape=(microbatch_size, *profile.sample_shape[1:]),
                                   by_microbatch_size=()), f"measured at micro-batch size {microbatch_size}"
    sizes = list(measured)
    layers = []
    for i, base in enumerate(profile.layers):
        series = [measured[b][i] for b in sizes]

        def t(field: str) -> float:
            return _at(sizes, [getattr(x, field) for x in series], microbatch_size, power=True)

        def n(field: str) -> int:
            return int(round(_at(sizes, [float(getattr(x, field)) for x in series], microbatch_size, power=False)))

        grads = [x.input_grad_ms for x in series]
        weights = [x.weight_grad_ms for x in series]
        split = not any(g is None for g in grads + weights)  # I and W measured: neither is part of the other
        input_grad = None if any(g is None for g in grads) else \
            _at(sizes, [float(g or 0.0) for g in grads], microbatch_size, power=True)
        if input_grad is not None and not split:
            input_grad = min(input_grad, t("backward_ms"))
        weight_grad = _at(sizes, [float(g or 0.0) for g in weights], microbatch_size, power=True) if split else None
        # the loss (last block) fitted as the times are; part of the block's times when the profile says so
        within = profile.loss_in_last_block
        loss_f = min(t("loss_forward_ms"), t("forward_ms")) if within else t("loss_forward_ms")
        loss_b = min(t("loss_backward_ms"), t("backward_ms")) if within else t("loss_backward_ms")
        layers.append(dataclasses.replace(base, forward_ms=t("forward_ms"), backward_ms=t("backward_ms"),
                                          input_grad_ms=input_grad, weight_grad_ms=weight_grad,
                                          loss_forward_ms=loss_f, loss_backward_ms=loss_b,
                                          activation_bytes=n("activation_bytes"), output_bytes=n("output_bytes"),
                                          forward_iqr_ms=0.0, backward_iqr_ms=0.0, cuda_peak_bytes=None))
    input_bytes = int(round(profile.input_bytes * microbatch_size / profile.microbatch_size))
    scaled = dataclasses.replace(profile, microbatch_size=microbatch_size, layers=tuple(layers),
                                 sample_shape=(microbatch_size, *profile.sample_shape[1:]), input_bytes=input_bytes,
                                 by_microbatch_size=())
    if len(sizes) == 1:
        how = (f"scaled from micro-batch size {sizes[0]} to {microbatch_size} assuming time and activations "
               f"grow linearly (profile more sizes, --microbatch-size 1,2,4,8, for a fit)")
    else:
        kind = "a + c*b^p (scipy curve_fit)" if len(sizes) >= 3 else "a + c*b (least squares)"
        where = "inside" if sizes[0] <= microbatch_size <= sizes[-1] else "outside"
        how = (f"per-block times fitted as {kind} over micro-batch sizes {sizes}, evaluated at "
               f"{microbatch_size} ({where} the measured range)")
    return scaled, how

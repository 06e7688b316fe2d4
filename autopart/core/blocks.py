"""The blocks the partitioner splits: per-block costs of one micro-batch, validated and read-only.

    BlockCosts.of([1.0, 2.0, 3.0], activation_bytes=[10, 20, 30])
    BlockCosts.from_profile(profile, optimizer="adamw")

Pure numpy (no torch). Every array is made read-only when the blocks are
made, so a :class:`~autopart.core.costmodel.Problem` built on them cannot
change under the partitioner.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Sequence

import numpy as np
import numpy.typing as npt

from autopart.errors import AutopartError
from autopart.formats.optimizers import DEFAULT_OPTIMIZER
from autopart.formats.profile import Profile

__all__ = ["BlockCosts"]

Floats = npt.NDArray[np.float64]


@dataclass(frozen=True, eq=False)
class BlockCosts:
    """Per-block costs for one micro-batch, validated: what the partitioner splits."""

    names: tuple[str, ...]
    compute_ms: Floats
    """Forward plus backward."""
    forward_ms: Floats
    param_bytes: Floats
    activation_bytes: Floats
    output_bytes: Floats
    """What crosses the boundary after the block."""
    optimizer_ms: Floats
    input_bytes: float = 0.0
    """One micro-batch's input: what a recomputing first stage keeps per micro-batch."""
    model_output_bytes: float = 0.0
    """One micro-batch's output of the last block (an LM's logits): what the last stage holds per
    in-flight micro-batch until its backward. Kept apart from ``output_bytes`` so the mirror image has it."""
    skip_bytes: Floats | None = None
    """Skips crossing the boundary after each block, besides its output (None: a chain, no skips)."""
    ties: tuple[tuple[float, tuple[int, ...]], ...] = ()
    """Shared parameters: (bytes, the blocks that use it, owner first); the owner's ``param_bytes`` has it."""
    input_grad_ms: Floats | None = None
    """The input-gradient half of each backward (None: not measured; the simulator assumes half)."""
    weight_grad_ms: Floats | None = None
    """The weight-gradient half that follows it, as torch runs it (None: not measured; the simulator takes
    the rest of the backward)."""
    loss_activation_bytes: Floats | None = None
    """Per block, the part of ``activation_bytes`` the loss saves (the last block's; None: no loss)."""
    largest_param_bytes: Floats | None = None
    """Per block, the largest parameter tensor it uses, a tied one included (None: not counted)."""
    output_saved_bytes: Floats | None = None
    """Per block, the part of ``output_bytes`` the block saved itself (in its ``activation_bytes``, in no later
    block's); None: not recorded (older profiles), counted as 0."""
    model_output_saved_bytes: float = 0.0
    """The same for the model's output (``model_output_bytes``), kept apart as it is for the mirror image."""
    foreach_optimizer: bool = False
    """The optimizer steps all of a stage's parameters at once (torch's foreach kernels, its default on
    CUDA) rather than one tensor at a time (its default on CPU): the profile's device says which."""

    def __post_init__(self) -> None:
        for f in fields(self):  # read-only: a problem built on these blocks cannot change under its callers
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):  # a read-only view: the caller's array stays as it was
                view = value.view()
                view.flags.writeable = False
                object.__setattr__(self, f.name, view)

    @property
    def n(self) -> int:
        return len(self.names)

    @staticmethod
    def of(compute_ms: Sequence[float], *, forward_ms: Sequence[float] | None = None,
           param_bytes: Sequence[float] | None = None, activation_bytes: Sequence[float] | None = None,
           output_bytes: Sequence[float] | None = None, input_bytes: float = 0.0,
           model_output_bytes: float | None = None, names: Sequence[str] | None = None,
           optimizer_ms: Sequence[float] | None = None,
           skip_bytes: Sequence[float] | None = None,
           ties: Sequence[tuple[float, Sequence[int]]] = (),
           input_grad_ms: Sequence[float] | None = None,
           weight_grad_ms: Sequence[float] | None = None,
           loss_activation_bytes: Sequence[float] | None = None,
           largest_param_bytes: Sequence[float] | None = None,
           output_saved_bytes: Sequence[float] | None = None,
           foreach_optimizer: bool = False) -> "BlockCosts":
        """Arrays from lists (missing ones are zeros; ``model_output_bytes``: the last block's
        ``output_bytes``, its saved part the last block's ``output_saved_bytes``); a NaN, infinite or
        negative entry names its block."""
        n = len(compute_ms)
        if n < 1:
            raise AutopartError("no blocks to partition")
        labels = tuple(names) if names is not None else tuple(str(i) for i in range(n))

        def arr(values: Sequence[float] | None, what: str) -> Floats:
            a = np.zeros(n) if values is None else np.asarray(values, dtype=np.float64)
            if a.shape != (n,):
                raise AutopartError(f"{what} has {a.size} entries for {n} blocks")
            if not np.all(np.isfinite(a)) or np.any(a < 0):
                bad = int(np.flatnonzero(~np.isfinite(a) | (a < 0))[0])
                raise AutopartError(f"{what} of block {labels[bad]!r} is {a[bad]}, must be finite and >= 0")
            return a

        outputs = arr(output_bytes, "output bytes")
        saved_out = None if output_saved_bytes is None else arr(output_saved_bytes, "output saved bytes")
        return BlockCosts(names=labels, compute_ms=arr(compute_ms, "compute time"),
                          forward_ms=arr(forward_ms, "forward time"), param_bytes=arr(param_bytes, "parameter bytes"),
                          activation_bytes=arr(activation_bytes, "activation bytes"),
                          output_bytes=outputs,
                          optimizer_ms=arr(optimizer_ms, "optimizer time"), input_bytes=float(input_bytes),
                          model_output_bytes=float(outputs[-1] if model_output_bytes is None
                                                   else model_output_bytes),
                          skip_bytes=arr(skip_bytes, "skip bytes") if skip_bytes is not None else None,
                          ties=_ties(ties, n),
                          input_grad_ms=arr(input_grad_ms, "input-gradient time") if input_grad_ms is not None
                          else None,
                          weight_grad_ms=arr(weight_grad_ms, "weight-gradient time") if weight_grad_ms is not None
                          else None,
                          loss_activation_bytes=None if loss_activation_bytes is None else np.minimum(
                              arr(loss_activation_bytes, "loss activation bytes"),
                              arr(activation_bytes, "activation bytes")),
                          largest_param_bytes=None if largest_param_bytes is None
                          else arr(largest_param_bytes, "largest parameter bytes"),
                          output_saved_bytes=None if saved_out is None else np.minimum(saved_out, outputs),
                          model_output_saved_bytes=0.0 if saved_out is None else min(
                              float(saved_out[-1]), float(outputs[-1] if model_output_bytes is None
                                                          else model_output_bytes)),
                          foreach_optimizer=foreach_optimizer)

    @staticmethod
    def from_profile(profile: Profile, optimizer: str = DEFAULT_OPTIMIZER) -> "BlockCosts":
        """The profile's blocks, paying ``optimizer``'s step (AdamW's where the profile did not time it)."""
        layers = profile.layers
        split = all(x.weight_grad_ms is not None and x.input_grad_ms is not None for x in layers)  # I and W timed
        return BlockCosts.of([x.forward_ms + x.backward_ms for x in layers], forward_ms=[x.forward_ms for x in layers],
                             param_bytes=[x.param_bytes for x in layers],
                             activation_bytes=[x.activation_bytes for x in layers],
                             output_bytes=[x.output_bytes for x in layers], input_bytes=profile.input_bytes,
                             names=profile.names,
                             optimizer_ms=[dict(x.optimizer_ms_by_name).get(optimizer, x.optimizer_ms) for x in layers],
                             skip_bytes=[x.skip_bytes for x in layers] if any(x.skip_bytes for x in layers) else None,
                             ties=[(t.bytes, [profile.names.index(b) for b in t.blocks]) for t in profile.ties
                                   if all(b in profile.names for b in t.blocks)],
                             input_grad_ms=None if any(x.input_grad_ms is None for x in layers)
                             else [(x.input_grad_ms or 0.0) if split else min(x.input_grad_ms or 0.0, x.backward_ms)
                                   for x in layers],
                             weight_grad_ms=[x.weight_grad_ms or 0.0 for x in layers] if split else None,
                             loss_activation_bytes=_loss_activation_bytes(profile),
                             largest_param_bytes=_largest_param_bytes(profile),
                             output_saved_bytes=[x.output_saved_bytes or 0 for x in layers]
                             if any(x.output_saved_bytes is not None for x in layers) else None,
                             foreach_optimizer=not profile.device.startswith("cpu"))  # "cpu (Xeon)"; a GPU's name ("NVIDIA H200")

    def mirrored(self) -> "BlockCosts":
        """Block n-1 first. The boundary after mirrored block b is the original one after block n-2-b."""
        return BlockCosts(names=self.names[::-1], compute_ms=self.compute_ms[::-1].copy(),
                          forward_ms=self.forward_ms[::-1].copy(), param_bytes=self.param_bytes[::-1].copy(),
                          activation_bytes=self.activation_bytes[::-1].copy(),
                          output_bytes=np.concatenate([self.output_bytes[:-1][::-1], [0.0]]),
                          optimizer_ms=self.optimizer_ms[::-1].copy(), input_bytes=self.input_bytes,
                          model_output_bytes=self.model_output_bytes,
                          skip_bytes=None if self.skip_bytes is None else np.concatenate(
                              [self.skip_bytes[:-1][::-1], [0.0]]),
                          ties=tuple((b, tuple(self.n - 1 - u for u in users)) for b, users in self.ties),
                          input_grad_ms=None if self.input_grad_ms is None else self.input_grad_ms[::-1].copy(),
                          weight_grad_ms=None if self.weight_grad_ms is None else self.weight_grad_ms[::-1].copy(),
                          loss_activation_bytes=None if self.loss_activation_bytes is None
                          else self.loss_activation_bytes[::-1].copy(),
                          largest_param_bytes=None if self.largest_param_bytes is None
                          else self.largest_param_bytes[::-1].copy(),
                          output_saved_bytes=None if self.output_saved_bytes is None else np.concatenate(
                              [self.output_saved_bytes[:-1][::-1], [0.0]]),
                          model_output_saved_bytes=self.model_output_saved_bytes,
                          foreach_optimizer=self.foreach_optimizer)


def _ties(ties: Sequence[tuple[float, Sequence[int]]], n: int) -> tuple[tuple[float, tuple[int, ...]], ...]:
    out = []
    for size, users in ties:
        if not users or any(not 0 <= u < n for u in users) or not size >= 0:
            raise AutopartError(f"tie of {size} bytes names blocks {list(users)} outside 0..{n - 1}")
        out.append((float(size), tuple(int(u) for u in users)))
    return tuple(out)




def _loss_activation_bytes(profile: Profile) -> list[float] | None:
    """Per block, what the loss saves: measured on the last block, or, in profiles from before it was
    (None), estimated as one copy of the model's output (cross-entropy saves its log-softmax) when the
    last block's bytes include the loss; None when they do not."""
    if not profile.loss_in_last_block:
        return None
    last = profile.layers[-1]
    measured = last.loss_activation_bytes
    estimate = min(last.output_bytes, last.activation_bytes) if measured is None else measured
    return [0.0] * (len(profile.layers) - 1) + [float(estimate)]


def _largest_param_bytes(profile: Profile) -> list[float]:
    """Per block, its largest parameter tensor: measured, or, in profiles from before it was recorded
    (None), an upper bound: the larger of the block's own parameter bytes and the largest tied parameter
    it uses."""
    tied: dict[str, int] = {}
    for t in profile.ties:
        for b in t.blocks:
            tied[b] = max(tied.get(b, 0), t.bytes)
    return [float(x.largest_param_bytes if x.largest_param_bytes is not None
                  else max(x.param_bytes, tied.get(x.name, 0))) for x in profile.layers]

"""BatchNorm under micro-batches: running statistics over the whole mini-batch (torchgpipe's deferred BatchNorm).

A pipeline runs a mini-batch as M micro-batches, so a plain BatchNorm
normalises each micro-batch with its own statistics (as it must: the others
have not been computed yet) and also updates its running mean and variance
once per micro-batch, M times a step, each from a fraction of the samples.
:class:`DeferredBatchNorm` keeps the first and fixes the second: the forward
pass is unchanged, but each micro-batch's mean and variance are merged (Chan's
parallel algorithm, no loss of precision) and committed once per step, so
``running_mean``, ``running_var`` and ``num_batches_tracked`` are what the
unpartitioned model would hold after one forward of the same mini-batch,
``momentum=None`` (the cumulative average) included.

    with deferred_batchnorm(model):         # swaps BatchNorm1d/2d/3d in place, puts them back after
        ...                                 # forward each micro-batch
        for layer in deferred_layers(model):
            layer.commit()                  # once per step

The swap keeps the parameters and buffers (the same tensors, the same names),
so the optimizer, ``state_dict`` and checkpoints see the model as it was.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from autopart.formats.profile import BATCHNORM_MODES
from autopart.torch_compat import BatchNormBase, non_persistent_buffers, own_buffers, own_children, own_parameters

__all__ = ["BATCHNORM_MODES", "DeferredBatchNorm", "batchnorm_layers", "defer_batchnorm", "deferred_batchnorm",
           "deferred_layers", "statistics_kept"]


_KINDS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def batchnorm_layers(model: nn.Module) -> list[str]:
    """Names of the BatchNorm layers (plain or already deferred) in ``model``."""
    return [name for name, m in model.named_modules() if isinstance(m, BatchNormBase)]


class DeferredBatchNorm(BatchNormBase):
    """A BatchNorm1d/2d/3d whose running statistics are committed once per step, over every micro-batch
    it saw since the last commit (see the module's text)."""

    def __init__(self, like: BatchNormBase) -> None:
        nn.Module.__init__(self)
        self.num_features, self.eps, self.momentum = like.num_features, like.eps, like.momentum
        self.affine, self.track_running_stats = like.affine, like.track_running_stats
        self.kind: type[BatchNormBase] = type(like)
        """The class it stands in for (its input-shape check, and the class it goes back to)."""
        for name, param in own_parameters(like).items():
            self.register_parameter(name, param)
        for name, buffer in own_buffers(like).items():
            self.register_buffer(name, buffer, persistent=name not in non_persistent_buffers(like))
        self.train(like.training)
        self._count = 0
        """Samples per channel merged since the last commit."""
        self._mean: torch.Tensor | None = None
        self._m2: torch.Tensor | None = None
        """Sum of squared deviations from ``_mean`` (Chan et al.), per channel."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        self.kind._check_input_dim(self, input)  # type: ignore[arg-type]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not (self.training and self.track_running_stats):
            return super().forward(input)
        self._check_input_dim(input)
        assert self.running_mean is not None
        mean = torch.zeros_like(self.running_mean)
        var = torch.ones_like(mean)
        # momentum 1: the scratch statistics become this micro-batch's own (the variance unbiased)
        out = F.batch_norm(input, mean, var, self.weight, self.bias, True, 1.0, self.eps)
        self._merge(mean, var, input.numel() // input.shape[1])
        return out

    @torch.no_grad()
    def _merge(self, mean: torch.Tensor, unbiased_var: torch.Tensor, n: int) -> None:
        m2 = unbiased_var * (n - 1)
        if self._mean is None or self._m2 is None or self._count == 0:
            self._mean, self._m2, self._count = mean, m2, n
            return
        total = self._count + n
        delta = mean - self._mean
        self._m2 = self._m2 + m2 + delta * delta * (self._count * n / total)
        self._mean = self._mean + delta * (n / total)
        self._count = total

    def reset(self) -> None:
        """Forget what was merged since the last commit."""
        self._count, self._mean, self._m2 = 0, None, None

    @torch.no_grad()
    def commit(self) -> None:
        """Fold the merged statistics into the running ones as one batch, as torch's ``_BatchNorm.forward`` would."""
        if self._count == 0 or self._mean is None or self._m2 is None or not self.track_running_stats:
            self.reset()
            return
        assert self.running_mean is not None and self.running_var is not None
        factor = 0.0 if self.momentum is None else self.momentum
        if self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        var = self._m2 / max(self._count - 1, 1)
        self.running_mean.mul_(1 - factor).add_(self._mean.to(self.running_mean.dtype), alpha=factor)
        self.running_var.mul_(1 - factor).add_(var.to(self.running_var.dtype), alpha=factor)
        self.reset()


def defer_batchnorm(model: nn.Module) -> list[tuple[nn.Module, str, BatchNormBase]]:
    """Replace every BatchNorm1d/2d/3d in ``model`` by a :class:`DeferredBatchNorm` holding the same tensors;
    returns (parent, attribute, original) for each, to put them back."""
    swapped = []
    for parent in list(model.modules()):
        for attr, child in list(own_children(parent).items()):
            if type(child) in _KINDS:
                assert isinstance(child, BatchNormBase)
                setattr(parent, attr, DeferredBatchNorm(child))
                swapped.append((parent, attr, child))
    return swapped


@contextmanager
def deferred_batchnorm(model: nn.Module, mode: str = "deferred") -> Iterator[int]:
    """``model`` with deferred BatchNorm inside the block (``mode`` "micro": unchanged); yields how many
    layers were swapped."""
    swapped = defer_batchnorm(model) if mode == "deferred" else []
    try:
        yield len(swapped)
    finally:
        for parent, attr, original in swapped:
            current = own_children(parent)[attr]
            if isinstance(current, DeferredBatchNorm):
                original.train(current.training)
            setattr(parent, attr, original)


@contextmanager
def statistics_kept(model: nn.Module) -> Iterator[None]:
    """Forwards inside the block leave no trace: every buffer (running statistics, ``num_batches_tracked``)
    and what deferred layers merged are put back as they were (for a runtime's shape-inference forward)."""
    buffers = [(b, b.clone()) for b in model.buffers() if not b.is_meta]
    merged = [(layer, layer._count, layer._mean, layer._m2) for layer in deferred_layers(model)]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in buffers:  # through .data: the forward's graph saved them, at this version
                buffer.data.copy_(value)
        for layer, count, mean, m2 in merged:
            layer._count, layer._mean, layer._m2 = count, mean, m2


def deferred_layers(model: nn.Module) -> list[DeferredBatchNorm]:
    """The deferred BatchNorm layers in ``model`` (each to :meth:`~DeferredBatchNorm.commit` once per step)."""
    return [m for m in model.modules() if isinstance(m, DeferredBatchNorm)]

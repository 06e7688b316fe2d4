"""A process's peak memory over a baseline, on CUDA or on CPU: what ``train`` reports per rank (docs/train.md, Memory).

    lower_mmap_threshold()       # CPU: first thing in the process, before anything big is allocated
    meter = MemoryMeter(device)
    meter.start()                # the baseline: what the process holds before the model is built
    meter.reset_peak()           # before the steps
    ...
    meter.read()                 # MemoryPeak(peak_bytes=..., reserved_bytes=...)

- CUDA: the caching allocator's own counters: ``torch.cuda.max_memory_allocated``
  (and ``max_memory_reserved``) after ``reset_peak_memory_stats``, less what was
  allocated (reserved) at :meth:`MemoryMeter.start`.
- CPU: the kernel's high-water mark of resident memory (``VmHWM`` in
  ``/proc/self/status``) less the resident memory at :meth:`MemoryMeter.start`;
  the mark is reset by writing ``5`` to ``/proc/self/clear_refs``. Pages of
  files (``RssFile``: the libraries' code, first run after the baseline, and
  memory-mapped data) are not the process's own memory and are left out: the
  growth of ``RssFile`` since the baseline, as read with the mark, is
  subtracted. glibc keeps freed blocks for reuse, so resident memory would stay
  high after a tensor is freed; :func:`lower_mmap_threshold` has every
  allocation of 64 KiB or more mapped on its own and unmapped when freed, so
  resident memory follows the live tensors. Without ``/proc`` (not Linux)
  nothing is measured: the peak is None.

torch, not torch.distributed: ``train`` and ``check`` both use it.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import platform
from dataclasses import dataclass
from typing import Iterator

import torch

__all__ = ["MemoryMeter", "MemoryPeak", "lower_mmap_threshold", "allocating_as_ranks_do", "MMAP_THRESHOLD_BYTES",
           "GLIBC_MMAP_THRESHOLD_MAX_BYTES"]

MMAP_THRESHOLD_BYTES = 64 * 1024
"""Allocations of this size or more get their own mapping, returned to the OS when freed."""

_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
_STATUS = "/proc/self/status"
_CLEAR_REFS = "/proc/self/clear_refs"


@dataclass(frozen=True)
class MemoryPeak:
    """One process's peak since the last reset, over its baseline; None where it could not be measured."""

    peak_bytes: int | None
    reserved_bytes: int | None
    """CUDA: the caching allocator's reserved peak over the baseline (what the device lost to this process);
    None on CPU."""


GLIBC_MMAP_THRESHOLD_MAX_BYTES = 32 * 1024 * 1024
"""glibc's largest dynamic threshold on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``): where it settles by itself."""

_lowered = False
"""Whether this process lowered the threshold for good (:func:`lower_mmap_threshold`)."""


def _mallopt_threshold(threshold_bytes: int) -> bool:
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes))


def lower_mmap_threshold(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """glibc's ``mallopt(M_MMAP_THRESHOLD, threshold_bytes)``: allocations that big are unmapped when freed,
    so resident memory drops with them. True when set (glibc only; elsewhere nothing is changed)."""
    global _lowered
    done = _mallopt_threshold(threshold_bytes)
    _lowered = _lowered or done
    return done


@contextlib.contextmanager
def allocating_as_ranks_do() -> Iterator[None]:
    """Inside: CPU memory allocated as a ``train`` rank allocates it (:func:`lower_mmap_threshold`: each tensor
    of 64 KiB or more mapped and unmapped on its own, its pages faulted in afresh), so times measured here are
    the ones a rank sees: on this project's 2-core machine 12 small blocks in a row ran 18-44% slower than with
    glibc's reuse of freed memory. On leaving, a process that had not lowered the threshold for good gets
    glibc's largest dynamic one (:data:`GLIBC_MMAP_THRESHOLD_MAX_BYTES`; glibc cannot be told to adjust it by
    itself again). A context manager, or a decorator of a function."""
    changed = _mallopt_threshold(MMAP_THRESHOLD_BYTES)
    try:
        yield
    finally:
        if changed and not _lowered:  # lowered for good meanwhile (a rank started here): left so
            _mallopt_threshold(GLIBC_MMAP_THRESHOLD_MAX_BYTES)


_FIELDS = ("VmHWM", "VmRSS", "RssFile")


def _status_bytes() -> dict[str, int] | None:
    """``VmHWM``, ``VmRSS`` and ``RssFile`` of this process in bytes; None without ``/proc``."""
    try:
        with open(_STATUS, encoding="ascii") as handle:
            lines = handle.read().splitlines()
    except OSError:
        return None
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in _FIELDS:
            amount, unit = value.split()
            out[key] = int(amount) * (1024 if unit == "kB" else 1)
    return out if len(out) == len(_FIELDS) else None


def _reset_high_water_mark() -> bool:
    """``echo 5 > /proc/self/clear_refs``: ``VmHWM`` starts again from the resident memory now."""
    try:
        with open(_CLEAR_REFS, "w", encoding="ascii") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


class MemoryMeter:
    """Peak memory of this process on ``device`` since the last :meth:`reset_peak`, over :meth:`start`'s baseline."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cuda = device.type == "cuda"
        self._baseline_bytes = 0
        self._baseline_file_bytes = 0
        self._baseline_reserved_bytes = 0
        self._measurable = False
        self._why_not = "not started"

    @property
    def method(self) -> str:
        """How the peak is measured, in words (or why it is not)."""
        if self.cuda:
            return "torch.cuda.max_memory_allocated (and reserved) over what was allocated before the model"
        if not self._measurable:
            return f"not measured: {self._why_not}"
        return ("peak resident memory (VmHWM) over the resident memory before the model, files' pages left out, "
                "freed memory returned to the OS (glibc mmap threshold 64 KiB)")

    def start(self) -> None:
        """Take the baseline (what the process holds now) and reset the peak."""
        gc.collect()
        if self.cuda:
            self._baseline_bytes = torch.cuda.memory_allocated(self.device)
            self._baseline_reserved_bytes = torch.cuda.memory_reserved(self.device)
            self._measurable = True
        else:
            status = _status_bytes()
            if status is None:
                self._measurable, self._why_not = False, f"{_STATUS} is missing (not Linux)"
                return
            self._baseline_bytes, self._baseline_file_bytes = status["VmRSS"], status["RssFile"]
            self._measurable = _reset_high_water_mark()
            self._why_not = f"{_CLEAR_REFS} cannot be written (the peak could not be reset)"
        self.reset_peak()

    def _status(self) -> dict[str, int]:
        status = _status_bytes()
        if status is None:  # it was there at start
            raise RuntimeError(f"{_STATUS} is no longer readable")
        return status

    def reset_peak(self) -> None:
        """The peak starts again from what is held now (unreachable objects collected first)."""
        gc.collect()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self._measurable:
            self._measurable = _reset_high_water_mark()

    def peak_bytes(self) -> int | None:
        """The most held at once since the last reset, over the baseline; None when not measurable."""
        if not self._measurable:
            return None
        if self.cuda:
            return max(0, torch.cuda.max_memory_allocated(self.device) - self._baseline_bytes)
        status = self._status()
        files = status["RssFile"] - self._baseline_file_bytes
        return max(0, status["VmHWM"] - files - self._baseline_bytes)

    def reserved_bytes(self) -> int | None:
        """CUDA: the allocator's reserved peak over the baseline; None on CPU."""
        if not self.cuda:
            return None
        return max(0, torch.cuda.max_memory_reserved(self.device) - self._baseline_reserved_bytes)

    def read(self) -> MemoryPeak:
        """The peak and (CUDA) reserved peak since the last reset."""
        return MemoryPeak(peak_bytes=self.peak_bytes(), reserved_bytes=self.reserved_bytes())

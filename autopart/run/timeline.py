"""Every action of every step, timed on the rank that runs it: the measured side of predicted-vs-measured.

    clock = ActionClock(rank, device)
    clock.begin_step()
    out = clock.timed("F", "1F0", stage_forward, ...)   # each forward, backward, half, tie sum, all-reduce, optimizer
    events = clock.end_step()                                      # simulate.Event, ms from the step's start

The events are the simulator's own type, so a measured step is a
:class:`autopart.core.simulate.Timeline` like a predicted one: the same
trace writer and SVG draw both. On CUDA each action is bracketed by CUDA
events (no synchronisation inside the step; read after it), on CPU by
``time.perf_counter``. Nothing here knows the pipelining runtime: the stages
module hands its stages' methods to :meth:`ActionClock.timed`.

Note: ranks start their step clocks when they leave the same barrier, so
their timelines line up to within that barrier's skew (well under a
millisecond between local gloo processes).
"""
from __future__ import annotations

import time
from typing import Any, Callable, TypeVar

import torch

from autopart.core.simulate import Event

__all__ = ["ActionClock"]

T = TypeVar("T")


class ActionClock:
    """Times the actions of one rank, step by step."""

    def __init__(self, rank: int, device: torch.device) -> None:
        self.rank = rank
        self.cuda = device.type == "cuda"
        self._origin: Any = None
        self._marks: list[tuple[str, str, Any, Any]] = []
        self.step = 0
        """The training step under way (1-based; 0 before the first)."""
        self.doing = "starting"
        """What this rank last began: an action, a send or receive it posted, a barrier (a timeout says it)."""

    def _now(self) -> Any:
        if self.cuda:
            mark = torch.cuda.Event(enable_timing=True)
            mark.record()
            return mark
        return time.perf_counter()

    def _ms(self, mark: Any) -> float:
        if self.cuda:
            return float(self._origin.elapsed_time(mark))
        return (float(mark) - float(self._origin)) * 1e3

    def begin_step(self) -> None:
        self._origin = self._now()
        self._marks = []

    def timed(self, kind: str, action: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` and record it as ``action`` (``"1F0"``, ``"OPT"``) of ``kind`` (F, B, I, W; TIE, the tied
        gradients' sum with the other holders, which waits for the last of them; AR, the gradients' average over
        the data-parallel replicas, which waits for the slowest replica; OPT). ``kind`` LOSS, the loss the
        schedule computes on the last stage's output right after its forward, extends that forward (as the
        profile and the plan count the last stage's forward: with its loss)."""
        self.doing = f"running {action}"
        if self._origin is None:  # outside a timed step (a warm-up, a check): run it untimed
            return fn(*args, **kwargs)
        start = self._now()
        out = fn(*args, **kwargs)
        if kind != "LOSS":
            self._marks.append((kind, action, start, self._now()))
        elif self._marks and self._marks[-1][0] == "F":
            forward, name, began, _ = self._marks[-1]
            self._marks[-1] = (forward, name, began, self._now())
        return out

    def end_step(self) -> tuple[Event, ...]:
        """This step's actions, in ms from :meth:`begin_step` (waits for the device first)."""
        if self.cuda:
            torch.cuda.synchronize()
        events = tuple(Event(self.rank, action, kind, self._ms(start), self._ms(end))
                       for kind, action, start, end in self._marks)
        self._origin, self._marks = None, []
        return events

"""Pipeline schedules as data: for every rank, the ordered list of actions it runs.

    s = build_schedule("1F1B", num_ranks=4, microbatches=8)
    print(s.format())        # one column per rank, "1F0" = stage 1, forward, micro-batch 0
    s.to_csv("1f1b.csv")     # torch.distributed.pipelining's CSV layout: one row per rank

Pure (no torch). Names and the ``"1F0"`` notation are torch.distributed.pipelining's:
``F`` forward, ``B`` full backward, ``I`` backward for the input only, ``W``
backward for the weights only. Sends and receives are implied by the
dependencies (the simulator charges them); they are not listed.
"""
from __future__ import annotations

import csv
import functools
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from autopart.errors import AutopartError
from autopart.formats import schedule_kinds
from autopart.formats.atomic import write_atomic
from autopart.formats.schedule_kinds import canonical_schedule, stage_ranks

__all__ = ["Action", "Schedule", "build_schedule", "peak_in_flight"]


@dataclass(frozen=True, order=True)
class Action:
    stage: int
    kind: str
    microbatch: int

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.microbatch}"

    @staticmethod
    def parse(text: str) -> "Action":
        match = re.fullmatch(r"\s*(\d+)([FBIW])(\d+)\s*", text)
        if not match:
            raise AutopartError(f"action {text!r} is not like 1F0 (stage, F/B/I/W, micro-batch)")
        return Action(int(match.group(1)), match.group(2), int(match.group(3)))


@dataclass(frozen=True)
class Schedule:
    name: str
    num_ranks: int
    stages_per_rank: int
    microbatches: int
    orders: tuple[tuple[Action | None, ...], ...]
    """Per rank, the actions in the order that rank runs them (None: an idle slot)."""
    stage_rank: tuple[int, ...]
    """The rank that holds each stage."""

    @property
    def num_stages(self) -> int:
        return self.num_ranks * self.stages_per_rank

    def stages_of(self, rank: int) -> list[int]:
        return [s for s, r in enumerate(self.stage_rank) if r == rank]

    def peak_in_flight(self) -> tuple[int, ...]:
        """Per stage: the most micro-batches whose activations it holds at once.

        A micro-batch is held from its ``F`` until its ``B`` (or its ``W`` when
        the backward is split). A rank runs its actions one after another, so
        this follows from each rank's order alone, whatever the timing.
        """
        frees = "W" if any(a is not None and a.kind == "W" for order in self.orders for a in order) else "B"
        live = [0] * self.num_stages
        peak = [0] * self.num_stages
        for order in self.orders:
            for a in order:
                if a is not None and a.kind == "F":
                    live[a.stage] += 1
                    peak[a.stage] = max(peak[a.stage], live[a.stage])
                elif a is not None and a.kind == frees:
                    live[a.stage] -= 1
        return tuple(peak)

    def format(self) -> str:
        """A table: one column per rank, one row per step of its order."""
        width = max(len(self.orders[r]) for r in range(self.num_ranks))
        cells = [[str(a) if a is not None else "-" for a in order] + [""] * (width - len(order))
                 for order in self.orders]
        pad = max([len(c) for col in cells for c in col] + [6])
        lines = ["".join(f"rank {r}".ljust(pad + 2) for r in range(self.num_ranks)).rstrip()]
        for i in range(width):
            lines.append("".join(cells[r][i].ljust(pad + 2) for r in range(self.num_ranks)).rstrip())
        return "\n".join(lines)

    def csv_text(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        for order in self.orders:
            writer.writerow([str(a) if a is not None else "" for a in order])
        return out.getvalue()

    def to_csv(self, path: str | Path) -> Path:
        """One row per rank, one action per cell, as torch's ``_dump_csv`` writes a compute-only schedule."""
        text = self.csv_text()
        return write_atomic(path, lambda handle: handle.write(text.encode()))


def _gpipe(k: int, m: int) -> list[list[Action | None]]:
    orders: list[list[Action | None]] = []
    for r in range(k):
        order: list[Action | None] = [Action(r, "F", i) for i in range(m)]
        order += [Action(r, "B", i) for i in range(m)]
        orders.append(order)
    return orders


def _1f1b(k: int, m: int) -> list[list[Action | None]]:
    """Warm up with min(M, K - r) forwards, then alternate backward and forward, then drain."""
    orders = []
    for r in range(k):
        warmup = min(m, k - r)
        order: list[Action | None] = [Action(r, "F", i) for i in range(warmup)]
        f = warmup
        for b in range(m):
            order.append(Action(r, "B", b))
            if f < m:
                order.append(Action(r, "F", f))
                f += 1
        orders.append(order)
    return orders


def _interleaved_1f1b(k: int, m: int, v: int) -> list[list[Action | None]]:
    """torch's ScheduleInterleaved1F1B order (Megatron's interleaving, rounds of K micro-batches).

    Note: ported from ``_get_1f1b_rank_ops`` in torch.distributed.pipelining
    (2.13) so that what we simulate is what the runtime runs; a test compares
    the two orders action by action.
    """
    rounds = max(1, m // k)
    per_round = m // rounds
    if m % rounds:
        raise AutopartError(f"Interleaved1F1B needs micro-batches to be a multiple of {rounds} "
                            f"(= max(1, M // ranks)), got {m}")
    orders: list[list[Action | None]] = []
    for rank in range(k):
        warmup = min((v - 1) * per_round + 2 * (k - 1 - rank), m * v)
        fwd_bwd = m * v - warmup
        cooldown = warmup

        def f_stage(step: int, rank: int = rank) -> int:
            return ((step // per_round) % v) * k + rank

        def b_stage(step: int, rank: int = rank, warmup: int = warmup) -> int:
            return (v - 1 - ((step - warmup) // per_round) % v) * k + rank

        fwd: dict[int, int] = {}
        bwd: dict[int, int] = {}
        ops: list[Action | None] = [None] * rank
        post_warmup = (v * k + 2 * (k - 1 - rank)) - (warmup + rank)

        def take(counter: dict[int, int], stage: int) -> int:
            counter[stage] = counter.get(stage, 0) + 1
            return counter[stage] - 1

        for op in range(warmup + fwd_bwd + cooldown):
            if op < warmup:
                st = f_stage(op)
                ops.append(Action(st, "F", take(fwd, st)))
                if op == warmup - 1:
                    ops.extend([None] * post_warmup)
            elif op < warmup + fwd_bwd:
                st = f_stage(op)
                ops.append(Action(st, "F", take(fwd, st)))
                st = b_stage(op)
                ops.append(Action(st, "B", take(bwd, st)))
            else:
                ops.append(None)
                st = b_stage(op)
                ops.append(Action(st, "B", take(bwd, st)))
        orders.append(ops)
    return orders


def _zbv(k: int, m: int) -> list[list[Action | None]]:
    """torch's ScheduleZBVZeroBubble order: rank r holds stages r and 2K-1-r; backward split into I and W.

    Note: ported from ``ScheduleZBVZeroBubble._calculate_single_rank_operations``
    (torch 2.13), including its planning for max(2K-1, M) micro-batches and
    dropping the ones that do not exist.
    """
    n = max(2 * k - 1, m)
    orders: list[list[Action | None]] = []
    for rank in range(k):
        ops: list[Action | None] = [None] * rank
        c0, c1 = rank, 2 * k - 1 - rank
        f0 = f1 = b0 = b1 = 0
        for _ in range(2 * (k - rank) - 1):
            ops.append(Action(c0, "F", f0))
            f0 += 1
        for _ in range(rank):
            ops += [Action(c1, "F", f1), Action(c0, "F", f0)]
            f1 += 1
            f0 += 1
        for _ in range(k - rank):
            ops += [Action(c1, "F", f1), Action(c1, "I", b1), Action(c1, "W", b1)]
            f1 += 1
            b1 += 1
        while f1 < f0 or f0 < n:
            if f0 < n:
                ops.append(Action(c0, "F", f0))
                f0 += 1
            ops += [Action(c0, "I", b0), Action(c0, "W", b0), Action(c1, "F", f1), Action(c1, "I", b1),
                    Action(c1, "W", b1)]
            b0 += 1
            f1 += 1
            b1 += 1
        w0, w1 = b0, b1
        for _ in range(rank):
            ops += [Action(c0, "I", b0), Action(c1, "I", b1)]
            b0 += 1
            b1 += 1
        for _ in range(k - rank):
            ops += [Action(c0, "I", b0), Action(c0, "W", w0)]
            b0 += 1
            w0 += 1
        ops += [Action(c1, "W", w) for w in range(w1, b1)]
        ops += [Action(c0, "W", w) for w in range(w0, b0)]
        orders.append([a if a is not None and a.microbatch < m else None for a in ops])
    return orders


_BUILDERS: dict[str, Callable[[int, int, int], list[list[Action | None]]]] = {
    "GPipe": lambda k, m, v: list(_gpipe(k, m)),
    "1F1B": lambda k, m, v: list(_1f1b(k, m)),
    "Interleaved1F1B": _interleaved_1f1b,
    "ZBVZeroBubble": lambda k, m, v: _zbv(k, m),
}


@functools.lru_cache(maxsize=8)
def build_schedule(name: str, num_ranks: int, microbatches: int, stages_per_rank: int = 1) -> Schedule:
    """The action order of schedule ``name`` for ``num_ranks`` ranks and ``microbatches`` micro-batches (the
    last 8 cached: a Schedule is immutable, and a joint search asks for each one several times)."""
    name = canonical_schedule(name)
    if num_ranks < 1:
        raise AutopartError(f"need at least 1 rank, got {num_ranks}")
    schedule_kinds.check_microbatches(microbatches)
    fixed = schedule_kinds.stages_per_rank(name, stages_per_rank)
    if fixed != stages_per_rank:
        what = "exactly 2 stages per rank (a V)" if fixed == 2 else "one stage per rank"
        raise AutopartError(f"{name} runs {what}, not {stages_per_rank}")
    if name == "1F1B" and microbatches < num_ranks:
        raise AutopartError(f"{name} needs at least as many micro-batches as ranks: {microbatches} < {num_ranks}")
    if stages_per_rank < 1:
        raise AutopartError(f"stages per rank must be >= 1, got {stages_per_rank}")
    orders = _BUILDERS[name](num_ranks, microbatches, stages_per_rank)
    return Schedule(name=name, num_ranks=num_ranks, stages_per_rank=stages_per_rank, microbatches=microbatches,
                    orders=tuple(tuple(o) for o in orders),
                    stage_rank=stage_ranks(name, num_ranks, stages_per_rank))


@functools.lru_cache(maxsize=256)
def peak_in_flight(schedule: str, num_ranks: int, microbatches: int, per_rank: int) -> tuple[int, ...]:
    """:meth:`Schedule.peak_in_flight` of the named schedule (cached: the partitioner asks often)."""
    return build_schedule(schedule, num_ranks, microbatches, per_rank).peak_in_flight()

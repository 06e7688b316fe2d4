"""Event simulation of a pipeline schedule: step time, idle time and memory per rank.

    sim = simulate(schedule, stage_costs)
    sim.step_ms, sim.bubble_fraction, sim.peak_memory_bytes, sim.events

Pure (no torch). Each rank runs its actions in the order the schedule lists
them; an action starts when its rank is free and its inputs have arrived:

- ``F`` of stage s, micro-batch m: after ``F`` of stage s-1, m (and its send);
- ``B`` (or ``I``, the input-gradient half) of s, m: after ``F`` of s, m and
  after ``B``/``I`` of s+1, m (and its send);
- ``W`` (the weight-gradient half) of s, m: after ``I`` of s, m.

Note: as in the partitioner's cost model, a send to another rank keeps the
sender busy for ``output_bytes / bandwidth + latency`` right after the action
that produced the tensor (a stage on the same rank receives for free). Like
torch.distributed.pipelining's own dry run, this does not model compute and
communication overlapping, nor contention between links.

Memory: a stage's parameters, gradients and optimizer state are always
resident; activations of a micro-batch are allocated when its ``F`` starts
and freed when its ``B`` (or ``W``) ends; a recomputing stage keeps only its
input per micro-batch and holds the full activations during the backward.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from autopart.core.schedules import Action, Schedule
from autopart.errors import AutopartError
from autopart.formats.stage import StageCost

__all__ = ["Event", "Simulation", "simulate", "closed_form_step_ms"]


INPUT_GRAD_SHARE = 0.5
"""Share of a backward that is the input gradient (``I``) when a schedule splits it from ``W``.

Note: an assumption, not a measurement: profiles time the whole backward.
"""


@dataclass(frozen=True)
class Event:
    rank: int
    action: str
    """``"1F0"``-style action, or ``"SEND_F 1F0"`` / ``"SEND_B 1B0"`` for a send after it."""
    kind: str
    """F, B, I, W, SEND or OPT (the optimizer step)."""
    start_ms: float
    end_ms: float


@dataclass(frozen=True)
class Simulation:
    schedule: str
    num_ranks: int
    microbatches: int
    step_ms: float
    busy_ms: tuple[float, ...]
    """Per rank: time computing or sending."""
    peak_memory_bytes: tuple[int, ...]
    """Per rank: static bytes plus the peak of live activations."""
    peak_activation_bytes: tuple[int, ...]
    peak_in_flight: tuple[int, ...]
    """Per stage: the most micro-batches whose activations it held at once."""
    events: tuple[Event, ...]

    @property
    def bubble_fractions(self) -> tuple[float, ...]:
        return tuple(1 - busy / self.step_ms if self.step_ms > 0 else 0.0 for busy in self.busy_ms)

    @property
    def bubble_fraction(self) -> float:
        """Idle share of all ranks' time in one step."""
        total = self.step_ms * self.num_ranks
        return 1 - sum(self.busy_ms) / total if total > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        return {"schedule": self.schedule, "num_ranks": self.num_ranks, "microbatches": self.microbatches,
                "step_ms": self.step_ms, "bubble_fraction": self.bubble_fraction,
                "bubble_fraction_per_rank": list(self.bubble_fractions),
                "peak_memory_bytes": list(self.peak_memory_bytes),
                "peak_activation_bytes": list(self.peak_activation_bytes),
                "peak_in_flight": list(self.peak_in_flight)}


def _duration(kind: str, cost: StageCost) -> float:
    if kind == "F":
        return cost.forward_ms
    if kind == "B":
        return cost.backward_ms
    if kind == "I":
        return cost.backward_ms * INPUT_GRAD_SHARE
    return cost.backward_ms * (1 - INPUT_GRAD_SHARE)


def simulate(schedule: Schedule, stages: Sequence[StageCost]) -> Simulation:
    """Run ``schedule`` with per-stage costs ``stages`` (one entry per stage, in pipeline order)."""
    if len(stages) != schedule.num_stages:
        raise AutopartError(f"schedule {schedule.name} has {schedule.num_stages} stages, costs given for {len(stages)}")
    last = schedule.num_stages - 1
    rank_of = schedule.stage_rank
    done: dict[tuple[int, str, int], float] = {}  # when an action's result is available to its consumer
    end_of: dict[tuple[int, str, int], float] = {}  # when an action ended on its own rank
    clock = [0.0] * schedule.num_ranks
    busy = [0.0] * schedule.num_ranks
    heads = [0] * schedule.num_ranks
    events: list[Event] = []
    orders = [[a for a in order if a is not None] for order in schedule.orders]
    remaining = sum(len(o) for o in orders)

    def deps(a: Action) -> list[tuple[int, str, int]] | None:
        s, m = a.stage, a.microbatch
        if a.kind == "F":
            return [(s - 1, "F", m)] if s > 0 else []
        if a.kind in ("B", "I"):
            need = [(s, "F", m)]
            if s < last:
                need.append((s + 1, "GRAD", m))
            return need
        if a.kind == "W":
            return [(s, "I", m)]
        return None

    while remaining:
        progress = False
        for r, order in enumerate(orders):
            while heads[r] < len(order):
                a = order[heads[r]]
                need = deps(a)
                if need is None:
                    raise AutopartError(f"unknown action kind in {a}")
                if any(key not in done for key in need):
                    break
                cost = stages[a.stage]
                start = max([clock[r]] + [done[key] for key in need])
                end = start + _duration(a.kind, cost)
                events.append(Event(r, str(a), a.kind, start, end))
                busy[r] += end - start
                end_of[(a.stage, a.kind, a.microbatch)] = end
                available = end
                send = 0.0
                if a.kind == "F" and a.stage < last and rank_of[a.stage + 1] != r:
                    send = cost.send_forward_ms
                elif a.kind in ("B", "I") and a.stage > 0 and rank_of[a.stage - 1] != r:
                    send = cost.send_backward_ms
                if send > 0:
                    events.append(Event(r, f"SEND_{'F' if a.kind == 'F' else 'B'} {a}", "SEND", end, end + send))
                    busy[r] += send
                    available = end + send
                clock[r] = available
                key = (a.stage, a.kind, a.microbatch)
                done[key] = available if a.kind == "F" else end
                if a.kind in ("B", "I"):
                    done[(a.stage, "GRAD", a.microbatch)] = available
                    if a.kind == "B":
                        done[(a.stage, "I", a.microbatch)] = end
                heads[r] += 1
                remaining -= 1
                progress = True
        if not progress:
            stuck = [f"rank {r} waits at {orders[r][heads[r]]}" for r in range(len(orders)) if heads[r] < len(orders[r])]
            raise AutopartError(f"schedule {schedule.name} deadlocks: {'; '.join(stuck)}")
    for r in range(schedule.num_ranks):  # each rank steps its optimizer once its gradients are complete
        opt = sum(stages[s].optimizer_ms for s in range(schedule.num_stages) if rank_of[s] == r)
        if opt > 0:
            events.append(Event(r, "OPT", "OPT", clock[r], clock[r] + opt))
            busy[r] += opt
            clock[r] += opt
    step = max(clock) if clock else 0.0
    peak_mem, peak_act, peak_flight = _memory(schedule, stages, events)
    return Simulation(schedule=schedule.name, num_ranks=schedule.num_ranks, microbatches=schedule.microbatches,
                      step_ms=step, busy_ms=tuple(busy), peak_memory_bytes=peak_mem, peak_activation_bytes=peak_act,
                      peak_in_flight=peak_flight, events=tuple(sorted(events, key=lambda e: (e.rank, e.start_ms))))


def _memory(schedule: Schedule, stages: Sequence[StageCost], events: Sequence[Event]
            ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Peak bytes per rank and peak in-flight micro-batches per stage, from the events."""
    split = any(e.kind == "W" for e in events)
    changes: list[list[tuple[float, int, int, int]]] = [[] for _ in range(schedule.num_ranks)]
    for e in events:
        if e.kind in ("SEND", "OPT"):
            continue
        action = Action.parse(e.action)
        cost = stages[action.stage]
        frees_at = "W" if split else "B"
        if e.kind == "F":
            changes[e.rank].append((e.start_ms, 1, cost.activation_bytes, action.stage))
        if e.kind == frees_at:
            changes[e.rank].append((e.end_ms, 0, -cost.activation_bytes, -action.stage - 1))
        if e.kind in ("B", "I") and cost.backward_extra_bytes:
            changes[e.rank].append((e.start_ms, 1, cost.backward_extra_bytes, schedule.num_stages))
            changes[e.rank].append((e.end_ms, 0, -cost.backward_extra_bytes, schedule.num_stages))
    static = [0] * schedule.num_ranks
    for s, cost in enumerate(stages):
        static[schedule.stage_rank[s]] += cost.static_bytes
    peak_act = []
    flight = [0] * schedule.num_stages
    peak_flight = [0] * schedule.num_stages
    for rank_changes in changes:
        live = best = 0
        for _, _, delta, tag in sorted(rank_changes):  # frees (0) before allocations (1) at equal times
            live += delta
            best = max(best, live)
            if 0 <= tag < schedule.num_stages:
                flight[tag] += 1
                peak_flight[tag] = max(peak_flight[tag], flight[tag])
            elif tag < 0:
                flight[-tag - 1] -= 1
        peak_act.append(best)
    peak_mem = tuple(s + a for s, a in zip(static, peak_act))
    return peak_mem, tuple(peak_act), tuple(peak_flight)


def closed_form_step_ms(stage_ms: Sequence[float], microbatches: int) -> tuple[float, float]:
    """(step time, bubble fraction) of GPipe/1F1B with these per-micro-batch stage times, in closed form.

    The first micro-batch passes every stage (fill and drain), the other M - 1
    follow at the pace of the slowest: ``Σ t_s + (M - 1) max t_s``. Exact for
    equal stages, where the tests check :func:`simulate` against it.
    """
    step = sum(stage_ms) + (microbatches - 1) * max(stage_ms)
    busy = microbatches * sum(stage_ms)
    bubble = 1 - busy / (len(stage_ms) * step) if step > 0 else 0.0
    return step, bubble

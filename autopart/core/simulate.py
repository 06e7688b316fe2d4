"""Event simulation of a pipeline schedule: step time, idle time and memory per rank.

    sim = simulate(schedule, stage_costs)
    sim.step_ms, sim.bubble_fraction, sim.peak_memory_bytes, sim.events

Pure (no torch). Each rank runs its actions in the order the schedule lists
them; an action starts when its rank is free and its inputs have arrived:

- ``F`` of stage s, micro-batch m: after ``F`` of stage s-1, m (and its send);
- ``B`` (or ``I``, the input-gradient half) of s, m: after ``F`` of s, m and
  after ``B``/``I`` of s+1, m (and its send);
- ``W`` (the weight-gradient half) of s, m: after ``I`` of s, m.

After its last action, each rank holding a copy of a tied parameter that
another rank also holds sums its gradient with theirs (``TIE``: it starts
when the last holder is done, lasts the stage costs' ``tie_ms``), then steps
its optimizer (``OPT``). :func:`step_ms_batch` and :func:`critical_path`
(the split search within one schedule) leave the ties out: they rank a
schedule's splits by their step without the tied gradients' sums. That is
not exact: which ranks hold a tie's copies, and so whether and how long it
is summed, depends on the split (a tie between the first and the last block
always spans the first and the last rank; one between other blocks may or
may not cross ranks), and the sum delays only its holders' optimizer steps,
so what it adds to the step depends on how their finish and optimizer time
compare with the other ranks'. The plan's predicted step (:func:`simulate`
of the chosen split), and with it the choice between configurations, the
runners-up and the noise-band choice, includes it.

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

import dataclasses
import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import numpy.typing as npt

from autopart.core.schedules import Action, Schedule
from autopart.errors import AutopartError
from autopart.formats.stage import StageCost

__all__ = ["Event", "Timeline", "Simulation", "simulate", "closed_form_step_ms", "StageTimes", "step_ms_batch", "compile_schedule",
           "Program", "critical_path", "STAGE_TIME_FIELDS", "tie_sums"]

Floats = npt.NDArray[np.float64]


INPUT_GRAD_SHARE = 0.5
"""Share of a backward that is the input gradient (``I``) when a schedule splits it from ``W``, for
stages whose profile did not measure it (``StageCost.input_grad_ms`` None: profiles from before it was)."""


@dataclass(frozen=True)
class Event:
    rank: int
    action: str
    """``"1F0"``-style action, or ``"SEND_F 1F0"`` / ``"SEND_B 1B0"`` for a send after it."""
    kind: str
    """F, B, I, W, SEND, TIE (a tied parameter's gradient summed between the ranks holding copies) or OPT
    (the optimizer step)."""
    start_ms: float
    end_ms: float


@dataclass(frozen=True)
class Timeline:
    """One step, action by action on every rank: what the simulator predicts or a training run measured."""

    schedule: str
    num_ranks: int
    microbatches: int
    step_ms: float
    events: tuple[Event, ...]

    @property
    def busy_ms(self) -> tuple[float, ...]:
        """Per rank: time computing, sending or stepping the optimizer."""
        busy = [0.0] * self.num_ranks
        for e in self.events:
            busy[e.rank] += e.end_ms - e.start_ms
        return tuple(busy)

    @property
    def bubble_fractions(self) -> tuple[float, ...]:
        return tuple(1 - busy / self.step_ms if self.step_ms > 0 else 0.0 for busy in self.busy_ms)

    @property
    def bubble_fraction(self) -> float:
        """Idle share of all ranks' time in one step."""
        total = self.step_ms * self.num_ranks
        return 1 - sum(self.busy_ms) / total if total > 0 else 0.0


@dataclass(frozen=True)
class Simulation(Timeline):
    """A predicted step: its timeline and the memory it holds."""

    peak_memory_bytes: tuple[int, ...] = ()
    """Per rank: static bytes plus the peak of live activations."""
    peak_activation_bytes: tuple[int, ...] = ()
    peak_in_flight: tuple[int, ...] = ()
    """Per stage: the most micro-batches whose activations it held at once."""
    tie_ms: tuple[float, ...] = ()
    """Per rank: the time of its TIE events (tied gradients summed with the other holders' copies)."""

    def to_dict(self) -> dict[str, object]:
        return {"schedule": self.schedule, "num_ranks": self.num_ranks, "microbatches": self.microbatches,
                "step_ms": self.step_ms, "bubble_fraction": self.bubble_fraction,
                "bubble_fraction_per_rank": list(self.bubble_fractions),
                "peak_memory_bytes": list(self.peak_memory_bytes),
                "peak_activation_bytes": list(self.peak_activation_bytes),
                "peak_in_flight": list(self.peak_in_flight), "tie_ms": list(self.tie_ms)}


@dataclass(frozen=True)
class _Step:
    """One action of a compiled schedule: where it runs, what it waits for, what it makes available."""

    rank: int
    action: Action
    waits: tuple[int, ...]
    """Slots (see :class:`Program`) that must be filled before it starts."""
    send: str
    """"F" or "B" when a send to another rank follows it, else ""."""
    sent_slot: int
    """The slot it fills with the time after its send (-1: none)."""
    end_slot: int
    """The slot it fills with its end (-1: none)."""


Ints = npt.NDArray[np.int64]


@dataclass(frozen=True, eq=False)
class Program:
    """A schedule compiled once: its actions in an order that respects every rank's order and every
    dependency, so that any costs run through it in one pass (:func:`simulate`, :func:`step_ms_batch`).

    Slot ``(stage * 3 + kind) * M + micro-batch`` holds when a result is
    ready: kind 0 a forward's output, 1 a backward's input gradient (after
    its send), 2 the end of the input-gradient half; the extra last slot is
    always 0 (a missing wait). The columns describe step i for the array
    passes: duration rows index ``F, B, I, W, send forward, send backward``
    blocks of ``stages`` rows each, then a zero row.
    """

    schedule: Schedule
    steps: tuple[_Step, ...]
    slots: int
    rank: Ints
    waits: Ints
    """(steps, 2): the slots each step waits for, padded with the zero slot."""
    duration_row: Ints
    send_row: Ints
    sent_slot: Ints
    end_slot: Ints
    previous: Ints
    """The step before it on its rank (-1: its rank's first)."""
    last_of_rank: tuple[int, ...]
    maker: Ints
    """Per slot, the step that fills it."""
    waves: tuple[tuple[Ints, ...], ...]
    """Steps grouped so that no step of a group waits for another of it: per group, the columns
    (indices, rank, first wait, second wait, duration row, send row, sent slot, end slot)."""


_KINDS = {"F": 0, "GRAD": 1, "I": 2}
_ROWS = {"F": 0, "B": 1, "I": 2, "W": 3}


@functools.lru_cache(maxsize=8)
def compile_schedule(schedule: Schedule) -> Program:
    """The dependency order of ``schedule``'s actions (raises if the schedule deadlocks). A caller that runs
    many costs through one schedule compiles it once and passes the :class:`Program` on; the last 8
    programs are cached (a joint search splits and then simulates each configuration: the same schedule;
    a program of 16 ranks x 2 stages x 128 micro-batches holds about 12,000 steps)."""
    return _columns(schedule, _order(schedule))


def _order(schedule: Schedule) -> list[_Step]:
    """Every rank's actions, interleaved in an order where each runs after what it waits for."""
    last = schedule.num_stages - 1
    m_count = schedule.microbatches
    rank_of = schedule.stage_rank

    def slot(stage: int, kind: str, microbatch: int) -> int:
        return (stage * 3 + _KINDS[kind]) * m_count + microbatch

    filled = bytearray(3 * schedule.num_stages * m_count)
    heads = [0] * schedule.num_ranks
    orders = [[a for a in order if a is not None] for order in schedule.orders]
    remaining = sum(len(o) for o in orders)
    steps: list[_Step] = []
    while remaining:
        progress = False
        for r, order in enumerate(orders):
            while heads[r] < len(order):
                a = order[heads[r]]
                s, m = a.stage, a.microbatch
                if a.kind == "F":
                    waits = [slot(s - 1, "F", m)] if s > 0 else []
                elif a.kind in ("B", "I"):
                    waits = [slot(s, "F", m)] + ([slot(s + 1, "GRAD", m)] if s < last else [])
                elif a.kind == "W":
                    waits = [slot(s, "I", m)]
                else:
                    raise AutopartError(f"unknown action kind in {a}")
                if not all(filled[w] for w in waits):
                    break
                send = ""
                if a.kind == "F" and s < last and rank_of[s + 1] != r:
                    send = "F"
                elif a.kind in ("B", "I") and s > 0 and rank_of[s - 1] != r:
                    send = "B"
                sent_slot = slot(s, "F", m) if a.kind == "F" else slot(s, "GRAD", m) if a.kind != "W" else -1
                end_slot = slot(s, "I", m) if a.kind in ("B", "I") else -1
                for f in (sent_slot, end_slot):
                    if f >= 0:
                        filled[f] = 1
                steps.append(_Step(r, a, tuple(waits), send, sent_slot, end_slot))
                heads[r] += 1
                remaining -= 1
                progress = True
        if not progress:
            stuck = [f"rank {r} waits at {orders[r][heads[r]]}" for r in range(len(orders)) if heads[r] < len(orders[r])]
            raise AutopartError(f"schedule {schedule.name} deadlocks: {'; '.join(stuck)}")
    return steps


def _columns(schedule: Schedule, steps: list[_Step]) -> Program:
    """The steps as index arrays, and grouped by depth: one more than every step a step waits for, the
    step before it on its rank included."""
    k = schedule.num_stages
    slots = 3 * k * schedule.microbatches
    zero_row = 6 * k
    maker = np.full(slots + 1, -1, dtype=np.int64)
    slot_depth = [0] * (slots + 1)
    rank_depth = [0] * schedule.num_ranks
    previous = [-1] * len(steps)
    last_of_rank = [-1] * schedule.num_ranks
    depth = [0] * len(steps)
    for i, st in enumerate(steps):
        d = max([rank_depth[st.rank]] + [slot_depth[w] + 1 for w in st.waits])
        depth[i], rank_depth[st.rank] = d, d + 1
        previous[i], last_of_rank[st.rank] = last_of_rank[st.rank], i
        for f in (st.sent_slot, st.end_slot):
            if f >= 0:
                slot_depth[f], maker[f] = d, i

    def column(values: list[int]) -> Ints:
        return np.array(values, dtype=np.int64)
    by_depth = np.argsort(column(depth), kind="stable")
    bounds = np.flatnonzero(np.diff(column(depth)[by_depth])) + 1
    program = Program(
        schedule=schedule, steps=tuple(steps), slots=slots, rank=column([st.rank for st in steps]),
        waits=np.array([list(st.waits) + [slots] * (2 - len(st.waits)) for st in steps], dtype=np.int64
                       ).reshape(len(steps), 2),
        duration_row=column([_ROWS[st.action.kind] * k + st.action.stage for st in steps]),
        send_row=column([(4 if st.send == "F" else 5) * k + st.action.stage if st.send else zero_row
                         for st in steps]),
        sent_slot=column([st.sent_slot if st.sent_slot >= 0 else slots for st in steps]),
        end_slot=column([st.end_slot if st.end_slot >= 0 else slots for st in steps]),
        previous=column(previous), last_of_rank=tuple(last_of_rank), maker=maker, waves=())
    cols = (program.rank, program.waits[:, 0], program.waits[:, 1], program.duration_row, program.send_row,
            program.sent_slot, program.end_slot)
    waves = tuple((wave,) + tuple(c[wave] for c in cols) for wave in np.split(by_depth, bounds))
    return dataclasses.replace(program, waves=waves)


def simulate(schedule: Schedule | Program, stages: Sequence[StageCost]) -> Simulation:
    """Run ``schedule`` (or its compiled :class:`Program`) with per-stage costs ``stages`` (one entry per
    stage, in pipeline order)."""
    program = schedule if isinstance(schedule, Program) else compile_schedule(schedule)
    if len(stages) != program.schedule.num_stages:
        raise AutopartError(f"schedule {program.schedule.name} has {program.schedule.num_stages} stages, costs "
                            f"given for {len(stages)}")
    return _simulate(program, tuple(stages))


@functools.lru_cache(maxsize=4)
def _simulate(program: Program, stages: tuple[StageCost, ...]) -> Simulation:
    """:func:`simulate`, the last 4 cached (a plan is simulated when it is made and again when a joint
    search reads its timeline; a Simulation is immutable)."""
    schedule = program.schedule
    kept, _ = _run(program, StageTimes.of([stages]), keep=True)  # the same pass step_ms_batch makes
    assert kept is not None
    start, end, available = (column[:, 0].tolist() for column in kept)
    events: list[Event] = []
    actions: dict[int, Action] = {}  # each compute event's action, by the event's id (no re-parsing)
    for i, step in enumerate(program.steps):
        r, a = step.rank, step.action
        events.append(Event(r, str(a), a.kind, start[i], end[i]))
        actions[id(events[-1])] = a
        send = stages[a.stage].send_forward_ms if step.send == "F" else stages[a.stage].send_backward_ms
        if step.send and send > 0:
            events.append(Event(r, f"SEND_{step.send} {a}", "SEND", end[i], available[i]))
    clock = [available[last] if last >= 0 else 0.0 for last in program.last_of_rank]
    tie = [0.0] * schedule.num_ranks
    for name, holders, ms in tie_sums(schedule.stage_rank, stages):
        start = max(clock[r] for r in holders)  # the all-reduce starts when the last holder joins it
        for r in holders:
            events.append(Event(r, f"TIE {name}", "TIE", start, start + ms))
            clock[r], tie[r] = start + ms, tie[r] + ms
    for r in range(schedule.num_ranks):  # each rank steps its optimizer once its gradients are complete
        opt = sum(stages[s].optimizer_ms for s in schedule.stages_of(r))
        if opt > 0:
            events.append(Event(r, "OPT", "OPT", clock[r], clock[r] + opt))
            clock[r] += opt
    step_ms = max(clock) if clock else 0.0
    peak_mem, peak_act, peak_flight = _memory(schedule, stages, events, actions)
    return Simulation(schedule=schedule.name, num_ranks=schedule.num_ranks, microbatches=schedule.microbatches,
                      step_ms=step_ms, peak_memory_bytes=peak_mem, peak_activation_bytes=peak_act,
                      peak_in_flight=peak_flight, events=tuple(sorted(events, key=lambda e: (e.rank, e.start_ms))),
                      tie_ms=tuple(tie))


def tie_sums(stage_rank: Sequence[int], stages: Sequence[StageCost]) -> list[tuple[str, tuple[int, ...], float]]:
    """(tie, its holder ranks, ms) of every tied parameter whose copies are on more than one rank, in the order
    ``autopart train`` sums them (by name): :attr:`StageCost.tie_ms` of the stages holding a copy (the longest,
    should they differ)."""
    holders: dict[str, set[int]] = {}
    longest: dict[str, float] = {}
    for s, cost in enumerate(stages):
        for name, ms in cost.tie_ms:
            holders.setdefault(name, set()).add(stage_rank[s])
            longest[name] = max(longest.get(name, 0.0), ms)
    return [(name, tuple(sorted(ranks)), longest[name]) for name, ranks in sorted(holders.items())
            if len(ranks) > 1 and longest[name] > 0]


STAGE_TIME_FIELDS = ("forward_ms", "backward_ms", "send_forward_ms", "send_backward_ms", "optimizer_ms", "overhead_ms",
                     "input_grad_ms", "weight_grad_ms")


@dataclass(frozen=True, eq=False)
class StageTimes:
    """What the step time depends on, for many stages at once: arrays of one shape, (candidates, stages)
    for :func:`step_ms_batch`."""

    forward_ms: Floats
    backward_ms: Floats
    send_forward_ms: Floats
    send_backward_ms: Floats
    optimizer_ms: Floats
    overhead_ms: Floats
    """Added to every forward and backward action (:attr:`StageCost.overhead_ms`)."""
    input_grad_ms: Floats
    """The input-gradient half of the backward (``I``)."""
    weight_grad_ms: Floats
    """The weight-gradient half (``W``): measured, or the rest of the backward."""

    @property
    def time_ms(self) -> Floats:
        """As :attr:`StageCost.time_ms`: compute and both sends."""
        out: Floats = self.forward_ms + self.backward_ms + self.send_forward_ms + self.send_backward_ms
        return out

    @staticmethod
    def of(splits: Sequence[Sequence[StageCost]]) -> "StageTimes":
        """(candidates, stages) arrays from candidate splits given as lists of :class:`StageCost`."""
        def value(c: StageCost, name: str) -> float:
            if name == "input_grad_ms" and c.input_grad_ms is None:
                return c.backward_ms * INPUT_GRAD_SHARE
            if name == "weight_grad_ms" and c.weight_grad_ms is None:
                return c.backward_ms - value(c, "input_grad_ms")
            return float(getattr(c, name))

        def arr(name: str) -> Floats:
            return np.array([[value(c, name) for c in split] for split in splits], dtype=np.float64)
        return StageTimes(*(arr(name) for name in STAGE_TIME_FIELDS))

    @staticmethod
    def stack(stages: Sequence["StageTimes"]) -> "StageTimes":
        """(candidates, stages) arrays from one (candidates,) entry per stage."""
        def arr(name: str) -> Floats:
            return np.stack([getattr(t, name) for t in stages], axis=1)
        return StageTimes(*(arr(name) for name in STAGE_TIME_FIELDS))


def _table(costs: StageTimes) -> Floats:
    """The duration rows of :class:`Program` for each candidate: (6 stages + 1, candidates)."""
    b, o, i, w = costs.backward_ms.T, costs.overhead_ms.T, costs.input_grad_ms.T, costs.weight_grad_ms.T
    count = b.shape[1]
    return np.concatenate([costs.forward_ms.T + o, b + o, i + o, w + o,
                           costs.send_forward_ms.T, costs.send_backward_ms.T, np.zeros((1, count))])


def _run(program: Program, costs: StageTimes, keep: bool
         ) -> tuple[tuple[Floats, Floats, Floats] | None, Floats]:
    """Each rank's finish with its optimizer step (ranks, candidates), and with ``keep`` every step's
    start, end and end after its send (steps, candidates); wave by wave, about 2(M + K) array operations
    for 1F1B."""
    schedule = program.schedule
    count, k = costs.forward_ms.shape
    if k != schedule.num_stages:
        raise AutopartError(f"schedule {schedule.name} has {schedule.num_stages} stages, costs given for {k}")
    table = _table(costs)
    n = len(program.steps)
    kept = (np.zeros((n, count)), np.zeros((n, count)), np.zeros((n, count))) if keep else None
    done = np.zeros((program.slots + 1, count))
    clock = np.zeros((schedule.num_ranks, count))
    for index, ranks, wait0, wait1, rows, send_rows, sent_slots, end_slots in program.waves:
        start = np.maximum(clock[ranks], np.maximum(done[wait0], done[wait1]))
        end = start + table[rows]
        available = end + table[send_rows]
        clock[ranks] = available
        done[sent_slots] = available
        done[end_slots] = end
        done[-1] = 0.0
        if kept is not None:
            kept[0][index], kept[1][index], kept[2][index] = start, end, available
    opt = costs.optimizer_ms.T
    for s in range(k):
        clock[schedule.stage_rank[s]] += opt[s]
    return kept, clock


def step_ms_batch(program: Program, costs: StageTimes) -> Floats:
    """The step time :func:`simulate` gives, for many candidate splits at once: ``costs`` arrays are
    (candidates, stages); ``program``: the schedule, compiled (:func:`compile_schedule`)."""
    _, finish = _run(program, costs, keep=False)
    out: Floats = finish.max(axis=0)
    return out


def critical_path(program: Program, costs: StageTimes) -> tuple[float, StageTimes]:
    """(step, how often a critical path charges each stage's costs) for one split (arrays of one row).

    The step is a longest path through the schedule's actions, so for any other
    costs ``c`` the step is at least ``Σ counts × c`` (the same path, repriced):
    the partitioner uses this to skip moves that cannot help. ``program``: the schedule, compiled.
    """
    schedule = program.schedule
    kept, clock = _run(program, costs, keep=True)
    assert kept is not None
    end, available, finish = kept[1][:, 0], kept[2][:, 0], clock[:, 0]
    k = schedule.num_stages
    last = int(np.argmax(finish))
    counts = {name: np.zeros((1, k)) for name in STAGE_TIME_FIELDS}
    for s in schedule.stages_of(last):
        counts["optimizer_ms"][0, s] = 1.0
    index, sent = program.last_of_rank[last], True
    while index >= 0:
        step = program.steps[index]
        stage = step.action.stage
        counts["overhead_ms"][0, stage] += 1
        kind = step.action.kind
        if kind == "F":
            counts["forward_ms"][0, stage] += 1
        elif kind == "I":
            counts["input_grad_ms"][0, stage] += 1
        elif kind == "W":
            counts["weight_grad_ms"][0, stage] += 1
        else:
            counts["backward_ms"][0, stage] += 1
        if step.send and sent:
            counts["send_forward_ms" if step.send == "F" else "send_backward_ms"][0, stage] += 1
        # what it waited for: the step before it on its rank (after that one's send), or a slot's maker
        by, by_sent, when = int(program.previous[index]), True, 0.0
        if by >= 0:
            when = float(available[by])
        for w in step.waits:
            m = int(program.maker[w])
            after_send = w == int(program.sent_slot[m])
            t = float(available[m]) if after_send else float(end[m])
            if t > when:
                by, by_sent, when = m, after_send, t
        index, sent = by, by_sent
    return float(finish[last]), StageTimes(*(counts[name] for name in STAGE_TIME_FIELDS))


def _memory(schedule: Schedule, stages: Sequence[StageCost], events: Sequence[Event],
            actions: dict[int, Action] | None = None) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """Peak bytes per rank and peak in-flight micro-batches per stage, from the events (``actions``: each
    compute event's action by its id, else parsed from its name)."""
    split = any(e.kind == "W" for e in events)
    changes: list[list[tuple[float, int, int, int]]] = [[] for _ in range(schedule.num_ranks)]
    for e in events:
        if e.kind in ("SEND", "OPT", "TIE"):
            continue
        action = actions[id(e)] if actions is not None else Action.parse(e.action)
        cost = stages[action.stage]
        frees_at = "W" if split else "B"
        if e.kind == "F":
            changes[e.rank].append((e.start_ms, 1, cost.activation_bytes, action.stage))
        if e.kind == frees_at:
            changes[e.rank].append((e.end_ms, 0, -cost.activation_bytes, -action.stage - 1))
        if e.kind in ("B", "I") and cost.backward_extra_bytes:
            changes[e.rank].append((e.start_ms, 1, cost.backward_extra_bytes, schedule.num_stages))
            changes[e.rank].append((e.end_ms, 0, -cost.backward_extra_bytes, schedule.num_stages))
    static, step = [0] * schedule.num_ranks, [0] * schedule.num_ranks
    for s, cost in enumerate(stages):
        static[schedule.stage_rank[s]] += cost.static_bytes + cost.runtime_bytes
        step[schedule.stage_rank[s]] += cost.optimizer_step_bytes  # the rank's OPT, after its last backward
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
    peak_mem = tuple(s + max(a, o) for s, a, o in zip(static, peak_act, step))
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

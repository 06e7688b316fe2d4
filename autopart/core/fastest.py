"""The split with the smallest predicted step: what ``--method exact`` returns.

    split = split_fastest(problem)       # problem.model names the schedule and micro-batch count
    split.method                         # "exact": every split simulated; "local": see the note

Pure (numpy, no torch). The step a split predicts is the simulator's
(:func:`autopart.core.simulate.step_ms_batch` runs many splits through the
schedule at once): pipeline fill and drain, sends, and every rank's
optimizer step after its last backward, not only the slowest stage. Among
splits of equal step (to 1e-9), the smallest bottleneck wins, then the
smallest sum of squared stage times.

Note: when the splits are few enough to simulate them all
(``C(n-1, K-1) × actions`` up to :data:`EXHAUSTIVE_WORK`), every split that
fits memory is simulated and the result is the exact optimum (method
"exact"). Beyond that (method "local") the search starts from the
bottleneck-optimal split and shifts runs of neighbouring boundaries by 1, 2,
4, ... blocks while the predicted step improves: never slower than the
bottleneck-optimal split, but a local optimum. Each round simulates only
the moves that a critical path of the current split, repriced with the
move's stage costs, does not already rule out (that repricing is a lower
bound on the move's step). I know of no exact method that scales for
1F1B's step: GPipe's has a closed form, 1F1B's critical path zigzags
between ranks.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import numpy.typing as npt

from autopart.core.costmodel import Problem
from autopart.core.partition import Split, bounds_to_balance, split_bottleneck
from autopart.core.schedules import Schedule, build_schedule
from autopart.core.simulate import (
    STAGE_TIME_FIELDS,
    Program,
    StageTimes,
    compile_schedule,
    critical_path,
    step_ms_batch,
)
from autopart.errors import AutopartError

__all__ = ["split_fastest", "RankMemory", "EXHAUSTIVE_WORK"]

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]

EXHAUSTIVE_WORK = 4_000_000
"""Splits × schedule actions up to which every split is simulated (about 0.3 s on a 2-core CPU)."""
_CHUNK = 4096  # splits simulated in one batch
_TIE = 1e-9  # relative: steps (and bottlenecks) this close are equal
_MAX_ROUNDS = 500
_VERIFY = 64  # candidate moves simulated per round, the most promising first


def _schedule(p: Problem) -> Schedule:
    per_rank = p.model.stages_per_rank
    return build_schedule(p.model.schedule, p.k // per_rank, p.model.microbatches, per_rank)


@dataclass(frozen=True)
class RankMemory:
    """Ranks holding several (virtual) stages: which stages share each rank's memory, and its bytes.

    Without it each stage must fit its own device's limit (an even share of
    its rank's under Interleaved1F1B and ZBVZeroBubble); with it the stages of
    a rank may share its memory as they need, recomputing where that is the
    fastest way for all of them to fit.
    """

    stages: tuple[tuple[int, ...], ...]
    limit_bytes: tuple[float, ...]


def _costs(p: Problem, starts: Ints, ranks: RankMemory | None = None
           ) -> tuple[StageTimes, npt.NDArray[np.bool_], npt.NDArray[np.bool_] | None]:
    """The stage times of each split (rows of first blocks), whether it fits memory, and (with ``ranks``)
    which stages recompute; without, each stage recomputes where it must to fit its own limit."""
    ends = np.concatenate([starts[:, 1:] - 1, np.full((starts.shape[0], 1), p.n - 1)], axis=1)
    mems = p.memories_all(starts, ends)  # every stage's memory in one pass: (splits, stages) each
    if ranks is not None:
        fits, recompute = _share_ranks(p, starts, ends, ranks, mems)
    else:  # each stage on its own limit, recomputing where it must (Problem.evaluate, every stage at once)
        plain, with_rc = mems
        fits_plain = plain <= p.limit
        can = np.isfinite(p.limit) & p.model.recompute
        recompute = ~fits_plain & can
        fits = np.all(fits_plain | (can & (with_rc <= p.limit)), axis=1)
    return p.stage_times_all(starts, ends, recompute), fits, recompute if ranks is not None else None


def _share_ranks(p: Problem, starts: Ints, ends: Ints, ranks: RankMemory, memories: tuple[Floats, Floats]
                 ) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
    """Per split, whether every rank's stages fit its memory together, and which of them recompute: of the
    choices that fit, the one with the least compute on the rank (``memories``: :meth:`Problem.memories_all`)."""
    fits = np.ones(starts.shape[0], dtype=bool)
    recompute = np.zeros(starts.shape, dtype=bool)
    every_time = p.times_all(starts, ends)
    for group, limit in zip(ranks.stages, ranks.limit_bytes):
        mems = {s: (memories[0][:, s], memories[1][:, s]) for s in group}
        times = {s: (every_time[0][:, s], every_time[1][:, s]) for s in group}
        best = np.full(starts.shape[0], np.inf)
        for flags in itertools.product((False, True), repeat=len(group)):
            mem = sum(mems[s][int(f)] for s, f in zip(group, flags))
            cost = sum(times[s][int(f)] for s, f in zip(group, flags))
            better = (mem <= limit) & (cost < best)
            best = np.where(better, cost, best)
            for s, f in zip(group, flags):
                recompute[better, s] = f
        fits &= np.isfinite(best)
    return fits, recompute


def _score(program: Program, costs: StageTimes, fits: npt.NDArray[np.bool_]) -> tuple[Floats, Floats, Floats]:
    """(step, bottleneck, sum of squared stage times) of each split; inf where it does not fit memory."""
    stage_ms = costs.time_ms
    step = np.where(fits, step_ms_batch(program, costs), np.inf)
    return step, np.where(fits, stage_ms.max(axis=1), np.inf), np.where(fits, (stage_ms ** 2).sum(axis=1), np.inf)


def _at(scores: tuple[Floats, Floats, Floats], i: int) -> tuple[float, float, float]:
    """Split ``i``'s (step, bottleneck, sum of squares)."""
    return float(scores[0][i]), float(scores[1][i]), float(scores[2][i])


def _first_blocks(balance: Sequence[int]) -> Ints:
    """The first block of each stage of a split given as block counts."""
    return np.concatenate([[0], np.cumsum(balance)[:-1]]).astype(np.int64)


def _best(step: Floats, bottleneck: Floats, sum_sq: Floats) -> int:
    """The index of the smallest step, then bottleneck, then sum of squares (ties to 1e-9)."""
    low = float(step.min())
    if not np.isfinite(low):
        return -1
    near = np.flatnonzero(step <= low + _TIE * abs(low))
    b = bottleneck[near]
    near = near[b <= b.min() + _TIE * abs(float(b.min()))]
    return int(near[np.argmin(sum_sq[near])])


def _better(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    """Whether score ``a`` beats ``b`` beyond the tie tolerance, in the order step, bottleneck, sum of squares."""
    for x, y in zip(a, b):
        if x < y - _TIE * abs(y):
            return True
        if x > y + _TIE * abs(y):
            return False
    return False


def _better_spread(bottleneck: Floats, sum_sq: Floats, score: tuple[float, float, float]) -> npt.NDArray[np.bool_]:
    """Which candidates would win the tie-break against ``score`` if their step were equal to it."""
    _, b, q = score
    tol_b, tol_q = _TIE * abs(b), _TIE * abs(q)
    out: npt.NDArray[np.bool_] = (bottleneck < b - tol_b) | ((bottleneck <= b + tol_b) & (sum_sq < q - tol_q))
    return out


def _every_split(n: int, k: int) -> Iterator[Ints]:
    """All splits of n blocks into k stages, in chunks: rows of first blocks."""
    combos = itertools.combinations(range(1, n), k - 1)
    while rows := list(itertools.islice(combos, _CHUNK)):
        body = np.array(rows, dtype=np.int64).reshape(len(rows), k - 1)
        yield np.concatenate([np.zeros((len(rows), 1), dtype=np.int64), body], axis=1)


def _exhaustive(p: Problem, program: Program, ranks: RankMemory | None) -> Ints | None:
    """The best split of all that fit (None: none does)."""
    best: Ints | None = None
    best_score = (np.inf, np.inf, np.inf)
    for starts in _every_split(p.n, p.k):
        costs, fits, _ = _costs(p, starts, ranks)
        scores = _score(program, costs, fits)
        i = _best(*scores)
        if i < 0:
            continue
        score = _at(scores, i)
        if best is None or _better(score, best_score):
            best, best_score = starts[i], score
    return best


def _neighbours(starts: Ints, n: int) -> Ints:
    """Splits one move away: a run of neighbouring boundaries shifted together by ±1, ±2, ±4, ...

    Shifting boundaries b..c moves work from one end of the run to the other:
    stages b..c-1 keep their size, stage b-1 and stage c change."""
    k = starts.size
    edges = np.append(starts, n)
    widest = int(np.diff(edges).max())
    deltas = np.array([1 << e for e in range(max(1, widest.bit_length()))], dtype=np.int64)
    deltas = np.concatenate([deltas, -deltas])
    masks = []  # which edges a move shifts: boundaries b .. b + span - 1
    for span in range(1, k):
        for b in range(1, k - span + 1):
            mask = np.zeros(k + 1, dtype=np.int64)
            mask[b: b + span] = 1
            masks.append(mask)
    if not masks:
        return np.zeros((0, k), dtype=np.int64)
    moved = edges[None, None, :] + deltas[:, None, None] * np.array(masks)[None, :, :]
    moved = moved.reshape(-1, k + 1)
    ok = np.all(np.diff(moved, axis=1) >= 1, axis=1)
    return moved[ok, :k]


def _repriced(counts: StageTimes, costs: StageTimes) -> Floats:
    """Each candidate's costs along one critical path of the current split: a lower bound on its step."""
    out: Floats = sum((getattr(counts, name) * getattr(costs, name)).sum(axis=1)
                      for name in STAGE_TIME_FIELDS)
    return out


def _local(p: Problem, program: Program, starts: Ints, ranks: RankMemory | None, screen: bool = True) -> Ints:
    """Best-improvement moves from ``starts`` until none improves (step, then bottleneck, then spread).

    A move is simulated only when the current critical path, repriced with the
    move's costs, leaves room to improve: the step after a move is at least
    that (:func:`critical_path`), so the moves skipped cannot win. ``screen=False`` prices every move's
    memory first (for tests: the same moves are tried either way).
    """
    current = starts
    costs, _, _ = _costs(p, current[None, :], ranks)
    scores = _score(program, costs, np.ones(1, dtype=bool))
    current_score = _at(scores, 0)
    for _ in range(_MAX_ROUNDS):
        step, counts = critical_path(program, costs)
        candidates = _neighbours(current, p.n)
        # the repricing without recomputation is at most the one with it (a recomputing stage only adds a
        # forward), and needs no memory: moves it already rules out are not priced further. The rest keep
        # their order, so the moves tried below are the same as when every move is priced.
        ends = np.concatenate([candidates[:, 1:] - 1, np.full((candidates.shape[0], 1), p.n - 1)], axis=1)
        plain = p.stage_times_all(candidates, ends, np.zeros(candidates.shape, dtype=bool))
        if screen:
            candidates = candidates[_repriced(counts, plain) <= step * (1 + _TIE)]
        if not candidates.size:
            break
        cand_costs, fits, _ = _costs(p, candidates, ranks)
        bound = np.where(fits, _repriced(counts, cand_costs), np.inf)
        order = np.argsort(bound, kind="stable")
        strictly = int(np.searchsorted(bound[order], step * (1 - _TIE), side="left"))
        ties = int(np.searchsorted(bound[order], step * (1 + _TIE), side="right"))
        stage_ms = cand_costs.time_ms
        evener = _better_spread(stage_ms.max(axis=1), (stage_ms ** 2).sum(axis=1), current_score)
        tie_pick = order[strictly:ties][evener[order[strictly:ties]]]
        found = None
        for pick in (order[:strictly][:_VERIFY], tie_pick):  # a faster step first, then a tie-break win
            if not pick.size:
                continue
            picked = StageTimes(*(getattr(cand_costs, name)[pick] for name in STAGE_TIME_FIELDS))
            scores = _score(program, picked, fits[pick])
            i = _best(*scores)
            score = _at(scores, i) if i >= 0 else current_score
            if i >= 0 and _better(score, current_score):
                found = (candidates[pick[i]], score)
                break
        if found is None:
            break
        current, current_score = found
        costs, _, _ = _costs(p, current[None, :], ranks)
    return current


def _start(p: Problem, ranks: RankMemory | None) -> tuple[Split | None, AutopartError | None]:
    """The bottleneck-optimal split to search from; with shared rank memory, that of each stage given its
    whole rank's memory when an even share fits nothing (if the ranks hold it together). Else None and why."""
    try:
        return split_bottleneck(p), None
    except AutopartError as even_share:
        if ranks is None:
            raise
        whole = np.zeros(p.k)
        for group, limit in zip(ranks.stages, ranks.limit_bytes):
            whole[list(group)] = limit
        try:
            base = split_bottleneck(p.with_limits(whole))
        except AutopartError:
            return None, even_share
        _, fits, _ = _costs(p, _first_blocks(base.balance)[None, :], ranks)
        return (base, None) if fits[0] else (None, even_share)


def split_fastest(p: Problem, ranks: RankMemory | None = None) -> Split:
    """The split that fits memory with the smallest predicted step under ``p.model``'s schedule and
    micro-batch count: method "exact" when every split was simulated, "local" when a local search from
    the bottleneck-optimal split found it (see the module note). ``ranks``: stages that share a rank's
    memory (:class:`RankMemory`)."""
    base, why = _start(p, ranks)  # raises, saying why, when no split fits its stages' own limits
    if p.k == 1 and base is not None:
        return dataclasses.replace(base, method="exact")
    program = compile_schedule(_schedule(p))  # once: every candidate split runs through it
    work = math.comb(p.n - 1, p.k - 1) * len(program.steps)
    if work <= EXHAUSTIVE_WORK:
        method, found = "exact", _exhaustive(p, program, ranks)
        if found is None:
            raise why or AutopartError("no split fits memory")
        starts = found
    else:
        if base is None:
            raise why or AutopartError("no split fits memory")
        method = "local"
        starts = _local(p, program, _first_blocks(base.balance), ranks)
    balance = bounds_to_balance(starts.tolist(), p.n)
    _, fits, recompute = _costs(p, starts[None, :], ranks)
    stages = p.stages(balance, None if recompute is None else recompute[0].tolist())
    return Split(method=method, balance=tuple(balance), stages=tuple(stages), fits=bool(fits[0]),
                 lower_bound_ms=p.lower_bound_ms())

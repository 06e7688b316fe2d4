"""Stage boundaries from block costs: bottleneck, minvar, and the baselines people use today.

    split = split_bottleneck(problem)     # smallest bottleneck, then smallest spread
    split.balance                         # [4, 3, 3, 4]
    split(problem, "exact")               # by name (autopart.core.methods); exact: autopart.core.fastest

Pure (numpy, no torch). ``bottleneck`` is exact for the cost model in
:mod:`autopart.core.costmodel`, sends, memory limits, recomputation and devices of
different speed included; ``exact`` (the default) starts from it.

Note: the bottleneck is found by bisection on a time bound T with a
feasibility check that sweeps the stages in order and keeps, per stage, the
set of blocks a prefix of stages can end on. For a stage ending at block j the
feasible starts without recomputation are a window (memory is monotone in
the start), and the time condition separates into a term of the start and a
term of the end, so one windowed maximum (a sparse table) answers every end
at once; stages that only fit with recomputation are checked pair by pair in
the narrow band where that applies. Bisection stops when the best plan found
and the largest bound proved infeasible are within 1e-9 of each other. The
tie-break (smallest sum of squared stage times among bottleneck-optimal
splits) is a dynamic programme over the pairs that can still be part of such
a split: reachable from the first block and able to reach the last.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import numpy.typing as npt

from autopart.core.costmodel import CostModel, Problem
from autopart.errors import AutopartError
from autopart.formats.devices import Device
from autopart.formats.stage import StageCost
from autopart.formats.units import format_bytes, plural

__all__ = ["Split", "split_bottleneck", "split_minvar", "split_uniform", "split_parameters", "split_given",
           "min_memory_scale", "bounds_to_balance"]

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]

_REL = 1e-9  # bisection stops when best plan and proved-infeasible bound are this close
_MAX_PAIRS = 1 << 21  # pairs evaluated at once, to bound memory


@dataclass(frozen=True)
class Split:
    """A split of the blocks into stages and what the cost model says of it."""

    method: str
    balance: tuple[int, ...]
    stages: tuple[StageCost, ...]
    fits: bool
    lower_bound_ms: float

    @property
    def bottleneck_ms(self) -> float:
        return max(s.time_ms for s in self.stages)

    @property
    def sum_sq(self) -> float:
        return sum(s.time_ms ** 2 for s in self.stages)

    @property
    def gap(self) -> float:
        """How far the bottleneck is above the lower bound (0.05 = 5%)."""
        return self.bottleneck_ms / self.lower_bound_ms - 1 if self.lower_bound_ms > 0 else 0.0


def _make(problem: Problem, method: str, balance: Sequence[int]) -> Split:
    stages = problem.stages(balance)
    return Split(method=method, balance=tuple(int(b) for b in balance), stages=tuple(stages),
                 fits=problem.fits(balance), lower_bound_ms=problem.lower_bound_ms())


def bounds_to_balance(starts: Sequence[int], n: int) -> list[int]:
    """Blocks per stage, from each stage's first block and the block count ``n``."""
    edges = list(starts) + [n]
    return [edges[s + 1] - edges[s] for s in range(len(starts))]


# --------------------------------------------------------------------------------------------
# windows and pair checks


def _lo_time(p: Problem, s: int, T: float, js: Ints) -> Ints:
    """A safe lower bound on the first block of stage s ending at js under time T (compute alone)."""
    if not np.isfinite(T):
        return np.zeros(js.shape, dtype=np.int64)
    pc = p.compute_prefix()
    target = pc[js + 1] - T * p.speed[s] * (1 + 1e-9) - 1e-12
    return np.minimum(np.searchsorted(pc, target, side="left").astype(np.int64), js)


def _lo_mem(p: Problem, s: int, js: Ints) -> Ints:
    """Exactly the first start i for which stage s ending at js fits without recomputation (js+1: none).

    Byte counts are integers below 2**53, so the float prefix sums are exact.
    """
    limit = p.limit[s]
    if not np.isfinite(limit):
        return np.zeros(js.shape, dtype=np.int64)
    q = p.plain_prefix(s)
    return np.minimum(np.searchsorted(q, q[js + 1] - limit, side="left").astype(np.int64), js + 1)


def _lo_rc(p: Problem, s: int, js: Ints) -> Ints:
    """A lower bound on the start of a recomputing stage ending at js that fits (inputs not counted)."""
    q = p.rc_prefix(s)
    return np.minimum(np.searchsorted(q, q[js + 1] - p.limit[s], side="left").astype(np.int64), js + 1)


def _start_term(p: Problem, s: int, i: Ints) -> Floats:
    return p.compute_prefix()[i] / p.speed[s] - p.send_in_ms(s, i)


def _end_term(p: Problem, s: int, j: Ints, T: float) -> Floats:
    return p.compute_prefix()[j + 1] / p.speed[s] - T + p.send_out_ms(s, j)


def _ok_pairs(p: Problem, s: int, T: float, i: Ints, j: Ints) -> Bools:
    """Can stage s hold blocks i..j within time T and its memory? (The search's own test.)"""
    plain, recompute = p.memories(s, i, j)
    fits_plain = plain <= p.limit[s]
    ok = fits_plain & (_start_term(p, s, i) >= _end_term(p, s, j, T))
    if p.model.recompute and np.isfinite(p.limit[s]):
        rc = ~fits_plain & (recompute <= p.limit[s]) & (p.times(s, i, j)[1] <= T)
        ok |= rc
    return ok


def _pairs(lo: Ints, hi: Ints) -> tuple[Ints, Ints]:
    """All (row, i) with lo[row] <= i <= hi[row], row-major."""
    widths = np.maximum(hi - lo + 1, 0)
    rows = np.repeat(np.arange(lo.size), widths)
    offsets = np.concatenate([[0], np.cumsum(widths)[:-1]])
    i = lo[rows] + (np.arange(rows.size) - offsets[rows])
    return rows, i


def _chunks(widths: Ints) -> list[slice]:
    """Row ranges whose pair counts stay under _MAX_PAIRS."""
    out, start, total = [], 0, 0
    for r, w in enumerate(widths.tolist()):
        if total + w > _MAX_PAIRS and r > start:
            out.append(slice(start, r))
            start, total = r, 0
        total += max(w, 0)
    out.append(slice(start, widths.size))
    return out


def _range_max(values: Floats, lo: Ints, hi: Ints) -> Floats:
    """max(values[lo[r]:hi[r]+1]) for every r (lo <= hi), with a sparse table."""
    length = hi - lo + 1
    longest = int(length.max()) if length.size else 1
    levels = [values]
    span = 1
    while span * 2 <= longest:
        prev = levels[-1]
        levels.append(np.maximum(prev[:-span], prev[span:]))
        span *= 2
    k = np.frexp(length.astype(np.float64))[1] - 1
    out = np.full(lo.shape, -np.inf)
    for level in range(int(k.min()), int(k.max()) + 1):
        rows = k == level
        if not rows.any():
            continue
        table = levels[level]
        out[rows] = np.maximum(table[lo[rows]], table[hi[rows] - (1 << level) + 1])
    return out


# --------------------------------------------------------------------------------------------
# feasibility sweep


def _reach(p: Problem, T: float) -> list[Bools]:
    """reach[s][j]: blocks 0..j can be split into stages 0..s, each within time T and memory."""
    n, K, pc = p.n, p.k, p.compute_prefix()
    idx = np.arange(n, dtype=np.int64)
    last = n - K  # stage 0 must leave a block for every later stage
    js = idx[: last + 1]
    r0 = np.zeros(n, dtype=bool)
    r0[: last + 1] = _ok_pairs(p, 0, T, np.zeros(js.shape, dtype=np.int64), js)
    reach = [r0]
    for s in range(1, K):
        prev = reach[-1]
        row = np.zeros(n, dtype=bool)
        reach.append(row)
        starts = np.flatnonzero(prev) + 1  # valid first blocks of stage s
        if starts.size == 0:
            continue
        first_i, last_i = int(starts[0]), int(starts[-1])
        j_hi = n - 1 - (K - 1 - s)
        if np.isfinite(T):  # no stage is longer in compute than T allows
            reach_end = np.searchsorted(pc, pc[last_i] + T * p.speed[s] * (1 + 1e-9) + 1e-12, side="right") - 2
            j_hi = min(j_hi, int(reach_end))
        j_lo = first_i if s < K - 1 else n - 1
        if np.isfinite(T) and s < K - 1:  # the rest must fit the later stages' compute
            rest = T * float(p.speed[s + 1:].sum()) * (1 + 1e-9) + 1e-12
            j_lo = max(j_lo, int(np.searchsorted(pc, pc[n] - rest, side="left")) - 1)
        if j_lo > j_hi:
            continue
        js = np.arange(j_lo, j_hi + 1, dtype=np.int64)
        lo_t = np.maximum(_lo_time(p, s, T, js), first_i)
        valid = np.zeros(n, dtype=bool)
        valid[starts] = True
        if p.general and np.isfinite(p.limit[s]):
            # memory is no window of starts (skips, ties): every start in the time window, pair by pair
            row[js] = _any_pair(p, s, T, js, lo_t, np.minimum(js, last_i), valid)
            continue
        lo_p = _lo_mem(p, s, js)
        # plain stages: a window of starts, one windowed maximum
        a = np.maximum(lo_t, lo_p)
        a = np.maximum(a, first_i)
        b = np.minimum(js, last_i)
        has = a <= b
        g = np.where(valid[first_i: last_i + 1], _start_term(p, s, np.arange(first_i, last_i + 1)), -np.inf)
        best = np.full(js.shape, -np.inf)
        if has.any():
            best[has] = _range_max(g, a[has] - first_i, b[has] - first_i)
        ok = (best > -np.inf) & (best >= _end_term(p, s, js, T))
        # recomputing stages: starts that fit in time but not in memory without recomputation
        if p.model.recompute and np.isfinite(p.limit[s]):
            lo_b = np.maximum(lo_t, _lo_rc(p, s, js))
            hi_b = np.minimum(np.minimum(lo_p - 1, js), last_i)
            ok |= _any_pair(p, s, T, js, lo_b, hi_b, valid, skip=ok)
        row[js] = ok
    return reach


def _any_pair(p: Problem, s: int, T: float, js: Ints, lo: Ints, hi: Ints, valid: Bools,
              skip: Bools | None = None) -> Bools:
    """For each end js[r]: does some valid start in lo[r]..hi[r] make a stage s within T and memory?"""
    found = np.zeros(js.shape, dtype=bool)
    todo = np.flatnonzero((lo <= hi) & (~skip if skip is not None else True))
    for part in _chunks((hi - lo + 1)[todo]):
        rows = todo[part]
        r, i = _pairs(lo[rows], hi[rows])
        good = valid[i]
        r, i = r[good], i[good]
        if r.size:
            good = _ok_pairs(p, s, T, i, js[rows][r])
            found[rows[np.unique(r[good])]] = True
    return found


def _backtrack(p: Problem, T: float, reach: list[Bools]) -> list[int]:
    """First blocks of the stages of some split that ``reach`` proves feasible."""
    starts = [0] * p.k
    j = p.n - 1
    for s in range(p.k - 1, 0, -1):
        jj = np.array([j], dtype=np.int64)
        i = np.arange(int(_lo_time(p, s, T, jj)[0]), j + 1, dtype=np.int64)
        i = i[i >= 1]
        i = i[reach[s - 1][i - 1]]
        i = i[_ok_pairs(p, s, T, i, np.full(i.shape, j, dtype=np.int64))]
        if i.size == 0:
            raise AssertionError(f"backtrack found no start for stage {s} ending at block {j}")
        starts[s] = int(i[-1])
        j = starts[s] - 1
    return starts


def _monotone(p: Problem) -> bool:
    """True when a stage that fits still fits with fewer blocks: no sends, no recomputation, and no skips
    or ties under a memory limit (a stage that starts after a skip's source holds it)."""
    return not p.model.sends and (not _limited(p) or (not p.model.recompute and not p.general))


def _greedy_safe(p: Problem, T: float) -> bool:
    """May :func:`_greedy` decide feasibility under T?

    Note: packing every stage as far as it goes ends each prefix of stages at
    least as far as any feasible split does, provided stages are monotone (a
    stage that fits still fits with fewer blocks) and every single block fits
    every stage: then a stage can always start where the greedy one ended.
    Without the second condition the greedy can leave a later stage only
    blocks it cannot hold (a small device after a large one).
    """
    if not _monotone(p):
        return False
    if T < float(p.blocks.compute_ms.max()) / float(p.speed.min()):
        return False
    return _every_block_fits_every_stage(p) if _limited(p) else True


def _limited(p: Problem) -> bool:
    """Does some stage have a memory limit?"""
    return bool(np.any(np.isfinite(p.limit)))


def _every_block_fits_every_stage(p: Problem) -> bool:
    """Does each block alone fit each stage without recomputation?"""
    return all(bool(np.all(np.diff(p.plain_prefix(s)) <= p.limit[s])) for s in range(p.k))


def _greedy(p: Problem, T: float) -> list[int] | None:
    """Stage starts of the split that packs each stage as far as time T and memory allow.

    Decides feasibility exactly where :func:`_greedy_safe` says so. Plain
    Python floats: the same IEEE arithmetic as the cost model's arrays.
    """
    pc = p.compute_prefix().tolist()
    starts, i, n, K = [], 0, p.n, p.k
    for s in range(K):
        v, limit = float(p.speed[s]), float(p.limit[s])
        q = p.plain_prefix(s).tolist() if np.isfinite(limit) else None
        starts.append(i)
        if s == K - 1:
            fits = q is None or q[n] - q[i] <= limit
            return starts if fits and (pc[n] - pc[i]) / v <= T else None
        j_max = n - 1 - (K - 1 - s)
        j = min(bisect.bisect_right(pc, pc[i] + T * v) - 2, j_max) if T < np.inf else j_max
        while j + 1 <= j_max and (pc[j + 2] - pc[i]) / v <= T:
            j += 1
        while j >= i and (pc[j + 1] - pc[i]) / v > T:
            j -= 1
        if q is not None:
            j = min(j, bisect.bisect_right(q, q[i] + limit) - 2)
        if j < i:
            return None
        i = j + 1
    return None


def _bottleneck(p: Problem, starts: Sequence[int]) -> float:
    """The slowest stage of the split with these first blocks, in the search's own arithmetic."""
    ends = list(starts[1:]) + [p.n]
    return max(float(p.evaluate(s, np.array([i]), np.array([e - 1]))[0][0]) for s, (i, e) in enumerate(zip(starts, ends)))


def min_memory_scale(p: Problem) -> float:
    """Smallest factor by which every finite memory limit must grow for some split to fit."""
    hi = 1.0
    while True:
        scaled = p.with_limits(p.limit * hi)
        if _reach(scaled, np.inf)[-1][-1]:
            break
        hi *= 2
        if hi > 2**40:
            raise AssertionError("memory scale does not converge")
    lo = hi / 2 if hi > 1 else 0.0
    while hi - lo > 1e-4 * hi:
        mid = (lo + hi) / 2
        if _reach(p.with_limits(p.limit * mid), np.inf)[-1][-1]:
            hi = mid
        else:
            lo = mid
    return hi


def _memory_error(p: Problem) -> AutopartError:
    """Why no split fits, with the block or stage that cannot, and the smallest limit that would."""
    per_block = []
    for b in range(p.n):
        bb = np.array([b])
        need = min(
            float(min(m[0] for m in p.memories(s, bb, bb)))
            for s in range(p.k))
        per_block.append(need)
    worst = int(np.argmax(per_block))
    largest = float(p.limit.max())
    uniform = bool(np.all(p.limit == p.limit[0]))
    scale = min_memory_scale(p)
    if uniform:
        fix = f"the smallest limit that fits is {format_bytes(p.limit[0] * scale)}"
    else:
        fix = f"the limits would have to be {scale:.3g}x larger"
    what = (f"{p.model.schedule}, {plural(p.model.microbatches, 'micro-batch')}, "
            f"{p.model.optimizer_states} optimizer states per parameter")
    if per_block[worst] > largest:
        return AutopartError(
            f"block {p.names[worst]!r} alone needs {format_bytes(per_block[worst])} "
            f"(even with recomputation) > {format_bytes(largest)} on the largest device ({what}); {fix}")
    return AutopartError(f"no split of {p.n} blocks into {p.k} stages fits the memory limits ({what}); {fix}")


# --------------------------------------------------------------------------------------------
# objectives


def _least_squares(p: Problem, T: float, fallback: list[int]) -> list[int]:
    """Among splits whose every stage is within T, the one with the smallest sum of squared times."""
    K, n = p.k, p.n
    fwd = _reach(p, T)
    rev = _reach(p.reversed(), T)
    # co[s][i]: blocks i..n-1 can be split into stages s..K-1
    co = [rev[K - 1 - s][::-1] for s in range(K)]
    cost = np.full(n, np.inf)
    back: list[Ints] = []
    for s in range(K):
        if s == K - 1:
            js = np.array([n - 1], dtype=np.int64)
        else:
            js = np.flatnonzero(fwd[s] & co[s + 1][np.minimum(np.arange(n) + 1, n - 1)] & (np.arange(n) < n - 1))
        new = np.full(n, np.inf)
        arg = np.full(n, -1, dtype=np.int64)
        if s == 0:
            i0 = np.zeros(js.shape, dtype=np.int64)
            ok = _ok_pairs(p, 0, T, i0, js)
            t = p.evaluate(0, i0, js)[0]
            new[js[ok]] = t[ok] ** 2
            arg[js[ok]] = 0
        else:
            lo = np.maximum(_lo_time(p, s, T, js), 1)
            for part in _chunks(js - lo + 1):
                jj, ll = js[part], lo[part]
                r, i = _pairs(ll, jj)
                j = jj[r]
                total = cost[i - 1] + p.evaluate(s, i, j)[0] ** 2
                total[~_ok_pairs(p, s, T, i, j)] = np.inf
                if total.size == 0:
                    continue
                order = np.lexsort((total, r))  # per row, cheapest first
                first = np.concatenate([[True], r[order][1:] != r[order][:-1]])
                pick = order[first]
                rows_best = r[pick]
                finite = np.isfinite(total[pick])
                new[jj[rows_best[finite]]] = total[pick][finite]
                arg[jj[rows_best[finite]]] = i[pick][finite]
        cost = new
        back.append(arg)
    if not np.isfinite(cost[n - 1]):
        return fallback
    starts = [0] * K
    end = n - 1
    for s in range(K - 1, 0, -1):
        starts[s] = int(back[s][end])
        end = starts[s] - 1
    return starts


def split_bottleneck(p: Problem) -> Split:
    """The smallest bottleneck (slowest stage) that fits memory; among those, the smallest sum of squared
    stage times."""
    def feasible(T: float) -> list[int] | None:
        if _greedy_safe(p, T):
            return _greedy(p, T)
        reach = _reach(p, T)
        return _backtrack(p, T, reach) if reach[-1][-1] else None

    found = feasible(np.inf)
    if found is None:
        raise _memory_error(p)
    best = found
    hi = _bottleneck(p, best)
    lo = p.lower_bound_ms() * (1 - 1e-12)
    if not _monotone(p):
        # Bracket the optimum first: without sends and memory limits the problem is
        # monotone (greedy, fast) and its optimum is a lower bound; stepping up from
        # it finds a feasible bound without sweeping wide, slow windows.
        relaxed = split_bottleneck(p.relaxed()).bottleneck_ms
        lo = max(lo, relaxed * (1 - 1e-12))
        step = max(2 * p.max_send_ms, relaxed * 1e-6, hi * 1e-9, 1e-300)
        while relaxed + step < hi:
            found = feasible(relaxed + step)
            if found is not None:
                best, hi = found, min(relaxed + step, _bottleneck(p, found))
                break
            lo = relaxed + step
            step *= 4
    while hi - lo > _REL * hi:
        mid = (lo + hi) / 2
        found = feasible(mid)
        if found is not None:
            best = found
            hi = min(mid, _bottleneck(p, best))
        else:
            lo = mid
    if p.k > 1:
        best = _least_squares(p, hi * (1 + 1e-12) + 1e-300, best)
    return _make(p, "bottleneck", bounds_to_balance(best, p.n))


def split_minvar(p: Problem) -> Split:
    """The smallest sum of squared stage times that fits memory (GPipe's balance goal).

    With free sends and equal devices the total time is fixed, so this is the
    split of minimum variance, which torchgpipe's balancer approximates.
    """
    exact = split_bottleneck(p)
    bound = float(np.sqrt(exact.sum_sq)) * (1 + 1e-9)  # no stage of the optimum is slower
    starts = np.concatenate([[0], np.cumsum(exact.balance)[:-1]]).tolist()
    best = _least_squares(p, bound, starts) if p.k > 1 else starts
    return _make(p, "minvar", bounds_to_balance(best, p.n))


def uniform_balance(blocks: int, stages: int) -> list[int]:
    """Equal block counts; the first ``blocks mod stages`` stages take one more (as torchtitan spreads the
    remainder)."""
    base, extra = divmod(blocks, stages)
    return [base + (1 if s < extra else 0) for s in range(stages)]


def split_uniform(p: Problem) -> Split:
    """Equal block counts (:func:`uniform_balance`)."""
    return _make(p, "uniform", uniform_balance(p.n, p.k))


def split_given(p: Problem, balance: Sequence[int]) -> Split:
    """A split given as block counts per stage (a hand-tuned ``balance`` list), priced by the same cost model."""
    return _make(p, "given", balance)


def split_parameters(p: Problem) -> Split:
    """Balance parameter bytes across stages (DeepSpeed's default ``partition_method="parameters"``)."""
    weights = Problem(p.blocks.param_bytes.tolist(), [Device("unit")] * p.k, CostModel(), names=p.names)
    balance = split_bottleneck(weights).balance
    return _make(p, "parameters", balance)

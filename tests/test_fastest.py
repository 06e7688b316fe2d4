"""The step-optimal split (``--method exact``) against brute force, and the array simulator it runs on.

Brute force here prices every contiguous split with the cost model
(``Problem.stages``, itself checked against docs/cost-model.md written out in test_partition) and
runs it through the one-at-a-time simulator, :func:`simulate`.
"""
from __future__ import annotations

import itertools
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autopart.core import fastest
from autopart.core.costmodel import BlockCosts, CostModel, Problem
from autopart.core.fastest import RankMemory, split_fastest
from autopart.core.partition import split_bottleneck
from autopart.core.schedules import build_schedule
from autopart.core.simulate import (
    STAGE_TIME_FIELDS,
    StageTimes,
    compile_schedule,
    critical_path,
    simulate,
    step_ms_batch,
)
from autopart.errors import AutopartError
from autopart.formats.devices import Device
from autopart.formats.profile import Profile
from autopart.formats.stage import StageCost

ROOT = Path(__file__).resolve().parent.parent
GPT2 = ROOT / "profiles" / "gpt2-small-cpu-mb1.json"

# (schedule, stages per rank): every schedule the joint search tries
SCHEDULES = [("GPipe", 1), ("1F1B", 1), ("Interleaved1F1B", 2), ("ZBVZeroBubble", 2)]


def _splits(n: int, k: int) -> list[list[int]]:
    return [[b - a for a, b in zip((0,) + cut, cut + (n,))] for cut in itertools.combinations(range(1, n), k - 1)]


def _step(p: Problem, balance: list[int] | tuple[int, ...]) -> float:
    per_rank = p.model.stages_per_rank
    schedule = build_schedule(p.model.schedule, p.k // per_rank, p.model.microbatches, per_rank)
    return simulate(schedule, p.stages(balance)).step_ms


def _brute(p: Problem) -> list[tuple[float, float, list[int]]]:
    """(step, bottleneck, balance) of every split that fits memory."""
    out = []
    for balance in _splits(p.n, p.k):
        if p.fits(balance):
            out.append((_step(p, balance), max(s.time_ms for s in p.stages(balance)), balance))
    return out


@dataclass
class _Case:
    problem: Problem

    def __repr__(self) -> str:
        p = self.problem
        return (f"Case({p.model.schedule} x{p.model.stages_per_rank}, M={p.model.microbatches}, n={p.n}, k={p.k}, "
                f"compute={p.blocks.compute_ms.round(2).tolist()}, limit={p.limit.tolist()}, speed={p.speed.tolist()})")


@st.composite
def _problems(draw: st.DrawFn, max_blocks: int = 9, choosy: bool = False) -> _Case:
    """A problem of every schedule. ``choosy`` draws the ones where the fastest split is often not the
    bottleneck split: 2-3 ranks and a spare block (more than one split), few micro-batches (the fill and
    drain, a sum of stage times, weighs as much as the bottleneck), and memory limits that a split drawn
    first fits by construction (none is skipped)."""
    name, per_rank = draw(st.sampled_from(SCHEDULES))
    ranks = draw(st.integers(2 if choosy else 1, 3))
    k = ranks * per_rank
    n = draw(st.integers(max(k + 1 if choosy else k, 2), max(k + 1 if choosy else k, max_blocks)))
    m = draw(st.integers(ranks, ranks + 1 if choosy else 2 * ranks + 2))
    if name == "Interleaved1F1B":
        m = max(1, m // ranks) * ranks  # rounds of whole ranks, as torch requires
    floats = st.floats(0.1, 10.0, allow_nan=False)
    compute = draw(st.lists(floats, min_size=n, max_size=n))
    share = draw(st.floats(0.2, 0.5))
    optimizer = draw(st.lists(st.sampled_from([0.0, 0.5, 3.0, 20.0]), min_size=n, max_size=n))
    params = draw(st.lists(st.integers(1, 100), min_size=n, max_size=n))
    acts = draw(st.lists(st.integers(1, 100), min_size=n, max_size=n))
    outs = draw(st.lists(st.integers(1, 100), min_size=n, max_size=n))
    bandwidth = draw(st.sampled_from([None, 10.0, 100.0]))
    model = CostModel(schedule=name, microbatches=m, stages_per_rank=per_rank, bandwidth_bytes_per_ms=bandwidth,
                      recompute=draw(st.booleans()))
    limit = draw(st.sampled_from([None, 600, 1200, 2500]))
    speeds = draw(st.lists(st.sampled_from([1.0, 2.0]), min_size=ranks, max_size=ranks))
    rank_of = [s % ranks if name != "ZBVZeroBubble" else (s if s < ranks else 2 * ranks - 1 - s) for s in range(k)]
    devices = [Device("d", memory_bytes=limit, speed=speeds[rank_of[s]]) for s in range(k)]
    # the backward's halves measured (torch's I and W: together more than the backward in one call), or not
    halves = draw(st.sampled_from([None, (0.5, 0.8)]))
    backward = [c * (1 - share) for c in compute]
    blocks = BlockCosts.of(compute, forward_ms=[c * share for c in compute], param_bytes=params,
                           activation_bytes=acts, output_bytes=outs, optimizer_ms=optimizer, input_bytes=50,
                           input_grad_ms=None if halves is None else [b * halves[0] for b in backward],
                           weight_grad_ms=None if halves is None else [b * halves[1] for b in backward])
    if not choosy:
        return _Case(Problem(blocks, devices, model))
    free = Problem(blocks, [Device("d", speed=d.speed) for d in devices], model)
    chosen = draw(st.sampled_from(_splits(n, k)))
    need = max(stage.memory_bytes for stage in free.stages(chosen))
    limit = draw(st.sampled_from([None, need, need, need + 50]))  # the least that fits the chosen split, often
    return _Case(Problem(blocks, [Device("d", memory_bytes=limit, speed=d.speed) for d in devices], model))


@given(case=_problems())
@settings(max_examples=100, deadline=None)
def test_exact_is_the_fastest_split_of_all(case: _Case) -> None:
    _check_fastest(case.problem)


@given(case=_problems(choosy=True))
@settings(max_examples=60, deadline=None)
def test_exact_is_the_fastest_where_the_bottleneck_split_is_not(case: _Case) -> None:
    """45% of these draws have a split faster than the bottleneck split (22% of the draws above, and a fifth
    of those have nothing that fits)."""
    assert _brute(case.problem)  # a split fits by construction
    _check_fastest(case.problem)


def _check_fastest(p: Problem) -> None:
    every = _brute(p)
    try:
        found = split_fastest(p)
    except AutopartError as exc:
        assert not every, f"a split fits but exact says: {exc}"
        return
    assert found.method == "exact" and found.fits
    fastest_step = min(step for step, _, _ in every)
    step = _step(p, found.balance)
    assert step <= fastest_step * (1 + 1e-9) + 1e-12
    tied = [bottleneck for s, bottleneck, _ in every if s <= fastest_step * (1 + 1e-9) + 1e-12]
    assert max(st.time_ms for st in found.stages) <= min(tied) * (1 + 1e-9) + 1e-12  # then the smallest bottleneck


@given(case=_problems(max_blocks=12))
@settings(max_examples=60, deadline=None)
def test_local_search_is_never_slower_than_the_bottleneck_split(case: _Case) -> None:
    p = case.problem
    try:
        base = split_bottleneck(p)
    except AutopartError:
        return
    saved, fastest.EXHAUSTIVE_WORK = fastest.EXHAUSTIVE_WORK, 0  # as if there were too many splits to simulate
    try:
        found = split_fastest(p)
    finally:
        fastest.EXHAUSTIVE_WORK = saved
    if p.k > 1:
        assert found.method == "local"
    assert found.fits
    assert _step(p, found.balance) <= _step(p, base.balance) * (1 + 1e-9)


@pytest.mark.parametrize("schedule, microbatches, balance", [
    ("1F1B", 4, (2, 6, 5, 1)), ("GPipe", 4, (3, 5, 5, 1)), ("1F1B", 8, (3, 5, 5, 1)),
])
@pytest.mark.parametrize("search", ["exact", "local"])
def test_gpt2_small_gets_the_best_of_its_286_splits(schedule: str, microbatches: int, balance: tuple[int, ...],
                                                    search: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bottleneck-optimal [4, 5, 4, 1] is 1.6-4.1% slower than these (docs/partition.md)."""
    profile = Profile.from_json(str(GPT2))
    p = Problem.from_profile(profile, [Device("cpu")] * 4, CostModel(schedule=schedule, microbatches=microbatches))
    if search == "local":
        monkeypatch.setattr(fastest, "EXHAUSTIVE_WORK", 0)
    found = split_fastest(p)
    every = _brute(p)
    assert len(every) == 286
    assert found.method == search and found.balance == balance
    assert _step(p, balance) == pytest.approx(min(step for step, _, _ in every), rel=1e-12)
    assert _step(p, split_bottleneck(p).balance) > 1.015 * _step(p, balance)


def test_local_search_at_scale_improves_on_the_bottleneck_split() -> None:
    rng = np.random.default_rng(0)
    compute = rng.lognormal(0.0, 1.0, 400)
    p = Problem(compute, [Device("d")] * 16, CostModel(microbatches=16), forward_ms=compute / 3,
                optimizer_ms=compute / 2)
    found = split_fastest(p)
    assert found.method == "local"
    assert _step(p, found.balance) < _step(p, split_bottleneck(p).balance)


def _random_costs(rng: np.random.Generator, stages: int, overhead_ms: float = 0.0) -> list[StageCost]:
    """Random stages; some with their backward's halves measured (I and W, together up to 1.5x the backward in
    one call, as torch's split runs on CPU), some without (W is then the rest of the backward)."""
    split = bool(rng.random() < 0.5)

    def one() -> StageCost:
        backward = float(rng.uniform(1, 20))
        halves = dict(input_grad_ms=backward * float(rng.uniform(0.3, 0.7)),
                      weight_grad_ms=backward * float(rng.uniform(0.3, 0.8))) if split else {}
        return StageCost(forward_ms=float(rng.uniform(1, 10)), backward_ms=backward,
                         send_forward_ms=float(rng.choice([0.0, rng.uniform(0, 3)])),
                         send_backward_ms=float(rng.choice([0.0, rng.uniform(0, 3)])),
                         optimizer_ms=float(rng.choice([0.0, rng.uniform(0, 30)])), overhead_ms=overhead_ms, **halves)
    return [one() for _ in range(stages)]


@given(seed=st.integers(0, 2**32 - 1), which=st.sampled_from(SCHEDULES), ranks=st.integers(1, 4),
       extra=st.integers(0, 5))
@settings(max_examples=80, deadline=None)
def test_the_array_simulator_agrees_with_simulate(seed: int, which: tuple[str, int], ranks: int, extra: int) -> None:
    name, per_rank = which
    m = ranks + extra
    if name == "Interleaved1F1B":
        m = max(1, m // ranks) * ranks
    schedule = build_schedule(name, ranks, m, per_rank)
    rng = np.random.default_rng(seed)
    splits = [_random_costs(rng, schedule.num_stages, float(rng.choice([0.0, 1.5]))) for _ in range(4)]
    program = compile_schedule(schedule)
    batch = step_ms_batch(program, StageTimes.of(splits))
    for costs, step in zip(splits, batch):
        assert step == pytest.approx(simulate(schedule, costs).step_ms, rel=1e-12)
        assert simulate(program, costs) == simulate(schedule, costs)  # compiled once or each time: the same
    # a critical path repriced with other costs is a lower bound on their step, and exact on its own
    step, counts = critical_path(program, StageTimes.of(splits[:1]))
    assert step == pytest.approx(float(batch[0]), rel=1e-12)
    for costs, other in zip(splits, batch):
        priced = StageTimes.of([costs])
        repriced = sum(float((getattr(counts, f) * getattr(priced, f)).sum()) for f in STAGE_TIME_FIELDS)
        assert repriced <= other * (1 + 1e-12)
    own = StageTimes.of(splits[:1])
    assert sum(float((getattr(counts, f) * getattr(own, f)).sum()) for f in STAGE_TIME_FIELDS) == pytest.approx(step)


def test_gpipe_step_has_a_closed_form() -> None:
    """GPipe: all forwards flow through the stages, then all backwards back; each rank steps its optimizer
    after its last backward: ΣF' + (M-1)max F' + max_s [Σ_{t>=s} B' + (M-1) max_{t>=s} B' + opt_s]."""
    rng = np.random.default_rng(1)
    for _ in range(50):
        k, m = int(rng.integers(1, 6)), int(rng.integers(1, 9))
        costs = _random_costs(rng, k)
        f = [c.forward_ms + (c.send_forward_ms if s < k - 1 else 0.0) for s, c in enumerate(costs)]
        b = [c.backward_ms + (c.send_backward_ms if s > 0 else 0.0) for s, c in enumerate(costs)]
        formula = sum(f) + (m - 1) * max(f) + max(sum(b[s:]) + (m - 1) * max(b[s:]) + costs[s].optimizer_ms
                                                  for s in range(k))
        assert simulate(build_schedule("GPipe", k, m), costs).step_ms == pytest.approx(formula, rel=1e-12)


def test_one_stage_is_the_whole_model() -> None:
    p = Problem([1.0, 2.0, 3.0], [Device("d")], CostModel())
    assert split_fastest(p).balance == (3,)


def test_nothing_fits_says_why() -> None:
    p = Problem([1.0] * 4, [Device("d", memory_bytes=10)] * 2, CostModel(microbatches=2), param_bytes=[100] * 4)
    with pytest.raises(AutopartError, match="fit"):
        split_fastest(p)


def _rank_brute(p: Problem, ranks: RankMemory) -> float:
    """The fastest step over every split and every choice of recomputing stages whose ranks fit (each rank
    taking, of the choices that fit it, the one with the least compute, as autopart does)."""
    best = float("inf")
    for balance in _splits(p.n, p.k):
        first = [sum(balance[:s]) for s in range(p.k)]
        flags = [False] * p.k
        ok = True
        for group, limit in zip(ranks.stages, ranks.limit_bytes):
            options = []
            for choice in itertools.product((False, True), repeat=len(group)):
                if any(c and not p.model.recompute for c in choice):
                    continue
                costs = [p.stage(s, first[s], first[s] + balance[s] - 1, c) for s, c in zip(group, choice)]
                if sum(c.memory_bytes for c in costs) <= limit:
                    options.append((sum(c.compute_ms + c.send_ms for c in costs), choice))
            if not options:
                ok = False
                break
            for s, c in zip(group, min(options)[1]):
                flags[s] = c
        if ok:
            per_rank = p.model.stages_per_rank
            schedule = build_schedule(p.model.schedule, p.k // per_rank, p.model.microbatches, per_rank)
            best = min(best, simulate(schedule, p.stages(balance, flags)).step_ms)
    return best


@given(seed=st.integers(0, 2**32 - 1), which=st.sampled_from(SCHEDULES[2:]), n=st.integers(4, 8),
       recompute=st.booleans())
@settings(max_examples=25, deadline=None)
def test_stages_of_a_rank_share_its_memory(seed: int, which: tuple[str, int], n: int, recompute: bool) -> None:
    """Interleaved and zero-bubble stages on one rank share its memory as they need, not half each."""
    name, per_rank = which
    rng = np.random.default_rng(seed)
    model = CostModel(schedule=name, microbatches=4, stages_per_rank=per_rank, recompute=recompute)
    blocks = BlockCosts.of(rng.uniform(1, 10, n).tolist(), forward_ms=rng.uniform(0.2, 1, n).tolist(),
                           param_bytes=rng.integers(1, 100, n).tolist(), activation_bytes=rng.integers(1, 40, n).tolist(),
                           output_bytes=rng.integers(1, 20, n).tolist(), input_bytes=10)
    total = float(blocks.param_bytes.sum() * 4 + blocks.activation_bytes.sum() * 4)
    limit = int(total * float(rng.uniform(0.3, 0.8)))
    k = 2 * per_rank
    rank_of = [s % 2 if name == "Interleaved1F1B" else (s if s < 2 else 3 - s) for s in range(k)]
    ranks = RankMemory(stages=tuple(tuple(s for s in range(k) if rank_of[s] == r) for r in range(2)),
                       limit_bytes=(float(limit), float(limit)))
    p = Problem(blocks, [Device("d", memory_bytes=limit // per_rank)] * k, model)
    brute = _rank_brute(p, ranks)
    try:
        found = split_fastest(p, ranks)
    except AutopartError:
        assert brute == float("inf")
        return
    assert found.fits
    for group, cap in zip(ranks.stages, ranks.limit_bytes):
        assert sum(found.stages[s].memory_bytes for s in group) <= cap
    schedule = build_schedule(name, 2, 4, per_rank)
    assert simulate(schedule, list(found.stages)).step_ms == pytest.approx(brute, rel=1e-9)


@given(case=_problems(), mirror=st.booleans(), tie=st.booleans(), largest=st.booleans(), measured=st.booleans())
@settings(max_examples=60, deadline=None)
def test_every_stage_at_once_prices_as_stage_by_stage(case: _Case, mirror: bool, tie: bool, largest: bool,
                                                      measured: bool) -> None:
    """``memories_all``, ``times_all`` and ``stage_times_all`` (the local search's one pass over a split's
    stages) equal the per-stage methods to the last bit, on every split, mirrored, with ties, largest
    tensors and measured input-gradient halves."""
    p = case.problem
    b = p.blocks
    blocks = BlockCosts.of(b.compute_ms.tolist(), forward_ms=b.forward_ms.tolist(), param_bytes=b.param_bytes.tolist(),
                           activation_bytes=b.activation_bytes.tolist(), output_bytes=b.output_bytes.tolist(),
                           optimizer_ms=b.optimizer_ms.tolist(), input_bytes=50,
                           ties=[(30.0, [0, p.n - 1])] if tie and p.n > 1 else (),
                           largest_param_bytes=(b.param_bytes / 2).tolist() if largest else None,
                           input_grad_ms=(b.compute_ms - b.forward_ms).tolist() if measured else None,
                           weight_grad_ms=(b.compute_ms - b.forward_ms).tolist() if measured else None)
    p = Problem(blocks, p.devices, p.model)
    if mirror:
        p = p.reversed()
    starts = np.array([[0, *np.cumsum(bal)[:-1]] for bal in _splits(p.n, p.k)], dtype=np.int64)
    ends = np.concatenate([starts[:, 1:] - 1, np.full((starts.shape[0], 1), p.n - 1)], axis=1)
    rng = np.random.default_rng(p.n)
    flags = rng.random(starts.shape) < 0.5
    plain, rc = p.memories_all(starts, ends)
    t_plain, t_rc = p.times_all(starts, ends)
    every = p.stage_times_all(starts, ends, flags)
    for s in range(p.k):
        one_plain, one_rc = p.memories(s, starts[:, s], ends[:, s])
        assert np.array_equal(plain[:, s], one_plain) and np.array_equal(rc[:, s], one_rc)
        one_t, one_t_rc = p.times(s, starts[:, s], ends[:, s])
        assert np.array_equal(t_plain[:, s], one_t) and np.array_equal(t_rc[:, s], one_t_rc)
        one, _ = p.stage_times(s, starts[:, s], ends[:, s], flags[:, s])
        for name in STAGE_TIME_FIELDS:
            assert np.array_equal(getattr(every, name)[:, s], getattr(one, name)), name


@pytest.mark.slow
@given(case=_problems(max_blocks=12), choosy=_problems(max_blocks=12, choosy=True))
@settings(max_examples=40, deadline=None)
def test_the_local_search_screen_tries_the_same_moves(case: _Case, choosy: _Case) -> None:
    """Moves ruled out by the repricing without recomputation (no memory priced) are never the ones the
    local search takes: from the bottleneck split it ends where pricing every move ends, with and without
    ranks sharing memory."""
    for p in (case.problem, choosy.problem):
        try:
            base = split_bottleneck(p)
        except AutopartError:
            continue
        program = compile_schedule(fastest._schedule(p))
        starts = np.array([0, *np.cumsum(base.balance)[:-1]], dtype=np.int64)
        ranks = [None]
        if p.model.stages_per_rank > 1 and np.isfinite(p.limit).all():
            groups = build_schedule(p.model.schedule, p.k // p.model.stages_per_rank, p.model.microbatches,
                                    p.model.stages_per_rank)
            ranks.append(RankMemory(stages=tuple(tuple(groups.stages_of(r)) for r in range(groups.num_ranks)),
                                    limit_bytes=tuple(float(p.limit[0]) * p.model.stages_per_rank
                                                      for _ in range(groups.num_ranks))))
        for shared in ranks:
            screened = fastest._local(p, program, starts, shared)
            plain = fastest._local(p, program, starts, shared, screen=False)
            assert screened.tolist() == plain.tolist()


def test_the_backwards_halves_are_priced_as_torch_runs_them() -> None:
    """With I and W measured, a stage's halves sum its blocks' (a recomputing stage recomputes its forward in
    each), except on the model's first stage, whose I torch skips and whose W is its whole backward in one call;
    the mirror image prices each stage as the original does."""
    blocks = BlockCosts.of([10.0] * 4, forward_ms=[4.0] * 4, param_bytes=[1] * 4, activation_bytes=[1] * 4,
                           output_bytes=[1] * 4, input_grad_ms=[2.0, 3.0, 3.0, 3.0],
                           weight_grad_ms=[5.0, 6.0, 6.0, 6.0])
    model = CostModel(schedule="ZBVZeroBubble", microbatches=4, stages_per_rank=2)
    p = Problem(blocks, [Device("d")] * 4, model)
    stages = p.stages([1, 1, 1, 1])
    assert [(s.input_grad_ms, s.weight_grad_ms) for s in stages] == [(0.0, 6.0), (3.0, 6.0), (3.0, 6.0), (3.0, 6.0)]
    first_two = Problem(blocks, [Device("d")] * 2, CostModel(schedule="1F1B", microbatches=2)).stages([2, 2])
    assert [(s.input_grad_ms, s.weight_grad_ms) for s in first_two] == [(0.0, 12.0), (6.0, 12.0)]
    recomputing = Problem(blocks, [Device("d")] * 2, CostModel(schedule="1F1B", microbatches=2)).stages(
        [2, 2], recompute=[True, True])
    assert [(s.input_grad_ms, s.weight_grad_ms) for s in recomputing] == [(0.0, 12.0 + 8.0), (6.0 + 8.0, 12.0 + 8.0)]
    mirrored = p.reversed()
    for s, original in zip(mirrored.stages([1, 1, 1, 1])[::-1], stages):
        assert (s.input_grad_ms, s.weight_grad_ms) == (original.input_grad_ms, original.weight_grad_ms)


def test_an_input_half_over_its_backward_is_capped_only_without_a_measured_weight_half() -> None:
    """An older profile's input-gradient time is the part of the backward it is (capped at the backward: a noisy
    repeat); measured as torch's I beside its W, it stands as measured (the halves may exceed the backward)."""
    profile = Profile.from_json(str(ROOT / "profiles" / "gpt2-tiny-cpu-mb4.json"))
    first = profile.layers[1]
    over = dataclasses.replace(first, input_grad_ms=first.backward_ms * 2)
    old = dataclasses.replace(profile, layers=(profile.layers[0], over, *profile.layers[2:]))
    assert BlockCosts.from_profile(old).input_grad_ms[1] == first.backward_ms
    halves = dataclasses.replace(old, layers=tuple(dataclasses.replace(x, weight_grad_ms=1.0) for x in old.layers))
    assert BlockCosts.from_profile(halves).input_grad_ms[1] == first.backward_ms * 2

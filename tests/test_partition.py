"""The partitioner against brute force, known answers, and its invariants."""
from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from autopart.core.costmodel import BlockCosts, CostModel, MirroredProblem, Problem
from autopart.formats.devices import Device
from autopart.formats.optimizers import OPTIMIZER_STATES
from autopart.errors import AutopartError
from autopart.core.partition import split_bottleneck, split_minvar, split_parameters, split_uniform
from autopart.formats.profile import Profile

ROOT = Path(__file__).resolve().parent.parent


def _compositions(n: int, k: int) -> list[list[int]]:
    return [[b - a for a, b in zip((0,) + cut, cut + (n,))] for cut in itertools.combinations(range(1, n), k - 1)]


def _stage_bytes(blocks: dict[str, Any], k: int, model: CostModel, s: int, i: int, j: int,
                 recompute: bool) -> float:
    """The memory of stage ``s`` holding blocks ``i..j`` (docs/cost-model.md, the memory terms' table),
    written out plainly."""
    n = len(blocks["compute"])
    skips = blocks.get("skips", [0.0] * n)
    params = sum(blocks["params"][i: j + 1]) * (2 + model.optimizer_states)
    for size, users in blocks.get("ties", []):  # a copy on every stage that uses it but not its owner
        if users[0] not in range(i, j + 1) and any(u in range(i, j + 1) for u in users):
            params += size * (2 + model.optimizer_states)
    acts = sum(blocks["acts"][i: j + 1])
    skip_in = skips[i - 1] if i > 0 else 0.0
    m = model.microbatches
    in_flight = m if model.schedule == "GPipe" else min(m, k - s)
    keep = blocks["input"][0] if i == 0 else blocks["outs"][i - 1] + skips[i - 1]  # what the stage receives
    last = j == n - 1
    held = blocks["outs"][n - 1] if last else blocks["outs"][j] + skips[j]  # its output, until the backward
    gradients = held + (keep if i > 0 else 0.0) + (blocks["outs"][n - 1] if last else 0.0)  # during a backward
    runtime = (m - in_flight) * keep + (0.0 if last else m * held)  # receive buffers: inputs, output gradients
    if recompute:
        return params + in_flight * (keep + held) + acts + gradients + runtime
    return params + in_flight * (acts + skip_in + held) + gradients + runtime


def _brute_stage(blocks: dict[str, Any], devices: Sequence[Device], model: CostModel, s: int,
                 i: int, j: int) -> float | None:
    """The cost model (docs/cost-model.md) written out plainly: the stage's time, or None if it cannot fit."""
    k = len(devices)
    skips = blocks.get("skips", [0.0] * len(blocks["compute"]))
    comp = sum(blocks["compute"][i: j + 1])
    fwd = sum(blocks["forward"][i: j + 1])

    def send(b: int) -> float:
        if not model.sends:
            return 0.0
        bw = model.bandwidth_bytes_per_ms
        return ((blocks["outs"][b] + skips[b]) / bw if bw else 0.0) + model.latency_ms

    sends = (send(i - 1) if s > 0 else 0.0) + (send(j) if s < k - 1 else 0.0)
    limit = devices[s].memory_bytes if devices[s].memory_bytes is not None else math.inf
    if _stage_bytes(blocks, k, model, s, i, j, False) <= limit:
        return comp / devices[s].speed + sends
    if model.recompute and _stage_bytes(blocks, k, model, s, i, j, True) <= limit:
        return (comp + fwd) / devices[s].speed + sends
    return None


def _brute(blocks: dict[str, Any], devices: Sequence[Device], model: CostModel
           ) -> list[tuple[list[int], list[float]]]:
    """Every split that fits, with its stage times."""
    out = []
    for balance in _compositions(len(blocks["compute"]), len(devices)):
        times, first = [], 0
        for s, count in enumerate(balance):
            t = _brute_stage(blocks, devices, model, s, first, first + count - 1)
            if t is None:
                break
            times.append(t)
            first += count
        else:
            out.append((balance, times))
    return out


def _problem(blocks: dict[str, Any], devices: Sequence[Device], model: CostModel) -> Problem:
    costs = BlockCosts.of(blocks["compute"], forward_ms=blocks["forward"], param_bytes=blocks["params"],
                          activation_bytes=blocks["acts"], output_bytes=blocks["outs"], input_bytes=blocks["input"][0],
                          skip_bytes=blocks.get("skips"), ties=blocks.get("ties", ()))
    return Problem(costs, devices, model)


@st.composite
def cases(draw: st.DrawFn, sends: bool, memory: bool, speeds: bool, graph: bool = False, choice: bool = False
          ) -> tuple[dict[str, Any], list[Device], CostModel]:
    """Blocks, devices and a cost model; with ``choice``, at least 2 stages and a block more than stages, so
    there is more than one split to choose from."""
    n = draw(st.integers(3 if choice else 1, 8))
    k = draw(st.integers(2 if choice else 1, min(n - 1 if choice else n, 4)))
    small = st.integers(0, 12)
    forward = [draw(small) / 4 for _ in range(n)]
    blocks = {
        "forward": forward,
        "compute": [f + draw(small) / 4 for f in forward],
        "params": [float(draw(st.integers(0, 20))) for _ in range(n)],
        "acts": [float(draw(st.integers(0, 20))) for _ in range(n)],
        "outs": [float(draw(st.integers(0, 20))) for _ in range(n)],
        "input": [float(draw(st.integers(0, 5)))],
    }
    if graph:  # skips crossing boundaries, and a weight shared by some blocks (the owner, the first, has its bytes)
        blocks["skips"] = [float(draw(st.integers(0, 15))) for _ in range(n)]
        users = sorted(draw(st.sets(st.integers(0, n - 1), min_size=1, max_size=n)))
        size = float(draw(st.integers(1, 20)))
        blocks["params"][users[0]] += size
        blocks["ties"] = [(size, users)]
    devices = []
    for _ in range(k):
        limit = draw(st.one_of(st.none(), st.integers(10, 250))) if memory else None
        speed = draw(st.sampled_from([1.0, 0.5, 2.0, 3.0])) if speeds else 1.0
        devices.append(Device("d", memory_bytes=limit, speed=speed))
    model = CostModel(
        schedule=draw(st.sampled_from(["gpipe", "1f1b"])), microbatches=draw(st.integers(1, 5)),
        optimizer=draw(st.sampled_from(sorted(OPTIMIZER_STATES))),
        bandwidth_bytes_per_ms=draw(st.sampled_from([None, 2.0, 7.0])) if sends else None,
        latency_ms=draw(st.sampled_from([0.0, 0.25])) if sends else 0.0,
        recompute=draw(st.booleans()))
    return blocks, devices, model


def _check_exact(case: tuple[dict[str, Any], list[Device], CostModel]) -> None:
    blocks, devices, model = case
    feasible = _brute(blocks, devices, model)
    problem = _problem(blocks, devices, model)
    if not feasible:
        with pytest.raises(AutopartError):
            split_bottleneck(problem)
        return
    result = split_bottleneck(problem)
    best = min(max(times) for _, times in feasible)
    assert result.fits
    assert result.bottleneck_ms == pytest.approx(best, rel=1e-9, abs=1e-12)
    tied = [sum(t * t for t in times) for _, times in feasible if max(times) <= best * (1 + 1e-9) + 1e-12]
    assert result.sum_sq == pytest.approx(min(tied), rel=1e-9, abs=1e-12)
    assert sum(result.balance) == len(blocks["compute"]) and min(result.balance) >= 1


@settings(deadline=None)
@given(cases(sends=False, memory=False, speeds=False))
def test_exact_matches_brute_force(case: tuple[dict[str, list[float]], list[Device], CostModel]) -> None:
    _check_exact(case)


@settings(deadline=None)
@given(cases(sends=False, memory=True, speeds=False))
def test_exact_with_memory_limits_matches_brute_force(case: tuple[dict[str, list[float]], list[Device], CostModel]) -> None:
    _check_exact(case)


@settings(deadline=None)
@given(cases(sends=True, memory=False, speeds=True))
def test_exact_with_sends_and_speeds_matches_brute_force(case: tuple[dict[str, list[float]], list[Device], CostModel]) -> None:
    _check_exact(case)


@settings(deadline=None)
@given(cases(sends=True, memory=True, speeds=True))
def test_exact_with_everything_matches_brute_force(case: tuple[dict[str, list[float]], list[Device], CostModel]) -> None:
    _check_exact(case)


@settings(deadline=None)
@given(cases(sends=True, memory=True, speeds=True, graph=True))
def test_exact_with_skips_and_tied_weights_matches_brute_force(case: tuple[dict[str, Any], list[Device], CostModel]
                                                                ) -> None:
    _check_exact(case)


@settings(deadline=None)
@given(cases(sends=False, memory=True, speeds=False, graph=True))
def test_exact_with_skips_under_memory_alone_matches_brute_force(case: tuple[dict[str, Any], list[Device], CostModel]
                                                                  ) -> None:
    _check_exact(case)


@settings(deadline=None)
@given(cases(sends=True, memory=True, speeds=True, graph=True))
def test_mirror_image_prices_every_stage_as_the_original(case: tuple[dict[str, Any], list[Device], CostModel]
                                                         ) -> None:
    """Every stage (s, i, j) that some split has, and stage (K-1-s, n-1-j, n-1-i) of the mirror image
    (:class:`MirroredProblem`, which the tie-break's backward sweep runs on) cost the same, sends swapped;
    the mirror of the mirror is a plain :class:`Problem` again."""
    blocks, devices, model = case
    problem = _problem(blocks, devices, model)
    mirror = problem.reversed()
    assert isinstance(mirror, MirroredProblem)
    again = mirror.reversed()
    assert type(again) is Problem
    n, k = problem.n, problem.k
    for s, i in itertools.product(range(k), range(n)):
        for j in range(i, n):
            if (s == 0) != (i == 0) or (s == k - 1) != (j == n - 1) or i < s or n - 1 - j < k - 1 - s:
                continue  # stage s of no split
            here, there, back = problem.stage(s, i, j), mirror.stage(k - 1 - s, n - 1 - j, n - 1 - i), again.stage(s, i, j)
            assert back == here
            assert (there.memory_bytes, there.recompute, there.static_bytes, there.activation_bytes,
                    there.backward_extra_bytes) == (here.memory_bytes, here.recompute, here.static_bytes,
                                                    here.activation_bytes, here.backward_extra_bytes)
            assert there.time_ms == pytest.approx(here.time_ms, rel=1e-12, abs=1e-12)
            assert (there.send_forward_ms, there.send_backward_ms) == (here.send_backward_ms, here.send_forward_ms)
            fits_here = problem.evaluate(s, np.array([i]), np.array([j]))[3][0]
            fits_there = mirror.evaluate(k - 1 - s, np.array([n - 1 - j]), np.array([n - 1 - i]))[3][0]
            assert bool(fits_there) == bool(fits_here)


@st.composite
def fitting_cases(draw: st.DrawFn) -> tuple[dict[str, Any], list[Device], CostModel]:
    """Memory limits that some split fits by construction: a split is drawn first, and each device's limit is
    that split's stage's own need plus a little (often nothing), so the limits bind but never rule out all."""
    blocks, devices, model = draw(cases(sends=True, memory=False, speeds=True, choice=True))
    n, k = len(blocks["compute"]), len(devices)
    chosen = draw(st.sampled_from(_compositions(n, k)))
    first = 0
    for s, count in enumerate(chosen):
        need = _stage_bytes(blocks, k, model, s, first, first + count - 1, False)
        slack = draw(st.one_of(st.none(), st.sampled_from([0, 0, 1, 5, 20])))
        limit = None if slack is None else int(need) + slack
        devices[s] = Device("d", memory_bytes=limit, speed=devices[s].speed)
        first += count
    return blocks, devices, model


@settings(deadline=None)
@given(fitting_cases())
def test_minvar_matches_brute_force(case: tuple[dict[str, list[float]], list[Device], CostModel]) -> None:
    blocks, devices, model = case
    feasible = _brute(blocks, devices, model)
    assert feasible  # by construction: the drawn split fits
    result = split_minvar(_problem(blocks, devices, model))
    assert result.fits and sum(result.balance) == len(blocks["compute"])
    assert result.sum_sq == pytest.approx(min(sum(t * t for t in times) for _, times in feasible),
                                          rel=1e-9, abs=1e-12)
    assert list(result.balance) in [balance for balance, _ in feasible]


@settings(deadline=None)
@given(st.integers(1, 40), st.integers(1, 40))
def test_uniform_spreads_the_remainder_first(n: int, k: int) -> None:
    if k > n:
        return
    balance = split_uniform(Problem([1.0] * n, [Device("d")] * k, CostModel())).balance
    assert sum(balance) == n and max(balance) - min(balance) <= 1 and list(balance) == sorted(balance, reverse=True)


def _exact(costs: Sequence[float], k: int, **kw: object) -> tuple[int, ...]:
    return split_bottleneck(Problem(costs, [Device("d")] * k, CostModel(), **kw)).balance  # type: ignore[arg-type]


def test_known_answers() -> None:
    assert _exact([1.0] * 12, 4) == (3, 3, 3, 3)
    assert _exact([1, 2, 3, 4, 5, 6], 2) == (4, 2)  # torchgpipe's own example
    assert _exact([1, 1, 1, 100, 1, 1, 1], 3) == (3, 1, 3)  # the giant block alone
    fast = split_bottleneck(Problem([1.0] * 8, [Device("slow"), Device("fast", speed=3.0)], CostModel()))
    assert fast.balance == (2, 6)


def test_memory_forces_the_split() -> None:
    # 4 equal blocks of 10 parameter bytes, plain SGD (2 x 10 bytes each): a 40-byte device holds two.
    problem = Problem([1.0, 1.0, 1.0, 5.0], [Device("d", memory_bytes=40)] * 2, CostModel(optimizer="sgd"),
                      param_bytes=[10] * 4)
    assert split_bottleneck(problem).balance == (2, 2)
    with pytest.raises(AutopartError, match="smallest limit that fits is"):
        split_bottleneck(Problem([1.0] * 4, [Device("d", memory_bytes=30)] * 2, CostModel(optimizer="sgd"),
                            param_bytes=[10] * 4))


def test_recomputation_only_where_it_is_needed() -> None:
    # GPipe holds 4 micro-batches: three light blocks (30 bytes x 4 > 60) fit only when recomputed,
    # which beats giving the heavy last block a neighbour (bottleneck 6 instead of 7).
    problem = Problem([1.0, 1.0, 1.0, 6.0], [Device("d", memory_bytes=60)] * 2,
                      CostModel(schedule="gpipe", microbatches=4), forward_ms=[0.5] * 4,
                      activation_bytes=[10, 10, 10, 1], output_bytes=[1] * 4)
    result = split_bottleneck(problem)
    assert result.balance == (3, 1) and [s.recompute for s in result.stages] == [True, False]
    assert result.stages[0].time_ms == 4.5 and result.bottleneck_ms == 6.0
    assert result.fits
    # without recomputation nothing fits 60 B: (2, 2) holds 4 x (20 + 1 held output) + 1 output gradient
    # + 4 x 1 gradient receive buffer = 89 B and 4 x (11 + 1) + 3 gradients = 51 B, the least of all splits
    # ((3, 1): 129 B, (1, 3): 91 B), so 89 B is the smallest limit, and there (2, 2) is the split
    def plain(limit: int) -> Problem:
        return Problem([1.0, 1.0, 1.0, 6.0], [Device("d", memory_bytes=limit)] * 2,
                       CostModel(schedule="gpipe", microbatches=4, recompute=False), forward_ms=[0.5] * 4,
                       activation_bytes=[10, 10, 10, 1], output_bytes=[1] * 4)

    with pytest.raises(AutopartError, match=r"no split of 4 blocks into 2 stages fits the memory limits "
                                            r"\(GPipe, 4 micro-batches, .*\); the smallest limit that fits is 89 B$"):
        split_bottleneck(plain(60))
    at_89 = split_bottleneck(plain(89))
    assert at_89.balance == (2, 2) and not any(s.recompute for s in at_89.stages) and at_89.bottleneck_ms == 7.0


def test_lm_head_gets_fewer_layers_than_uniform() -> None:
    profile = Profile.from_json(ROOT / "profiles" / "gpt2-small-cpu-mb1.json")
    problem = Problem.from_profile(profile, [Device("d")] * 4, CostModel(microbatches=4))
    exact, uniform = split_bottleneck(problem), split_uniform(problem)
    assert exact.balance[-1] < uniform.balance[-1]
    assert exact.bottleneck_ms < uniform.bottleneck_ms


def test_parameters_split_balances_parameter_bytes_not_time() -> None:
    # one block holds most of the weights: by parameters it stands alone, by time the blocks split evenly
    problem = Problem([1.0] * 6, [Device("d")] * 2, CostModel(), param_bytes=[30, 1, 1, 1, 1, 1])
    by_params = split_parameters(problem)
    assert by_params.method == "parameters" and by_params.balance == (1, 5)
    assert [s.time_ms for s in by_params.stages] == [1.0, 5.0]  # priced by the real problem, not the weights
    assert split_bottleneck(problem).balance == (3, 3)
    tight = Problem([1.0] * 6, [Device("d", memory_bytes=100)] * 2, CostModel(), param_bytes=[30, 1, 1, 1, 1, 1])
    assert not split_parameters(tight).fits  # 30 B x 4 (weights, gradients, 2 Adam states) = 120 B > 100 B


def test_parameters_split_matches_brute_force_on_gpt2() -> None:
    """Every split of GPT-2 small's 14 blocks into 4 stages: the fewest parameter bytes on the fullest stage,
    then the smallest sum of squares (the bottleneck split's tie-break)."""
    profile = Profile.from_json(ROOT / "profiles" / "gpt2-small-cpu-mb1.json")
    problem = Problem.from_profile(profile, [Device("d")] * 4, CostModel(microbatches=4))
    params = [layer.param_bytes for layer in profile.layers]

    def stage_bytes(balance: Sequence[int]) -> list[int]:
        edges = list(itertools.accumulate(balance, initial=0))
        return [sum(params[a:b]) for a, b in zip(edges, edges[1:])]

    best = min(_compositions(len(params), 4), key=lambda b: (max(stage_bytes(b)), sum(x * x for x in stage_bytes(b))))
    got = split_parameters(problem)
    assert max(stage_bytes(got.balance)) == max(stage_bytes(best))
    assert list(got.balance) == best, (got.balance, stage_bytes(got.balance), best, stage_bytes(best))
    assert got.balance != split_bottleneck(problem).balance  # the LM head is heavy in time, not in bytes


@pytest.mark.parametrize("costs, k, message", [
    ([1.0, 2.0], 3, "3 stages > 2 blocks"),
    ([1.0, math.nan], 1, "is nan"),
    ([1.0, -2.0], 1, "is -2.0"),
])
def test_bad_problems(costs: list[float], k: int, message: str) -> None:
    with pytest.raises(AutopartError, match=message):
        Problem(costs, [Device("d")] * k, CostModel())


def test_lower_bound_and_gap() -> None:
    result = split_bottleneck(Problem([1.0] * 10, [Device("d")] * 5, CostModel()))
    assert result.lower_bound_ms == 2.0 and result.gap == 0.0

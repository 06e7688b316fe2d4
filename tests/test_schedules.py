"""Schedules as data, and the simulator against pipeline theory (exact, on equal stages)."""
from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import pytest

from autopart.errors import AutopartError
from autopart.core.schedules import Action, build_schedule, canonical_schedule
from autopart.core.simulate import simulate
from autopart.formats.stage import StageCost


def test_gpipe_reads_like_a_table() -> None:
    assert build_schedule("GPipe", 2, 3).format().splitlines() == [
        "rank 0  rank 1",
        "0F0     1F0",
        "0F1     1F1",
        "0F2     1F2",
        "0B0     1B0",
        "0B1     1B1",
        "0B2     1B2",
    ]


def test_1f1b_order() -> None:
    orders = [[str(a) for a in o] for o in build_schedule("1f1b", 3, 4).orders]
    assert orders[0] == ["0F0", "0F1", "0F2", "0B0", "0F3", "0B1", "0B2", "0B3"]
    assert orders[2] == ["2F0", "2B0", "2F1", "2B1", "2F2", "2B2", "2F3", "2B3"]


@pytest.mark.parametrize("name", ["GPipe", "1F1B"])
@pytest.mark.parametrize("k, m", [(2, 2), (2, 8), (4, 4), (4, 16), (3, 7), (8, 8)])
def test_equal_stages_match_theory(name: str, k: int, m: int) -> None:
    f, b = 1.25, 2.5
    sim = simulate(build_schedule(name, k, m), [StageCost(f, b, activation_bytes=1)] * k)
    assert sim.step_ms == pytest.approx((m + k - 1) * (f + b), rel=1e-12)
    assert sim.bubble_fraction == pytest.approx((k - 1) / (m + k - 1), rel=1e-12)
    expected = [m] * k if name == "GPipe" else [min(m, k - s) for s in range(k)]
    assert list(sim.peak_in_flight) == expected


@pytest.mark.parametrize("k, m, v", [(2, 4, 2), (4, 8, 2), (4, 8, 4), (3, 6, 2), (4, 12, 3), (2, 8, 2)])
def test_interleaving_shrinks_the_bubble_to_k_minus_1_over_vm(k: int, m: int, v: int) -> None:
    f, b = 0.5, 1.0  # per chunk; one rank's work per micro-batch is v * (f + b)
    sim = simulate(build_schedule("Interleaved1F1B", k, m, v), [StageCost(f, b)] * (k * v))
    ideal = m * v * (f + b)
    bubble = Fraction(sim.step_ms - ideal).limit_denominator(10**6) / Fraction(ideal).limit_denominator(10**6)
    assert bubble == Fraction(k - 1, v * m)


def test_zero_bubble_fills_idle_time() -> None:
    k, m = 4, 8
    zbv = simulate(build_schedule("ZBVZeroBubble", k, m, 2), [StageCost(1.0, 2.0)] * (2 * k))
    plain = simulate(build_schedule("1F1B", k, m), [StageCost(2.0, 4.0)] * k)  # the same work, unsplit
    assert zbv.step_ms < plain.step_ms and zbv.bubble_fraction < 0.06


def _torch_orders(cls: type, k: int, m: int, v: int) -> dict[int, list[str | None]]:
    stages = [SimpleNamespace(num_stages=k * v, group_size=k, group_rank=0, submod=None) for _ in range(v)]
    schedule = cls(stages, n_microbatches=m)
    return {r: [str(a) if a is not None else None for a in acts] for r, acts in schedule.pipeline_order.items()}


@pytest.mark.parametrize("k, m", [(2, 4), (2, 3), (3, 6), (4, 8), (4, 10), (4, 3)])
def test_orders_are_torchs_own(k: int, m: int) -> None:
    pipelining = pytest.importorskip("torch.distributed.pipelining")
    for name, cls, v in (("Interleaved1F1B", pipelining.ScheduleInterleaved1F1B, 2),
                         ("ZBVZeroBubble", pipelining.ScheduleZBVZeroBubble, 2)):
        ours = build_schedule(name, k, m, v)
        theirs = _torch_orders(cls, k, m, v)
        for r in range(k):
            assert [str(a) if a is not None else None for a in ours.orders[r]] == theirs[r], (name, r)


def test_csv_round_trip(tmp_path: Path) -> None:
    schedule = build_schedule("ZBVZeroBubble", 2, 4, 2)
    path = schedule.to_csv(tmp_path / "zbv.csv")
    rows = path.read_text().splitlines()
    assert len(rows) == 2 and rows[0].startswith("0F0,0F1,0F2,3F0,3I0,3W0")
    assert Action.parse("3W0") == Action(3, "W", 0)


@pytest.mark.parametrize("call, message", [
    (lambda: build_schedule("1F1B", 4, 2), "at least as many micro-batches as ranks: 2 < 4"),
    (lambda: build_schedule("Pipedream", 2, 2), "unknown schedule 'Pipedream'"),
    (lambda: build_schedule("Interleaved1F1B", 2, 5, 2), "multiple of 2"),
    (lambda: build_schedule("ZBVZeroBubble", 2, 4, 3), "exactly 2 stages per rank"),
    (lambda: build_schedule("GPipe", 2, 4, 2), "one stage per rank"),
])
def test_schedule_errors(call: object, message: str) -> None:
    with pytest.raises(AutopartError, match=message):
        call()  # type: ignore[operator]


def test_names_are_torchs() -> None:
    assert canonical_schedule("gpipe") == "GPipe" and canonical_schedule("ScheduleInterleaved1F1B") == "Interleaved1F1B"
    assert canonical_schedule("zbv") == "ZBVZeroBubble"


@pytest.mark.parametrize("name, k, m, v", [("GPipe", 3, 5, 1), ("1F1B", 4, 6, 1), ("1F1B", 3, 3, 1),
                                           ("Interleaved1F1B", 2, 4, 2), ("Interleaved1F1B", 3, 6, 3),
                                           ("ZBVZeroBubble", 2, 4, 2), ("ZBVZeroBubble", 3, 7, 2)])
def test_in_flight_from_the_orders_is_what_the_simulator_holds(name: str, k: int, m: int, v: int) -> None:
    sched = build_schedule(name, k, m, v)
    sim = simulate(sched, [StageCost(1.0, 2.0, activation_bytes=1)] * (k * v))
    assert sched.peak_in_flight() == sim.peak_in_flight
    if name == "GPipe":
        assert sched.peak_in_flight() == (m,) * k
    if name == "1F1B":
        assert sched.peak_in_flight() == tuple(min(m, k - s) for s in range(k))

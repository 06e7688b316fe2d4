from __future__ import annotations

import pytest

from autopart.errors import AutopartError
from autopart.core.schedules import Action, Schedule, build_schedule
from autopart.core.simulate import closed_form_step_ms, simulate
from autopart.formats.stage import StageCost


def test_sends_between_ranks_add_to_the_step() -> None:
    free = simulate(build_schedule("GPipe", 2, 1), [StageCost(1.0, 2.0)] * 2)
    sent = simulate(build_schedule("GPipe", 2, 1), [StageCost(1.0, 2.0, send_forward_ms=0.5, send_backward_ms=0.5)] * 2)
    assert free.step_ms == 6.0 and sent.step_ms == 7.0
    assert any(e.kind == "SEND" for e in sent.events)


def test_memory_peaks() -> None:
    costs = [StageCost(1.0, 2.0, activation_bytes=10, static_bytes=100)] * 2
    gpipe = simulate(build_schedule("GPipe", 2, 4), costs)
    assert gpipe.peak_memory_bytes == (140, 140)
    one = simulate(build_schedule("1F1B", 2, 4), costs)
    assert one.peak_memory_bytes == (120, 110) and one.peak_in_flight == (2, 1)
    recompute = [StageCost(1.0, 3.0, activation_bytes=1, static_bytes=0, backward_extra_bytes=50)] * 2
    assert simulate(build_schedule("GPipe", 2, 4), recompute).peak_memory_bytes == (54, 54)


def test_a_schedule_that_waits_forever_is_reported() -> None:
    bad = Schedule(name="bad", num_ranks=2, stages_per_rank=1, microbatches=1,
                   orders=((Action(0, "B", 0), Action(0, "F", 0)), (Action(1, "F", 0), Action(1, "B", 0))),
                   stage_rank=(0, 1))
    with pytest.raises(AutopartError, match="deadlocks: rank 0 waits at 0B0"):
        simulate(bad, [StageCost(1.0, 1.0)] * 2)


def test_unequal_stages_are_paced_by_the_slowest() -> None:
    sim = simulate(build_schedule("1F1B", 2, 8), [StageCost(1.0, 2.0), StageCost(3.0, 6.0)])
    assert sim.step_ms == pytest.approx(3.0 + 8 * 9.0)  # fill with stage 0's forward, then stage 1 sets the pace


def test_closed_form_step_of_equal_stages() -> None:
    step, bubble = closed_form_step_ms([2.0] * 4, 8)
    assert step == (8 + 4 - 1) * 2.0 and bubble == pytest.approx(3 / 11)
    for name in ("GPipe", "1F1B"):
        sim = simulate(build_schedule(name, 4, 8), [StageCost(0.5, 1.5)] * 4)
        assert (sim.step_ms, sim.bubble_fraction) == pytest.approx(closed_form_step_ms([2.0] * 4, 8))


def test_a_measured_input_gradient_sets_the_split_of_the_backward() -> None:
    """ZBVZeroBubble runs I then W: I takes the measured input-gradient time, W the rest of the backward;
    without a measurement, half each."""
    schedule = build_schedule("ZBVZeroBubble", 2, 4, 2)
    measured = [StageCost(forward_ms=1.0, backward_ms=4.0, input_grad_ms=1.0)] * 4
    guessed = [StageCost(forward_ms=1.0, backward_ms=4.0)] * 4
    # both halves as torch runs them: together longer than the backward in one call
    halves = [StageCost(forward_ms=1.0, backward_ms=4.0, input_grad_ms=1.5, weight_grad_ms=3.5)] * 4
    for costs, (i_ms, w_ms) in ((measured, (1.0, 3.0)), (guessed, (2.0, 2.0)), (halves, (1.5, 3.5))):
        events = simulate(schedule, costs).events
        assert {e.end_ms - e.start_ms for e in events if e.kind == "I"} == {i_ms}
        assert {e.end_ms - e.start_ms for e in events if e.kind == "W"} == {w_ms}

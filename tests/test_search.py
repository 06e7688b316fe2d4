from __future__ import annotations

import pytest

from autopart.formats.devices import Device
from autopart.errors import AutopartError
from autopart.formats.profile import LayerProfile, Profile
from autopart.core.costmodel import CostModel
from autopart.core.search import all_schedules, plan_search


def _profile(overhead_ms: float, blocks: int = 8) -> Profile:
    """Blocks whose time per micro-batch is a fixed overhead plus 1 ms per sample."""
    def layers(b: int) -> tuple[LayerProfile, ...]:
        t = overhead_ms + 1.0 * b
        return tuple(LayerProfile(name=f"b{i}", forward_ms=t / 3, backward_ms=2 * t / 3, param_bytes=1000,
                                  activation_bytes=100 * b, output_bytes=10 * b) for i in range(blocks))

    return Profile(model="m", device="cpu", dtype="float32", microbatch_size=1, sample_shape=(1, 4), torch="2.13.0",
                   layers=layers(1), by_microbatch_size=tuple((b, layers(b)) for b in (2, 4, 8, 16)))


def _one_f_one_b_step_ms(overhead_ms: float, microbatches: int, global_batch: int = 64) -> float:
    """Known answer: 8 equal blocks on 4 ranks are 2 per stage, each stage ``2 (overhead + size)`` ms per
    micro-batch (the profile has every size's times), and 1F1B without sends takes ``M + 4 - 1`` stage times."""
    return (microbatches + 3) * 2 * (overhead_ms + global_batch / microbatches)


@pytest.mark.parametrize("overhead_ms, best, scaling", [
    (0.0, 64, ""),  # no overhead: more micro-batches, smaller bubble; size 1 is the profile's own
    (8.0, 4, "measured at micro-batch size 16"),  # a fixed cost per micro-batch makes very many slow
])
def test_overhead_per_microbatch_limits_how_many_pay_off(overhead_ms: float, best: int, scaling: str) -> None:
    plan = plan_search(_profile(overhead_ms), [Device("d")] * 4, CostModel(), global_batch=64,
                       search_microbatches=True, schedules=[("1F1B", 1)])
    counts = [4, 8, 16, 32, 64]  # the divisors of 64 with at least one micro-batch per rank
    want = sorted((_one_f_one_b_step_ms(overhead_ms, m), m) for m in counts)
    assert want[0][1] == best and plan.microbatches == best and plan.microbatch_size == 64 // best
    assert plan.balance == (2, 2, 2, 2) and plan.scaling == scaling
    assert plan.predicted.step_ms == pytest.approx(want[0][0], rel=1e-12)
    assert [(c.microbatches, c.step_ms) for c in plan.runners_up] == [(m, pytest.approx(t, rel=1e-12))
                                                                      for t, m in want[1:]]


def test_auto_schedule_records_the_winner_and_runners_up() -> None:
    plan = plan_search(_profile(2.0), [Device("d")] * 2, CostModel(), global_batch=16, search_microbatches=True,
                       schedules=all_schedules())
    names = {plan.schedule} | {c.schedule for c in plan.runners_up}
    assert len(names) >= 2 and len(plan.runners_up) == 5
    assert sum(plan.balance) == 8 and plan.num_ranks == 2


def test_memory_that_no_choice_fits() -> None:
    tiny = [Device("d", memory_bytes=100)] * 2
    with pytest.raises(AutopartError, match="no schedule and micro-batch count fits"):
        plan_search(_profile(1.0), tiny, CostModel(), global_batch=8, search_microbatches=True,
                    schedules=all_schedules())
    with pytest.raises(AutopartError, match="alone needs"):
        plan_search(_profile(1.0), tiny, CostModel(microbatches=2), global_batch=8, schedules=[("GPipe", 1)])


def test_global_batch_must_divide() -> None:
    with pytest.raises(AutopartError, match="not divisible by 3"):
        plan_search(_profile(1.0), [Device("d")] * 2, CostModel(microbatches=3), global_batch=8,
                    schedules=[("GPipe", 1)])
    with pytest.raises(AutopartError, match="needs --global-batch"):
        plan_search(_profile(1.0), [Device("d")] * 2, CostModel(), search_microbatches=True)


def test_a_zero_bubble_rank_shares_its_memory_between_its_two_stages() -> None:
    """The first block holds most of the parameters: half a rank's memory each is too little for the stage
    that holds it, but the rank's other stage needs little, so the rank fits them both."""
    layers = tuple(LayerProfile(name=f"b{i}", forward_ms=1.0, backward_ms=2.0,
                                param_bytes=6000 if i == 0 else 100, activation_bytes=10, output_bytes=10)
                   for i in range(8))
    profile = Profile(model="m", device="cpu", dtype="float32", microbatch_size=1, sample_shape=(1, 4),
                      torch="2.13.0", layers=layers)
    # block 0 alone: 6000 x 4 (weights, gradients, 2 Adam states) + AdamW's step on its one tensor, 2 x 6000
    # (the profile does not say its largest tensor: all 6000 bytes) = 36,000 > 20,000
    rank_bytes = 40_000
    devices = [Device("d", memory_bytes=rank_bytes)] * 2
    model = CostModel(schedule="ZBVZeroBubble", microbatches=4, stages_per_rank=2, recompute=False)
    with pytest.raises(AutopartError):
        plan_search(profile, devices, model, method="bottleneck")  # an even share each: nothing fits
    plan = plan_search(profile, devices, model)
    assert plan.fits and plan.balance[0] >= 1
    for rank in range(2):
        stages = [plan.stages[s] for s in plan.stages_of(rank)]
        assert sum(st.cost.memory_bytes for st in stages) <= rank_bytes
        assert sum(st.device.memory_bytes or 0 for st in stages) <= rank_bytes  # its shares add up to the rank
        assert all(st.cost.memory_bytes <= (st.device.memory_bytes or 0) for st in stages)

"""A plan re-priced at another micro-batch size its profile measured; a rank's threads and device memory
against the plan. Pure: no torch, no processes."""
from __future__ import annotations

import dataclasses

import pytest

from autopart.core.costmodel import CostModel
from autopart.core.resize import plan_at_microbatch_size, ranks_over_limit
from autopart.core.search import plan_search, score_balance
from autopart.errors import AutopartError
from autopart.formats.devices import Device
from autopart.formats.plan import Plan
from autopart.formats.profile import Profile
from autopart.run.microbatch import plan_for_run, replan_commands
from autopart.run.resources import check_device_memory, planned_rank_bytes, rank_threads
from tests.conftest import ROOT

SMALL = ROOT / "profiles" / "gpt2-small-cpu-mb1-2-4-8.json"
TINY = ROOT / "profiles" / "gpt2-tiny-cpu-mb4.json"
GiB = 2**30


def _plan(profile: Profile, schedule: str, m: int, global_batch: int, devices: list[Device] | None = None) -> Plan:
    devices = devices or [Device("cpu")] * 2
    return plan_search(profile, devices, CostModel(schedule=schedule, microbatches=m), global_batch=global_batch,
                       profile_path=str(SMALL))


@pytest.mark.parametrize("schedule", ["GPipe", "1F1B"])
def test_resized_stages_are_those_the_search_prices_at_that_size(schedule: str) -> None:
    profile = Profile.from_json(SMALL)
    at2 = _plan(profile, schedule, 4, 8)
    assert at2.microbatch_size == 2
    assert plan_at_microbatch_size(at2, profile, 2).stages == at2.stages  # its own size: nothing changes
    at8 = _plan(profile, schedule, 4, 32)
    expected = score_balance(profile, [Device("cpu")] * 2, at8, at2.balance)  # the same split, priced at 8
    resized = plan_at_microbatch_size(at2, profile, 8)
    assert resized.microbatch_size == 8 and resized.balance == at2.balance
    assert [st.cost for st in resized.stages] == [st.cost for st in expected.stages]
    assert resized.predicted.step_ms == pytest.approx(expected.predicted.step_ms)
    assert resized.sample_shape[0] == 8
    assert all(b.cost.memory_bytes > a.cost.memory_bytes for a, b in zip(at2.stages, resized.stages))


def test_resizing_keeps_the_exposed_allreduce_in_the_step() -> None:
    profile = Profile.from_json(SMALL)
    at2 = _plan(profile, "1F1B", 4, 8)
    alone = plan_at_microbatch_size(at2, profile, 8)
    assert alone.predicted.allreduce_ms == 0.0
    replicated = dataclasses.replace(at2, data_parallel=2,
                                     predicted=dataclasses.replace(at2.predicted, allreduce_ms=7.5,
                                                                   step_ms=at2.predicted.step_ms + 7.5))
    resized = plan_at_microbatch_size(replicated, profile, 8)
    assert resized.predicted.allreduce_ms == 7.5
    assert resized.predicted.step_ms == pytest.approx(alone.predicted.step_ms + 7.5)


def test_a_size_the_profile_did_not_measure_is_refused() -> None:
    profile = Profile.from_json(SMALL)
    with pytest.raises(AutopartError, match=r"measured micro-batch sizes \[1, 2, 4, 8\], not 3"):
        plan_at_microbatch_size(_plan(profile, "GPipe", 4, 8), profile, 3)


def test_ranks_over_limit_names_the_rank_and_both_numbers() -> None:
    profile = Profile.from_json(SMALL)
    free = _plan(profile, "GPipe", 4, 8)
    need = [st.cost.memory_bytes for st in free.stages]
    limit = int(max(need) * 1.2)  # mb 2 fits; mb 8 holds about 4x the activations
    at2 = _plan(profile, "GPipe", 4, 8, [Device("cpu", memory_bytes=limit)] * 2)
    assert at2.fits and not any(st.cost.recompute for st in at2.stages) and ranks_over_limit(at2) == []
    resized = plan_at_microbatch_size(at2, profile, 8)
    over = ranks_over_limit(resized)
    assert over and not resized.fits
    assert over == [(r, resized.stages[r].cost.memory_bytes, limit) for r in range(2)
                    if resized.stages[r].cost.memory_bytes > limit]


def test_plan_for_run_refuses_an_unmeasured_size_with_the_replan_commands(tmp_path: object) -> None:
    profile = Profile.from_json(TINY)
    plan = plan_search(profile, [Device("cpu")] * 2, CostModel(schedule="GPipe", microbatches=2),
                       profile_path=str(TINY))
    assert plan_for_run(plan, "plan.json", None).plan is plan
    assert plan_for_run(plan, "plan.json", 8).plan is plan  # 2 x 4: the plan's own size
    with pytest.raises(AutopartError) as exc:
        plan_for_run(plan, "plan.json", 16)
    text = str(exc.value)
    assert "--global-batch 16 makes micro-batches of 8, the plan's are 4 (2 micro-batches)" in text
    assert "not measured at 8 (only [4])" in text
    assert ("autopart profile gpt2-tiny --microbatch-size 8 --threads 1 -o profile-mb8.json && autopart partition "
            "profile-mb8.json --stages 2 --schedule GPipe --microbatches 2 -o plan-mb8.json") in text
    other = dataclasses.replace(plan, profile=str(SMALL))  # measured at 8, but not these blocks
    with pytest.raises(AutopartError, match="holds other blocks than the plan's"):
        plan_for_run(other, "plan.json", 16)
    missing = dataclasses.replace(plan, profile="/no/such/profile.json")
    with pytest.raises(AutopartError, match="its profile '/no/such/profile.json' is not there"):
        plan_for_run(missing, "plan.json", 16)


def test_plan_for_run_says_the_new_peaks_of_a_measured_size() -> None:
    profile = Profile.from_json(SMALL)
    plan = _plan(profile, "1F1B", 4, 8)
    run = plan_for_run(plan, "plan.json", 16)
    assert run.plan.microbatch_size == 4 and run.plan.stages == plan_at_microbatch_size(plan, profile, 4).stages
    assert run.note is not None and "its profile measured 4: the plan's split at that size peaks at stage 0" in run.note


def test_replan_commands_keep_the_plans_memory_limit() -> None:
    profile = Profile.from_json(SMALL)
    plan = _plan(profile, "GPipe", 4, 8, [Device("cpu", memory_bytes=2 * GiB)] * 2)
    assert "--memory-limit 2GiB -o plan-mb8.json" in replan_commands(plan, 8)
    odd = _plan(profile, "GPipe", 4, 8, [Device("cpu", memory_bytes=2 * GiB + 1)] * 2)
    assert f"--memory-limit {2 * GiB + 1} " in replan_commands(odd, 8)  # exactly, as partition reads it back


def test_replan_commands_profile_on_the_plans_device_and_precision() -> None:
    """A GPU profile names its GPU ("NVIDIA H200"): the command profiles with --device cuda, and under the plan's
    precision (a profile without it would be fp32, which train then refuses for a bf16-mixed plan)."""
    profile = Profile.from_json(SMALL)
    plan = dataclasses.replace(_plan(profile, "GPipe", 4, 8), precision="bf16-mixed")
    gpu = dataclasses.replace(profile, device="NVIDIA H200")
    assert "--microbatch-size 8 --device cuda --precision bf16-mixed " in replan_commands(plan, 8, gpu)
    assert " --device" not in replan_commands(plan, 8, profile)  # "cpu (Intel Xeon)": the default device


def test_rank_threads() -> None:
    assert rank_threads(None, 4, cores=16, ranks_here=2) == 4  # the profile's
    assert rank_threads(None, 12, cores=16, ranks_here=2) == 8  # more than the cores allow: an even share
    assert rank_threads(None, None, cores=16, ranks_here=4) == 4
    assert rank_threads(3, 4, cores=16, ranks_here=2) == 3  # --threads
    assert rank_threads(None, 2, cores=1, ranks_here=2) == 1


def test_device_memory_below_the_plans_need_is_refused_with_both_numbers() -> None:
    profile = Profile.from_json(SMALL)
    plan = _plan(profile, "1F1B", 4, 8)
    need = planned_rank_bytes(plan, 1)
    assert need == plan.stages[1].cost.memory_bytes > 0
    check_device_memory(plan, 1, "cuda:1", total_bytes=80 * GiB, free_bytes=need)  # exactly enough
    with pytest.raises(AutopartError) as exc:
        check_device_memory(plan, 1, "cuda:1", total_bytes=80 * GiB, free_bytes=need - 1)
    text = str(exc.value)
    assert text.startswith("rank 1: the plan's stage 1 needs ") and "on cuda:1" in text
    assert "80 GiB in all" in text and "in use already" in text

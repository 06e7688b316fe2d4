"""Threads (issue 21, part B): a profile timed at several CPU thread counts, its blocks at any count
(``Profile.at_threads``), partition for the threads each rank gets (``--ranks-per-machine``), and train's
prediction at the threads its ranks got."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from autopart.core.resize import plan_at_microbatch_size
from autopart.errors import AutopartError
from autopart.formats.plan import Plan
from autopart.formats.profile import LayerProfile, Profile
from autopart.run.resources import plan_at_threads
from conftest import assert_one_line_error, run_cli, run_cli_here

GOLDEN = Path(__file__).resolve().parent / "golden"


def _layer(name: str, forward_ms: float, backward_ms: float, **more: object) -> LayerProfile:
    return LayerProfile(name=name, forward_ms=forward_ms, backward_ms=backward_ms, param_bytes=1000,
                        activation_bytes=100, output_bytes=100, **more)  # type: ignore[arg-type]


def _profile(times: dict[int, list[float]], main: int, cores: int | None = 2, **more: object) -> Profile:
    """Blocks b0, b1, ... whose forward takes ``times[threads][i]`` ms (backward twice that) at each count."""
    def layers(count: int) -> tuple[LayerProfile, ...]:
        return tuple(_layer(f"b{i}", ms, 2 * ms) for i, ms in enumerate(times[count]))

    return Profile(model="m", device="cpu", dtype="float32", microbatch_size=2, sample_shape=(2, 8), torch="2.13.0",
                   threads=main, cpu_cores=cores, layers=layers(main),
                   by_threads=tuple((count, layers(count)) for count in times if count != main),
                   **more)  # type: ignore[arg-type]


def test_at_threads_known_answers() -> None:
    # block 0: 12 ms at 1 thread, 3 at 4: a + b/t through both is b = 12, a = 0; block 1: 10 and 4: b = 8, a = 2
    profile = _profile({4: [3.0, 4.0], 1: [12.0, 10.0]}, main=4)
    two = profile.at_threads(2)
    assert two.threads == 2 and two.by_threads == ()
    assert [x.forward_ms for x in two.layers] == pytest.approx([6.0, 6.0])
    assert [x.backward_ms for x in two.layers] == pytest.approx([12.0, 12.0])
    assert [x.forward_ms for x in profile.at_threads(3).layers] == pytest.approx([4.0, 2 + 8 / 3])
    assert profile.at_threads(1).layers == profile.by_threads[0][1]  # measured: exactly
    assert profile.at_threads(4).layers == profile.layers
    assert profile.at_threads(16).layers == profile.layers  # beyond the range: the nearest measured count
    assert profile.at_threads(2).layers[0].param_bytes == 1000  # bytes do not depend on threads


def test_at_threads_records_the_count_its_times_are_for() -> None:
    """Beyond the timed range, and for a profile timed at one count, the times are the nearest timed count's, and
    so is ``threads``: a plan made from it never records a count its times were not measured at."""
    profile = _profile({4: [3.0, 4.0], 2: [6.0, 7.0]}, main=4)
    assert [profile.at_threads(t).threads for t in (1, 2, 3, 4, 16)] == [2, 2, 3, 4, 4]
    assert profile.at_threads(1).layers == profile.by_threads[0][1] and profile.at_threads(16).layers == profile.layers
    alone = _profile({8: [1.0, 2.0]}, main=8)
    assert alone.at_threads(4).threads == 8 and alone.at_threads(4).layers == alone.layers
    unknown = dataclasses.replace(alone, threads=None)
    assert unknown.at_threads(4).threads is None  # a profile that records no count is left as it is


def test_at_threads_interpolates_the_loss_and_scales_it_at_other_sizes() -> None:
    """The last block's loss times depend on threads as its other times do: measured at 1 (8 and 4 ms) and 4 threads
    (2 and 1 ms) they are ``b / t``, so 4 and 2 ms at 2 threads; at micro-batch size 8 scaled by the same ratio."""
    def with_loss(layers: tuple[LayerProfile, ...], f: float, b: float) -> tuple[LayerProfile, ...]:
        return (*layers[:-1], dataclasses.replace(layers[-1], loss_forward_ms=f, loss_backward_ms=b))

    base = _profile({4: [3.0, 4.0], 1: [12.0, 16.0]}, main=4)
    other = (8, with_loss((_layer("b0", 30.0, 60.0), _layer("b1", 40.0, 80.0)), 20.0, 10.0))
    profile = dataclasses.replace(base, layers=with_loss(base.layers, 2.0, 1.0), by_microbatch_size=(other,),
                                  by_threads=((1, with_loss(base.by_threads[0][1], 8.0, 4.0)),))
    two = profile.at_threads(2)
    last = two.layers[-1]
    assert (last.loss_forward_ms, last.loss_backward_ms) == (pytest.approx(4.0), pytest.approx(2.0))
    assert (two.layers[0].loss_forward_ms, two.layers[0].loss_backward_ms) == (0.0, 0.0)
    scaled = two.sizes()[8][-1]
    assert (scaled.loss_forward_ms, scaled.loss_backward_ms) == (pytest.approx(40.0), pytest.approx(20.0))


def test_at_threads_scales_the_other_micro_batch_sizes_by_the_main_sizes_ratio() -> None:
    other = (8, (_layer("b0", 30.0, 60.0), _layer("b1", 40.0, 80.0)))
    profile = _profile({4: [3.0, 4.0], 1: [12.0, 10.0]}, main=4, by_microbatch_size=(other,))
    one = profile.at_threads(1)
    assert [x.forward_ms for x in one.by_microbatch_size[0][1]] == pytest.approx([120.0, 100.0])
    assert [x.forward_ms for x in one.sizes()[8]] == pytest.approx([120.0, 100.0])


@given(st.lists(st.tuples(st.floats(0.01, 100.0), st.floats(0.0, 1.0), st.floats(0.0, 1.0)), min_size=1, max_size=4))
def test_at_threads_is_monotone_between_monotone_measurements(blocks: list[tuple[float, float, float]]) -> None:
    # each block no faster at fewer threads: 1, 4 and 16 threads measured; every count from 1 to 20 is between
    # two of them (or beyond, clamped), and no block's time grows with the count
    times = {1: [a for a, _, _ in blocks], 4: [a * (1 - f) for a, f, _ in blocks],
             16: [a * (1 - f) * (1 - g) for a, f, g in blocks]}
    profile = _profile(times, main=16, cores=16)
    previous = None
    for threads in range(1, 21):
        now = [x.forward_ms for x in profile.at_threads(threads).layers]
        if previous is not None:
            assert all(b <= a * (1 + 1e-9) + 1e-12 for a, b in zip(previous, now))
        previous = now


def test_the_fields_round_trip_and_older_files_load(tmp_path: Path) -> None:
    profile = _profile({2: [1.0, 2.0], 1: [2.0, 3.0]}, main=2)
    saved = json.loads(profile.to_json(tmp_path / "p.json").read_text())
    assert saved["cpu_cores"] == 2 and list(saved["by_threads"]) == ["1"]
    assert Profile.from_json(tmp_path / "p.json") == profile
    older = {k: v for k, v in saved.items() if k not in ("cpu_cores", "by_threads")}
    read = Profile.from_dict(older)
    assert read.cpu_cores is None and read.by_threads == () and read.thread_counts() == {2: read.layers}
    golden = Profile.from_json(GOLDEN / "profile-every-field.json")
    assert golden.cpu_cores == 8 and golden.by_threads[0][0] == 1


@pytest.mark.parametrize("change, fragment", [
    ({"by_threads": {"x": []}}, "by_threads key 'x' is not a thread count"),
    ({"by_threads": {"1": []}}, "by_threads[1] must list 2 layers"),
    ({"by_threads": [1]}, "by_threads must be an object of threads -> layers"),
    ({"cpu_cores": 0}, "cpu_cores"),
])
def test_bad_thread_fields_are_refused(change: dict[str, object], fragment: str) -> None:
    data = {**_profile({2: [1.0, 2.0], 1: [2.0, 3.0]}, main=2).to_dict(), **change}
    with pytest.raises(AutopartError) as caught:
        Profile.from_dict(data)
    assert fragment in str(caught.value)


# One split is best at 2 threads, another at 1: b3 is slow with 2 threads (contention), b0 with 1.
TIMES = {2: [1.0, 1.0, 1.0, 6.0], 1: [6.0, 1.0, 1.0, 1.0]}


def _partition(profile: Path, tmp_path: Path, name: str, *flags: str) -> tuple[Plan, str]:
    out = tmp_path / name
    result = run_cli_here("partition", str(profile), "--stages", "2", "-o", str(out), *flags)
    assert result.returncode == 0, result.stderr
    return Plan.from_json(out), result.stdout


def test_partition_prices_the_blocks_at_the_threads_each_rank_gets(tmp_path: Path) -> None:
    both = _profile(TIMES, main=2).to_json(tmp_path / "both.json")
    one_only = dataclasses.replace(_profile({1: TIMES[1]}, main=1), cpu_cores=2).to_json(tmp_path / "one.json")
    expected, _ = _partition(one_only, tmp_path, "expected.json")
    # 2 ranks share the 2 cores: 1 thread each, by default (CPU devices) and when told
    for flags in ((), ("--ranks-per-machine", "2"), ("--devices", "2x16GiB")):
        plan, out = _partition(both, tmp_path, "plan.json", *flags)
        assert plan.threads == 1 and plan.balance == expected.balance
        assert plan.predicted.step_ms == pytest.approx(expected.predicted.step_ms)
        assert "times for 1 thread per rank (2 ranks share 2 cores" in out
    # one rank on the machine: its 2 threads, the profile's own times
    plan, out = _partition(both, tmp_path, "plan.json", "--ranks-per-machine", "1")
    assert plan.threads == 2 and plan.balance != expected.balance
    assert "times for 2 threads per rank (1 rank shares 2 cores)" in out
    # GPUs: the profile as it is
    plan, out = _partition(both, tmp_path, "plan.json", "--devices", "2xH100-80GB")
    assert plan.threads == 2 and "times for" not in out


def test_partition_between_and_beyond_the_timed_counts(tmp_path: Path) -> None:
    profile = _profile({8: [1.0, 1.0, 1.0, 6.0], 1: [6.0, 1.0, 1.0, 1.0]}, main=8, cores=8)
    path = profile.to_json(tmp_path / "p.json")
    plan, out = _partition(path, tmp_path, "plan.json", "--ranks-per-machine", "2")
    assert plan.threads == 4 and "between the 1 and 8 threads timed" in out
    alone = dataclasses.replace(profile, by_threads=()).to_json(tmp_path / "alone.json")
    plan, out = _partition(alone, tmp_path, "plan.json", "--ranks-per-machine", "2")
    # the times of 8 threads, so the plan records 8 (train then says, and re-prices, when its ranks get 4)
    assert plan.threads == 8 and "the profile timed 8 threads only: the times of 8" in out
    assert plan.balance == _partition(alone, tmp_path, "plain.json")[0].balance


def test_a_profile_without_cores_is_planned_as_it_is(tmp_path: Path) -> None:
    path = dataclasses.replace(_profile(TIMES, main=2), cpu_cores=None).to_json(tmp_path / "p.json")
    plan, out = _partition(path, tmp_path, "plan.json", "--ranks-per-machine", "2")
    assert plan.threads == 2 and "--ranks-per-machine 2 changes nothing" in out
    assert_one_line_error(run_cli_here("partition", str(path), "--stages", "2", "--ranks-per-machine", "0"),
                          "--ranks-per-machine", "must be >= 1, got 0")


def test_a_cluster_node_shares_its_cores_among_its_devices(tmp_path: Path) -> None:
    path = _profile(TIMES, main=2).to_json(tmp_path / "p.json")
    out = tmp_path / "plan.json"
    result = run_cli_here("partition", str(path), "--nodes", "2", "--devices-per-node", "2x16GiB", "--stages", "2",
                          "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert Plan.from_json(out).threads == 1 and "2 ranks share 2 cores, every rank on each node" in result.stdout


def test_plan_at_threads_is_the_plan_priced_from_that_counts_times(tmp_path: Path) -> None:
    both = _profile(TIMES, main=2)
    plan, _ = _partition(both.to_json(tmp_path / "both.json"), tmp_path, "plan.json", "--ranks-per-machine", "1")
    repriced = plan_at_threads(plan, both, 1)
    one = dataclasses.replace(_profile({1: TIMES[1]}, main=1), cpu_cores=2)
    expected = plan_at_microbatch_size(plan, one, 2)
    assert repriced is not None and repriced.threads == 1 and repriced.balance == plan.balance
    assert repriced.predicted == expected.predicted and repriced.stages == expected.stages
    assert repriced.predicted.step_ms > plan.predicted.step_ms  # b0 is 6x slower at 1 thread
    assert plan_at_threads(plan, dataclasses.replace(both, by_threads=()), 1) is None  # nothing to re-price from
    beyond = plan_at_threads(plan, both, 8)  # beyond the timed 1 and 2: the times of 2, and the plan says 2
    assert beyond is not None and beyond.threads == 2 and beyond.predicted.step_ms == plan.predicted.step_ms


def test_train_keeps_the_plans_prediction_when_its_profile_was_replaced(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The plan's profile file overwritten by another model's profile since partition, and the ranks get fewer
    threads than the plan's: train re-prices nothing, keeps the plan's prediction and says why (it used to refuse
    with the re-pricing's error when the blocks did not match)."""
    from autopart.cli.train import _threads
    from autopart.run.config import TrainConfig

    path = tmp_path / "both.json"
    plan, _ = _partition(_profile(TIMES, main=2).to_json(path), tmp_path, "plan.json", "--ranks-per-machine", "1")
    assert plan.threads == 2
    other = dataclasses.replace(_profile({2: [1.0, 1.0, 1.0], 1: [2.0, 2.0, 2.0]}, main=2), model="another")
    other.to_json(path)
    threads, repriced = _threads(TrainConfig(plan=str(tmp_path / "plan.json"), model="m", threads=1), plan)
    assert (threads, repriced) == (1, None)
    err = capsys.readouterr().err
    assert "the plan's times were measured with 2 CPU threads; each of its 2 ranks gets 1" in err
    assert "the plan's prediction is kept: its profile cannot re-price it (profile" in err
    assert "holds other blocks than the plan's" in err



@pytest.mark.slow
def test_profile_times_every_count_asked_for(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    result = run_cli("profile", "gpt2-tiny", "--threads", "1,2", "--repeats", "1", "--warmup", "0", "-o", str(out))
    assert result.returncode == 0, result.stderr
    profile = Profile.from_json(out)
    assert profile.threads == 1 and [count for count, _ in profile.by_threads] == [2]
    assert profile.cpu_cores is not None and profile.cpu_cores >= 1
    assert [x.name for x in profile.by_threads[0][1]] == profile.names
    assert all(x.forward_ms > 0 for x in profile.by_threads[0][1])
    assert "1 thread (also timed at 2)" in result.stderr


@pytest.mark.slow
def test_train_predicts_at_the_threads_its_ranks_get(tmp_path: Path) -> None:
    profile = tmp_path / "p.json"
    made = run_cli("profile", "mlp-hetero", "--threads", "2,1", "--repeats", "1", "--warmup", "0", "-o",
                   str(profile))
    assert made.returncode == 0, made.stderr
    plan_path = tmp_path / "plan.json"
    _, _ = _partition(profile, tmp_path, "plan.json", "--ranks-per-machine", "1")
    plan = Plan.from_json(plan_path)
    assert plan.threads == 2
    repriced = plan_at_threads(plan, Profile.from_json(profile), 1)
    assert repriced is not None
    report = tmp_path / "report.json"
    result = run_cli("train", str(plan_path), "--model", "mlp-hetero", "--steps", "2", "--threads", "1",
                     "--report", str(report), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the prediction is re-simulated from its profile" in result.stderr and "at 1 thread" in result.stderr
    data = json.loads(report.read_text())
    assert data["plan"] == str(plan_path)
    assert data["predicted_step_ms"] == pytest.approx(repriced.predicted.step_ms)
    assert data["predicted_step_ms"] != pytest.approx(plan.predicted.step_ms)


@pytest.mark.slow
def test_profile_times_the_loss_at_every_count() -> None:
    """The loss on the last block's output is timed at each thread count, not the main count's times copied."""
    import torch
    from torch import nn

    from autopart.measure.profiler import profile_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 512))
    x, target = torch.randn(8, 32), torch.randint(0, 512, (8,))
    profile = profile_model(model, x, loss_fn=nn.functional.cross_entropy, target=target, warmup=1, repeats=3,
                            threads=(1, 2))
    main, other = profile.layers[-1], profile.by_threads[0][1][-1]
    assert other.loss_forward_ms > 0 and other.loss_backward_ms > 0
    assert (other.loss_forward_ms, other.loss_backward_ms) != (main.loss_forward_ms, main.loss_backward_ms)

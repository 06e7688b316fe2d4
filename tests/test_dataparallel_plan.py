"""The joint planner (issue 20): ring all-reduce, the exposed all-reduce on a hand-computed timeline, the
search against a brute force over every configuration and split, pins, and known answers."""
from __future__ import annotations

import dataclasses
import itertools
import random

import pytest

from autopart.core.costmodel import CostModel
from autopart.core.dataparallel import plan_cluster, ring_allreduce_ms, score_configuration, traffic_bytes
from autopart.core.search import all_schedules
from autopart.errors import AutopartError
from autopart.formats.cluster import Cluster
from autopart.formats.plan import Plan
from autopart.formats.profile import LayerProfile, Profile, Tie
from autopart.core.placement import place


def _profile(forward_ms: list[float], backward_ms: list[float], param_bytes: list[int],
             output_bytes: list[int] | None = None, activation_bytes: list[int] | None = None,
             optimizer_ms: list[float] | None = None) -> Profile:
    n = len(forward_ms)
    layers = tuple(LayerProfile(name=f"b{i}", forward_ms=forward_ms[i], backward_ms=backward_ms[i],
                                param_bytes=param_bytes[i], largest_param_bytes=param_bytes[i],
                                activation_bytes=(activation_bytes or [0] * n)[i],
                                output_bytes=(output_bytes or [0] * n)[i],
                                optimizer_ms=(optimizer_ms or [0.0] * n)[i]) for i in range(n))
    return Profile(model="m", device="cpu", dtype="float32", microbatch_size=1, sample_shape=(1, 4),
                   torch="2.13.0", layers=layers)


def test_ring_allreduce_closed_form() -> None:
    assert ring_allreduce_ms(1e9, 1, 1e9, latency_ms=5.0) == 0.0  # one replica: nothing to reduce
    assert ring_allreduce_ms(1e9, 2, 1e9) == pytest.approx(1000.0)  # 2 (D-1)/D = 1: the bytes once
    assert ring_allreduce_ms(1e9, 4, 1e9) == pytest.approx(1500.0)
    assert ring_allreduce_ms(1e9, 10_000, 1e9) == pytest.approx(2000.0, rel=1e-3)  # towards twice the bytes
    assert ring_allreduce_ms(1e9, 4, None, latency_ms=0.5) == pytest.approx(3.0)  # free link: 2 (D-1) latencies
    assert ring_allreduce_ms(1e9, 4, 1e9, latency_ms=0.5) == pytest.approx(1503.0)
    with pytest.raises(AutopartError, match="replicas must be >= 1"):
        ring_allreduce_ms(1.0, 0, None)


@pytest.mark.parametrize("param_bytes, exposed_ms", [
    ((1_000_000, 5_000_000), 3.0),   # rank 1 ends its backwards at 7, +5 = 12 > rank 0's 9 + 1 = 10: 3 exposed
    ((1_000_000, 1_000_000), 1.0),   # rank 0's own all-reduce after its last backward at 9: 1 exposed
    ((0, 2_000_000), 0.0),           # rank 1's 2 ms fit in the 2 ms drain before rank 0 ends: all hidden
])
def test_exposed_allreduce_on_a_hand_computed_gpipe_timeline(param_bytes: tuple[int, int],
                                                             exposed_ms: float) -> None:
    """2 stages (F 1 ms, B 2 ms each), GPipe, 2 micro-batches, no sends: rank 1 runs F0 1-2, F1 2-3, B0 3-5,
    B1 5-7; rank 0 F0 0-1, F1 1-2, B0 5-7, B1 7-9; then each rank's 0.5 ms optimizer step: step 9.5. Two
    replicas on a 1 GB/s link: a ring of 2 moves each rank's gradient bytes once, 1 ms per MB."""
    profile = _profile([1.0, 1.0], [2.0, 2.0], list(param_bytes), optimizer_ms=[0.5, 0.5])
    cluster = Cluster(nodes=1, devices_per_node=4, intra_node_bytes_per_s=1e9)
    plan = score_configuration(profile, cluster, CostModel(), global_batch=4, stages=2, data_parallel=2,
                               microbatches=2, schedule="gpipe", balance=[1, 1], placer=place)
    assert plan.data_parallel == 2 and plan.world_size == 4 and plan.cluster == cluster
    assert plan.predicted.allreduce_ms == pytest.approx(exposed_ms)
    assert plan.predicted.step_ms == pytest.approx(9.5 + exposed_ms)
    one = score_configuration(profile, Cluster(nodes=1, devices_per_node=2, intra_node_bytes_per_s=1e9), CostModel(),
                              global_batch=2, stages=2, data_parallel=1, microbatches=2, schedule="gpipe",
                              balance=[1, 1], placer=place)
    assert one.predicted.step_ms == pytest.approx(9.5) and one.predicted.allreduce_ms == 0.0


def _tied(profile: Profile, first: str, last: str, tie_bytes: int) -> Profile:
    return dataclasses.replace(profile, ties=(Tie(params=(f"{first}.w", f"{last}.w"), owner=first, blocks=(first, last),
                                                  bytes=tie_bytes),))


def test_a_tied_weights_all_reduce_waits_for_the_other_holders_last_backward() -> None:
    """The timeline above, with b0's 2 MB weight tied into b1 (b1's own 4 MB, so rank 1 reduces 6 MB, rank 0
    2 MB): ``autopart train`` sums the tie between the ranks first (the simulator's TIE: 2 MB over the 1 GB/s
    pipeline link, from rank 0's last backward at 9 to 11 on both ranks), so rank 1's 6 ms ring starts at 11,
    not at its own last backward, 7: step 11 + 6 + 0.5 = 17.5, 6 ms exposed beyond the pipeline's 11.5."""
    profile = _tied(_profile([1.0, 1.0], [2.0, 2.0], [2_000_000, 4_000_000], optimizer_ms=[0.5, 0.5]), "b0", "b1",
                    2_000_000)
    assert traffic_bytes(profile, [1, 1], "gpipe", 2, 1, 2)[1] == [2_000_000, 6_000_000]
    plan = score_configuration(profile, Cluster(nodes=1, devices_per_node=4, intra_node_bytes_per_s=1e9), CostModel(),
                               global_batch=4, stages=2, data_parallel=2, microbatches=2, schedule="gpipe",
                               balance=[1, 1], placer=place)
    assert plan.predicted.allreduce_ms == pytest.approx(6.0)
    assert plan.predicted.step_ms == pytest.approx(17.5)


def test_a_tie_whose_holders_share_a_rank_is_reduced_once() -> None:
    """ZBVZeroBubble on 2 ranks puts stages 0 and 3 on rank 0: an embedding tied to the head is one tensor there,
    reduced once (its bytes are in the owner's param_bytes, nothing added); stage 1 (rank 1) holding a third use
    adds it once to rank 1."""
    profile = _tied(_profile([1.0] * 4, [2.0] * 4, [3_000, 1_000, 1_000, 1_000]), "b0", "b3", 2_000)
    assert traffic_bytes(profile, [1, 1, 1, 1], "ZBVZeroBubble", 2, 2, 2)[1] == [4_000, 2_000]
    three = dataclasses.replace(profile, ties=(dataclasses.replace(profile.ties[0], blocks=("b0", "b1", "b3")),))
    assert traffic_bytes(three, [1, 1, 1, 1], "ZBVZeroBubble", 2, 2, 2)[1] == [4_000, 4_000]


def _random_profile(seed: int, blocks: int) -> Profile:
    rng = random.Random(seed)
    forward = [rng.uniform(0.5, 3.0) for _ in range(blocks)]
    return _profile(forward, [2 * f * rng.uniform(0.8, 1.2) for f in forward],
                    [rng.randrange(100_000, 4_000_000) for _ in range(blocks)],
                    output_bytes=[rng.randrange(10_000, 400_000) for _ in range(blocks)],
                    activation_bytes=[rng.randrange(10_000, 200_000) for _ in range(blocks)],
                    optimizer_ms=[rng.uniform(0.0, 0.3) for _ in range(blocks)])


def _compositions(n: int, parts: int) -> list[list[int]]:
    return [[b - a for a, b in zip((0, *cuts), (*cuts, n))] for cuts in itertools.combinations(range(1, n), parts - 1)]


def _brute_force(profile: Profile, cluster: Cluster, global_batch: int) -> tuple[float, tuple[int, int, int, str]]:
    """Every (K, D, M, schedule) and, for each, every split: the split the pipeline runs fastest (what the
    exact method finds, ties broken apart by random times), then its step with the all-reduce; the best."""
    n, devices = len(profile.layers), cluster.num_devices
    best: tuple[float, tuple[int, int, int, str]] | None = None
    for k in (k for k in range(1, devices + 1) if devices % k == 0):
        d = devices // k
        for m in (m for m in range(1, global_batch // d + 1) if (global_batch // d) % m == 0):
            for name, per_rank in all_schedules():
                if k * per_rank > n or (name == "1F1B" and m < k):
                    continue
                fastest: tuple[float, Plan] | None = None
                for balance in _compositions(n, k * per_rank):
                    plan = score_configuration(profile, cluster, CostModel(), global_batch=global_batch, stages=k,
                                               data_parallel=d, microbatches=m, schedule=name, balance=balance,
                                               stages_per_rank=per_rank, placer=place)
                    pipeline_ms = plan.predicted.step_ms - plan.predicted.allreduce_ms
                    if plan.fits and (fastest is None or pipeline_ms < fastest[0]):
                        fastest = (pipeline_ms, plan)
                if fastest is not None and (best is None or fastest[1].predicted.step_ms < best[0]):
                    best = (fastest[1].predicted.step_ms, (k, d, m, name))
    assert best is not None
    return best


@pytest.mark.slow
@pytest.mark.parametrize("seed, blocks, memory, links", [
    (0, 6, None, (None, None)),
    (1, 6, None, (2e9, 1e8)),          # a slow inter-node link: the all-reduce matters
    (2, 7, 45_000_000, (5e9, 2e8)),    # and a memory limit that rules one device's 69 MB of weights out
])
def test_the_joint_search_equals_a_brute_force_over_every_configuration_and_split(
        seed: int, blocks: int, memory: int | None, links: tuple[float | None, float | None]) -> None:
    profile = _random_profile(seed, blocks)
    cluster = Cluster(nodes=2, devices_per_node=2, memory_bytes=memory, intra_node_bytes_per_s=links[0],
                      inter_node_bytes_per_s=links[1])
    want_ms, want = _brute_force(profile, cluster, 8)
    for prune in (True, False):  # the bounds skip configurations but never change the answer
        search = plan_cluster(profile, cluster, CostModel(), global_batch=8, placer=place, prune=prune)
        best = search.best
        assert best.predicted.step_ms == pytest.approx(want_ms, rel=1e-9), (prune, want, search.tried[0])
        assert best.fits and best.num_ranks * best.data_parallel == 4
        assert (best.num_ranks, best.data_parallel, best.microbatches, best.schedule) == want
    unpruned = plan_cluster(profile, cluster, CostModel(), global_batch=8, placer=place, prune=False)
    assert all(c.scored or c.why and not c.fits for c in unpruned.tried)  # split, or no split fits


def _equal_blocks(param_bytes: int) -> Profile:
    """4 blocks of F 1 ms, B 2 ms per sample, no activations or outputs (sends and in-flight memory free)."""
    return _profile([1.0] * 4, [2.0] * 4, [param_bytes] * 4)


@pytest.mark.parametrize("limit_bytes, depth", [
    (None, 1),           # no limit: 4 replicas, no bubble
    (11_000_000, 2),     # 2 blocks: 8 MB of weights (AdamW: 4 copies) + the step's 2 MB of temporaries
    (7_000_000, 4),      # 1 block: 4 + 2 MB
])
def test_a_memory_limit_forces_deeper_pipelines(limit_bytes: int | None, depth: int) -> None:
    cluster = Cluster(nodes=1, devices_per_node=4, memory_bytes=limit_bytes)
    search = plan_cluster(_equal_blocks(1_000_000), cluster, CostModel(recompute=False), global_batch=8,
                          placer=place)
    assert (search.best.num_ranks, search.best.data_parallel) == (depth, 4 // depth)
    assert all(c.memory_bytes <= limit_bytes for c in search.tried if c.fits and limit_bytes)
    if limit_bytes is not None:
        assert any(not c.fits and "needs" in c.why and c.stages < depth for c in search.tried)


@pytest.mark.parametrize("link, shape, step_ms", [
    (None, (1, 4), 24.0),   # free links: 4 replicas, 2 samples each through 12 ms of blocks
    (1e8, (4, 1), 33.0),    # 100 MB/s between nodes: 4 MB of gradients would cost 60 ms; a 4-deep 1F1B of
                            # 8 micro-batches of 1: (8 + 3) x 3 ms
])
def test_a_slow_inter_node_link_turns_replicas_into_a_pipeline(link: float | None, shape: tuple[int, int],
                                                               step_ms: float) -> None:
    cluster = Cluster(nodes=4, devices_per_node=1, inter_node_bytes_per_s=link)
    search = plan_cluster(_equal_blocks(1_000_000), cluster, CostModel(), global_batch=8, placer=place)
    best = search.best
    assert (best.num_ranks, best.data_parallel) == shape
    assert best.predicted.step_ms == pytest.approx(step_ms)
    four = next(c for c in search.tried if c.data_parallel == 4)
    if link is not None:  # 2 x 3/4 x 4 MB / 100 MB/s, all after the last backward
        assert four.allreduce_ms == pytest.approx(60.0) and four.step_ms == pytest.approx(84.0)
        assert four.why == "all-reduce 60 ms exposed vs 0 µs"


def test_pins_fix_depth_width_and_microbatches() -> None:
    profile, cluster = _equal_blocks(1000), Cluster(nodes=2, devices_per_node=2, inter_node_bytes_per_s=1e9)
    for kwargs, check in (({"stages": 2}, lambda c: c.stages == 2 and c.data_parallel == 2),
                          ({"data_parallel": 4}, lambda c: c.stages == 1),
                          ({"microbatches": 2}, lambda c: c.microbatches == 2),
                          ({"stages": 4, "microbatches": 4, "schedules": [("gpipe", 1)]},
                           lambda c: (c.stages, c.microbatches, c.schedule) == (4, 4, "GPipe"))):
        search = plan_cluster(profile, cluster, CostModel(), global_batch=8, placer=place, **kwargs)  # type: ignore[arg-type]
        assert search.tried and all(check(c) for c in search.tried), kwargs
        assert check(search.tried[0])


@pytest.mark.parametrize("kwargs, message", [
    ({"data_parallel": 4, "global_batch": 6}, "global batch 6 is not divisible by 4 replicas"),
    ({"data_parallel": 3, "global_batch": 6}, "data parallel 3 does not divide the cluster's 4 devices"),
    ({"stages": 3, "global_batch": 8}, "3 stages do not divide the cluster's 4 devices"),
    ({"stages": 2, "data_parallel": 1, "global_batch": 8}, "2 stages x 1 replicas = 2 devices, the cluster has 4"),
    ({"global_batch": 0}, "global batch must be >= 1, got 0"),
])
def test_bad_configurations_say_why(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(AutopartError, match=message):
        plan_cluster(_equal_blocks(1000), Cluster(nodes=2, devices_per_node=2), CostModel(), placer=place,
                     **kwargs)  # type: ignore[arg-type]
    with pytest.raises(AutopartError, match="global batch 6 is not divisible by 4 replicas"):
        score_configuration(_equal_blocks(1000), Cluster(nodes=2, devices_per_node=2), CostModel(), global_batch=6,
                            stages=1, data_parallel=4, microbatches=1, schedule="1f1b", placer=place)


def test_the_best_plan_records_runners_up_with_their_replicas() -> None:
    cluster = Cluster(nodes=4, devices_per_node=1, inter_node_bytes_per_s=1e8)
    search = plan_cluster(_equal_blocks(1_000_000), cluster, CostModel(), global_batch=8, placer=place, keep=50)
    plan = search.best
    again = Plan.from_dict(plan.to_dict())
    assert again.data_parallel == plan.data_parallel and again.cluster == cluster
    assert again.runners_up == plan.runners_up
    assert {2, 4} <= {c.data_parallel for c in plan.runners_up}
    assert any(c.allreduce_ms > 0 for c in plan.runners_up)
    assert [c.step_ms for c in plan.runners_up] == sorted(c.step_ms for c in plan.runners_up)


def test_the_pruning_bound_is_below_every_simulated_step() -> None:
    """The bound that skips configurations, against the simulated step of random splits of random blocks
    (input-gradient halves measured or not) under every schedule: never above it."""
    from autopart.core.dataparallel import _lower_bound_ms

    rng = random.Random(7)
    cluster = Cluster(nodes=1, devices_per_node=4)
    for case in range(60):
        n = rng.randrange(4, 10)
        profile = _random_profile(100 + case, n)
        if case % 2:
            layers = tuple(dataclasses.replace(x, input_grad_ms=x.backward_ms * rng.uniform(0.1, 0.9))
                           for x in profile.layers)
            profile = dataclasses.replace(profile, layers=layers)
        name, per_rank = rng.choice(all_schedules())
        k = rng.choice([k for k in (1, 2, 4) if k * per_rank <= n])
        m = rng.choice([m for m in (1, 2, 4, 8) if name != "1F1B" or m >= k])
        cuts = sorted(rng.sample(range(1, n), k * per_rank - 1))
        balance = [b - a for a, b in zip((0, *cuts), (*cuts, n))]
        plan = score_configuration(profile, cluster, CostModel(), global_batch=m * (4 // k), stages=k,
                                   data_parallel=4 // k, microbatches=m, schedule=name, balance=balance,
                                   stages_per_rank=per_rank, placer=place)
        bound = _lower_bound_ms(profile, 1.0, k, m, name, per_rank)
        assert bound <= plan.predicted.step_ms - plan.predicted.allreduce_ms + 1e-9, (case, name, k, m, balance)


@pytest.mark.slow
def test_pruning_and_bound_order_never_change_the_answer() -> None:
    """The search as it runs (configurations in the order of their bounds, those that cannot win skipped)
    against the same search scoring every configuration, on seeded random profiles and clusters, some with
    a memory limit, some with equal blocks (ties that memory breaks): the same configuration, split and step."""
    rng = random.Random(20)
    for case in range(16):
        n = rng.randrange(4, 8)
        profile = _random_profile(300 + case, n) if case % 4 else _equal_blocks(rng.choice([1_000_000, 5_000_000]))
        nodes, per_node = rng.choice([(1, 2), (2, 2), (1, 4), (4, 1), (3, 1)])
        total = sum(x.param_bytes for x in profile.layers)
        cluster = Cluster(nodes=nodes, devices_per_node=per_node,
                          memory_bytes=rng.choice([None, int(total * rng.uniform(2.5, 6.0))]),
                          intra_node_bytes_per_s=rng.choice([None, 5e9]), inter_node_bytes_per_s=rng.choice([None, 1e8]))
        batch = nodes * per_node * rng.choice([1, 2, 4])
        try:
            plain = plan_cluster(profile, cluster, CostModel(), global_batch=batch, placer=place, prune=False)
        except AutopartError:
            with pytest.raises(AutopartError):
                plan_cluster(profile, cluster, CostModel(), global_batch=batch, placer=place)
            continue
        fast = plan_cluster(profile, cluster, CostModel(), global_batch=batch, placer=place)
        a, b = fast.best, plain.best
        assert (a.num_ranks, a.data_parallel, a.microbatches, a.schedule, a.balance) == \
            (b.num_ranks, b.data_parallel, b.microbatches, b.schedule, b.balance), (case, fast.tried[0], plain.tried[0])
        assert a.predicted == b.predicted and fast.tried[0] == plain.tried[0]
        assert sum(c.scored for c in fast.tried) <= sum(c.scored for c in plain.tried)


def test_the_busiest_rank_bound_is_below_every_assignment_of_blocks() -> None:
    """However blocks are dealt to ranks (every assignment, brute force), the busiest holds at least the
    bound; for equal blocks it is the exact answer (ceil(n / ranks) of them)."""
    from autopart.core.dataparallel import _busiest_rank_ms

    rng = random.Random(11)
    for _ in range(40):
        n, ranks = rng.randrange(1, 8), rng.randrange(1, 4)
        work = [rng.choice([1.0, 2.0, rng.uniform(0.1, 5.0)]) for _ in range(n)]
        best = min(max(sum(w for w, r in zip(work, owners) if r == rank) for rank in range(ranks))
                   for owners in itertools.product(range(ranks), repeat=n))
        assert _busiest_rank_ms(work, ranks) <= best + 1e-12, (work, ranks)
    assert _busiest_rank_ms([2.0] * 78, 16) == 10.0  # 5 of 78 equal blocks on the busiest of 16 ranks

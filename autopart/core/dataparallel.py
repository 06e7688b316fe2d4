"""Data parallel x pipeline: depth, width, micro-batches, schedule and split chosen together for a cluster.

    search = plan_cluster(profile, cluster, CostModel(optimizer="adamw"), global_batch=1024)
    search.best                 # a Plan with data_parallel, placement, cluster and predicted.allreduce_ms
    search.tried                # every configuration, best first, each with why it lost

For a fixed global batch on ``cluster.num_devices`` devices, every pipeline
depth K that divides the devices (D = devices / K replicas), every
micro-batch count M that divides a replica's share of the batch and every
schedule is scored: each replica's pipeline is the exact split for (K, M,
schedule) at micro-batch size global batch / (D x M) (:mod:`autopart.core.search`'s
machinery), placed on the cluster (:func:`autopart.core.placement.place`),
and its step simulated; then each pipeline rank's gradient all-reduce over
its D replicas (a ring over the slowest link the group crosses) starts when
that rank's last backward ends in the simulated step and must end before
the rank's optimizer step. The part the drain does not hide is
``Predicted.allreduce_ms``. The fastest step (time per global batch) that
fits every device wins, unless a configuration within the profile's noise
band of it has a less busy busiest rank (:mod:`autopart.core.choice`);
ties (to 9 significant digits) go to less memory per device, then fewer
replicas, fewer micro-batches, and the schedule listed first.

A one-rank pipeline (K = 1) is not tried under a schedule of several stages per rank
(Interleaved1F1B, ZBVZeroBubble) when a schedule of one is: on one rank
they run the same forwards and backwards with no bubble to hide, in more
memory and more actions.

Pruning: a configuration whose lower bound (no bubble it cannot avoid, no
sends, no all-reduce, no recomputation) is slower than the best so far
(to the 9 digits steps tie at: one that may tie could win on memory) is
not split; configurations are scored in the order of their bounds, so the
best is found early and most are skipped; nor one whose weights alone, spread evenly, exceed a device.
Neither can change the fastest configuration (``tests/test_dataparallel_plan.py`` checks it
against the unpruned search). The choice within the noise band weighs the
configurations scored (where it is free): one skipped by its bound is never
preferred, so with ``prune=False`` (every configuration scored) a noisy
profile's choice may be a more balanced one still.

Left out: ZeRO (optimizer state sharded over the replicas: the executor does
not run it), the all-reduce overlapping earlier backwards than the rank's
last, and replicas' all-reduces sharing a node's network ports. Pure (no torch).
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass
from typing import Callable, Sequence

from autopart.core.blocks import BlockCosts
from autopart.core.choice import busiest_compute_ms, choose
from autopart.core.costmodel import CostModel, ring_allreduce_ms  # the ring, priced where ties use it too
from autopart.core.partition import split_given, uniform_balance
from autopart.core.placement import Placement, divisors, place
from autopart.core.planner import simulate_plan
from autopart.core.scaling import scale_profile
from autopart.core.schedules import peak_in_flight
from autopart.core.search import all_schedules, plan_one, splitter
from autopart.core.simulate import INPUT_GRAD_SHARE, Simulation
from autopart.errors import AutopartError
from autopart.formats.cluster import Cluster
from autopart.formats.optimizers import DEFAULT_OPTIMIZER
from autopart.formats.plan import Candidate, Plan
from autopart.formats.profile import Profile
from autopart.formats.schedule_kinds import canonical_schedule, stage_ranks
from autopart.formats.units import format_bytes, format_ms, plural

__all__ = ["ring_allreduce_ms", "plan_cluster", "score_configuration", "ClusterSearch", "Configuration",
           "Placer", "exposed_allreduce_ms", "traffic_bytes", "tie_waits", "slowest_bytes_per_s"]


MAX_REPLICA_MICROBATCHES = 1024
"""The most micro-batches a replica's step is split into (every divisor of its share of the global batch up to
this is tried): deep pipelines of few replicas want many (70B on 64 devices: 32 stages x 2 replicas, 512
micro-batches of one sequence, 33% faster than 128)."""


Placer = Callable[[Cluster, int, int, Sequence[float], Sequence[float]], Placement]
"""``place(cluster, num_ranks, replicas, send_bytes, grad_bytes)``: :func:`autopart.core.placement.place`, or
another for tests."""


def slowest_bytes_per_s(links: Sequence[float | None]) -> float | None:
    """The slowest of some links (None: free, faster than any); None when all are free or there are none."""
    finite = [b for b in links if b is not None]
    return min(finite) if finite else None


def _rank_of_blocks(profile: Profile, balance: Sequence[int], ranks: Sequence[int]) -> dict[str, int]:
    """The pipeline rank holding each block, when ``balance`` splits ``profile``'s blocks into stages held by
    ``ranks`` (stage -> rank)."""
    stage_of = [s for s, count in enumerate(balance) for _ in range(count)]
    return {layer.name: ranks[stage_of[i]] for i, layer in enumerate(profile.layers)}


def traffic_bytes(profile: Profile, balance: Sequence[int], schedule: str, num_ranks: int, per_rank: int,
                  microbatches: int) -> tuple[list[float], list[float]]:
    """(bytes one replica sends across each pipeline boundary r|r+1 per step, both directions and every
    micro-batch; gradient bytes each pipeline rank all-reduces per step) for ``balance`` of ``profile``'s
    blocks (at the micro-batch size the profile is for).

    A stage's gradients are its parameters' bytes (the memory model's ``weights`` term counts the gradient
    as one more copy of them); a tied parameter once on each rank that holds a stage using it (the owner's
    copy is in its ``param_bytes``; a rank holding two of its stages reduces the one tensor once). Traffic
    between ranks that are not neighbours (an interleaved schedule's wrap from the last rank to the first)
    is left out: the placement's interface has a link per neighbour pair."""
    layers = profile.layers
    ranks = stage_ranks(schedule, num_ranks, per_rank)
    first = 0
    grads = [0.0] * num_ranks
    sends = [0.0] * max(num_ranks - 1, 0)
    for s, count in enumerate(balance):
        grads[ranks[s]] += sum(layer.param_bytes for layer in layers[first: first + count])
        last = layers[first + count - 1]
        if s + 1 < len(balance):
            a, b = ranks[s], ranks[s + 1]
            if abs(a - b) == 1:
                sends[min(a, b)] += 2.0 * microbatches * (last.output_bytes + last.skip_bytes)
        first += count
    rank_of = _rank_of_blocks(profile, balance, ranks)
    for tie in profile.ties:
        holders = {rank_of[b] for b in tie.blocks if b in rank_of}
        for r in holders - {rank_of.get(tie.owner)}:
            grads[r] += tie.bytes
    return sends, grads


def tie_waits(profile: Profile, balance: Sequence[int], schedule: str, num_ranks: int,
              per_rank: int) -> list[frozenset[int]]:
    """For each pipeline rank, the ranks whose last backward its gradient all-reduce waits for: itself, and
    every rank that holds a tied parameter it holds (``autopart train`` sums a tie's gradient between its
    holders before averaging over the replicas)."""
    rank_of = _rank_of_blocks(profile, balance, stage_ranks(schedule, num_ranks, per_rank))
    waits = [{r} for r in range(num_ranks)]
    for tie in profile.ties:
        holders = {rank_of[b] for b in tie.blocks if b in rank_of}
        for r in holders:
            waits[r] |= holders
    return [frozenset(w) for w in waits]


def exposed_allreduce_ms(sim: Simulation, allreduce_ms: Sequence[float],
                         waits: Sequence[frozenset[int]] | None = None) -> float:
    """The step with each rank's all-reduce (``allreduce_ms[rank]``) started when its last backward ends in
    ``sim`` (or the last of ``waits[rank]``'s: the ranks whose tied gradients it sums first) and ended before
    its optimizer step, less ``sim``'s step: what the drain does not hide."""
    last_backward = [0.0] * sim.num_ranks
    before_opt = [0.0] * sim.num_ranks
    opt = [0.0] * sim.num_ranks
    for e in sim.events:
        if e.kind == "OPT":
            opt[e.rank] += e.end_ms - e.start_ms
            continue
        before_opt[e.rank] = max(before_opt[e.rank], e.end_ms)
        if e.kind in ("B", "I", "W", "TIE"):  # the replicas' average follows the tie sum (simulated: TIE)
            last_backward[e.rank] = max(last_backward[e.rank], e.end_ms)
    start = [max(last_backward[h] for h in waits[r]) if waits is not None else last_backward[r]
             for r in range(sim.num_ranks)]
    step = max((max(before_opt[r], start[r] + allreduce_ms[r] if allreduce_ms[r] > 0 else 0.0) + opt[r]
                for r in range(sim.num_ranks)), default=0.0)
    return max(step - sim.step_ms, 0.0)


@dataclass(frozen=True)
class Configuration:
    """One (K, D, M, schedule) the joint search scored (or skipped), and how it compares with the best."""

    stages: int
    """Pipeline ranks of one replica (K)."""
    data_parallel: int
    microbatches: int
    microbatch_size: int
    schedule: str
    stages_per_rank: int
    step_ms: float
    """Predicted time per global batch (one step of every replica), the exposed all-reduce included; for a
    skipped configuration, the lower bound that had it skipped."""
    allreduce_ms: float
    bubble_fraction: float
    comm_share: float
    """Exposed all-reduce plus the busiest rank's sends, over the step."""
    memory_bytes: int
    """The largest peak of any device."""
    memory_limit_bytes: int | None
    fits: bool
    scored: bool = True
    """False: skipped by a bound (``step_ms`` is the bound; memory: what the weights alone need)."""
    why: str = ""
    """Why it lost to the best (empty for the best)."""
    balance: tuple[int, ...] = ()
    layout: str = ""
    busiest_ms: float = 0.0
    """The busiest rank's compute per step (:func:`autopart.core.choice.busiest_compute_ms`)."""

    @property
    def label(self) -> str:
        return f"{self.stages}x{self.data_parallel}"


@dataclass(frozen=True)
class ClusterSearch:
    best: Plan
    tried: tuple[Configuration, ...]
    """Every configuration, best first (the skipped ones last)."""
    layout: str
    """How the best plan's ranks are placed (the placement's one line)."""


def _check(profile: Profile, cluster: Cluster, global_batch: int, stages: int, data_parallel: int,
           per_rank: int) -> None:
    n = len(profile.layers)
    if stages < 1 or data_parallel < 1:
        raise AutopartError(f"stages and data parallel must be >= 1, got {stages} and {data_parallel}")
    if stages * data_parallel != cluster.num_devices:
        raise AutopartError(f"{plural(stages, 'stage')} x {data_parallel} replicas = {stages * data_parallel} "
                            f"devices, the cluster has {cluster.num_devices}")
    if stages * per_rank > n:
        raise AutopartError(f"{plural(stages * per_rank, 'stage')} > {plural(n, 'block')}")
    if global_batch < 1:
        raise AutopartError(f"global batch must be >= 1, got {global_batch}")
    if global_batch % data_parallel:
        raise AutopartError(f"global batch {global_batch} is not divisible by {data_parallel} replicas")


class _Scorer:
    """Scores configurations, caching each scaled profile and each split (they depend on D only through the
    micro-batch size and the pipeline's link)."""

    def __init__(self, profile: Profile, cluster: Cluster, model: CostModel, method: str, profile_path: str,
                 placer: Placer) -> None:
        self.profile, self.cluster, self.model, self.method = profile, cluster, model, method
        self.profile_path, self.placer = profile_path, placer
        self.scaled: dict[int, tuple[Profile, str]] = {}
        self.splits: dict[tuple[object, ...], Plan] = {}

    def at(self, size: int) -> tuple[Profile, str]:
        if size not in self.scaled:
            self.scaled[size] = scale_profile(self.profile, size)
        return self.scaled[size]

    def score(self, stages: int, data_parallel: int, microbatches: int, size: int, schedule: str, per_rank: int,
              balance: Sequence[int] | None = None) -> tuple[Plan, Simulation, str]:
        """The configuration's plan (data parallel, placement, cluster and exposed all-reduce set), its
        pipeline's simulated step (without the all-reduce) and the placement's layout line."""
        scaled, how = self.at(size)
        k, d = stages, data_parallel
        # placed from an even split's traffic: the split is chosen for the placement's links, so the same
        # configuration gets the same placement whichever split it is scored with
        even = uniform_balance(len(scaled.layers), k * per_rank)
        sends, grads = traffic_bytes(scaled, even, schedule, k, per_rank, microbatches)
        placement = self.placer(self.cluster, k, d, sends, grads)
        link = slowest_bytes_per_s(placement.pipeline_bytes_per_s)
        model = dataclasses.replace(self.model, schedule=schedule, microbatches=microbatches,
                                    stages_per_rank=per_rank, bandwidth_bytes_per_ms=link / 1e3 if link else None)
        key = (k, size, microbatches, schedule, per_rank, link, tuple(balance) if balance is not None else None)
        plan = self.splits.get(key)
        if plan is None:
            make = splitter(self.method) if balance is None else (lambda p, _r: split_given(p, list(balance)))
            plan = plan_one(scaled, how, size, [self.cluster.device] * k, model, make, self.profile_path)
            self.splits[key] = plan
        sim = simulate_plan(plan)
        _, grads = traffic_bytes(scaled, plan.balance, schedule, k, per_rank, microbatches)
        ring = [ring_allreduce_ms(g, d, bw, self.model.latency_ms)
                for g, bw in zip(grads, placement.replica_bytes_per_s)]
        exposed = exposed_allreduce_ms(sim, ring, tie_waits(scaled, plan.balance, schedule, k, per_rank))
        predicted = dataclasses.replace(plan.predicted, step_ms=sim.step_ms + exposed, allreduce_ms=exposed)
        out = dataclasses.replace(plan, data_parallel=d, cluster=self.cluster, predicted=predicted,
                                  placement=tuple(tuple(row) for row in placement.ranks))
        return out, sim, placement.layout


def _configuration(plan: Plan, sim: Simulation, layout: str) -> Configuration:
    per_rank = [0.0] * sim.num_ranks  # each rank's sends, summed in the events' order: one pass
    for e in sim.events:
        if e.kind == "SEND":
            per_rank[e.rank] += e.end_ms - e.start_ms
    sends = max(per_rank, default=0.0)
    step = plan.predicted.step_ms
    limit = plan.cluster.memory_bytes if plan.cluster is not None else None
    return Configuration(stages=plan.num_ranks, data_parallel=plan.data_parallel, microbatches=plan.microbatches,
                         microbatch_size=plan.microbatch_size or 0, schedule=plan.schedule,
                         stages_per_rank=plan.stages_per_rank, step_ms=step, allreduce_ms=plan.predicted.allreduce_ms,
                         bubble_fraction=sim.bubble_fraction,
                         comm_share=(plan.predicted.allreduce_ms + sends) / step if step > 0 else 0.0,
                         memory_bytes=max(sim.peak_memory_bytes, default=0), memory_limit_bytes=limit,
                         fits=plan.fits, balance=plan.balance, layout=layout, busiest_ms=busiest_compute_ms(plan))


def _lower_bound_ms(scaled: Profile, speed: float, stages: int, microbatches: int, schedule: str,
                    per_rank: int, optimizer: str = DEFAULT_OPTIMIZER) -> float:
    """No split of ``scaled``'s blocks on ``stages`` ranks steps faster than this under ``schedule``.

    W = one micro-batch's forward and backward through every block, O = every block's optimizer step
    (``optimizer``'s). The ranks' work: (M W + O) / K on average (each rank runs its stages' M forwards and
    backwards, then its optimizer step), and at least :func:`_busiest_rank_ms` on one (the blocks do not
    divide evenly: 78 equal layers on 16 ranks put 5 on one, not 4.875). The
    pipeline: take any (virtual) stage b of the S = K x V. Its first forward waits for a micro-batch to
    pass the stages before it; it then runs M forwards and M backwards (M input-gradient halves ``I``
    under a zero-bubble schedule, whose ``W`` halves may wait); and its last one's gradient passes back
    through the stages before it, to stage 0, whose rank then still runs that micro-batch's ``W`` half
    (zero bubble) and its optimizer step: at least block 0's, c. With u = forward + backward (or + ``I``)
    and U_b the stages before b: step - c >= U_b + M u_b for every b, whatever the split:
    :func:`_chain_ms` finds the split of the blocks that makes the largest of these the smallest. (Its
    continuous relaxation, stages of any size, is the closed form U / (1 - (1 - 1/M)^S).)
    """
    zero_bubble = schedule == "ZBVZeroBubble"  # the schedule that splits a backward into I and W
    opt = [ms / speed for ms in BlockCosts.from_profile(scaled, optimizer).optimizer_ms.tolist()]
    measured = all(x.input_grad_ms is not None for x in scaled.layers)  # else the simulator assumes a share
    input_grad = [min(x.input_grad_ms or 0.0, x.backward_ms) if measured else x.backward_ms * INPUT_GRAD_SHARE
                  for x in scaled.layers]
    # W timed as torch runs it: a block's I + W may exceed its backward in one call, and the model's first stage
    # runs no I (its W is its whole backward), so any block, which may be on it, counts no I in the chain
    split = measured and all(x.weight_grad_ms is not None for x in scaled.layers)
    weight_ms = [(x.weight_grad_ms or 0.0) if split else x.backward_ms - ig
                 for x, ig in zip(scaled.layers, input_grad)]
    backward_ms = [min(x.backward_ms, ig + wg) if zero_bubble else x.backward_ms
                   for x, ig, wg in zip(scaled.layers, input_grad, weight_ms)]
    times = [(x.forward_ms + b) / speed for x, b in zip(scaled.layers, backward_ms)]
    chain = [(x.forward_ms + (x.backward_ms if not zero_bubble else 0.0 if split else ig)) / speed
             for x, ig in zip(scaled.layers, input_grad)]
    after = opt[0] + ((scaled.layers[0].backward_ms if split else weight_ms[0]) / speed if zero_bubble else 0.0)
    w, m = sum(times), microbatches
    return max((m * w + sum(opt)) / stages, _busiest_rank_ms([m * t + o for t, o in zip(times, opt)], stages),
               after + _chain_ms(chain, stages * per_rank, m))


def _chain_ms(chain_ms: Sequence[float], stages: int, microbatches: int) -> float:
    """The least, over every split of blocks of these times into ``stages`` contiguous non-empty stages, of
    the largest U_b + M u_b (u_b: stage b's time, U_b: the stages' before it); a hair below it (it bounds
    from below). Binary search on T: packing each stage as far as T allows is feasible if any split is (a
    stage ending later never helps the next one less: u_b + U_b = U_{b+1}), and fewer stages than asked
    can always be split further without raising any term."""
    m, n = microbatches, len(chain_ms)
    prefix = [0.0]
    for x in chain_ms:
        prefix.append(prefix[-1] + x)

    def fits(t: float) -> bool:
        i = 0
        for _ in range(stages):
            # the last block j this stage can end at: m prefix[j + 1] - (m - 1) prefix[i] <= t
            j = bisect.bisect_right(prefix, (t + (m - 1) * prefix[i]) / m) - 2
            if j < i:
                return False
            i = j + 1
            if i >= n:
                return True
        return False

    lo, hi = 0.0, m * prefix[n] * (1 + 1e-9) + 1e-300
    if stages > n or not fits(hi):
        return 0.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if mid <= lo or mid >= hi:
            break
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return lo * (1 - 1e-9)


def _busiest_rank_ms(work_ms: Sequence[float], ranks: int) -> float:
    """However blocks of these works are dealt to ``ranks`` ranks (contiguous or not), some rank holds at
    least this: of the j largest, one rank holds ceil(j / ranks), at least the smallest ones of them."""
    ordered = sorted(work_ms, reverse=True)
    prefix = [0.0]
    for x in ordered:
        prefix.append(prefix[-1] + x)
    return max((prefix[j] - prefix[j - -(-j // ranks)] for j in range(1, len(ordered) + 1)), default=0.0)


def _weights_bytes(profile: Profile, model: CostModel) -> float:
    """Parameters, gradients and optimizer state of the whole model (ties once)."""
    return float(sum(x.param_bytes for x in profile.layers)) * (2 + model.optimizer_states)


def _why(c: Configuration, best: Configuration) -> str:
    """One line: the term that makes ``c`` slower than ``best`` (or why it cannot run)."""
    if not c.fits:
        need = "needs >= " if not c.scored else "needs "
        return f"{need}{format_bytes(c.memory_bytes)} > {format_bytes(c.memory_limit_bytes or 0)} per device"
    if not c.scored:
        return f"lower bound {format_ms(c.step_ms)} >= best {format_ms(best.step_ms)} (not split)"
    if _same(c.step_ms, best.step_ms):
        if c.memory_bytes != best.memory_bytes:
            return f"same time, more memory: {format_bytes(c.memory_bytes)} vs {format_bytes(best.memory_bytes)}"
        return "same time and memory; the tie goes to fewer replicas, then fewer micro-batches"
    # the step is each rank's average busy time (compute, sends, optimizer) + its average idle time (the
    # bubble) + the exposed all-reduce: the term that grew most says why
    def parts(x: Configuration) -> dict[str, float]:
        pipeline = x.step_ms - x.allreduce_ms
        return {"work": (1 - x.bubble_fraction) * pipeline, "bubble": x.bubble_fraction * pipeline,
                "allreduce": x.allreduce_ms}
    mine, theirs = parts(c), parts(best)
    name = max(mine, key=lambda t: mine[t] - theirs[t])
    if name == "bubble":
        digits = 0 if f"{c.bubble_fraction:.0%}" != f"{best.bubble_fraction:.0%}" else 1
        return f"bubble {c.bubble_fraction:.{digits}%} vs {best.bubble_fraction:.{digits}%}"
    if name == "allreduce":
        return f"all-reduce {format_ms(c.allreduce_ms)} exposed vs {format_ms(best.allreduce_ms)}"
    return f"work per device {format_ms(mine['work'])} vs {format_ms(theirs['work'])}"


def _same(a: float, b: float) -> bool:
    """Equal to the simulator's rounding (the same step reached through different sums)."""
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))


def _tie_ms(step_ms: float) -> float:
    """The step to 9 significant digits: steps that differ only by rounding tie."""
    return float(f"{step_ms:.9g}")


def _order_key(c: Configuration, schedules: Sequence[str]) -> tuple[object, ...]:
    return (not c.fits, not c.scored, _tie_ms(c.step_ms), c.memory_bytes, c.data_parallel, c.microbatches,
            schedules.index(c.schedule) if c.schedule in schedules else len(schedules))


def plan_cluster(profile: Profile, cluster: Cluster, model: CostModel, *, global_batch: int, method: str = "exact",
                 schedules: Sequence[tuple[str, int]] | None = None, stages: int | None = None,
                 data_parallel: int | None = None, microbatches: int | None = None, keep: int = 5,
                 profile_path: str = "", placer: Placer | None = None, prune: bool = True) -> ClusterSearch:
    """The fastest (K, D, M, schedule, split) for ``global_batch`` samples per step on ``cluster``.

    ``stages`` (K), ``data_parallel`` (D) and ``microbatches`` (M) pin; ``schedules`` lists (name, stages per
    rank) to try (default: :func:`all_schedules`). ``model`` fixes the optimizer, latency, recomputation and
    the runtime's overhead; its bandwidth is replaced by the placement's: the slowest link a pipeline
    boundary crosses (the cost model has one bandwidth for all boundaries). ``placer``: :func:`autopart.core.placement.place`
    by default. ``prune=False`` scores every configuration (for tests).
    """
    devices = cluster.num_devices
    n = len(profile.layers)
    todo = [(canonical_schedule(name), v) for name, v in (schedules if schedules is not None else all_schedules())]
    names = [name for name, _ in todo]
    if global_batch < 1:
        raise AutopartError(f"global batch must be >= 1, got {global_batch}")
    if stages is not None and (stages < 1 or devices % stages):
        raise AutopartError(f"{plural(stages, 'stage')} do not divide the cluster's {devices} devices")
    if data_parallel is not None and (data_parallel < 1 or devices % data_parallel):
        raise AutopartError(f"data parallel {data_parallel} does not divide the cluster's {devices} devices")
    if stages is not None and data_parallel is not None and stages * data_parallel != devices:
        raise AutopartError(f"{plural(stages, 'stage')} x {data_parallel} replicas = {stages * data_parallel} "
                            f"devices, the cluster has {devices}")
    if data_parallel is not None and global_batch % data_parallel:
        raise AutopartError(f"global batch {global_batch} is not divisible by {data_parallel} replicas")
    if stages is not None and stages > n:
        raise AutopartError(f"{plural(stages, 'stage')} > {plural(n, 'block')}")
    depths = [stages] if stages is not None else [devices // data_parallel] if data_parallel is not None \
        else [k for k in divisors(devices) if k <= n]
    scorer = _Scorer(profile, cluster, model, method, profile_path, placer if placer is not None else place)
    limit = cluster.memory_bytes
    weights = _weights_bytes(profile, model)
    one_per_rank = any(v == 1 for _, v in todo)  # then a one-rank pipeline needs no schedule of several
    pending: list[tuple[float, int, int, int, int, str, int]] = []
    skipped: list[Configuration] = []
    reasons: list[str] = []
    for k in depths:
        d = devices // k
        if global_batch % d:
            reasons.append(f"{k}x{d}: global batch {global_batch} is not divisible by {d} replicas")
            continue
        share = global_batch // d
        counts = [microbatches] if microbatches is not None else \
            [m for m in divisors(share) if m <= MAX_REPLICA_MICROBATCHES]
        for m in counts:
            if share % m:
                reasons.append(f"{k}x{d}: a replica's {share} samples are not divisible by {m} micro-batches")
                continue
            size = share // m
            for name, per_rank in todo:
                if k == 1 and per_rank > 1 and one_per_rank:
                    reasons.append(f"{k}x{d} {name}: one rank runs its stages one after another, as 1F1B "
                                   f"does one stage, with more memory (not tried)")
                    continue
                if k * per_rank > n:
                    reasons.append(f"{k}x{d} {name}: {plural(k * per_rank, 'stage')} > {plural(n, 'block')}")
                    continue
                try:
                    peak_in_flight(name, k, m, per_rank)  # the schedule exists (1F1B: M >= K); cached
                except AutopartError as exc:
                    reasons.append(f"{k}x{d} {name} M={m}: {exc}")
                    continue
                if prune and limit is not None and weights / k > limit:
                    skipped.append(Configuration(k, d, m, size, name, per_rank, math.inf, 0.0, 0.0, 0.0,
                                                 int(weights / k), limit, fits=False, scored=False))
                    continue
                bound = _lower_bound_ms(scorer.at(size)[0], cluster.speed, k, m, name, per_rank, model.optimizer)
                pending.append((bound, k, d, m, size, name, per_rank))
    pending.sort()
    scored: list[tuple[Configuration, Plan]] = []
    best_ms = math.inf
    for bound, k, d, m, size, name, per_rank in pending:
        if prune and _tie_ms(bound) > _tie_ms(best_ms):  # loses outright: one that may tie is scored (memory)
            skipped.append(Configuration(k, d, m, size, name, per_rank, bound, 0.0, 0.0, 0.0, 0, limit,
                                         fits=True, scored=False))
            continue
        try:
            plan, sim, layout = scorer.score(k, d, m, size, name, per_rank)
        except AutopartError as exc:  # no split fits, or the schedule cannot run it
            reasons.append(f"{k}x{d} {name} M={m}: {exc}")
            skipped.append(Configuration(k, d, m, size, name, per_rank, math.inf, 0.0, 0.0, 0.0, 0, limit,
                                         fits=False, scored=False, why=str(exc)))
            continue
        config = _configuration(plan, sim, layout)
        scored.append((config, plan))
        if config.fits:
            best_ms = min(best_ms, config.step_ms)
    if not scored:
        if skipped:
            c = min(skipped, key=lambda c: c.memory_bytes or math.inf)
            if c.why:
                raise AutopartError(f"no configuration fits ({len(skipped)} tried); {c.label} {c.schedule} "
                                    f"M={c.microbatches}: {c.why}")
            raise AutopartError(f"no configuration fits: {c.label} needs >= {format_bytes(c.memory_bytes)} "
                                f"> {format_bytes(c.memory_limit_bytes or 0)} per device for the weights alone")
        raise AutopartError(f"no configuration to try on {devices} devices: {reasons[-1] if reasons else 'none'}")
    scored.sort(key=lambda item: _order_key(item[0], names))
    best_config, best = scored[0]
    if not best_config.fits:
        raise AutopartError(f"no configuration fits: the closest, {best_config.label} {best_config.schedule} "
                            f"M={best_config.microbatches}, needs {format_bytes(best_config.memory_bytes)} > "
                            f"{format_bytes(best_config.memory_limit_bytes or 0)} per device")
    fitting = [item for item in scored if item[0].fits]
    best, _ = choose([p for _, p in fitting], profile)
    at = next(i for i, (_, p) in enumerate(scored) if p.microbatches == best.microbatches and p.schedule ==
              best.schedule and p.data_parallel == best.data_parallel and p.balance == best.balance and
              p.stages_per_rank == best.stages_per_rank)
    best_config = scored[at][0]
    scored.insert(0, scored.pop(at))
    tried = [best_config] + [dataclasses.replace(c, why=_why(c, best_config)) for c, _ in scored[1:]]
    tried += [dataclasses.replace(c, why=c.why or _why(c, best_config))
              for c in sorted(skipped, key=lambda c: _order_key(c, names))]
    runners = tuple(Candidate(schedule=c.schedule, microbatches=c.microbatches, stages_per_rank=c.stages_per_rank,
                              step_ms=c.step_ms, balance=c.balance, data_parallel=c.data_parallel,
                              allreduce_ms=c.allreduce_ms, busiest_ms=c.busiest_ms)
                    for c in tried[1:] if c.scored and c.fits)[:keep]
    return ClusterSearch(best=dataclasses.replace(best, runners_up=runners), tried=tuple(tried),
                         layout=best_config.layout)


def score_configuration(profile: Profile, cluster: Cluster, model: CostModel, *, global_batch: int, stages: int,
                        data_parallel: int, microbatches: int, schedule: str, balance: Sequence[int] | None = None,
                        stages_per_rank: int = 1, method: str = "exact", placer: Placer | None = None) -> Plan:
    """One given configuration under the same cost model as :func:`plan_cluster`: ``balance`` (blocks per
    stage, e.g. torchtitan's uniform split) or, without it, the exact split for it."""
    name = canonical_schedule(schedule)
    _check(profile, cluster, global_batch, stages, data_parallel, stages_per_rank)
    share = global_batch // data_parallel
    if microbatches < 1 or share % microbatches:
        raise AutopartError(f"a replica's {share} samples (global batch {global_batch} / {data_parallel} replicas) "
                            f"are not divisible by {plural(microbatches, 'micro-batch')}")
    n = len(profile.layers)
    if balance is not None and (len(balance) != stages * stages_per_rank or sum(balance) != n or min(balance) < 1):
        raise AutopartError(f"balance {list(balance)} does not split {n} blocks into {stages * stages_per_rank} "
                            f"non-empty stages (sum {sum(balance)}, {len(balance)} stages)")
    scorer = _Scorer(profile, cluster, model, method, "", placer if placer is not None else place)
    plan, _, _ = scorer.score(stages, data_parallel, microbatches, share // microbatches, name, stages_per_rank,
                              balance)
    return plan

"""The cost model that the partitioner and the simulator share (DESIGN.md).

K stages, M micro-batches, stage s holds blocks i..j (inclusive):

- time ``t_s = Σ(forward_ms + backward_ms) / speed_s`` (``+ Σ forward_ms / speed_s``
  when the stage recomputes activations) plus its sends: the forward send of
  its output when it is not the last stage and the backward send of its
  input's gradient when it is not the first, each ``output_bytes / bandwidth + latency``
  of the boundary crossed. Sends are free when no bandwidth or latency is given.
- memory ``Σ param_bytes × (2 + optimizer_states) + in_flight_s × Σ activation_bytes``,
  ``in_flight_s = M`` under GPipe and ``min(M, K − s)`` under 1F1B.
- recomputation (chosen only where a stage does not fit otherwise) keeps, per
  in-flight micro-batch, only the stage's input, plus one micro-batch's full
  activations while it is recomputed:
  ``Σ param_bytes × (2 + opt) + in_flight_s × input_bytes + Σ activation_bytes``.

Pure numpy; every function takes arrays of starts and ends so the partitioner
can evaluate many candidate stages at once, and the same arithmetic gives
the numbers a plan reports.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import numpy.typing as npt

from autopart.formats.devices import Device
from autopart.errors import AutopartError
from autopart.formats.profile import Profile
from autopart.core.schedules import canonical_schedule

__all__ = ["CostModel", "Problem", "OPTIMIZER_STATES", "StageCost"]

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]

OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "sgd-momentum": 1, "sgd": 0}


@dataclass(frozen=True)
class CostModel:
    """Everything about training that changes a stage's time or memory, except the blocks."""

    schedule: str = "1F1B"
    """A torch.distributed.pipelining schedule name (GPipe, 1F1B, Interleaved1F1B,
    ZBVZeroBubble; any case): how many micro-batches a stage holds activations for."""
    microbatches: int = 1
    optimizer_states: int = 2
    """Copies of the parameters the optimizer keeps: 2 for Adam, 1 SGD+momentum, 0 SGD."""
    bandwidth_bytes_per_ms: float | None = None
    """Link bandwidth between neighbouring stages; None with latency 0 means free sends."""
    latency_ms: float = 0.0
    recompute: bool = True
    """Allow activation recomputation on stages that do not fit otherwise."""
    stages_per_rank: int = 1
    """Virtual stages per rank (Interleaved1F1B: any, ZBVZeroBubble: 2)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", canonical_schedule(self.schedule))
        if self.microbatches < 1:
            raise AutopartError(f"micro-batches must be >= 1, got {self.microbatches}")
        if self.optimizer_states < 0:
            raise AutopartError(f"optimizer states must be >= 0, got {self.optimizer_states}")
        if self.bandwidth_bytes_per_ms is not None and not self.bandwidth_bytes_per_ms > 0:
            raise AutopartError(f"bandwidth must be > 0, got {self.bandwidth_bytes_per_ms}")
        if not self.latency_ms >= 0:
            raise AutopartError(f"latency must be >= 0, got {self.latency_ms}")

    @property
    def sends(self) -> bool:
        return self.bandwidth_bytes_per_ms is not None or self.latency_ms > 0

    def in_flight(self, stage: int, num_stages: int) -> int:
        """Micro-batches whose activations stage ``stage`` holds at its peak.

        M under GPipe, min(M, K - s) under 1F1B; for the interleaved and
        zero-bubble schedules, what the simulator counts on equal stages.
        """
        if self.schedule == "GPipe":
            return self.microbatches
        if self.schedule == "1F1B":
            return min(self.microbatches, num_stages - stage)
        return _simulated_in_flight(self.schedule, num_stages, self.stages_per_rank, self.microbatches)[stage]


@functools.lru_cache(maxsize=256)
def _simulated_in_flight(schedule: str, num_stages: int, stages_per_rank: int, microbatches: int) -> tuple[int, ...]:
    from autopart.core.schedules import build_schedule
    from autopart.core.simulate import StageCosts, simulate

    if num_stages % stages_per_rank:
        raise AutopartError(f"{num_stages} stages do not divide into {stages_per_rank} per rank")
    sched = build_schedule(schedule, num_stages // stages_per_rank, microbatches, stages_per_rank)
    return simulate(sched, [StageCosts(1.0, 2.0, activation_bytes=1)] * num_stages).peak_in_flight


@dataclass(frozen=True)
class StageCost:
    """One stage of a split, as the cost model sees it."""

    first: int
    last: int
    time_ms: float
    memory_bytes: int
    recompute: bool
    compute_ms: float
    send_ms: float
    forward_ms: float = 0.0
    """Forward of one micro-batch on this stage's device."""
    backward_ms: float = 0.0
    """Backward of one micro-batch, the recomputed forward included."""
    send_forward_ms: float = 0.0
    send_backward_ms: float = 0.0
    activation_bytes: int = 0
    """Kept per in-flight micro-batch (only the stage's input when recomputing)."""
    static_bytes: int = 0
    """Parameters, gradients and optimizer state."""
    backward_extra_bytes: int = 0
    """Held during a backward only: the recomputed activations."""
    optimizer_ms: float = 0.0
    """The stage's optimizer step, once per training step."""


class Problem:
    """Blocks, devices and a cost model: the arrays the partitioner works on.

    Block costs come from a profile, or directly from arrays (tests, benchmarks).
    """

    def __init__(self, compute_ms: Sequence[float], devices: Sequence[Device], model: CostModel, *,
                 forward_ms: Sequence[float] | None = None, param_bytes: Sequence[float] | None = None,
                 activation_bytes: Sequence[float] | None = None, output_bytes: Sequence[float] | None = None,
                 input_bytes: float = 0.0, names: Sequence[str] | None = None,
                 optimizer_ms: Sequence[float] | None = None) -> None:
        n = len(compute_ms)
        k = len(devices)
        if k < 1:
            raise AutopartError(f"need at least 1 stage, got {k}")
        if n < 1:
            raise AutopartError("no blocks to partition")
        if k > n:
            raise AutopartError(f"{k} stages > {n} blocks: every stage needs at least one block")
        self.n, self.k, self.model, self.devices = n, k, model, list(devices)
        self.names = list(names) if names is not None else [str(i) for i in range(n)]

        def arr(values: Sequence[float] | None, what: str) -> Floats:
            a = np.zeros(n) if values is None else np.asarray(values, dtype=np.float64)
            if a.shape != (n,):
                raise AutopartError(f"{what} has {a.size} entries for {n} blocks")
            if not np.all(np.isfinite(a)) or np.any(a < 0):
                bad = int(np.flatnonzero(~np.isfinite(a) | (a < 0))[0])
                raise AutopartError(f"{what} of block {self.names[bad]!r} is {a[bad]}, must be finite and >= 0")
            return a

        self.compute = arr(compute_ms, "compute time")
        self.forward = arr(forward_ms, "forward time")
        self.params = arr(param_bytes, "parameter bytes")
        self.acts = arr(activation_bytes, "activation bytes")
        self.outs = arr(output_bytes, "output bytes")
        self.opt = arr(optimizer_ms, "optimizer time")
        self.input_bytes = float(input_bytes)
        z = np.zeros(1)
        self.pc = np.concatenate([z, np.cumsum(self.compute)])
        self.pf = np.concatenate([z, np.cumsum(self.forward)])
        weight = self.params * (2 + model.optimizer_states)
        self.pw = np.concatenate([z, np.cumsum(weight)])
        self.pa = np.concatenate([z, np.cumsum(self.acts)])
        # send cost of the boundary after block b (b = 0 .. n-2); the last entry is never used
        if model.sends:
            bw = model.bandwidth_bytes_per_ms
            self.send = (self.outs / bw if bw else np.zeros(n)) + model.latency_ms
        else:
            self.send = np.zeros(n)
        # bytes a recomputing stage that starts at block i keeps per in-flight micro-batch
        self.keep = np.concatenate([[self.input_bytes], self.outs[:-1]])
        self.speed = np.array([d.speed for d in devices], dtype=np.float64)
        self.limit = np.array([np.inf if d.memory_bytes is None else float(d.memory_bytes) for d in devices])
        self.in_flight = np.array([model.in_flight(s, k) for s in range(k)], dtype=np.float64)
        self.keep_at_end = False  # True only in the mirror image made by reversed()

    def reversed(self) -> "Problem":
        """The mirror image: block n-1 first, stage K-1 first. Stage (i, j) here is
        stage (K-1-s, n-1-j, n-1-i) there, with the same time and memory."""
        r = object.__new__(Problem)
        r.n, r.k, r.model = self.n, self.k, self.model
        r.devices, r.names = self.devices[::-1], self.names[::-1]
        for name in ("compute", "forward", "params", "acts", "speed", "limit", "in_flight", "opt"):
            setattr(r, name, getattr(self, name)[::-1].copy())
        r.outs, r.input_bytes = self.outs, self.input_bytes  # not used by the mirror's costs
        z = np.zeros(1)
        r.pc = np.concatenate([z, np.cumsum(r.compute)])
        r.pf = np.concatenate([z, np.cumsum(r.forward)])
        r.pw = np.concatenate([z, np.cumsum(self.params[::-1] * (2 + self.model.optimizer_states))])
        r.pa = np.concatenate([z, np.cumsum(r.acts)])
        r.send = np.concatenate([self.send[:-1][::-1], [0.0]])
        r.keep = self.keep[::-1].copy()
        r.keep_at_end = True
        return r

    @classmethod
    def from_profile(cls, profile: Profile, devices: Sequence[Device], model: CostModel) -> "Problem":
        layers = profile.layers
        return cls([x.forward_ms + x.backward_ms for x in layers], devices, model,
                   forward_ms=[x.forward_ms for x in layers], param_bytes=[x.param_bytes for x in layers],
                   activation_bytes=[x.activation_bytes for x in layers],
                   output_bytes=[x.output_bytes for x in layers], input_bytes=profile.input_bytes,
                   names=profile.names, optimizer_ms=[x.optimizer_ms for x in layers])

    def plain_prefix(self, s: int) -> Floats:
        """Prefix sums of a block's memory on stage s without recomputation (exact: integer bytes)."""
        f = float(self.in_flight[s])
        cache: dict[float, Floats] = self.__dict__.setdefault("_plain_prefix", {})
        if f not in cache:
            cache[f] = self.pw + f * self.pa
        return cache[f]

    def rc_prefix(self) -> Floats:
        cache: dict[str, Floats] = self.__dict__.setdefault("_rc_prefix", {})
        if "rc" not in cache:
            cache["rc"] = self.pw + self.pa
        return cache["rc"]

    @property
    def limited(self) -> bool:
        return bool(np.any(np.isfinite(self.limit)))

    # ---- vectorised stage costs: i, j are arrays of first and last block (inclusive) ----

    def send_ms(self, s: int, i: Ints, j: Ints) -> Floats:
        out = np.zeros(np.broadcast(i, j).shape)
        if s > 0:
            out = out + self.send[np.maximum(i - 1, 0)]
        if s < self.k - 1:
            out = out + self.send[j]
        return out

    def mem_plain(self, s: int, i: Ints, j: Ints) -> Floats:
        q = self.plain_prefix(s)
        return q[j + 1] - q[i]

    def mem_recompute(self, s: int, i: Ints, j: Ints) -> Floats:
        keep = self.keep[j] if self.keep_at_end else self.keep[i]
        return (self.pw[j + 1] - self.pw[i]) + self.in_flight[s] * keep + (self.pa[j + 1] - self.pa[i])

    def time_plain(self, s: int, i: Ints, j: Ints) -> Floats:
        return (self.pc[j + 1] - self.pc[i]) / self.speed[s] + self.send_ms(s, i, j)

    def time_recompute(self, s: int, i: Ints, j: Ints) -> Floats:
        work = (self.pc[j + 1] - self.pc[i]) + (self.pf[j + 1] - self.pf[i])
        return work / self.speed[s] + self.send_ms(s, i, j)

    def evaluate(self, s: int, i: Ints, j: Ints) -> tuple[Floats, Floats, npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
        """(time, memory, recompute, fits) of stage ``s`` holding blocks i..j."""
        mp = self.mem_plain(s, i, j)
        fits_plain = mp <= self.limit[s]
        if not self.model.recompute or not np.isfinite(self.limit[s]):
            return self.time_plain(s, i, j), mp, np.zeros(mp.shape, dtype=bool), fits_plain
        mr = self.mem_recompute(s, i, j)
        rc = ~fits_plain
        time = np.where(rc, self.time_recompute(s, i, j), self.time_plain(s, i, j))
        return time, np.where(rc, mr, mp), rc, fits_plain | (mr <= self.limit[s])

    def stage(self, s: int, first: int, last: int) -> StageCost:
        i, j = np.array([first]), np.array([last])
        t, m, rc, _ = self.evaluate(s, i, j)
        recompute = bool(rc[0])
        v = float(self.speed[s])
        forward = float(self.pf[last + 1] - self.pf[first])
        backward = float(self.pc[last + 1] - self.pc[first]) - forward + (forward if recompute else 0.0)
        acts = int(self.pa[last + 1] - self.pa[first])
        keep = int(self.keep[last] if self.keep_at_end else self.keep[first])
        return StageCost(
            first=first, last=last, time_ms=float(t[0]), memory_bytes=int(round(float(m[0]))), recompute=recompute,
            compute_ms=(forward + backward) / v, send_ms=float(self.send_ms(s, i, j)[0]),
            forward_ms=forward / v, backward_ms=backward / v,
            send_forward_ms=float(self.send[last]) if s < self.k - 1 else 0.0,
            send_backward_ms=float(self.send[first - 1]) if s > 0 else 0.0,
            activation_bytes=keep if recompute else acts, static_bytes=int(self.pw[last + 1] - self.pw[first]),
            backward_extra_bytes=acts if recompute else 0,
            optimizer_ms=float(self.opt[first: last + 1].sum()) / v)

    def stages(self, balance: Sequence[int]) -> list[StageCost]:
        """Costs of every stage of a split given as block counts."""
        if len(balance) != self.k or sum(balance) != self.n or min(balance) < 1:
            raise AutopartError(f"balance {list(balance)} does not split {self.n} blocks into {self.k} non-empty stages")
        out, first = [], 0
        for s, count in enumerate(balance):
            out.append(self.stage(s, first, first + count - 1))
            first += count
        return out

    def fits(self, balance: Sequence[int]) -> bool:
        first = 0
        for s, count in enumerate(balance):
            _, _, _, ok = self.evaluate(s, np.array([first]), np.array([first + count - 1]))
            if not ok[0]:
                return False
            first += count
        return True

    def lower_bound_ms(self) -> float:
        """No split of these blocks has a slower stage than... at least this.

        max(total compute / total speed, the largest block on the fastest device).
        """
        return float(max(self.pc[-1] / self.speed.sum(), self.compute.max() / self.speed.max()))

"""The cost model that the partitioner and the simulator share (docs/cost-model.md, term by term).

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
- skips (models captured as a graph): a boundary sends every value that
  crosses it, ``output_bytes + skip_bytes``, so a skip is charged at every
  boundary it crosses; a stage holds the skips it receives until the
  micro-batch's backward (``in_flight_s × skip_bytes`` of the boundary
  before it), and a recomputing stage keeps its whole input.
- tied weights: a parameter used by several blocks counts in every stage that
  holds one of them (a copy per stage, its gradients summed between them).

Pure numpy; every function takes arrays of starts and ends so the partitioner
can evaluate many candidate stages at once, and the same arithmetic gives
the numbers a plan reports.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import numpy.typing as npt

from autopart.core.schedules import peak_in_flight
from autopart.core.simulate import INPUT_GRAD_SHARE, StageTimes
from autopart.errors import AutopartError
from autopart.formats.devices import Device
from autopart.formats.optimizers import DEFAULT_OPTIMIZER, OPTIMIZER_STATES, check_optimizer
from autopart.formats.profile import Profile
from autopart.formats.schedule_kinds import canonical_schedule, check_microbatches
from autopart.formats.stage import StageCost
from autopart.formats.units import plural

__all__ = ["CostModel", "BlockCosts", "Problem", "MirroredProblem"]

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]

@dataclass(frozen=True)
class CostModel:
    """Everything about training that changes a stage's time or memory, except the blocks."""

    schedule: str = "1F1B"
    """A torch.distributed.pipelining schedule name (GPipe, 1F1B, Interleaved1F1B,
    ZBVZeroBubble; any case): how many micro-batches a stage holds activations for."""
    microbatches: int = 1
    optimizer: str = DEFAULT_OPTIMIZER
    """Whose step time each rank pays after its last backward, and whose state each parameter carries
    (a key of :data:`~autopart.formats.optimizers.OPTIMIZER_STATES`)."""
    bandwidth_bytes_per_ms: float | None = None
    """Link bandwidth between neighbouring stages; None with latency 0 means free sends."""
    latency_ms: float = 0.0
    recompute: bool = True
    """Allow activation recomputation on stages that do not fit otherwise."""
    stages_per_rank: int = 1
    """Virtual stages per rank (Interleaved1F1B: any, ZBVZeroBubble: 2)."""
    overhead_ms: float = 0.0
    """The runtime's own time around each forward or backward action (:attr:`StageCost.overhead_ms`)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "schedule", canonical_schedule(self.schedule))
        check_microbatches(self.microbatches)
        check_optimizer(self.optimizer)
        if self.bandwidth_bytes_per_ms is not None and not self.bandwidth_bytes_per_ms > 0:
            raise AutopartError(f"bandwidth must be > 0, got {self.bandwidth_bytes_per_ms}")
        if not self.latency_ms >= 0:
            raise AutopartError(f"latency must be >= 0, got {self.latency_ms}")
        if not 0 <= self.overhead_ms < 1e9:
            raise AutopartError(f"overhead must be >= 0 ms (and finite), got {self.overhead_ms}")

    @property
    def optimizer_states(self) -> int:
        """Copies of the parameters the optimizer keeps: 2 for Adam, 1 SGD+momentum, 0 SGD (from the table)."""
        return OPTIMIZER_STATES[self.optimizer]

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
        if num_stages % self.stages_per_rank:
            raise AutopartError(f"{num_stages} stages do not divide into {self.stages_per_rank} per rank")
        return peak_in_flight(self.schedule, num_stages // self.stages_per_rank, self.microbatches,
                              self.stages_per_rank)[stage]


@dataclass(frozen=True, eq=False)
class BlockCosts:
    """Per-block costs for one micro-batch, validated: what the partitioner splits."""

    names: tuple[str, ...]
    compute_ms: Floats
    """Forward plus backward."""
    forward_ms: Floats
    param_bytes: Floats
    activation_bytes: Floats
    output_bytes: Floats
    """What crosses the boundary after the block."""
    optimizer_ms: Floats
    input_bytes: float = 0.0
    """One micro-batch's input: what a recomputing first stage keeps per micro-batch."""
    skip_bytes: Floats | None = None
    """Skips crossing the boundary after each block, besides its output (None: a chain, no skips)."""
    ties: tuple[tuple[float, tuple[int, ...]], ...] = ()
    """Shared parameters: (bytes, the blocks that use it, owner first); the owner's ``param_bytes`` has it."""
    input_grad_ms: Floats | None = None
    """The input-gradient half of each backward (None: not measured; the simulator assumes half)."""

    @property
    def n(self) -> int:
        return len(self.names)

    @staticmethod
    def of(compute_ms: Sequence[float], *, forward_ms: Sequence[float] | None = None,
           param_bytes: Sequence[float] | None = None, activation_bytes: Sequence[float] | None = None,
           output_bytes: Sequence[float] | None = None, input_bytes: float = 0.0,
           names: Sequence[str] | None = None, optimizer_ms: Sequence[float] | None = None,
           skip_bytes: Sequence[float] | None = None,
           ties: Sequence[tuple[float, Sequence[int]]] = (),
           input_grad_ms: Sequence[float] | None = None) -> "BlockCosts":
        """Arrays from lists (missing ones are zeros); a NaN, infinite or negative entry names its block."""
        n = len(compute_ms)
        if n < 1:
            raise AutopartError("no blocks to partition")
        labels = tuple(names) if names is not None else tuple(str(i) for i in range(n))

        def arr(values: Sequence[float] | None, what: str) -> Floats:
            a = np.zeros(n) if values is None else np.asarray(values, dtype=np.float64)
            if a.shape != (n,):
                raise AutopartError(f"{what} has {a.size} entries for {n} blocks")
            if not np.all(np.isfinite(a)) or np.any(a < 0):
                bad = int(np.flatnonzero(~np.isfinite(a) | (a < 0))[0])
                raise AutopartError(f"{what} of block {labels[bad]!r} is {a[bad]}, must be finite and >= 0")
            return a

        return BlockCosts(names=labels, compute_ms=arr(compute_ms, "compute time"),
                          forward_ms=arr(forward_ms, "forward time"), param_bytes=arr(param_bytes, "parameter bytes"),
                          activation_bytes=arr(activation_bytes, "activation bytes"),
                          output_bytes=arr(output_bytes, "output bytes"),
                          optimizer_ms=arr(optimizer_ms, "optimizer time"), input_bytes=float(input_bytes),
                          skip_bytes=arr(skip_bytes, "skip bytes") if skip_bytes is not None else None,
                          ties=_ties(ties, n),
                          input_grad_ms=arr(input_grad_ms, "input-gradient time") if input_grad_ms is not None
                          else None)

    @staticmethod
    def from_profile(profile: Profile, optimizer: str = DEFAULT_OPTIMIZER) -> "BlockCosts":
        """The profile's blocks, paying ``optimizer``'s step (AdamW's where the profile did not time it)."""
        layers = profile.layers
        return BlockCosts.of([x.forward_ms + x.backward_ms for x in layers], forward_ms=[x.forward_ms for x in layers],
                             param_bytes=[x.param_bytes for x in layers],
                             activation_bytes=[x.activation_bytes for x in layers],
                             output_bytes=[x.output_bytes for x in layers], input_bytes=profile.input_bytes,
                             names=profile.names,
                             optimizer_ms=[dict(x.optimizer_ms_by_name).get(optimizer, x.optimizer_ms) for x in layers],
                             skip_bytes=[x.skip_bytes for x in layers] if any(x.skip_bytes for x in layers) else None,
                             ties=[(t.bytes, [profile.names.index(b) for b in t.blocks]) for t in profile.ties
                                   if all(b in profile.names for b in t.blocks)],
                             input_grad_ms=None if any(x.input_grad_ms is None for x in layers)
                             else [min(x.input_grad_ms or 0.0, x.backward_ms) for x in layers])

    def mirrored(self) -> "BlockCosts":
        """Block n-1 first. The boundary after mirrored block b is the original one after block n-2-b."""
        return BlockCosts(names=self.names[::-1], compute_ms=self.compute_ms[::-1].copy(),
                          forward_ms=self.forward_ms[::-1].copy(), param_bytes=self.param_bytes[::-1].copy(),
                          activation_bytes=self.activation_bytes[::-1].copy(),
                          output_bytes=np.concatenate([self.output_bytes[:-1][::-1], [0.0]]),
                          optimizer_ms=self.optimizer_ms[::-1].copy(), input_bytes=self.input_bytes,
                          skip_bytes=None if self.skip_bytes is None else np.concatenate(
                              [self.skip_bytes[:-1][::-1], [0.0]]),
                          ties=tuple((b, tuple(self.n - 1 - u for u in users)) for b, users in self.ties),
                          input_grad_ms=None if self.input_grad_ms is None else self.input_grad_ms[::-1].copy())


def _ties(ties: Sequence[tuple[float, Sequence[int]]], n: int) -> tuple[tuple[float, tuple[int, ...]], ...]:
    out = []
    for size, users in ties:
        if not users or any(not 0 <= u < n for u in users) or not size >= 0:
            raise AutopartError(f"tie of {size} bytes names blocks {list(users)} outside 0..{n - 1}")
        out.append((float(size), tuple(int(u) for u in users)))
    return tuple(out)


class Problem:
    """Blocks, devices (one per stage) and a cost model, and what a stage of them costs.

        Problem([1.0, 2.0, 3.0], [Device("gpu")] * 2, CostModel())      # compute times, other costs zero
        Problem.from_profile(profile, devices, model)

    The description (``blocks``, ``devices``, ``model`` and the per-block and
    per-stage arrays derived from them: ``compute``, ``params``, ``speed``,
    ``limit``) is read-only. Stage ``s`` holding blocks ``i..j`` (arrays,
    inclusive) is priced by :meth:`time_plain`, :meth:`time_recompute`,
    :meth:`mem_plain`, :meth:`mem_recompute`, :meth:`send_ms` (and its halves
    :meth:`send_in_ms`, :meth:`send_out_ms`), :meth:`evaluate` and
    :meth:`stage_times`; the partitioner's window searches read the three
    monotone prefix sums :meth:`compute_prefix`, :meth:`plain_prefix` and
    :meth:`rc_prefix`. Every other prefix sum is private. The mirror image
    (block n-1 first) is a :class:`MirroredProblem`, from :meth:`reversed`.
    """

    def __init__(self, blocks: BlockCosts | Sequence[float], devices: Sequence[Device], model: CostModel, *,
                 forward_ms: Sequence[float] | None = None, param_bytes: Sequence[float] | None = None,
                 activation_bytes: Sequence[float] | None = None, output_bytes: Sequence[float] | None = None,
                 input_bytes: float = 0.0, names: Sequence[str] | None = None,
                 optimizer_ms: Sequence[float] | None = None) -> None:
        """``blocks`` is a :class:`BlockCosts`, or the compute times with the other arrays as keywords."""
        costs = blocks if isinstance(blocks, BlockCosts) else BlockCosts.of(
            blocks, forward_ms=forward_ms, param_bytes=param_bytes, activation_bytes=activation_bytes,
            output_bytes=output_bytes, input_bytes=input_bytes, names=names, optimizer_ms=optimizer_ms)
        n, k = costs.n, len(devices)
        if k < 1:
            raise AutopartError(f"need at least 1 stage, got {k}")
        if k > n:
            raise AutopartError(f"{plural(k, 'stage')} > {plural(n, 'block')}: every stage needs at least one block")
        self.blocks, self.n, self.k, self.model, self.devices = costs, n, k, model, tuple(devices)
        self.names = list(costs.names)
        self.compute, self.params = costs.compute_ms, costs.param_bytes
        """Per block: forward plus backward (ms), parameter bytes."""
        self.speed = np.array([d.speed for d in devices], dtype=np.float64)
        self.limit = np.array([np.inf if d.memory_bytes is None else float(d.memory_bytes) for d in devices])
        """Per stage: device speed, memory limit in bytes (inf: none)."""
        z = np.zeros(1)
        self._compute_prefix_ms = np.concatenate([z, np.cumsum(costs.compute_ms)])
        self._forward_prefix_ms = np.concatenate([z, np.cumsum(costs.forward_ms)])
        self._static_prefix_bytes = np.concatenate([z, np.cumsum(costs.param_bytes * (2 + model.optimizer_states))])
        """Parameters, their gradients and the optimizer's state."""
        self._activation_prefix_bytes = np.concatenate([z, np.cumsum(costs.activation_bytes)])
        self._optimizer_prefix_ms = np.concatenate([z, np.cumsum(costs.optimizer_ms)])
        self._input_grad_prefix_ms = (None if costs.input_grad_ms is None
                                      else np.concatenate([z, np.cumsum(costs.input_grad_ms)]))
        skips = costs.skip_bytes if costs.skip_bytes is not None else np.zeros(n)
        crossing = costs.output_bytes + skips
        # send cost of the boundary after block b (b = 0 .. n-2); the last entry is never used
        if model.sends:
            bw = model.bandwidth_bytes_per_ms
            self._send_after_ms = (crossing / bw if bw else np.zeros(n)) + model.latency_ms
        else:
            self._send_after_ms = np.zeros(n)
        # what a stage receives per micro-batch, all of it (a recomputing stage keeps it) or its skips (held
        # until the backward), indexed by the block :meth:`_received` picks
        self._received_bytes = self._incoming(crossing, costs.input_bytes)
        self._received_skip_bytes = self._incoming(skips, 0.0)
        self._ties = [(size * (2 + model.optimizer_states), np.array(sorted(users), dtype=np.int64), users[0])
                      for size, users in costs.ties if len(set(users)) > 1]
        self.general = bool(np.any(skips > 0) or self._ties)
        """Memory is not a difference of prefix sums (skips, ties): the partitioner checks stages pair by pair."""
        self._in_flight = np.array(self._per_stage([model.in_flight(s, k) for s in range(k)]), dtype=np.float64)
        self._plain: dict[float, Floats] = {}  # memory prefix sums per in-flight count, made on first use
        self._rc: Floats | None = None
        self._lists: dict[str, list[float]] = {}  # the same as Python lists, for the greedy path
        self._single_fits: bool | None = None

    # ---- which way the blocks run: overridden by MirroredProblem alone ----

    def _incoming(self, after_block: Floats, at_input: float) -> Floats:
        """Per block b, what crosses into a stage that starts at b: ``at_input`` for block 0, else what
        crosses the boundary after block b-1."""
        return np.concatenate([[at_input], after_block[:-1]])

    def _received(self, per_block: Floats, i: Ints, j: Ints) -> Floats:
        """The entry of an :meth:`_incoming` array for stages i..j: the first block's."""
        out: Floats = per_block[i]
        return out

    def _per_stage(self, values: list[int]) -> list[int]:
        """Per-stage values of the original order, in this problem's stage order."""
        return values

    @classmethod
    def from_profile(cls, profile: Profile, devices: Sequence[Device], model: CostModel) -> "Problem":
        return cls(BlockCosts.from_profile(profile, model.optimizer), devices, model)

    def reversed(self) -> "Problem":
        """The mirror image: block n-1 first, stage K-1 first. Stage (i, j) here is
        stage (K-1-s, n-1-j, n-1-i) there, with the same time and memory."""
        return MirroredProblem(self.blocks.mirrored(), self.devices[::-1], self.model)

    def _like(self, devices: Sequence[Device], model: CostModel) -> "Problem":
        """The same blocks, running the same way, on other devices or under another model."""
        return type(self)(self.blocks, devices, model)

    def with_limits(self, limits: Floats) -> "Problem":
        """The same problem with other memory limits per stage (whole bytes; inf for none)."""
        devices = [dataclasses.replace(d, memory_bytes=None if not np.isfinite(x) else int(np.floor(x)))
                   for d, x in zip(self.devices, limits)]
        return self._like(devices, self.model)

    def relaxed(self) -> "Problem":
        """The same blocks and devices without sends and memory limits: its optimum bounds ours from below."""
        model = CostModel(schedule=self.model.schedule, microbatches=self.model.microbatches,
                          optimizer=self.model.optimizer,
                          recompute=self.model.recompute,
                          stages_per_rank=self.model.stages_per_rank, overhead_ms=self.model.overhead_ms)
        devices = [dataclasses.replace(d, memory_bytes=None) for d in self.devices]
        return self._like(devices, model)

    # ---- the monotone prefix sums the partitioner's window searches read ----

    def compute_prefix(self) -> Floats:
        """Prefix sums of the blocks' compute (forward plus backward, ms on a speed-1 device)."""
        return self._compute_prefix_ms

    def plain_prefix(self, s: int) -> Floats:
        """Prefix sums of a block's memory on stage s without recomputation (exact: integer bytes)."""
        f = float(self._in_flight[s])
        if f not in self._plain:
            self._plain[f] = self._static_prefix_bytes + f * self._activation_prefix_bytes
        return self._plain[f]

    def rc_prefix(self) -> Floats:
        """Prefix sums of a block's memory on a recomputing stage, inputs aside."""
        if self._rc is None:
            self._rc = self._static_prefix_bytes + self._activation_prefix_bytes
        return self._rc

    def as_list(self, key: str, values: Floats) -> list[float]:
        """``values`` as a Python list, made once per ``key``."""
        if key not in self._lists:
            self._lists[key] = values.tolist()
        return self._lists[key]

    def every_block_fits_every_stage(self) -> bool:
        """Does each block alone fit each stage without recomputation?"""
        if self._single_fits is None:
            self._single_fits = all(bool(np.all(np.diff(self.plain_prefix(s)) <= self.limit[s]))
                                    for s in range(self.k))
        return self._single_fits

    @property
    def limited(self) -> bool:
        """Does some stage have a memory limit?"""
        return bool(np.any(np.isfinite(self.limit)))

    @property
    def max_send_ms(self) -> float:
        """The dearest boundary's send (0 when sends are free)."""
        return float(self._send_after_ms.max())

    # ---- vectorised stage costs: i, j are arrays of first and last block (inclusive) ----

    def send_in_ms(self, s: int, i: Ints) -> Floats:
        """Stage s's backward send of its input's gradient, starting at blocks i (0 on the first stage)."""
        zero = np.zeros(np.shape(i))
        return self._send_after_ms[np.maximum(i - 1, 0)] + zero if s > 0 else zero

    def send_out_ms(self, s: int, j: Ints) -> Floats:
        """Stage s's forward send of its output, ending at blocks j (0 on the last stage)."""
        zero = np.zeros(np.shape(j))
        return self._send_after_ms[j] + zero if s < self.k - 1 else zero

    def send_ms(self, s: int, i: Ints, j: Ints) -> Floats:
        """Both sends of stage s holding blocks i..j."""
        out = np.zeros(np.broadcast(i, j).shape)
        if s > 0:
            out = out + self._send_after_ms[np.maximum(i - 1, 0)]
        if s < self.k - 1:
            out = out + self._send_after_ms[j]
        return out

    def mem_plain(self, s: int, i: Ints, j: Ints) -> Floats:
        """Stage s's bytes holding blocks i..j without recomputation."""
        q = self.plain_prefix(s)
        if not self.general:
            return q[j + 1] - q[i]
        skip = self._received(self._received_skip_bytes, i, j)
        return q[j + 1] - q[i] + self._in_flight[s] * skip + self.tie_bytes(i, j)

    def mem_recompute(self, s: int, i: Ints, j: Ints) -> Floats:
        """Stage s's bytes holding blocks i..j, recomputing."""
        keep = self._received(self._received_bytes, i, j)
        static, acts = self._static_prefix_bytes, self._activation_prefix_bytes
        mem = (static[j + 1] - static[i]) + self._in_flight[s] * keep + (acts[j + 1] - acts[i])
        return mem + self.tie_bytes(i, j) if self._ties else mem

    def tie_bytes(self, i: Ints, j: Ints) -> Floats:
        """Copies of shared parameters (with gradients and optimizer state) that blocks i..j use but whose
        owner is elsewhere (the owner's share is in the prefix sums)."""
        out = np.zeros(np.broadcast(i, j).shape)
        for size, users, owner in self._ties:
            nxt = users[np.minimum(np.searchsorted(users, i), users.size - 1)]
            used = (nxt >= i) & (nxt <= j)
            out = out + np.where(used & ~((i <= owner) & (owner <= j)), size, 0.0)
        return out

    def time_plain(self, s: int, i: Ints, j: Ints) -> Floats:
        """Stage s's time holding blocks i..j without recomputation, sends included."""
        pc = self._compute_prefix_ms
        return (pc[j + 1] - pc[i]) / self.speed[s] + self.send_ms(s, i, j)

    def time_recompute(self, s: int, i: Ints, j: Ints) -> Floats:
        """Stage s's time holding blocks i..j, recomputing (one more forward), sends included."""
        pc, pf = self._compute_prefix_ms, self._forward_prefix_ms
        work = (pc[j + 1] - pc[i]) + (pf[j + 1] - pf[i])
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

    def memories(self, s: int, i: Ints, j: Ints) -> tuple[Floats, Floats]:
        """Stage ``s``'s bytes holding blocks i..j without and with recomputation (inf where not allowed)."""
        plain = self.mem_plain(s, i, j)
        if not self.model.recompute:
            return plain, np.full(plain.shape, np.inf)
        return plain, self.mem_recompute(s, i, j)

    def stage_times(self, s: int, i: Ints, j: Ints, recompute: npt.NDArray[np.bool_] | None = None
                    ) -> tuple[StageTimes, npt.NDArray[np.bool_]]:
        """The times of stage ``s`` holding blocks i..j (arrays), recomputing where it must to fit, and
        whether each fits its own limit; or recomputing where ``recompute`` says (the caller decided what
        fits: all True)."""
        if recompute is None:
            _, _, rc, fits = self.evaluate(s, i, j)
        else:
            shape = np.broadcast(i, j).shape
            rc, fits = np.broadcast_to(recompute, shape), np.ones(shape, dtype=bool)
        v = self.speed[s]
        pc, pf, po, pig = (self._compute_prefix_ms, self._forward_prefix_ms, self._optimizer_prefix_ms,
                           self._input_grad_prefix_ms)
        forward = pf[j + 1] - pf[i]
        backward = (pc[j + 1] - pc[i]) - forward + np.where(rc, forward, 0.0)
        zero = np.zeros(np.broadcast(i, j).shape)
        if pig is None:  # not measured: half of the backward (the simulator's old assumption)
            input_grad = backward * INPUT_GRAD_SHARE
        else:  # a recomputing stage recomputes its forward before the input gradient
            input_grad = (pig[j + 1] - pig[i]) + np.where(rc, forward, 0.0)
        times = StageTimes(forward_ms=forward / v, backward_ms=backward / v, input_grad_ms=input_grad / v,
                           send_forward_ms=self.send_out_ms(s, j) + zero, send_backward_ms=self.send_in_ms(s, i) + zero,
                           optimizer_ms=(po[j + 1] - po[i]) / v, overhead_ms=zero + self.model.overhead_ms)
        return times, fits

    def stage(self, s: int, first: int, last: int, recompute: bool | None = None) -> StageCost:
        """The cost of stage ``s`` holding blocks ``first``..``last`` (recomputing where it must to fit its
        own limit, or as ``recompute`` says)."""
        i, j = np.array([first]), np.array([last])
        if recompute is None:
            _, m, rc, _ = self.evaluate(s, i, j)
        else:
            rc, m = np.array([recompute]), self.memories(s, i, j)[1 if recompute else 0]
        t, _ = self.stage_times(s, i, j, rc)
        recompute = bool(rc[0])
        static, pa = self._static_prefix_bytes, self._activation_prefix_bytes
        acts = int(pa[last + 1] - pa[first])
        keep = int(self._received(self._received_bytes, i, j)[0])
        skip = int(self._received(self._received_skip_bytes, i, j)[0])
        ties = int(self.tie_bytes(i, j)[0]) if self._ties else 0
        return StageCost(
            forward_ms=float(t.forward_ms[0]), backward_ms=float(t.backward_ms[0]),
            input_grad_ms=float(t.input_grad_ms[0]) if self._input_grad_prefix_ms is not None else None,
            send_forward_ms=float(t.send_forward_ms[0]), send_backward_ms=float(t.send_backward_ms[0]),
            activation_bytes=keep if recompute else acts + skip,
            static_bytes=int(static[last + 1] - static[first]) + ties,
            backward_extra_bytes=acts if recompute else 0,
            optimizer_ms=float(t.optimizer_ms[0]), overhead_ms=self.model.overhead_ms,
            memory_bytes=int(round(float(m[0]))), recompute=recompute)

    def stages(self, balance: Sequence[int], recompute: Sequence[bool] | None = None) -> list[StageCost]:
        """Costs of every stage of a split given as block counts (recomputing as ``recompute`` says, if given)."""
        if len(balance) != self.k or sum(balance) != self.n or min(balance) < 1:
            raise AutopartError(f"balance {list(balance)} does not split {self.n} blocks into {self.k} non-empty stages")
        out, first = [], 0
        for s, count in enumerate(balance):
            out.append(self.stage(s, first, first + count - 1, None if recompute is None else bool(recompute[s])))
            first += count
        return out

    def fits(self, balance: Sequence[int]) -> bool:
        """Does every stage of the split fit its device (recomputing where allowed)?"""
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
        return float(max(self._compute_prefix_ms[-1] / self.speed.sum(), self.compute.max() / self.speed.max()))


class MirroredProblem(Problem):
    """A problem built from mirrored blocks (:meth:`BlockCosts.mirrored`) and reversed devices: stage s
    here is stage K-1-s of the original, and what a stage receives is indexed by its last block (the
    mirror image of the original stage's first). Made by :meth:`Problem.reversed`."""

    def _incoming(self, after_block: Floats, at_input: float) -> Floats:
        return np.concatenate([after_block[:-1], [at_input]])

    def _received(self, per_block: Floats, i: Ints, j: Ints) -> Floats:
        out: Floats = per_block[j]
        return out

    def _per_stage(self, values: list[int]) -> list[int]:
        return values[::-1]

    def reversed(self) -> Problem:
        """The original problem again."""
        return Problem(self.blocks.mirrored(), self.devices[::-1], self.model)

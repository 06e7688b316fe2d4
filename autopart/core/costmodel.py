"""What a pipeline stage costs: :class:`Problem` prices stage (s, i, j) (docs/cost-model.md, term by term).

K stages, M micro-batches, stage s holds blocks i..j (inclusive):

- time ``t_s = Σ(forward_ms + backward_ms) / speed_s`` (``+ Σ forward_ms / speed_s``
  when the stage recomputes activations) plus its sends: the forward send of
  its output when it is not the last stage and the backward send of its
  input's gradient when it is not the first, each ``output_bytes / bandwidth + latency``
  of the boundary crossed. Sends are free when no bandwidth or latency is given.
- memory: the terms of :data:`autopart.core.memory.MEMORY_TERMS`
  (parameters, gradients and optimizer state; tied copies; per in-flight
  micro-batch the saved activations, skips received and the stage's output
  held until its backward, or with recomputation only its input, output and
  the loss's saved tensors plus one micro-batch's activations; the gradients
  of one backward, the largest parameter's among them; the runtime's receive
  buffers for the step's M micro-batches), with the optimizer step's
  temporaries a phase of their own: ``held + max(backward phase, step)``.

The description (:class:`~autopart.core.blocks.BlockCosts`, the devices, the
:class:`~autopart.core.training.CostModel`) is read-only, and so is every
array derived from it. Pure numpy; every function takes arrays of starts and
ends so the partitioner can evaluate many candidate stages at once, and the
same arithmetic gives the numbers a plan reports.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import numpy as np
import numpy.typing as npt

from autopart.core.blocks import BlockCosts
from autopart.core.memory import MEMORY_TERMS, PART_SCALE, PHASE
from autopart.core.simulate import INPUT_GRAD_SHARE, StageTimes
from autopart.core.training import CostModel
from autopart.errors import AutopartError
from autopart.formats.devices import Device
from autopart.formats.profile import Profile
from autopart.formats.schedule_kinds import stage_ranks
from autopart.formats.stage import StageCost
from autopart.formats.units import plural

__all__ = ["CostModel", "BlockCosts", "Problem", "MirroredProblem", "ring_allreduce_ms"]

Ints = npt.NDArray[np.int64]
Floats = npt.NDArray[np.float64]
Bools = npt.NDArray[np.bool_]


def _frozen(a: Floats) -> Floats:
    a.flags.writeable = False
    return a


class Problem:
    """Blocks, devices (one per stage) and a cost model, and what a stage of them costs.

        Problem([1.0, 2.0, 3.0], [Device("gpu")] * 2, CostModel())      # compute times, other costs zero
        Problem.from_profile(profile, devices, model)

    Read-only once made: the description (``blocks``, ``devices``, ``model``)
    and what is derived from it (``n``, ``k``, ``names``, per stage ``speed``
    and ``limit``). The partitioner's interface: stage ``s`` holding blocks
    ``i..j`` (arrays, inclusive) is priced by :meth:`evaluate` (time, memory,
    recompute, fits), :meth:`times` and :meth:`memories` (without and with
    recomputation), :meth:`stage_times` (the simulator's split of the time),
    the sends :meth:`send_in_ms`, :meth:`send_out_ms`; whole splits by
    :meth:`stages` and :meth:`fits`; the window searches read the three
    monotone prefix sums :meth:`compute_prefix`, :meth:`plain_prefix`,
    :meth:`rc_prefix` and :attr:`general`. Every other prefix sum is private.
    Memory comes from one table, :data:`autopart.core.memory.MEMORY_TERMS`.
    The mirror image (block n-1 first) is a :class:`MirroredProblem`, from
    :meth:`reversed`.
    """

    def __init__(self, blocks: BlockCosts | Sequence[float], devices: Sequence[Device], model: CostModel, *,
                 forward_ms: Sequence[float] | None = None, param_bytes: Sequence[float] | None = None,
                 activation_bytes: Sequence[float] | None = None, output_bytes: Sequence[float] | None = None,
                 input_bytes: float = 0.0, names: Sequence[str] | None = None,
                 optimizer_ms: Sequence[float] | None = None, loss_ms: tuple[float, float] = (0.0, 0.0)) -> None:
        """``blocks`` is a :class:`BlockCosts`, or the compute times with the other arrays as keywords;
        ``loss_ms``: the parts of the model's last block's forward and backward that are the loss (shown apart)."""
        costs = blocks if isinstance(blocks, BlockCosts) else BlockCosts.of(
            blocks, forward_ms=forward_ms, param_bytes=param_bytes, activation_bytes=activation_bytes,
            output_bytes=output_bytes, input_bytes=input_bytes, names=names, optimizer_ms=optimizer_ms)
        n, k = costs.n, len(devices)
        if k < 1:
            raise AutopartError(f"need at least 1 stage, got {k}")
        if k > n:
            raise AutopartError(f"{plural(k, 'stage')} > {plural(n, 'block')}: every stage needs at least one block")
        if model.overhead_ms is None:  # no profile to measure it: no cost per action
            model = dataclasses.replace(model, overhead_ms=0.0)
        self.blocks, self.model, self.devices = costs, model, tuple(devices)
        self.overhead_ms: float = model.overhead_ms or 0.0
        """The runtime's cost per forward or backward action on every stage (ms)."""
        self.loss_ms = loss_ms
        """The loss's forward and backward per micro-batch: in the model's last block's, shown apart."""
        self.n, self.k, self.names = n, k, costs.names
        self.speed = _frozen(np.array([d.speed for d in devices], dtype=np.float64))
        self.limit = _frozen(np.array([np.inf if d.memory_bytes is None else float(d.memory_bytes)
                                       for d in devices]))
        """Per stage: device speed, memory limit in bytes (inf: none)."""
        z = np.zeros(1)
        self._compute_prefix_ms = _frozen(np.concatenate([z, np.cumsum(costs.compute_ms)]))
        self._forward_prefix_ms = np.concatenate([z, np.cumsum(costs.forward_ms)])
        self._optimizer_prefix_ms = np.concatenate([z, np.cumsum(costs.optimizer_ms)])
        self._input_grad_prefix_ms = (None if costs.input_grad_ms is None
                                      else np.concatenate([z, np.cumsum(costs.input_grad_ms)]))
        self._weight_grad_prefix_ms = (None if costs.weight_grad_ms is None or costs.input_grad_ms is None
                                       else np.concatenate([z, np.cumsum(costs.weight_grad_ms)]))
        skips = costs.skip_bytes if costs.skip_bytes is not None else np.zeros(n)
        # send cost of the boundary after block b (b = 0 .. n-2); the last entry is never used
        if model.sends:
            bw = model.bandwidth_bytes_per_ms
            self._send_after_ms = ((costs.output_bytes + skips) / bw if bw else np.zeros(n)) + model.latency_ms
        else:
            self._send_after_ms = np.zeros(n)
        self._in_flight = np.array(self._per_stage([model.in_flight(s, k) for s in range(k)]), dtype=np.float64)
        self._init_memory(costs, model)
        self._ready = True

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_ready", False):
            raise AttributeError(f"a Problem is read-only: cannot set {name!r} (make another one)")
        object.__setattr__(self, name, value)

    def _init_memory(self, costs: BlockCosts, model: CostModel) -> None:
        """The memory terms of :data:`MEMORY_TERMS`, per mode (plain, recompute): prefix sums (per-block
        terms), arrays indexed by a stage's first or last block (received and sent terms: :meth:`_incoming`,
        :meth:`_outgoing`), tie lists and range maxima (largest terms), each with its scale and ``StageCost``
        field."""
        z = np.zeros(1)
        blocks: dict[bool, list[tuple[str, str, Floats]]] = {False: [], True: []}
        edges: dict[bool, list[tuple[str, str, bool, Floats]]] = {False: [], True: []}
        shared: dict[bool, list[tuple[str, str, list[tuple[float, Ints, int]]]]] = {False: [], True: []}
        largest: dict[bool, list[tuple[str, str, RangeMax]]] = {False: [], True: []}
        for term in MEMORY_TERMS:
            for rc in (False, True):
                if not term.applies(rc):
                    continue
                if term.per_block is not None:
                    prefix = np.concatenate([z, np.cumsum(term.per_block(costs, model))])
                    blocks[rc].append((term.scale, term.part, prefix))
                elif term.received is not None or term.sent is not None:
                    first = term.received is not None
                    values = (self._incoming(*term.received(costs)) if term.received is not None
                              else self._outgoing(*term.sent(costs)) if term.sent is not None else z)
                    if np.any(values != 0):  # a term that is zero everywhere costs nothing to leave out
                        edges[rc].append((term.scale, term.part, first, values))
                elif term.shared is not None:
                    ties = [(size, np.array(sorted(users), dtype=np.int64), users[0])
                            for size, users in term.shared(costs, model) if len(set(users)) > 1]
                    if ties:
                        shared[rc].append((term.scale, term.part, ties))
                elif term.largest is not None:
                    values = term.largest(costs, model)
                    if np.any(values != 0):
                        largest[rc].append((term.scale, term.part, RangeMax(values)))
        self._block_terms, self._edge_terms, self._shared_terms = blocks, edges, shared
        self._largest_terms = largest
        self.general = bool(edges[False] or shared[False] or shared[True] or largest[False] or largest[True])
        """Memory is not a difference of prefix sums (what a stage receives or sends, ties, a largest
        tensor): the partitioner checks stages pair by pair."""
        self._prefix = {rc: tuple(self._scaled_prefix(rc, s, ("held", "backward")) for s in range(self.k))
                        for rc in (False, True)}
        self._step_prefix = {rc: tuple(self._scaled_prefix(rc, s, ("step",)) for s in range(self.k))
                             for rc in (False, True)}
        self._held_prefix = {rc: tuple(self._scaled_prefix(rc, s, ("held",)) for s in range(self.k))
                             for rc in (False, True)}
        self._steps = any(PHASE[part] == "step" for terms in (blocks, edges, shared, largest)
                          for rc in (False, True) for _, part, *_ in terms[rc])
        self._stacked = {rc: tuple(_frozen(np.stack(prefixes[rc])) for prefixes in
                                   (self._prefix, self._held_prefix, self._step_prefix)) for rc in (False, True)}
        """Per mode, the three per-stage prefix sums as (stage, block + 1) tables: :meth:`memories_all`."""
        self._factors = {scale: _frozen(np.array([self._factor(scale, s) for s in range(self.k)]))
                         for scale in ("once", "in_flight", "microbatches", "not_in_flight")}

    def _factor(self, scale: str, s: int) -> float:
        """How many copies of a term of this scale stage ``s`` holds."""
        in_flight, m = float(self._in_flight[s]), float(self.model.microbatches)
        return {"once": 1.0, "in_flight": in_flight, "microbatches": m, "not_in_flight": m - in_flight}[scale]

    def _scaled_prefix(self, recompute: bool, s: int, phases: tuple[str, ...]) -> Floats:
        """Prefix sums of the per-block terms of these phases on stage s, each times its factor there."""
        out = np.zeros(self.n + 1)
        for scale, part, prefix in self._block_terms[recompute]:
            if PHASE[part] in phases:
                out = out + self._factor(scale, s) * prefix
        return _frozen(out)

    # ---- which way the blocks run: overridden by MirroredProblem alone ----

    def _incoming(self, after_block: Floats, at_input: float) -> Floats:
        """Per block b, what crosses into a stage that starts at b: ``at_input`` for block 0, else what
        crosses the boundary after block b-1."""
        return np.concatenate([[at_input], after_block[:-1]])

    def _outgoing(self, after_block: Floats, at_output: float) -> Floats:
        """Per block b, what leaves a stage that ends at b: what crosses the boundary after block b, or
        ``at_output`` for block n-1."""
        return np.concatenate([after_block[:-1], [at_output]])

    def _edge(self, per_block: Floats, first: bool, i: Ints, j: Ints) -> Floats:
        """The entry of an :meth:`_incoming` (``first``) or :meth:`_outgoing` array for stages i..j."""
        out: Floats = per_block[i] if first else per_block[j]
        return out

    def _per_stage(self, values: list[int]) -> list[int]:
        """Per-stage values of the original order, in this problem's stage order."""
        return values

    @classmethod
    def from_profile(cls, profile: Profile, devices: Sequence[Device], model: CostModel) -> "Problem":
        """The profile's blocks, the loss in the last one (added to it when the profile timed it apart), and
        the runtime's measured cost per action (``profile.action_ms``) when ``model.overhead_ms`` is None (a given
        number, even 0, is used as given)."""
        last = profile.layers[-1]
        loss_ms = (last.loss_forward_ms, last.loss_backward_ms)
        if sum(loss_ms) > 0 and not profile.loss_in_last_block:
            grad = None if last.input_grad_ms is None else last.input_grad_ms + last.loss_backward_ms
            last = dataclasses.replace(last, forward_ms=last.forward_ms + last.loss_forward_ms,
                                       backward_ms=last.backward_ms + last.loss_backward_ms, input_grad_ms=grad)
            profile = dataclasses.replace(profile, layers=(*profile.layers[:-1], last), by_microbatch_size=(),
                                          loss_in_last_block=True)
        if model.overhead_ms is None:
            model = dataclasses.replace(model, overhead_ms=profile.action_ms)
        return cls(BlockCosts.from_profile(profile, model.optimizer), devices, model, loss_ms=loss_ms)

    def reversed(self) -> "Problem":
        """The mirror image: block n-1 first, stage K-1 first. Stage (i, j) here is
        stage (K-1-s, n-1-j, n-1-i) there, with the same time and memory."""
        return MirroredProblem(self.blocks.mirrored(), self.devices[::-1], self.model, loss_ms=self.loss_ms)

    def _like(self, devices: Sequence[Device], model: CostModel) -> "Problem":
        """The same blocks, running the same way, on other devices or under another model."""
        return type(self)(self.blocks, devices, model, loss_ms=self.loss_ms)

    def _loss_block(self) -> int:
        """The model's last block, whose stage computes the loss."""
        return self.n - 1

    def _first_block(self) -> int:
        """The model's first block, whose stage torch runs without an input-gradient half."""
        return 0

    def _loss(self, s: int, first: int, last: int) -> float:
        """The loss's forward and backward on stage s holding blocks first..last (at its device's speed; 0 when
        the stage does not hold the model's last block)."""
        return sum(self.loss_ms) / float(self.speed[s]) if first <= self._loss_block() <= last else 0.0

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
                          stages_per_rank=self.model.stages_per_rank, overhead_ms=self.overhead_ms)
        devices = [dataclasses.replace(d, memory_bytes=None) for d in self.devices]
        return self._like(devices, model)

    # ---- the monotone prefix sums the partitioner's window searches read ----

    def compute_prefix(self) -> Floats:
        """Prefix sums of the blocks' compute (forward plus backward, ms on a speed-1 device)."""
        return self._compute_prefix_ms

    def plain_prefix(self, s: int) -> Floats:
        """Prefix sums of a block's memory on stage s without recomputation (exact: integer bytes); what a
        stage receives and tied copies aside (:attr:`general`)."""
        return self._prefix[False][s]

    def rc_prefix(self, s: int) -> Floats:
        """Prefix sums of a block's memory on a recomputing stage s, what it receives and tied copies aside."""
        return self._prefix[True][s]

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

    def _send_ms(self, s: int, i: Ints, j: Ints) -> Floats:
        """Both sends of stage s holding blocks i..j."""
        out = np.zeros(np.broadcast(i, j).shape)
        if s > 0:
            out = out + self._send_after_ms[np.maximum(i - 1, 0)]
        if s < self.k - 1:
            out = out + self._send_after_ms[j]
        return out

    def _memory(self, s: int, i: Ints, j: Ints, recompute: bool) -> Floats:
        """Stage s's bytes holding blocks i..j: every term of the table that applies, what is held throughout
        plus the larger of the backward phase and the optimizer step (:data:`PHASE`)."""
        q = self._prefix[recompute][s]
        mem: Floats = q[j + 1] - q[i]  # held and backward phases
        step: Floats | None = None
        held_mem: Floats = mem
        if self._steps:
            held, qs = self._held_prefix[recompute][s], self._step_prefix[recompute][s]
            held_mem = held[j + 1] - held[i]
            step = qs[j + 1] - qs[i]
        for scale, part, raw in self._stage_terms(i, j, recompute):
            value = self._factors[scale][s] * raw  # _factor(scale, s), looked up
            if PHASE[part] == "step":
                step = value if step is None else step + value
            else:
                mem = mem + value
                if self._steps and PHASE[part] == "held":
                    held_mem = held_mem + value
        if step is None:
            return mem
        return held_mem + np.maximum(mem - held_mem, step)

    def _stage_terms(self, i: Ints, j: Ints, recompute: bool) -> Iterator[tuple[str, str, Floats]]:
        """(scale, part, bytes of one copy) of every term that is no difference of prefix sums, for stages
        holding blocks i..j."""
        for scale, part, first, values in self._edge_terms[recompute]:
            yield scale, part, self._edge(values, first, i, j)
        for scale, part, ties in self._shared_terms[recompute]:
            yield scale, part, _tied(ties, i, j)
        for scale, part, table in self._largest_terms[recompute]:
            yield scale, part, table.max(i, j)

    def _memory_all(self, i: Ints, j: Ints, recompute: bool) -> Floats:
        """:meth:`_memory` of every stage at once: ``i``, ``j`` are (splits, stages) arrays, column s stage s's
        first and last blocks; the same operations in the same order (equal to the last bit)."""
        cols = np.arange(self.k)
        q, held, qs = self._stacked[recompute]
        mem: Floats = q[cols, j + 1] - q[cols, i]
        step: Floats | None = None
        held_mem: Floats = mem
        if self._steps:
            held_mem = held[cols, j + 1] - held[cols, i]
            step = qs[cols, j + 1] - qs[cols, i]
        for scale, part, raw in self._stage_terms(i, j, recompute):
            value = self._factors[scale] * raw
            if PHASE[part] == "step":
                step = value if step is None else step + value
            else:
                mem = mem + value
                if self._steps and PHASE[part] == "held":
                    held_mem = held_mem + value
        if step is None:
            return mem
        out: Floats = held_mem + np.maximum(mem - held_mem, step)
        return out

    def memories_all(self, i: Ints, j: Ints) -> tuple[Floats, Floats]:
        """:meth:`memories` of every stage at once: ``i``, ``j`` are (splits, stages) arrays of first and last
        blocks, column s for stage s (one call where a whole split is priced)."""
        plain = self._memory_all(i, j, False)
        if not self.model.recompute:
            return plain, np.full(plain.shape, np.inf)
        return plain, self._memory_all(i, j, True)

    def memories(self, s: int, i: Ints, j: Ints) -> tuple[Floats, Floats]:
        """Stage ``s``'s bytes holding blocks i..j without and with recomputation (inf where not allowed)."""
        plain = self._memory(s, i, j, False)
        if not self.model.recompute:
            return plain, np.full(plain.shape, np.inf)
        return plain, self._memory(s, i, j, True)

    def _time(self, s: int, i: Ints, j: Ints, recompute: bool) -> Floats:
        """Stage s's time holding blocks i..j (one more forward when recomputing), sends included."""
        pc = self._compute_prefix_ms
        if not recompute:
            return (pc[j + 1] - pc[i]) / self.speed[s] + self._send_ms(s, i, j)
        pf = self._forward_prefix_ms
        work = (pc[j + 1] - pc[i]) + (pf[j + 1] - pf[i])
        return work / self.speed[s] + self._send_ms(s, i, j)

    def _sends_all(self, i: Ints, j: Ints) -> tuple[Floats, Floats]:
        """(backward send of the input gradient, forward send of the output) of every stage at once, for
        (splits, stages) arrays of first and last blocks: :meth:`send_in_ms`, :meth:`send_out_ms`."""
        cols = np.arange(self.k)
        zero = np.zeros(np.broadcast(i, j).shape)
        send_in = np.where(cols > 0, self._send_after_ms[np.maximum(i - 1, 0)], 0.0) + zero
        send_out = np.where(cols < self.k - 1, self._send_after_ms[j], 0.0) + zero
        return send_in, send_out

    def times_all(self, i: Ints, j: Ints) -> tuple[Floats, Floats]:
        """:meth:`times` of every stage at once, for (splits, stages) arrays of first and last blocks."""
        pc, pf = self._compute_prefix_ms, self._forward_prefix_ms
        send_in, send_out = self._sends_all(i, j)
        sends = (np.zeros(send_in.shape) + send_in) + send_out  # _send_ms's sum, term by term
        plain = (pc[j + 1] - pc[i]) / self.speed + sends
        work = (pc[j + 1] - pc[i]) + (pf[j + 1] - pf[i])
        return plain, work / self.speed + sends

    def stage_times_all(self, i: Ints, j: Ints, recompute: Bools) -> StageTimes:
        """:meth:`stage_times` of every stage at once, recomputing where ``recompute`` says: (splits, stages)
        arrays of first and last blocks and flags; the same operations, so equal to the last bit."""
        v = self.speed
        pc, pf, po = self._compute_prefix_ms, self._forward_prefix_ms, self._optimizer_prefix_ms
        forward = pf[j + 1] - pf[i]
        backward = (pc[j + 1] - pc[i]) - forward + np.where(recompute, forward, 0.0)
        zero = np.zeros(np.broadcast(i, j).shape)
        input_grad, weight_grad = self._split_backward(i, j, forward, backward, recompute)
        send_in, send_out = self._sends_all(i, j)
        return StageTimes(forward_ms=forward / v, backward_ms=backward / v, input_grad_ms=input_grad / v,
                          weight_grad_ms=weight_grad / v,
                          send_forward_ms=send_out, send_backward_ms=send_in,
                          optimizer_ms=(po[j + 1] - po[i]) / v, overhead_ms=zero + self.overhead_ms)

    def times(self, s: int, i: Ints, j: Ints) -> tuple[Floats, Floats]:
        """Stage ``s``'s time holding blocks i..j without and with recomputation, sends included."""
        return self._time(s, i, j, False), self._time(s, i, j, True)

    def evaluate(self, s: int, i: Ints, j: Ints) -> tuple[Floats, Floats, Bools, Bools]:
        """(time, memory, recompute, fits) of stage ``s`` holding blocks i..j."""
        mp = self._memory(s, i, j, False)
        fits_plain = mp <= self.limit[s]
        if not self.model.recompute or not np.isfinite(self.limit[s]):
            return self._time(s, i, j, False), mp, np.zeros(mp.shape, dtype=bool), fits_plain
        mr = self._memory(s, i, j, True)
        rc = ~fits_plain
        time = np.where(rc, self._time(s, i, j, True), self._time(s, i, j, False))
        return time, np.where(rc, mr, mp), rc, fits_plain | (mr <= self.limit[s])

    def stage_times(self, s: int, i: Ints, j: Ints, recompute: Bools | None = None) -> tuple[StageTimes, Bools]:
        """The times of stage ``s`` holding blocks i..j (arrays), recomputing where it must to fit, and
        whether each fits its own limit; or recomputing where ``recompute`` says (the caller decided what
        fits: all True)."""
        if recompute is None:
            _, _, rc, fits = self.evaluate(s, i, j)
        else:
            shape = np.broadcast(i, j).shape
            rc, fits = np.broadcast_to(recompute, shape), np.ones(shape, dtype=bool)
        v = self.speed[s]
        pc, pf, po = self._compute_prefix_ms, self._forward_prefix_ms, self._optimizer_prefix_ms
        forward = pf[j + 1] - pf[i]
        backward = (pc[j + 1] - pc[i]) - forward + np.where(rc, forward, 0.0)
        zero = np.zeros(np.broadcast(i, j).shape)
        input_grad, weight_grad = self._split_backward(i, j, forward, backward, rc)
        times = StageTimes(forward_ms=forward / v, backward_ms=backward / v, input_grad_ms=input_grad / v,
                           weight_grad_ms=weight_grad / v,
                           send_forward_ms=self.send_out_ms(s, j) + zero, send_backward_ms=self.send_in_ms(s, i) + zero,
                           optimizer_ms=(po[j + 1] - po[i]) / v, overhead_ms=zero + self.overhead_ms)
        return times, fits

    def _split_backward(self, i: Ints, j: Ints, forward: Floats, backward: Floats, recompute: Bools
                        ) -> tuple[Floats, Floats]:
        """Blocks i..j's backward split as the zero-bubble schedules run it, (I, W) at speed 1.

        Halves measured as torch runs them: each sums its blocks' (a recomputing stage recomputes its forward
        in each half), but the model's first stage runs as torch runs it, its I skipped and its W the whole
        backward in one call. Not measured (older profiles): I is the measured input-gradient part of the
        backward, or half of it, and W the rest."""
        pig, pwg = self._input_grad_prefix_ms, self._weight_grad_prefix_ms
        if pig is None:
            input_grad = backward * INPUT_GRAD_SHARE
        else:
            input_grad = (pig[j + 1] - pig[i]) + np.where(recompute, forward, 0.0)
        if pwg is None:
            return input_grad, backward - input_grad
        weight_grad = (pwg[j + 1] - pwg[i]) + np.where(recompute, forward, 0.0)
        first = (i <= self._first_block()) & (self._first_block() <= j)
        return np.where(first, 0.0, input_grad), np.where(first, backward, weight_grad)

    def _memory_parts(self, s: int, first: int, last: int, recompute: bool) -> dict[str, int]:
        """Stage s holding blocks first..last: its bytes per ``StageCost`` memory field, every term of the
        table that applies summed into its field (``activation_bytes``: one micro-batch's; the others
        scaled: ``runtime_bytes`` holds M receive buffers)."""
        parts = dict.fromkeys(PART_SCALE, 0)
        i, j = np.array([first]), np.array([last])

        def add(scale: str, part: str, value: float) -> None:
            parts[part] += int(round(value * (1.0 if scale == PART_SCALE[part] else self._factor(scale, s))))

        for scale, part, prefix in self._block_terms[recompute]:
            add(scale, part, float(prefix[last + 1] - prefix[first]))
        for scale, part, raw in self._stage_terms(i, j, recompute):
            add(scale, part, float(raw[0]))
        return parts

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
        parts: dict[str, Any] = dict(self._memory_parts(s, first, last, recompute))  # the memory fields, as keywords
        return StageCost(
            forward_ms=float(t.forward_ms[0]), backward_ms=float(t.backward_ms[0]),
            input_grad_ms=float(t.input_grad_ms[0]) if self._input_grad_prefix_ms is not None else None,
            weight_grad_ms=float(t.weight_grad_ms[0]) if self._weight_grad_prefix_ms is not None else None,
            send_forward_ms=float(t.send_forward_ms[0]), send_backward_ms=float(t.send_backward_ms[0]),
            optimizer_ms=float(t.optimizer_ms[0]), overhead_ms=self.overhead_ms,
            loss_ms=self._loss(s, first, last),
            memory_bytes=int(round(float(m[0]))), recompute=recompute, **parts)

    def stages(self, balance: Sequence[int], recompute: Sequence[bool] | None = None) -> list[StageCost]:
        """Costs of every stage of a split given as block counts (recomputing as ``recompute`` says, if given)."""
        if len(balance) != self.k or sum(balance) != self.n or min(balance) < 1:
            raise AutopartError(f"balance {list(balance)} does not split {self.n} blocks into {self.k} non-empty stages")
        out, first = [], 0
        for s, count in enumerate(balance):
            out.append(self.stage(s, first, first + count - 1, None if recompute is None else bool(recompute[s])))
            first += count
        return self._with_ties(out, balance)

    def _with_ties(self, stages: list[StageCost], balance: Sequence[int]) -> list[StageCost]:
        """The stages with their tied parameters' gradient sums (:attr:`StageCost.tie_ms`): per tie, a ring
        all-reduce of its bytes among the ranks whose stages use it, over the link the sends use (the model's
        bandwidth and latency; free without them). Nothing when one rank holds every copy."""
        if not self.blocks.ties:
            return stages
        ranks = self._per_stage(list(stage_ranks(self.model.schedule, self.k // self.model.stages_per_rank,
                                                 self.model.stages_per_rank)))
        stage_of = [s for s, count in enumerate(balance) for _ in range(count)]
        bandwidth = self.model.bandwidth_bytes_per_ms * 1e3 if self.model.bandwidth_bytes_per_ms else None
        extra: list[dict[str, float]] = [{} for _ in stages]
        original = self._per_stage(list(range(self.n)))  # a block's index in the model's own order
        for size, users in self.blocks.ties:
            holders = {ranks[stage_of[u]] for u in users}
            ms = ring_allreduce_ms(size, len(holders), bandwidth, self.model.latency_ms)
            if ms <= 0:  # one rank holds every copy, or the link is free
                continue
            name = ",".join(self.names[u] for u in sorted(users, key=lambda u: original[u]))
            for s in sorted({stage_of[u] for u in users}):
                extra[s][name] = extra[s].get(name, 0.0) + ms
        return [dataclasses.replace(st, tie_ms=tuple(sorted(extra[s].items()))) if extra[s] else st
                for s, st in enumerate(stages)]

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
        return float(max(self._compute_prefix_ms[-1] / self.speed.sum(),
                         self.blocks.compute_ms.max() / self.speed.max()))


def ring_allreduce_ms(grad_bytes: float, replicas: int, bytes_per_s: float | None, latency_ms: float = 0.0) -> float:
    """A ring all-reduce of ``grad_bytes`` over ``replicas`` ranks: each sends and receives 2(D-1)/D of the
    bytes over its link (``bytes_per_s`` per direction; None: free) in 2(D-1) steps of ``latency_ms`` each.
    0 for one replica."""
    if replicas < 1:
        raise AutopartError(f"replicas must be >= 1, got {replicas}")
    if replicas == 1:
        return 0.0
    steps = 2 * (replicas - 1)
    transfer = 0.0 if bytes_per_s is None else steps / replicas * grad_bytes / bytes_per_s * 1e3
    return transfer + steps * latency_ms


class RangeMax:
    """The largest of ``values[i..j]`` (inclusive) for arrays of i and j, in O(1) each: a sparse table of
    maxima over windows of 2**k blocks."""

    def __init__(self, values: Floats) -> None:
        levels = [np.asarray(values, dtype=np.float64)]
        width = 1
        while 2 * width <= len(values):
            prev = levels[-1]
            levels.append(np.maximum(prev[:-width], prev[width:]))
            width *= 2
        self._levels = [_frozen(level) for level in levels]
        # the levels as one (level, block) table, so that a query of many windows is two gathers; a level's
        # tail (windows running past the last block) is never read
        table = np.full((len(levels), len(levels[0])), -np.inf)
        for k, level in enumerate(levels):
            table[k, :level.size] = level
        self._table = _frozen(table)
        lengths = np.arange(len(levels[0]) + 1)
        self._level_of = _frozen(np.floor(np.log2(np.maximum(lengths, 1))).astype(np.int64))
        """Per window length, the level whose two windows cover it."""

    def max(self, i: Ints, j: Ints) -> Floats:
        """The largest value of blocks i..j (i <= j)."""
        i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
        if i.shape != j.shape:
            i, j = np.broadcast_arrays(i, j)
        k = self._level_of[j - i + 1]
        out: Floats = np.maximum(self._table[k, i], self._table[k, j - (1 << k) + 1])
        return out


def _tied(ties: list[tuple[float, Ints, int]], i: Ints, j: Ints) -> Floats:
    """Copies of shared parameters that blocks i..j use but whose owner is elsewhere (the owner's share
    is in the blocks' own terms)."""
    out = np.zeros(np.broadcast(i, j).shape)
    for size, users, owner in ties:
        nxt = users[np.minimum(np.searchsorted(users, i), users.size - 1)]
        used = (nxt >= i) & (nxt <= j)
        out = out + np.where(used & ~((i <= owner) & (owner <= j)), size, 0.0)
    return out


class MirroredProblem(Problem):
    """A problem built from mirrored blocks (:meth:`BlockCosts.mirrored`) and reversed devices: stage s
    here is stage K-1-s of the original, and what a stage receives is indexed by its last block (the
    mirror image of the original stage's first). Made by :meth:`Problem.reversed`."""

    def _incoming(self, after_block: Floats, at_input: float) -> Floats:
        return np.concatenate([after_block[:-1], [at_input]])

    def _outgoing(self, after_block: Floats, at_output: float) -> Floats:
        return np.concatenate([[at_output], after_block[:-1]])

    def _edge(self, per_block: Floats, first: bool, i: Ints, j: Ints) -> Floats:
        out: Floats = per_block[j] if first else per_block[i]
        return out

    def _per_stage(self, values: list[int]) -> list[int]:
        return values[::-1]

    def _loss_block(self) -> int:
        return 0

    def _first_block(self) -> int:
        return self.n - 1

    def reversed(self) -> Problem:
        """The original problem again."""
        return Problem(self.blocks.mirrored(), self.devices[::-1], self.model, loss_ms=self.loss_ms)

"""A plan's stages tried one at a time on the one device there is: ``autopart check`` (docs/check.md).

    results = check_plan(Plan.from_json("plan.json"), "gpt2-mini", torch.device("cpu"))
    for r in results:
        print(r.stage, r.measured_bytes, r.planned_bytes, r.verdict)

For each stage in turn, one process builds the model as ``train`` does (same seed, the plan's precision: a
true one casts the model, a mixed one runs the stage's forward and the loss under autocast; recomputing where
the plan says, with :func:`autopart.run.stages.recompute_forward`), keeps only that stage's blocks (the rest is
freed) and runs the stage's own actions in the order the plan's schedule gives its rank
(:func:`autopart.core.schedules.build_schedule`): its forwards, each holding its output until its backward as
torch's runtime holds it (its forward cache), so the stage reaches the schedule's peak of in-flight
micro-batches; its backwards; then the optimizer step. The stage holds what torch's ``PipelineStage`` holds
besides: a receive buffer per micro-batch for its input (not the first stage), whose gradient is dropped
after its backward (torch's ``stage_backward`` sends it and sets ``.grad`` to None), and one for its output's
gradient (not the last stage). The first stage gets real data, drawn as
``train`` draws it (:mod:`autopart.run.data`); a later stage's inputs are random values shaped as the plan's
boundary (:mod:`autopart.run.shapes`), zeros for integer inputs; the last stage computes the loss on the real
targets after each forward, as the schedule does.

Memory is the :class:`~autopart.measure.memory.MemoryMeter`'s peak over what the process held before the
model was built (the meter ``train`` reports per rank with), over ``steps`` steps (the first creates the
gradients and the optimizer state). Times are the median forward and backward of one micro-batch, and the
optimizer step, of the steps after the first. Zero-bubble schedules split a backward into ``I`` and ``W``:
here the whole backward runs at ``W`` (what the stage holds is freed then, as in the run).

One process, no torch.distributed: nothing is sent; what a stage would send stays where it is made. Under
fp16-mixed there is no gradient scaler (torch's ``ShardedGradScaler`` needs a process group): scaling the loss
and unscaling the gradients change neither what is held nor, measurably, the times.
"""
from __future__ import annotations

import gc
import statistics
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from autopart.core.planner import cost_model_of
from autopart.core.schedules import build_schedule
from autopart.errors import AutopartError
from autopart.formats.plan import Plan
from autopart.formats.precision import check_precision
from autopart.formats.units import format_bytes
from autopart.measure.amp import autocast, cast_dtype, floating_in
from autopart.measure.batchnorm import batchnorm_layers, defer_batchnorm, deferred_layers
from autopart.measure.blocks import Chain, chain_of, tensors_of
from autopart.measure.memory import MemoryMeter
from autopart.measure.optimizers import make_optimizer
from autopart.measure.spec import ModelBundle, require_parameters, shape_example
from autopart.measure.timing import Clock
from autopart.run.build import build_model
from autopart.run.data import training_data
from autopart.run.microbatch import microbatch_shape
from autopart.run.shapes import StageSignature, stage_signatures
from autopart.run.stages import check_plan_against_model, in_precision, loss_in_precision, recompute_forward

__all__ = ["StageCheck", "check_plan", "verdict", "memory_method", "AS_PLANNED_SHARE"]

AS_PLANNED_SHARE = 0.10
"""Without a memory limit, a measured peak within this share of the planned one is "as planned"."""

Progress = Callable[[str], None]


@dataclass(frozen=True)
class StageCheck:
    """One stage tried alone: what it held and took, against the plan."""

    stage: int
    blocks: tuple[str, ...]
    rank: int
    """The rank the plan puts the stage on."""
    in_flight: int
    """The most micro-batches whose forward was held at once (the schedule's peak for this stage)."""
    planned_in_flight: int
    """The cost model's count for this stage (:meth:`autopart.core.costmodel.CostModel.in_flight`)."""
    measured_bytes: int | None
    """Peak memory over the process before the model was built; None where the meter cannot measure."""
    planned_bytes: int
    """The plan's ``memory_bytes`` for the stage."""
    limit_bytes: int | None
    """What the stage must fit: the plan's device memory limit, or (CUDA) the device's total memory where
    smaller; None: neither."""
    limit_source: str
    """Where ``limit_bytes`` comes from: "plan", "device" or ""."""
    forward_ms: float
    backward_ms: float
    optimizer_ms: float
    planned_forward_ms: float
    planned_backward_ms: float
    planned_optimizer_ms: float
    fits: bool
    verdict: str
    """"fits (81% of 400 MiB)", "over by 1.2 GiB", "as planned (+3%)" ..."""

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "blocks": list(self.blocks), "rank": self.rank, "in_flight": self.in_flight,
                "planned_in_flight": self.planned_in_flight, "measured_bytes": self.measured_bytes,
                "planned_bytes": self.planned_bytes, "limit_bytes": self.limit_bytes,
                "limit_source": self.limit_source, "forward_ms": self.forward_ms, "backward_ms": self.backward_ms,
                "optimizer_ms": self.optimizer_ms, "planned_forward_ms": self.planned_forward_ms,
                "planned_backward_ms": self.planned_backward_ms, "planned_optimizer_ms": self.planned_optimizer_ms,
                "fits": self.fits, "verdict": self.verdict}


def verdict(measured_bytes: int | None, planned_bytes: int, limit_bytes: int | None) -> tuple[bool, str]:
    """Whether a stage fits, and the words: against the limit where there is one ("fits (81% of 400 MiB)",
    "over by 1.2 GiB"), else against the plan ("as planned (+3%)", "above plan (+45%)")."""
    if measured_bytes is None:
        return True, "not measured"
    if limit_bytes is not None:
        if measured_bytes > limit_bytes:
            return False, f"over by {format_bytes(measured_bytes - limit_bytes)}"
        return True, f"fits ({measured_bytes / limit_bytes:.0%} of {format_bytes(limit_bytes)})"
    if planned_bytes <= 0:
        return True, "no plan to compare"
    change = measured_bytes / planned_bytes - 1
    word = "as planned" if abs(change) <= AS_PLANNED_SHARE else "above plan" if change > 0 else "below plan"
    return True, f"{word} ({change:+.0%})"


def check_plan(plan: Plan, model: str, device: torch.device, *, data: str | None = None, seed: int = 0,
               steps: int = 2, lr: float = 1e-3, stages: Sequence[int] | None = None,
               progress: Progress | None = None) -> list[StageCheck]:
    """Each stage of ``plan`` (or those in ``stages``) built alone on ``device`` and run through ``steps`` steps
    of its schedule's actions; see the module docstring. Raises :class:`AutopartError` for a plan that does not
    match the model."""
    if steps < 1:
        raise AutopartError(f"steps must be >= 1, got {steps}")
    chosen = list(range(plan.num_stages)) if stages is None else list(stages)
    for s in chosen:
        if not 0 <= s < plan.num_stages:
            raise AutopartError(f"stage {s} is not in the plan's {plan.num_stages} stages (0..{plan.num_stages - 1})")
    schedule = build_schedule(plan.schedule, plan.num_ranks, plan.microbatches, plan.stages_per_rank)
    model_in_flight = cost_model_of(plan)
    meter = MemoryMeter(device)
    # A first build pays, before any stage is measured, what a process pays once (the factory's imports, a
    # capture's, the data), so that every stage is measured alike; the plan is checked against the model.
    # On CPU the host memory is what is measured, so each stage is built anew and the rest freed; on a GPU one
    # build (kept on the host) serves every stage, each moved to the device and back in turn.
    keep = device.type != "cpu"
    bundle = _build(model, seed, plan)
    kept: Chain | None = _chain(plan, bundle)
    assert kept is not None
    shared = _Shared.of(plan, bundle, kept, model, data, seed, device)
    del bundle
    if not keep:
        kept = None
    _pay_fixed_costs(plan.optimizer, device)
    results = []
    for s in chosen:
        if progress:
            progress(f"stage {s}/{plan.num_stages - 1}: blocks {plan.stages[s].blocks[0]}..{plan.stages[s].blocks[-1]}")
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        meter.start()  # the baseline: the process before this stage's model is built (on CPU) or moved (GPU)
        chain = kept if kept is not None else _chain(plan, _build(model, seed, plan))
        stage = _stage_module(plan, chain, s, device)
        del chain  # on CPU the other stages' blocks go with it
        stage.to(device)
        gc.collect()
        meter.reset_peak()
        rank = plan.stage_ranks()[s]
        actions = [(a.kind, a.microbatch) for a in schedule.orders[rank] if a is not None and a.stage == s]
        run = _StageRun(plan, s, stage, shared, device, lr)
        times = [run.step(actions) for _ in range(steps)]
        peak = meter.read().peak_bytes
        if keep:  # the kept model's blocks back to the host, without their gradients
            stage.zero_grad(set_to_none=True)
            stage.to("cpu")
        del run, stage
        later = times[1:] or times
        forward = [t for step in later for t in step.forward_ms]
        backward = [t for step in later for t in step.backward_ms]
        cost = plan.stages[s].cost
        limit, source = _limit(plan, s, device)
        fits, words = verdict(peak, cost.memory_bytes, limit)
        results.append(StageCheck(
            stage=s, blocks=plan.stages[s].blocks, rank=rank, in_flight=times[-1].in_flight,
            planned_in_flight=model_in_flight.in_flight(s, plan.num_stages), measured_bytes=peak,
            planned_bytes=cost.memory_bytes, limit_bytes=limit, limit_source=source,
            forward_ms=statistics.median(forward) if forward else 0.0,
            backward_ms=statistics.median(backward) if backward else 0.0,
            optimizer_ms=statistics.median(step.optimizer_ms for step in later),
            planned_forward_ms=cost.forward_ms, planned_backward_ms=cost.backward_ms,
            planned_optimizer_ms=cost.optimizer_ms, fits=fits, verdict=words))
    return results


def memory_method(device: torch.device) -> str:
    """How :func:`check_plan` measures memory on ``device``, in words (or why it cannot)."""
    meter = MemoryMeter(device)
    meter.start()
    return meter.method


def _limit(plan: Plan, stage: int, device: torch.device) -> tuple[int | None, str]:
    """The memory the stage must fit: the plan's device limit, or the CUDA device's total where smaller."""
    limit, source = plan.stages[stage].device.memory_bytes, "plan" if plan.stages[stage].device.memory_bytes else ""
    if device.type == "cuda":
        total = int(torch.cuda.get_device_properties(device).total_memory)
        if limit is None or total < limit:
            limit, source = total, "device"
    return limit, source


def _pay_fixed_costs(optimizer: str, device: torch.device) -> None:
    """The first optimizer step imports ``torch._dynamo`` (some 70 MiB of Python modules on CPU), the first
    backward starts autograd's engine: paid here, once."""
    layer = nn.Linear(4, 4).to(device)
    layer(torch.ones(2, 4, device=device)).sum().backward()
    make_optimizer(optimizer, list(layer.parameters()), lr=1e-3).step()


def _build(model: str, seed: int, plan: Plan) -> ModelBundle:
    """The whole model, with the weights ``train``'s ranks build their stages with (``build_model``), in the plan's
    parameter dtype."""
    bundle = build_model(model, seed)
    require_parameters(bundle)
    dtype = cast_dtype(check_precision(plan.precision))
    if dtype is not None:
        bundle.module.to(dtype=dtype)
    return bundle


@dataclass(frozen=True)
class _Shared:
    """What every stage's run shares: found once, on the first build."""

    signatures: list[StageSignature]
    inputs: tuple[torch.Tensor, ...]
    """The first stage's inputs (the whole mini-batch, every input), as the data gives them."""
    target: torch.Tensor
    """The mini-batch's targets."""
    loss_fn: Callable[[Any, Any], torch.Tensor]
    """The loss on what the last stage returns."""

    @staticmethod
    def of(plan: Plan, bundle: ModelBundle, chain: Chain, model: str, data: str | None, seed: int,
           device: torch.device) -> "_Shared":
        check_plan_against_model(plan, chain.names, plan.world_size, model)
        per_mb, sample_shape = microbatch_shape(plan, bundle)
        drawn = training_data(bundle, data, per_mb * plan.microbatches, sample_shape, seed, 0)
        inputs, target = next(drawn.batches)  # every step of the check runs this mini-batch
        precision = check_precision(plan.precision)
        with autocast(precision, device):  # as build_pipeline: what crosses a cut is what autocast makes
            signatures = stage_signatures(chain, plan.balance, device)
        # fp16-mixed: no gradient scaler (the module docstring says why that changes nothing measured)
        return _Shared(signatures=signatures,
                       inputs=floating_in(inputs if isinstance(inputs, tuple) else (inputs,), cast_dtype(precision)),
                       target=target, loss_fn=loss_in_precision(chain.model_loss(drawn.loss_fn), precision, device,
                                                                None))


def _chain(plan: Plan, bundle: ModelBundle) -> Chain:
    """The model's blocks as ``train`` cuts them (a graph captured at the run's micro-batch shape), BatchNorm
    deferred as ``train`` defers it unless the plan says ``micro``."""
    per_mb, sample_shape = microbatch_shape(plan, bundle)
    shape = (per_mb, *sample_shape) if sample_shape else None
    dtype = cast_dtype(check_precision(plan.precision))
    example = floating_in(shape_example(bundle, shape, None, per_mb), dtype) if bundle.example is not None else ()
    chain = chain_of(bundle.module, example, bundle.name, bundle.input_names)
    if batchnorm_layers(chain.root) and plan.batchnorm != "micro":  # as train runs the plan (deferred by default)
        defer_batchnorm(chain.root)
        chain.reload_blocks()
    return chain


def _stage_module(plan: Plan, chain: Chain, stage: int, device: torch.device) -> nn.Module:
    """Stage ``stage``'s blocks as one module, as ``train`` builds it: recomputing where the plan says, its forward
    under the plan's precision."""
    first = sum(plan.balance[:stage])
    module = chain.stage_module(first, first + plan.balance[stage] - 1)
    if plan.stages[stage].cost.recompute:
        recompute_forward(module)
    return in_precision(module, check_precision(plan.precision), device)


@dataclass
class _StepTimes:
    forward_ms: list[float]
    backward_ms: list[float]
    optimizer_ms: float
    in_flight: int


class _StageRun:
    """One stage's buffers and optimizer, and its actions run as torch's ``PipelineStage`` runs them."""

    def __init__(self, plan: Plan, stage: int, module: nn.Module, shared: _Shared, device: torch.device,
                 lr: float) -> None:
        self.module = module
        self.shared = shared
        self.device = device
        self.clock = Clock(device)
        self.microbatches = plan.microbatches
        self.first, self.last = stage == 0, stage == plan.num_stages - 1
        signature = shared.signatures[stage]
        # torch allocates a receive buffer per micro-batch at setup, kept for the whole run
        self.received = [] if self.first else [
            tuple(_random_like(t, device) for t in signature.inputs) for _ in range(plan.microbatches)]
        self.grads_received = [] if self.last else [
            tuple(_random_like(t, device, 1e-3) if t.requires_grad else None for t in signature.outputs)
            for _ in range(plan.microbatches)]
        self.optimizer = make_optimizer(plan.optimizer, [p for p in module.parameters() if p.requires_grad], lr=lr)
        self.deferred = deferred_layers(module)

    def step(self, actions: Sequence[tuple[str, int]]) -> _StepTimes:
        """One step of the stage's actions, then the optimizer step; the times and the in-flight peak."""
        for buffers in self.received:  # torch's clear_runtime_states: input gradients do not accumulate
            for t in buffers:
                t.grad = None
        self.optimizer.zero_grad(set_to_none=False)  # in place, as train does
        for layer in self.deferred:
            layer.reset()
        inputs = tuple(x.to(self.device) for x in self.shared.inputs)  # every rank holds the mini-batch
        target = self.shared.target.to(self.device)
        chunks = [x.tensor_split(self.microbatches) for x in inputs]
        targets = target.tensor_split(self.microbatches)
        held: dict[int, tuple[Any, torch.Tensor | None]] = {}
        forward_ms, backward_ms, peak = [], [], 0
        for kind, mb in actions:
            if kind == "F":
                args = tuple(c[mb] for c in chunks) if self.first else self.received[mb]
                (out, loss), ms = self.clock.time(lambda: self._forward(args, targets[mb]))
                held[mb] = (out, loss)
                peak = max(peak, len(held))
                forward_ms.append(ms)
            elif kind in ("B", "W"):
                out, loss = held.pop(mb)
                _, ms = self.clock.time(lambda: self._backward(out, loss, mb))
                del out, loss
                backward_ms.append(ms)
        for layer in self.deferred:
            layer.commit()
        _, opt_ms = self.clock.time(self.optimizer.step)
        return _StepTimes(forward_ms, backward_ms, opt_ms, peak)

    def _forward(self, args: tuple[torch.Tensor, ...], target: torch.Tensor) -> tuple[Any, torch.Tensor | None]:
        out = self.module(*args)
        return out, (self.shared.loss_fn(out, target) if self.last else None)

    def _backward(self, out: Any, loss: torch.Tensor | None, mb: int) -> None:
        if loss is not None:
            loss.backward()
            return
        pairs = [(t, g) for t, g in zip(tensors_of(out), self.grads_received[mb]) if t.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        for t in self.received[mb] if not self.first else ():  # sent at once; torch's stage_backward drops it
            t.grad = None


def _random_like(meta: torch.Tensor, device: torch.device, scale: float | None = None) -> torch.Tensor:
    """A tensor shaped as ``meta`` on ``device``: normal values for a float, zeros (a valid id) for an integer;
    a received activation requires grad as ``meta`` does; with ``scale``, a received gradient (those values
    times ``scale``, no grad)."""
    if meta.is_floating_point():
        values = torch.randn(meta.shape, dtype=meta.dtype, device=device)
        return values.mul_(scale) if scale is not None else values.requires_grad_(meta.requires_grad)
    return torch.zeros(meta.shape, dtype=meta.dtype, device=device)

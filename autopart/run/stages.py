"""The one module that speaks to torch.distributed.pipelining: stages from a plan, and its schedule.

    pipe = build_pipeline(plan, chain_of(model, example, name), rank, device, loss_fn)
    losses = pipe.step(inputs, targets)     # one training step of M micro-batches

Each rank keeps only its own stages' blocks, under the unpartitioned model's
own names, so ``state_dict`` keys of every stage merge back into the original
model's. A chain of children gives each stage its children; a captured graph
gives each stage one GraphModule that takes the values live at its first cut
and returns those live at its last, so skips pass through the stages between
and only neighbours talk (every schedule, Interleaved1F1B and ZBVZeroBubble
included, accepts that). Tied weights live on every stage that uses them and
their gradients are summed between the ranks that hold them. The schedule is the torch class of the
plan's name (``get_schedule_class``). Gradients are the mean over micro-batches,
which equals the gradient of the mean loss over the mini-batch when every
micro-batch has the same size and the loss is a mean: each parameter's summed
gradient is divided by ``M`` once, after the schedule's step (torch's
``scale_grads=True`` divides each stage's parameters after that stage's last
backward, so a parameter two stages of one rank share, a tied embedding and
head on the V of ZBVZeroBubble, was divided once before the other stage had
added to it and again after).

Each block draws its random numbers (dropout) from its own stream, seeded from
the run's seed, the block, the step and the micro-batch
(:mod:`autopart.run.streams`), so masks differ between stages and are the same
whatever the cuts. The stages are given their input and output shapes
(:mod:`autopart.run.shapes`), so the runtime never runs them to learn them.
Each stage is a :class:`TimedStage`, torch's ``PipelineStage`` with the calls
the schedules make on it overridden: each action is timed, tells the streams
its micro-batch, and a send or receive posted says what this rank waits for.
Every other private torch API autopart uses is in :mod:`autopart.torch_compat`.

A stage the plan marks ``recompute`` runs its whole forward under ``torch.utils.checkpoint`` (non-reentrant,
:func:`recompute_forward`): autograd keeps only the stage's inputs per in-flight micro-batch, and each backward
runs the forward again (the cost model's recompute term, ``docs/cost-model.md``). The recomputation runs inside
the backward call, after the stage has told the streams its micro-batch, so each block draws the masks it drew
forward; it leaves no trace on buffers (deferred BatchNorm merges each micro-batch once).
"""
from __future__ import annotations

import functools
import inspect
from contextlib import AbstractContextManager, contextmanager, nullcontext
from types import TracebackType
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining._backward import stage_backward_input, stage_backward_weight
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle, get_schedule_class
from torch.utils.checkpoint import checkpoint

from autopart.errors import AutopartError
from autopart.formats.plan import Plan
from autopart.formats.precision import Precision, check_precision
from autopart.measure.amp import autocast
from autopart.measure.batchnorm import deferred_layers, statistics_kept
from autopart.measure.blocks import Chain, LossFn, NamedBlock
from autopart.run.replicas import Replicas, average_gradients
from autopart.run.shapes import StageSignature, stage_signatures
from autopart.run.streams import BlockStreams
from autopart.run.timeline import ActionClock

__all__ = ["Pipeline", "SharedParameters", "TimedStage", "build_pipeline", "canonical_names", "check_evaluable",
           "check_plan_against_model", "check_world_size", "in_precision", "loss_in_precision", "recompute_forward",
           "one_stage_world", "split_backward"]

Schedule = PipelineScheduleSingle | PipelineScheduleMulti
"""Every schedule ``get_schedule_class`` returns is one of the two."""


def check_world_size(plan: Plan, world_size: int) -> None:
    """Refuse a plan for another number of processes than were started (its replicas' ranks, all of them)."""
    if world_size != plan.world_size:
        replicas = f" x {plan.data_parallel} data-parallel replicas = {plan.world_size} ranks" \
            if plan.data_parallel > 1 else ""
        raise AutopartError(f"the plan has {plan.num_stages} stages on {plan.num_ranks} ranks "
                            f"({plan.stages_per_rank} per rank){replicas} but {world_size} processes were started")


def check_plan_against_model(plan: Plan, blocks: Sequence[str], world_size: int, model_name: str) -> None:
    """Refuse, before any training, a plan that does not fit the model's blocks or the number of processes."""
    check_world_size(plan, world_size)
    ours = list(blocks)
    planned = [name for stage in plan.stages for name in stage.blocks]
    if planned != ours:
        diff = next((i for i, (a, b) in enumerate(zip(planned, ours)) if a != b), min(len(planned), len(ours)))
        got = planned[diff] if diff < len(planned) else "(end)"
        want = ours[diff] if diff < len(ours) else "(end)"
        raise AutopartError(f"the plan's blocks do not match model {model_name!r}: block {diff} is {got!r} in the "
                            f"plan but {want!r} in the model ({len(planned)} vs {len(ours)} blocks)")


@contextmanager
def one_stage_world(module: nn.Module, microbatches: int, loss_fn: Callable[[Any, Any], torch.Tensor],
                    device: torch.device) -> Iterator[Callable[[torch.Tensor, torch.Tensor], None] | None]:
    """A step of ``module`` as the one stage of a ``GPipe`` schedule of ``microbatches`` in a world of one
    process (gloo, an in-process store, destroyed on leaving): what ``train`` runs per stage, less the sends
    (:mod:`autopart.measure.runtime_cost` times it). Each call of the function it gives runs one step on a batch
    and its target. None when a process group exists already (a world that is not this one process)."""
    if dist.is_initialized():
        yield None
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        stage = PipelineStage(module, 0, 1, device)
        schedule = get_schedule_class("GPipe")(stage, n_microbatches=microbatches, loss_fn=loss_fn, scale_grads=False)

        def step(x: torch.Tensor, target: torch.Tensor) -> None:
            schedule.step(x, target=target, return_outputs=False)
        yield step
    finally:
        dist.destroy_process_group()


def split_backward(module: nn.Module, outputs: Sequence[torch.Tensor], output_grads: Sequence[torch.Tensor],
                   inputs: Sequence[Any]) -> Callable[[], None] | None:
    """The zero-bubble schedules' I of ``module``'s backward, run now as torch runs it (``stage_backward_input``:
    the inputs' gradients, the graph kept for the weights'); returns their W (``stage_backward_weight``) to run
    later. None when no input needs a gradient: torch then skips the I, as on a first stage, and its W is the
    whole backward (``torch.autograd.backward``). The profiler times both halves with it
    (:func:`autopart.measure.timing.time_block`), so the plan prices I and W as the runtime runs them."""
    if not any(isinstance(t, torch.Tensor) and t.requires_grad for t in inputs):
        return None
    # torch detaches the outputs in place after the I, which a view refuses (a Linear's output on 3-d input)
    owned = [t.clone() if t._base is not None else t for t in outputs]
    _, groups = stage_backward_input(owned, list(output_grads), list(inputs), module.parameters())

    def weight() -> None:
        stage_backward_weight(module.parameters(), groups)
    return weight


def check_evaluable(plan: Plan) -> None:
    """Refuse ``--eval-every`` under a schedule that torch 2.13's ``schedule.eval`` cannot run: ZBVZeroBubble, whose
    runtime hands a gradient between a rank's two stages of the V even when the schedule runs no backward
    (``AssertionError: can't steal_bwd_input if this stage doesn't have backward``)."""
    if plan.schedule == "ZBVZeroBubble":
        raise AutopartError("--eval-every under ZBVZeroBubble: torch's forward-only schedule.eval does not run a "
                            "V-shaped schedule (it passes gradients between a rank's two stages without a backward); "
                            "partition with another schedule (1F1B, GPipe, Interleaved1F1B) to evaluate")


class SharedParameters:
    """Parameters that several ranks hold a copy of (tied weights): their gradients are summed between
    those ranks after every backward, as Megatron's embedding group does, so the copies never drift.

    Note: every rank works out every stage's parameters by name from the same chain, so all ranks
    create the same process groups in the same order (``new_group`` is collective). ``rank`` is the pipeline
    rank; with several replicas each replica's holders get their own group (``mesh[replica][pipeline_rank]`` is
    the global rank: every rank makes every replica's groups, and keeps its own replica's); one replica's holders are
    the global ranks ``row[pipeline_rank]`` (its placement; identity when None).
    """

    def __init__(self, plan: Plan, chain: Chain, rank: int, local: list[tuple[int, nn.Module]],
                 replicas: Replicas | None = None, row: Sequence[int] | None = None) -> None:
        canonical = canonical_names(chain.root)
        built = {s: [n for n, _ in m.named_parameters(remove_duplicate=False)] for s, m in local}
        holders: dict[str, set[int]] = {}
        for s, ranks_stage in enumerate(plan.stage_ranks()):
            for name in built[s] if s in built else chain.parameter_names(*_span(plan, s)):
                holders.setdefault(canonical.get(name, name), set()).add(ranks_stage)
        shared = sorted((name, tuple(sorted(r))) for name, r in holders.items() if len(r) > 1)
        groups: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
        mesh = replicas.mesh if replicas is not None else (tuple(row if row is not None else range(plan.num_ranks)),)
        mine_row = replicas.replica if replicas is not None else 0
        for _, ranks in shared:
            if ranks not in groups:
                for d, row in enumerate(mesh):  # every replica's group, made by every rank in the same order
                    group = dist.new_group([row[r] for r in ranks]) if dist.is_initialized() else None
                    if d == mine_row:
                        groups[ranks] = group
        names = [n for s, _ in local for n in built[s]]
        firsts = {canonical.get(n, n) for n in names}
        self.aliases = {n: first for n, first in canonical.items() if first in firsts and n != first}
        """Every other name of a tied parameter this rank holds, used by its stages or not -> its first name (for
        checkpoints: a merged one has each name the model has)."""
        mine = {canonical.get(n, n): p for _, m in local for n, p in m.named_parameters(remove_duplicate=False)}
        self.local = [(name, mine[name], groups[ranks]) for name, ranks in shared if rank in ranks and name in mine]
        """(name, this rank's copy, the group of ranks that hold one)."""

    def sync_gradients(self) -> None:
        for _, param, group in self.local:
            if param.grad is not None and group is not None:
                dist.all_reduce(param.grad, group=group)


def canonical_names(root: nn.Module) -> dict[str, str]:
    """Every name of a shared parameter -> its first name in the model."""
    first: dict[int, str] = {}
    out = {}
    for name, param in root.named_parameters(remove_duplicate=False):
        out[name] = first.setdefault(id(param), name)
    return out


def _span(plan: Plan, stage: int) -> tuple[int, int]:
    first = sum(plan.balance[:stage])
    return first, first + plan.balance[stage] - 1


class Pipeline:
    """This rank's stages and the schedule that drives them."""

    def __init__(self, plan: Plan, blocks: dict[int, list[NamedBlock]], modules: list[tuple[int, nn.Module]],
                 schedule: Schedule, loss_fn: LossFn, shared: SharedParameters, clock: ActionClock,
                 streams: BlockStreams, signatures: list[StageSignature],
                 scaler: ShardedGradScaler | None = None, replicas: Replicas | None = None) -> None:
        self.plan = plan
        self.replicas = replicas
        """Where this rank is in the data-parallel x pipeline grid (None: one replica, no mesh)."""
        self.scaler = scaler
        """fp16-mixed's gradient scaler (None under the other precisions): the loss the schedule backpropagates is
        scaled by it; the optimizer step unscales, and every rank skips a step any rank found inf/nan in."""
        self.streams = streams
        """Every block's random stream; its step advances once per :meth:`step`."""
        self.signatures = signatures
        """Every stage's input and output shapes (the first stage's inputs: one micro-batch of the model's)."""
        self.clock = clock
        """Times every forward and backward the schedule runs here (see :mod:`autopart.run.timeline`)."""
        self.blocks = blocks
        """Each local stage's blocks, one module each (to measure them one by one)."""
        self.modules = modules
        self.schedule = schedule
        self.loss_fn = loss_fn
        """The loss on what the last stage's blocks return when run on their own, outside the stage module (a
        captured graph's flat values rebuilt into the model's output; a chain's last block's output as it is)."""
        self.shared = shared
        self.deferred = [layer for _, m in modules for layer in deferred_layers(m)]
        """Deferred BatchNorm layers: they commit their running statistics once per step."""
        self.has_first = any(s == 0 for s, _ in modules)
        self.has_last = any(s == plan.num_stages - 1 for s, _ in modules)
        self.captured: dict[int, tuple[Any, ...]] = {}
        """Each local stage's inputs of its first micro-batch (for measuring it alone afterwards)."""
        self.last_target: torch.Tensor | None = None
        """The first micro-batch's target, kept on the last stage's rank (for measuring it alone)."""
        for s, module in modules:
            module.register_forward_pre_hook(self._capture(s))

    def _capture(self, stage: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            if stage not in self.captured:
                self.captured[stage] = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)
        return hook

    def parameters(self) -> list[nn.Parameter]:
        """This rank's parameters, each once (two local stages may share one)."""
        seen: dict[int, nn.Parameter] = {}
        for _, m in self.modules:
            for p in m.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    def span(self, stage: int) -> tuple[int, int]:
        """The first and last block of a stage."""
        return _span(self.plan, stage)

    def state_dicts(self) -> dict[int, dict[str, torch.Tensor]]:
        return {s: m.state_dict() for s, m in self.modules}

    def step(self, inputs: torch.Tensor | tuple[torch.Tensor, ...], target: torch.Tensor
             ) -> list[torch.Tensor] | None:
        """One training step of the plan's micro-batches, shared gradients summed, then (several replicas)
        averaged over the replicas; the per-micro-batch losses (of this replica's share) on the last stage's rank.
        ``inputs``: the model's input, or a tuple of its inputs (this replica's share of the global batch)."""
        losses: list[torch.Tensor] = []
        for layer in self.deferred:
            layer.reset()
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        self._check_microbatches(args)
        if self.has_last and self.last_target is None:
            self.last_target = target.tensor_split(self.plan.microbatches)[0].detach().clone()
        if self.has_first and self.has_last:
            self.schedule.step(*args, target=target, losses=losses, return_outputs=False)
        elif self.has_first:
            self.schedule.step(*args, return_outputs=False)
        elif self.has_last:
            self.schedule.step(target=target, losses=losses, return_outputs=False)
        else:
            self.schedule.step(return_outputs=False)
        for p in self.parameters():  # the mean over micro-batches, once per parameter (the schedule sums them)
            if p.grad is not None:
                p.grad.div_(self.plan.microbatches)
        for layer in self.deferred:
            layer.commit()
        # a replica's tied copies summed first (timed: the report's tie sum); the average over replicas of the
        # sums is the sum of the averages, so either order gives the same gradient
        if self.shared.local:
            self.clock.timed("TIE", "TIE", self.shared.sync_gradients)
        if self.replicas is not None and self.replicas.data_parallel > 1:  # timed: the report's all-reduce
            self.clock.timed("AR", "AR", average_gradients, self.parameters(), self.replicas.dp_group,
                             self.replicas.data_parallel)
        self.streams.step += 1
        return losses if self.has_last else None

    def evaluate(self, inputs: torch.Tensor | tuple[torch.Tensor, ...], target: torch.Tensor
                 ) -> list[torch.Tensor] | None:
        """The per-micro-batch losses of one forward-only pass (torch's ``schedule.eval``: no backward, no gradients)
        with dropout off and BatchNorm on its running statistics (every local module in ``eval()`` mode, each put
        back as it was after); on the last stage's rank, else None. Nothing is committed: no gradient, no
        BatchNorm statistic, no step of the random streams."""
        losses: list[torch.Tensor] = []
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        self._check_microbatches(args)
        modes = [(sub, sub.training) for _, m in self.modules for sub in m.modules()]
        for _, m in self.modules:
            m.eval()
        try:
            with torch.no_grad():
                if self.has_first and self.has_last:
                    self.schedule.eval(*args, target=target, losses=losses)
                elif self.has_first:
                    self.schedule.eval(*args)
                elif self.has_last:
                    self.schedule.eval(target=target, losses=losses)
                else:
                    self.schedule.eval()
        finally:
            for sub, training in modes:
                sub.training = training
        return losses if self.has_last else None

    def _check_microbatches(self, args: tuple[torch.Tensor, ...]) -> None:
        """Refuse inputs whose micro-batches are not what the stages were sized for (every rank draws the
        same batches, so every rank refuses alike, before any stage waits for another)."""
        expected = self.signatures[0].inputs
        got = [x.tensor_split(self.plan.microbatches)[0] for x in args]
        if len(got) != len(expected) or any(a.shape != b.shape or a.dtype != b.dtype for a, b in zip(got, expected)):
            def say(ts: Sequence[torch.Tensor]) -> str:
                return ", ".join(f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}" for t in ts)
            raise AutopartError(f"the data's micro-batches are {say(got)}, the stages were built for {say(expected)} "
                                f"(the plan's micro-batch size and sample shape)")


def build_pipeline(plan: Plan, chain: Chain, rank: int, device: torch.device, loss_fn: LossFn,
                   group: dist.ProcessGroup | None = None,
                   materialise: Callable[[int, nn.Module], None] | None = None, seed: int = 0,
                   first_step: int = 0, replicas: Replicas | None = None) -> Pipeline:
    """This rank's stages of ``chain`` (moved to ``device``) wrapped for ``plan``'s schedule, under the plan's
    precision (the chain's model already in its parameter dtype).

    A stage built on the meta device is handed to ``materialise(stage, module)``, which gives it storage on
    ``device`` and its values (:func:`autopart.run.build.fill_stage`). Random streams come from ``seed``; ``first_step``: steps
    done before (a resumed run's). ``replicas``: several data-parallel replicas (:mod:`autopart.run.replicas`):
    ``rank`` is then this rank's pipeline rank, its stages talk on its replica's "pp" group (``group`` is
    ignored), and gradients are averaged over the "dp" group after each step.
    """
    precision = check_precision(plan.precision)
    # this replica's global rank of every pipeline rank (the plan's placement; even one replica's may permute them)
    row = list(replicas.mesh[replicas.replica]) if replicas is not None else list(range(plan.num_ranks))
    if replicas is not None and replicas.data_parallel > 1:
        group = replicas.pp_group
    else:
        replicas = None
    first_mb = replicas.replica * plan.microbatches if replicas is not None else 0
    streams = BlockStreams(seed, device, first_step, first_mb)
    with autocast(precision, device):  # what crosses a cut under autocast is what the receiver allocates for
        signatures = stage_signatures(chain, plan.balance, device)
    modules: list[tuple[int, nn.Module]] = []
    for s in plan.stages_of(rank):
        module = chain.stage_module(*_span(plan, s), enter=streams.enter)
        if plan.stages[s].cost.recompute:
            recompute_forward(module)
        streams.keep_caller_state(module)
        if any(t.is_meta for t in list(module.parameters()) + list(module.buffers())):
            if materialise is None:
                raise AutopartError(f"stage {s} was built on the meta device and nothing materialises it")
            materialise(s, module)
        else:
            module.to(device)
        modules.append((s, in_precision(module, precision, device)))
    shared = SharedParameters(plan, chain, rank, modules, replicas, row)
    # every rank of every replica agrees on skipping a step: found inf/nan all-reduced over the whole world
    agree = dist.group.WORLD if replicas is not None else group or dist.group.WORLD
    scaler = ShardedGradScaler(device=device.type, process_group=agree) if precision.scaler else None
    if scaler is not None:
        scaler.scale(torch.zeros((), device=device))  # makes its scale on every rank, not only the loss's
    clock = ActionClock(rank, device)
    precise_loss = loss_in_precision(chain.model_loss(loss_fn), precision, device, scaler)

    def model_loss(out: Any, target: Any) -> torch.Tensor:  # the schedule calls it between the last stage's actions
        return clock.timed("LOSS", "LOSS", precise_loss, out, target)
    global_ranks = [row[r] for r in plan.stage_ranks()]
    stages = [TimedStage(module, s, plan.num_stages, device, clock=clock, streams=streams, ranks=global_ranks,
                         input_args=signatures[s].inputs, output_args=signatures[s].outputs, group=group)
              for s, module in modules]
    cls = get_schedule_class(plan.schedule)
    schedule: Schedule
    if issubclass(cls, PipelineScheduleMulti):
        schedule = cls(stages, n_microbatches=plan.microbatches, loss_fn=model_loss, scale_grads=False)
    else:
        if len(stages) != 1:
            raise AutopartError(f"{plan.schedule} runs one stage per rank, the plan gives rank {rank} {len(stages)}")
        schedule = cls(stages[0], n_microbatches=plan.microbatches, loss_fn=model_loss, scale_grads=False)
    place_stages(schedule, stages, rank, global_ranks, group)
    blocks = {s: chain.blocks[_span(plan, s)[0]: _span(plan, s)[1] + 1] for s, _ in modules}
    block_loss = chain.block_loss(loss_fn)
    return Pipeline(plan, blocks, modules, schedule, block_loss, shared, clock, streams, signatures, scaler, replicas)


def place_stages(schedule: Schedule, stages: Sequence[PipelineStage], pipeline_rank: int,
                 global_ranks: Sequence[int], group: dist.ProcessGroup | None) -> None:
    """Run ``stages`` where the plan places them: stage ``s`` on global rank ``global_ranks[s]``.

    torch numbers a pipeline by group rank: a stage sends to ``stage_index_to_group_rank[s]`` of its group, and a
    multi-stage schedule runs the actions of ``schedule.rank`` (its first stage's group rank). ``new_group`` (and so
    a ``DeviceMesh`` row) sorts its ranks, and one replica's stages talk on the default group, so a placement row
    that is not ascending (``[3, 2]``, or ``[1, 0]`` on two ranks) has pipeline rank ``p`` at another group rank.
    The schedule's actions stay keyed by pipeline rank (the plan's ``stage_ranks`` are torch's own mapping); each
    stage's peers are the group ranks of the global ranks the plan puts their stages on.
    """
    where = {s: g if group is None else dist.get_group_rank(group, g) for s, g in enumerate(global_ranks)}
    for stage in stages:
        stage.stage_index_to_group_rank = dict(where)
    if isinstance(schedule, PipelineScheduleMulti):
        schedule.rank = pipeline_rank


def in_precision(module: nn.Module, precision: Precision, device: torch.device) -> nn.Module:
    """``module`` with its forward run under the precision's autocast (a mixed precision; the others are cast, not
    wrapped). The forward is replaced on the instance, so parameter names and ``state_dict`` keys stay the model's."""
    if not precision.mixed:
        return module
    forward = module.forward

    @functools.wraps(forward)
    def autocast_forward(*args: Any, **kwargs: Any) -> Any:
        with autocast(precision, device):
            return forward(*args, **kwargs)

    setattr(module, "forward", autocast_forward)
    return module


def loss_in_precision(loss_fn: Callable[[Any, Any], torch.Tensor], precision: Precision, device: torch.device,
                      scaler: ShardedGradScaler | None) -> Callable[[Any, Any], torch.Tensor]:
    """The last stage's loss under the precision's autocast, scaled by ``scaler`` (fp16-mixed) for the backward."""
    def loss(output: Any, target: Any) -> torch.Tensor:
        with autocast(precision, device):
            value = loss_fn(output, target)
        return scaler.scale(value) if scaler is not None else value
    return loss


def recompute_forward(module: nn.Module) -> None:
    """Run ``module``'s forward under activation checkpointing from now on (non-reentrant, the random generators'
    state preserved): autograd keeps only its inputs, and the backward runs the forward again, under
    ``statistics_kept`` so a recomputation changes no buffer (BatchNorm's statistics count each micro-batch once).

    The module stays the same object (its parameter and buffer names, hooks and ``state_dict`` unchanged); its
    hooks run once per forward, not again when the backward recomputes it.
    """
    forward = module.forward
    recomputing = _Recomputing(module)

    def contexts() -> tuple[AbstractContextManager[None], AbstractContextManager[None]]:
        return nullcontext(), recomputing

    def checkpointed(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(forward, *args, use_reentrant=False, preserve_rng_state=True, context_fn=contexts,
                          **kwargs)

    module.forward = checkpointed  # type: ignore[method-assign]


class _Recomputing(AbstractContextManager[None]):
    """``statistics_kept(module)`` around each recomputation; reusable: checkpoint recomputes once per backward
    call that needs the saved tensors, and a zero-bubble schedule makes several per micro-batch (the input half,
    then the weight half's)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.open: list[AbstractContextManager[None]] = []

    def __enter__(self) -> None:
        kept = statistics_kept(self.module)
        kept.__enter__()
        self.open.append(kept)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool | None:
        return self.open.pop().__exit__(kind, exc, tb)


_BACKWARD_PARAMETERS = list(inspect.signature(PipelineStage.backward_one_chunk).parameters.values())[2:]
"""``backward_one_chunk``'s parameters after ``self`` and ``bwd_chunk_id``, as torch declares them."""


def _full_backward(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """Whether a ``backward_one_chunk(bwd_chunk_id, *args, **kwargs)`` call runs the whole backward (True) or only
    its input-gradient half (``full_backward=False``: the zero-bubble schedules' I, whose W comes later), the
    argument found by name or by its position in torch's own signature."""
    if "full_backward" in kwargs:
        return bool(kwargs["full_backward"])
    at = [p.name for p in _BACKWARD_PARAMETERS].index("full_backward")
    return bool(args[at]) if len(args) > at else bool(_BACKWARD_PARAMETERS[at].default)


class TimedStage(PipelineStage):
    """A ``PipelineStage`` that tells the rest of the run what the schedule does with it.

    The schedules call the stage's ``forward_one_chunk``, ``backward_one_chunk`` (``full_backward=False``
    for the input-gradient half) and ``backward_weight_one_chunk``; each is timed on ``clock`` (F, B, I, W)
    and first tells ``streams`` its micro-batch (a backward that recomputes the forward then draws what the
    forward drew). Just before the schedule waits on the sends and receives that ``get_fwd_recv_ops`` and its
    three siblings return, ``clock.doing`` says which, so a timeout can say what this rank waited for.
    """

    def __init__(self, submodule: nn.Module, stage_index: int, num_stages: int, device: torch.device, *,
                 clock: ActionClock, streams: BlockStreams, ranks: Sequence[int], **kwargs: Any) -> None:
        super().__init__(submodule, stage_index, num_stages, device, **kwargs)
        self.clock = clock
        self.streams = streams
        self.ranks = list(ranks)
        """The rank of every stage of the plan (to name a peer)."""

    def forward_one_chunk(self, fwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
        self.streams.microbatch = fwd_chunk_id
        return self.clock.timed("F", f"{self.stage_index}F{fwd_chunk_id}", super().forward_one_chunk,
                                fwd_chunk_id, *args, **kwargs)

    def backward_one_chunk(self, bwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
        self.streams.microbatch = bwd_chunk_id
        kind = "B" if _full_backward(args, kwargs) else "I"
        return self.clock.timed(kind, f"{self.stage_index}{kind}{bwd_chunk_id}", super().backward_one_chunk,
                                bwd_chunk_id, *args, **kwargs)

    def backward_weight_one_chunk(self, bwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
        self.streams.microbatch = bwd_chunk_id
        return self.clock.timed("W", f"{self.stage_index}W{bwd_chunk_id}", super().backward_weight_one_chunk,
                                bwd_chunk_id, *args, **kwargs)

    def _posted(self, ops: list[dist.P2POp], what: str, chunk: int, to: str, peer: int) -> list[dist.P2POp]:
        """``ops`` as the schedule gets them; when there are any, ``clock.doing`` says what they are."""
        if ops:
            self.clock.doing = f"stage {self.stage_index} {what} of micro-batch {chunk} {to} stage {peer} " \
                               f"(rank {self.ranks[peer]})"
        return ops

    def get_fwd_recv_ops(self, fwd_chunk_id: int) -> list[dist.P2POp]:
        ops = super().get_fwd_recv_ops(fwd_chunk_id)
        return self._posted(ops, "waited for the input", fwd_chunk_id, "from", self.stage_index - 1)

    def get_bwd_recv_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        ops = super().get_bwd_recv_ops(bwd_chunk_id)
        return self._posted(ops, "waited for the gradient", bwd_chunk_id, "from", self.stage_index + 1)

    def get_fwd_send_ops(self, fwd_chunk_id: int) -> list[dist.P2POp]:
        ops = super().get_fwd_send_ops(fwd_chunk_id)
        return self._posted(ops, "sent the output", fwd_chunk_id, "to", self.stage_index + 1)

    def get_bwd_send_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        ops = super().get_bwd_send_ops(bwd_chunk_id)
        return self._posted(ops, "sent the gradient", bwd_chunk_id, "to", self.stage_index - 1)

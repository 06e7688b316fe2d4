"""One rank of ``autopart train``: set up its stages from the plan, train, checkpoint, report.

Note: every rank builds the model with its parameters on the meta device and its buffers real, cuts it (a
graph is captured on meta), and gives storage and values only to its own stages (:mod:`autopart.run.build`):
the weights are those :func:`autopart.run.build.build_model` gives the whole model in one process, whatever
the split. A model with a parameter nothing initialises is built whole on every rank, which says so.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import replace
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from autopart.errors import AutopartError
from autopart.formats.plan import Plan
from autopart.formats.precision import check_precision
from autopart.formats.units import plural
from autopart.measure.amp import cast_dtype, floating_in
from autopart.measure.batchnorm import batchnorm_layers, defer_batchnorm
from autopart.measure.blocks import Chain, chain_of
from autopart.measure.hf import is_hf_spec
from autopart.measure.memory import MemoryMeter, MemoryPeak, lower_mmap_threshold
from autopart.measure.optimizers import make_optimizer
from autopart.measure.spec import ModelBundle, require_parameters, shape_example
from autopart.run.build import DrawsNeedValues, build_for_rank, buffers_to_meta, cut_on_meta, materialise_stage
from autopart.run.checkpoint import latest_complete, load_stages, mark_complete
from autopart.run.config import TrainConfig
from autopart.run.data import cycled_note, training_data
from autopart.run.job import Job, StepLog
from autopart.run.log import say
from autopart.run.microbatch import microbatch_shape, plan_for_run
from autopart.run.replan import reprofile_stages, write_replan
from autopart.run.replicas import Replicas, join_mesh, mean_over_replicas, shard
from autopart.run.report import gather_measured, hand_over_report, make_report, write_report, write_timelines
from autopart.run.resources import check_device_memory, rank_threads, threads_note
from autopart.run.resume import restore_pipeline, save_pipeline
from autopart.run.shapes import NeedsValues
from autopart.run.stages import build_pipeline, check_evaluable, check_plan_against_model
from autopart.run.weights import load_stage_weights
from autopart.torch_compat import is_timeout, pytree

__all__ = ["run_rank", "PeerTimeout"]


class PeerTimeout(RuntimeError):
    """A peer did not answer within ``--timeout``: says what this rank was waiting for."""


def run_rank(cfg: TrainConfig, rank: int) -> None:
    """Everything one rank does, from joining the process group to the report."""
    lower_mmap_threshold()  # before anything big is allocated: freed memory leaves the resident set
    run = plan_for_run(Plan.from_json(cfg.plan), cfg.plan, cfg.global_batch)
    device = _join(cfg, run.plan, rank)
    replicas = join_mesh(run.plan, rank, device.type)  # several replicas: the ("dp", "pp") mesh, before any group
    _import_model_code(cfg.model)
    meter = MemoryMeter(device)
    meter.start()  # the baseline: torch (and the model's code) imported and the group joined, no model yet
    if run.note and rank == 0 and not os.environ.get("AUTOPART_LAUNCHED"):  # autopart's launcher said it
        say(run.note)
    job = _prepare(cfg, rank, device, run.plan, replicas)
    build_peak = meter.read().peak_bytes  # the build's peak: this rank's stages, not the whole model
    try:
        log = _train(job, meter)
        memory = meter.read()  # the steps' peak, before the report's own work (--replan re-profiles)
        job.pipe.clock.step, job.pipe.clock.doing = 0, "gathered every rank's timings after the last step"
        _finish(job, log, memory, meter.method, build_peak)
        job.pipe.clock.doing = "waited for every rank to finish before leaving the group"
        dist.barrier()
        dist.destroy_process_group()  # its threads end here, not in the interpreter's teardown
    except RuntimeError as exc:
        if not is_timeout(exc):
            raise
        clock = job.pipe.clock
        during = f"in step {clock.step}, " if clock.step else ""
        raise PeerTimeout(f"no answer within --timeout {cfg.timeout_s:g} s: {during}{clock.doing} (that rank "
                          f"hung, or is slower than --timeout)") from None


def _join(cfg: TrainConfig, plan: Plan, rank: int) -> torch.device:
    """This rank's device (refused when its free memory is below the plan's peak for it) and threads (the
    plan's, under a user's torchrun too), and the process group (gloo on CPU, NCCL on CUDA)."""
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise AutopartError("--device cuda asked for, but CUDA is not available")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
        free, total = torch.cuda.mem_get_info(device)
        check_device_memory(plan, plan.position_of(rank)[1], str(device), int(total), int(free))
    else:
        _set_threads(cfg, plan, rank)
    backend, timeout = "nccl" if use_cuda else "gloo", timedelta(seconds=cfg.timeout_s)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent keeps one store for every restart of the group, and torch 2.13 does not prefix
        # it per attempt: a restarted group would read the dead ranks' gloo addresses. Each attempt gets
        # its own keys (pytorch/pytorch#167288 is the same failure under NCCL).
        world = int(os.environ["WORLD_SIZE"])
        agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False,
                              timeout=timeout)
        store = dist.PrefixStore(f"autopart/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", agent)
        dist.init_process_group(backend, store=store, rank=int(os.environ["RANK"]), world_size=world,
                                timeout=timeout)
    else:
        dist.init_process_group(backend, timeout=timeout)
    return device


def _set_threads(cfg: TrainConfig, plan: Plan, rank: int) -> None:
    """CPU threads as the plan's profile measured (``--threads`` if given; fewer where this machine's ranks
    would oversubscribe its cores). autopart's launcher passes the count it chose and said; a rank started by
    the user's torchrun (which sets OMP_NUM_THREADS=1) chooses it here, and rank 0 says so."""
    cores = os.cpu_count() or 1
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0) or plan.world_size
    threads = rank_threads(cfg.threads, plan.threads, cores, ranks_here)
    torch.set_num_threads(threads)
    if rank == 0 and not os.environ.get("AUTOPART_LAUNCHED"):
        source = "--threads" if cfg.threads else ("as the plan's profile measured" if threads == plan.threads else
                                                   f"{plural(cores, 'core')} / {plural(ranks_here, 'rank')} here")
        omp = os.environ.get("OMP_NUM_THREADS")
        unused = f"not OMP_NUM_THREADS={omp}; " if omp and omp != str(threads) and not cfg.threads else ""
        say(f"CPU threads: {threads} per rank ({source}; {unused}--threads N sets another count)")
        note = threads_note(plan, threads, cores)
        if note:
            say(note)


def _import_model_code(spec: str) -> None:
    """Import the model's code before the memory baseline, so its import is not counted as the build's or the
    steps' peak: for an ``hf:`` model the module of its class (``modeling_llama`` ...: about 130 MiB with what
    it pulls in, against 18 MiB for ``import transformers`` alone)."""
    if is_hf_spec(spec):
        try:
            from autopart.measure.hf import hf_auto_class, hf_config

            config = hf_config(spec)
            hf_auto_class(config)._model_mapping[type(config)]  # the lazy mapping imports the class's module
        except Exception:  # noqa: BLE001 - load_model says what is wrong with the spec, as one line
            pass


class _ShapesOnMeta(nn.Module):
    """A model whose parameters are on the meta device, run on the meta device: outputs of the right shapes
    and dtypes (zeros on the inputs' device), for what needs only those (synthetic data's target)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.inner = module

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        def to(value: Any, device: torch.device | str) -> Any:
            return pytree.tree_map(lambda t: t.to(device) if isinstance(t, torch.Tensor) else t, value)

        where = next((t.device for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)), "cpu")
        out = self.inner(*to(args, "meta"), **to(kwargs, "meta"))
        return pytree.tree_map(lambda t: torch.zeros(t.shape, dtype=t.dtype, device=where)
                               if isinstance(t, torch.Tensor) else t, out)


def _prepare(cfg: TrainConfig, rank: int, device: torch.device, plan: Plan, replicas: Replicas,
             whole: str | None = None) -> Job:
    """The plan (at the run's micro-batch size) checked against the model, this rank's stages, data and
    optimizer, resumed if asked. ``rank``: the global rank (``replicas`` says its replica and pipeline rank);
    ``whole``: why this rank builds the whole model (else only its stages)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    built = build_for_rank(cfg.model, cfg.seed, whole, weights=bool(cfg.weights))
    bundle = built.bundle
    if built.note and (rank == 0 or built.note.startswith(f"note: rank {rank}: ")):
        say(built.note)
    require_parameters(bundle)
    dtype = cast_dtype(check_precision(plan.precision))
    drawn = {id(p): p.dtype for p in bundle.module.parameters()}  # initialised in these, then cast
    if dtype is not None:
        bundle.module.to(dtype=dtype)  # bf16-true: every weight in bfloat16 (on meta: nothing allocated)
    m = plan.microbatches
    per_mb, sample_shape = microbatch_shape(plan, bundle)
    global_batch = cfg.global_batch or per_mb * m * plan.data_parallel  # every replica's share: every rank draws it
    microbatch_size = plan.microbatch_size_for(global_batch // plan.data_parallel)
    buffers = buffers_to_meta(bundle.module) if built.empty else {}
    planned = [name for stage in plan.stages for name in stage.blocks]
    chain = _chain(cfg, bundle, microbatch_size, tuple(plan.sample_shape[1:]), dtype,
                   device if built.empty else None, planned)
    check_plan_against_model(plan, chain.names, world, cfg.model)
    batchnorm = _batchnorm_mode(cfg, plan, chain)
    if batchnorm == "deferred":
        defer_batchnorm(chain.root)
        chain.reload_blocks()
    saved_dir = latest_complete(cfg.checkpoint) if cfg.checkpoint else None
    saved = load_stages(saved_dir) if saved_dir is not None else []
    start = int(saved[0]["step"]) if saved else 0
    data = training_data(replace(bundle, module=_ShapesOnMeta(bundle.module)) if built.empty else bundle,
                         cfg.data, global_batch, sample_shape, cfg.seed, start,
                         cfg.eval_batches if cfg.eval_every else 0)

    def own_stage(_: int, module: nn.Module) -> None:
        materialise_stage(module, chain, bundle.module, buffers, drawn, dtype, device, cfg.seed)

    try:
        pipe = build_pipeline(plan, chain, replicas.pipeline_rank, device, data.loss_fn, materialise=own_stage,
                              seed=cfg.seed, first_step=start, replicas=replicas)
    except NeedsValues as exc:
        # Raised before any collective: stage_signatures (every rank finds it alike) or materialise (its stages'
        # initialisation, DrawsNeedValues: found only by the ranks whose stages draw so). A rank that builds the
        # whole model then is not out of step with the others: build_pipeline had made no group and sent nothing
        # (new_group, the first collective, comes after materialise), so it makes the same calls as they do, once;
        # the whole build draws every module from its own seed, as build_model does, so its stages' weights are
        # the ones the ranks that build only their stages get; and the data is drawn from the seed alone.
        if not built.empty:
            raise
        if isinstance(exc, DrawsNeedValues):
            return _prepare(cfg, rank, device, plan, replicas,
                            whole=f"note: rank {rank}: {exc}: it builds the whole model")
        return _prepare(cfg, rank, device, plan, replicas, whole=str(exc).split(", and the model")[0])
    weights = load_stage_weights(cfg.weights, bundle.module, [m for _, m in pipe.modules], cfg.model) \
        if cfg.weights else None  # every rank checks them alike before any waits for another; a resume wins
    optimizer = make_optimizer(plan.optimizer, pipe.parameters(), lr=cfg.lr)
    job = Job(cfg=cfg, plan=plan, rank=replicas.pipeline_rank, world=world, device=device, pipe=pipe,
              optimizer=optimizer, data=data, global_batch=global_batch, microbatch_size=microbatch_size,
              start_step=start, replicas=replicas)
    if saved:
        restore_pipeline(pipe, optimizer, saved, job.reporter)
    if job.reporter:
        _say_start(job, batchnorm_layers(chain.root), batchnorm, weights.description if weights else None)
    return job  # the rest of the model (other ranks' blocks) is freed with ``bundle``


def _chain(cfg: TrainConfig, bundle: ModelBundle, microbatch_size: int, sample_shape: tuple[int, ...],
           dtype: torch.dtype | None, on_meta: torch.device | None, planned: list[str]) -> Chain:
    """The model's blocks, as the profiler found them; a graph is captured at the run's micro-batch shape, its
    floating inputs in ``dtype`` (None: as they are). ``on_meta``: the model is wholly on the meta device, and so
    is the example it is cut (captured) on; its stages will run on this device; ``planned``: the plan's blocks."""
    shape = (microbatch_size, *sample_shape) if sample_shape else None
    example = floating_in(shape_example(bundle, shape, None, microbatch_size), dtype) \
        if bundle.example is not None else ()
    if on_meta is not None:
        return cut_on_meta(bundle.module, example, cfg.model, bundle.input_names, on_meta, planned)
    return chain_of(bundle.module, example, cfg.model, bundle.input_names)


def _batchnorm_mode(cfg: TrainConfig, plan: Plan, chain: Chain) -> str | None:
    """deferred or micro for a model with BatchNorm (``--batchnorm``, else the plan's, else deferred); None
    without."""
    if not batchnorm_layers(chain.root):
        return None
    return cfg.batchnorm or plan.batchnorm or "deferred"


def _say_start(job: Job, layers: list[str], batchnorm: str | None, weights: str | None) -> None:
    plan, mb, gb = job.plan, job.microbatch_size, job.global_batch
    if batchnorm == "deferred":
        say(f"BatchNorm: {len(layers)} layers ({layers[0]}, ...), deferred: each micro-batch of {mb} is normalised "
            f"on its own, running statistics are committed once per step over the {gb}-sample mini-batch")
    elif batchnorm == "micro":
        say(f"warning: BatchNorm: {len(layers)} layers ({layers[0]}, ...), micro: running statistics follow each "
            f"micro-batch of {mb}, not the {gb}-sample mini-batch (GPipe paper, sec. 3)")
    if batchnorm and plan.batchnorm and plan.batchnorm != batchnorm:
        say(f"note: the profile measured BatchNorm {plan.batchnorm}, training runs it {batchnorm}")
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restart:
        where = f"resuming after step {job.start_step}, its last complete checkpoint" if job.start_step else \
            "starting over: no complete checkpoint yet"
        say(f"restart {restart} of {os.environ.get('TORCHELASTIC_MAX_RESTARTS', '?')} after a rank failed: {where}")
    resuming = f", resuming after step {job.start_step}" if job.start_step else ""
    again = [str(s) for s, stage in enumerate(plan.stages) if stage.cost.recompute]
    recompute = f", stage{'s' if len(again) > 1 else ''} {', '.join(again)} recomputed in the backward" if again else ""
    precision = f", {plan.precision}" if plan.precision != "fp32" else ""
    d = plan.data_parallel
    ranks = f"{plural(plan.num_ranks, 'rank')} x {d} data-parallel replicas" if d > 1 else plural(job.world, 'rank')
    per_step = f"{gb} per step, {gb // d} per replica" if d > 1 else f"{gb} per step"
    say(f"training {job.cfg.model}: {plural(plan.num_stages, 'stage')} on {ranks}, {plan.schedule}, "
        f"{plural(plan.microbatches, 'micro-batch')} of {mb} ({per_step}){recompute}, {plan.optimizer}{precision}, "
        f"data: {job.data.source}{f', weights: {weights}' if weights else ''}{resuming}")


def _train(job: Job, meter: MemoryMeter) -> StepLog:
    """The steps: one pipelined step of all micro-batches, the optimizer, and checkpoints when due; ``meter``
    holds their peak memory (from the first step on: the optimizer's state appears in it)."""
    cfg, log = job.cfg, StepLog()
    if cfg.eval_every:
        check_evaluable(job.plan)  # under a user's torchrun too, before the first step
    cycled = cycled_note(job.data.batches_per_pass, cfg.steps)
    if cycled and job.reporter:
        say(cycled)
    meter.reset_peak()  # the other ranks' blocks, built and dropped, are not this rank's
    dtype = cast_dtype(check_precision(job.plan.precision))
    for step in range(job.start_step, cfg.steps):
        inputs, target = _share(job, *next(job.data.batches))
        inputs, target = _on_device(job, inputs, dtype), target.to(job.device)
        job.optimizer.zero_grad(set_to_none=False)  # in place, as the profile's optimizer time assumes
        job.pipe.clock.step = step + 1
        job.pipe.clock.doing = "waited at the barrier before the step for every rank"
        dist.barrier()
        t0 = time.perf_counter()
        job.pipe.clock.begin_step()
        out = job.pipe.step(inputs, target)
        scale = _optimizer_step(job)
        log.timelines.append(job.pipe.clock.end_step())  # waits for the device
        elapsed = (time.perf_counter() - t0) * 1e3
        log.step_ms.append(elapsed)
        if out is not None:  # this replica's last stage: the step's loss is the mean over the replicas' equal shares
            loss = mean_over_replicas(float(torch.stack([x.detach().float() for x in out]).mean()) / scale,
                                      job.replicas, job.device)
            if job.reporter:
                log.losses.append(_say_step(job, step, loss, elapsed))
        if cfg.eval_every and (step + 1 == cfg.steps or (step + 1) % cfg.eval_every == 0):
            _evaluate(job, step + 1, log)
        if cfg.checkpoint and (step + 1 == cfg.steps or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0)):
            _checkpoint(job, cfg.checkpoint, step + 1)
    return log


def _share(job: Job, inputs: torch.Tensor | tuple[torch.Tensor, ...], target: torch.Tensor
           ) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor]:
    """This replica's rows of a global batch every rank drew alike (all of it with one replica)."""
    d, r = job.plan.data_parallel, job.replicas.replica
    part = tuple(shard(x, r, d) for x in inputs) if isinstance(inputs, tuple) else shard(inputs, r, d)
    return part, shard(target, r, d)


def _on_device(job: Job, inputs: torch.Tensor | tuple[torch.Tensor, ...], dtype: torch.dtype | None
               ) -> torch.Tensor | tuple[torch.Tensor, ...]:
    """A batch's inputs on this rank's device, floating ones in ``dtype`` (None: as they are)."""
    if isinstance(inputs, tuple):
        return floating_in(tuple(x.to(job.device) for x in inputs), dtype)
    return floating_in((inputs.to(job.device),), dtype)[0]


def _evaluate(job: Job, step: int, log: StepLog) -> None:
    """``--eval-every``: the held-out batches through the pipeline, forward only (:meth:`Pipeline.evaluate`), each
    replica its share of every batch; on the last stage's rank, their mean loss averaged over the replicas, said and
    logged (by replica 0's)."""
    assert job.data.held_out is not None
    dtype = cast_dtype(check_precision(job.plan.precision))
    losses: list[torch.Tensor] = []
    for whole, whole_target in job.data.held_out:
        inputs, target = _share(job, whole, whole_target)
        job.pipe.clock.doing = f"evaluated the held-out data after step {step}"
        out = job.pipe.evaluate(_on_device(job, inputs, dtype), target.to(job.device))
        losses += out or []
    if not losses:
        return
    scale = job.pipe.scaler.get_scale() if job.pipe.scaler is not None else 1.0  # the loss fn scales under fp16
    loss = mean_over_replicas(float(torch.stack([x.detach().float() for x in losses]).mean()) / scale, job.replicas,
                              job.device)
    if not job.reporter:
        return
    say(f"eval after step {step}: loss {loss:.4f} ({plural(len(job.data.held_out), 'batch')} of "
        f"{job.global_batch}, held out)")
    log.eval_losses.append({"step": step, "loss": loss})


def _optimizer_step(job: Job) -> float:
    """The optimizer's step; under fp16-mixed, the gradients unscaled first, the step skipped on every rank when
    any found inf/nan (its scaler all-reduces the flag), and the scale updated. The scale the step's losses were
    multiplied by (1 without a scaler)."""
    scaler = job.pipe.scaler
    if scaler is None:
        job.pipe.clock.timed("OPT", "OPT", job.optimizer.step)
        return 1.0
    scale = scaler.get_scale()
    job.pipe.clock.doing = "unscaled the gradients and agreed with every rank on skipping the step"

    def step() -> None:
        scaler.unscale_(job.optimizer)
        scaler.step(job.optimizer)
        scaler.update()

    job.pipe.clock.timed("OPT", "OPT", step)
    return scale


def _say_step(job: Job, step: int, loss: float, elapsed_ms: float) -> float:
    if not math.isfinite(loss):
        raise RuntimeError(f"loss is {loss} at step {step + 1}")
    tokens = job.data.tokens_per_sample
    rate = job.global_batch * tokens / (elapsed_ms / 1e3)
    unit = "tokens/s" if tokens > 1 else "samples/s"
    say(f"step {step + 1}/{job.cfg.steps}  loss {loss:.4f}  {rate:,.0f} {unit}  {elapsed_ms:.0f} ms")
    return loss


def _checkpoint(job: Job, root: str, step: int) -> None:
    """Every rank of replica 0 writes its stages (the other replicas hold the same weights and optimizer state: the
    same averaged gradients); then its rank 0 marks the step complete."""
    if job.replicas.leader:
        save_pipeline(job.pipe, job.optimizer, root, step, job.rank)
    job.pipe.clock.doing = f"waited for every rank to save step {step}'s checkpoint"
    dist.barrier()
    if job.replicas.leader and job.rank == 0:
        mark_complete(root, step, job.plan.num_stages, job.cfg.model, job.plan.precision)
    dist.barrier()


def _finish(job: Job, log: StepLog, memory: MemoryPeak, memory_method: str, build_peak_bytes: int | None) -> None:
    """Gather every rank's timings and peak memory, and (on the last stage's rank) hand the report to the
    launcher (or print it), write it, draw and replan."""
    profiles = reprofile_stages(job) if job.cfg.replan and job.replicas.leader else []
    measured, profiles = gather_measured(job, log, profiles, memory, memory_method, build_peak_bytes)
    if not job.reporter:
        return
    report = make_report(job, log, measured)
    hand_over_report(report, job.plan.microbatch_size)
    if job.cfg.report:
        write_report(report, job.cfg.report)
    if job.cfg.trace or job.cfg.svg:
        write_timelines(job.plan, measured, job.cfg.trace, job.cfg.svg)
    if job.cfg.replan:
        write_replan(job, profiles, report.measured_step_ms, job.cfg.replan)

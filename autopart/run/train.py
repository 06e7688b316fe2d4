"""``autopart train``'s worker: one process per rank, started by torchrun (or by the launcher, which uses
torchrun's API). Builds this rank's stages from the plan, trains on real data, checkpoints, and reports
measured against predicted.

Note: every rank builds the whole model from the same seed (so a pipelined run
starts from exactly the weights a single process would) and then keeps only
its own blocks; ``--meta-init`` builds on the meta device instead and
materialises only the local blocks, for models too big to build whole.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from autopart.errors import AutopartError

__all__ = ["TrainConfig", "worker_main", "Batches", "make_batches"]


@dataclass(frozen=True)
class TrainConfig:
    plan: str
    """Plan JSON written by ``autopart partition``."""
    model: str
    """Model spec: built-in name, pkg.mod:factory or file.py:factory."""
    steps: int = 10
    global_batch: int | None = None
    """Samples per step; default: the plan's micro-batch size x its micro-batches."""
    lr: float = 1e-3
    data: str | None = None
    checkpoint: str | None = None
    checkpoint_every: int = 0
    """Save every N steps (0: only at the end, when --checkpoint is given)."""
    seed: int = 0
    threads: int | None = None
    report: str | None = None
    replan: str | None = None
    device: str = "auto"
    timeout_s: float = 300.0
    meta_init: bool = False


Batches = Iterator[tuple[torch.Tensor, torch.Tensor]]


def make_batches(bundle: Any, cfg: TrainConfig, global_batch: int, sample_shape: tuple[int, ...],
                 start_step: int) -> tuple[Batches, str, Callable[[Any, Any], torch.Tensor], int]:
    """Batches of (inputs, targets), where they come from, the loss, and tokens per sample (1 if not text)."""
    from autopart.run.data import Digits, TextCorpus

    name = bundle.name
    if bundle.builtin and name.startswith("gpt2"):
        corpus = TextCorpus(cfg.data)
        seq = sample_shape[0]
        return corpus.batches(global_batch, seq, cfg.seed, start_step), corpus.source, bundle.loss_fn, seq
    if bundle.builtin:
        if cfg.data:
            raise AutopartError(f"--data for {name} is not supported: it trains on scikit-learn's digits")
        digits = Digits()
        return digits.batches(global_batch, sample_shape, cfg.seed, start_step), digits.source, bundle.loss_fn, 1
    if bundle.data is not None:
        if bundle.loss_fn is None:
            raise AutopartError(f"model {name!r} gives data but no loss_fn")
        return _user_batches(bundle.data, global_batch), "the factory's data", bundle.loss_fn, 1
    return _synthetic(bundle, global_batch, sample_shape, cfg.seed), "SYNTHETIC (random inputs, MSE to a fixed " \
        "random target: measures speed, learns nothing)", F.mse_loss, 1


def _user_batches(data: Any, global_batch: int) -> Batches:
    for i, item in enumerate(data):
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise AutopartError(f"the factory's data must yield (input, target) pairs; item {i} is not")
        x, y = item
        if x.shape[0] != global_batch:
            raise AutopartError(f"the factory's data gives batches of {x.shape[0]}, the run needs {global_batch}")
        yield x, y


def _synthetic(bundle: Any, global_batch: int, sample_shape: tuple[int, ...], seed: int) -> Batches:
    if bundle.example is None:
        raise AutopartError(f"model {bundle.name!r} gives no example input to shape synthetic data")
    example = bundle.example[0]
    if example.is_meta:
        raise AutopartError("synthetic data needs a real example; --meta-init works with the built-ins")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        was = bundle.module.training
        bundle.module.eval()
        out = bundle.module(example[:1])
        bundle.module.train(was)
    target = torch.randn((global_batch, *out.shape[1:]), generator=g)
    return _synthetic_batches(example, target, global_batch, sample_shape, seed)


def _synthetic_batches(example: torch.Tensor, target: torch.Tensor, global_batch: int,
                       sample_shape: tuple[int, ...], seed: int) -> Batches:
    step = 0
    while True:
        gs = torch.Generator().manual_seed(seed * 1_000_003 + step)
        if example.is_floating_point():
            x = torch.randn((global_batch, *sample_shape), generator=gs).to(example.dtype)
        else:
            x = torch.randint(0, int(example.max()) + 1, (global_batch, *sample_shape), generator=gs)
        yield x, target
        step += 1


def _batchnorm_blocks(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class RankFailure(Exception):
    """What a failed rank records for the launcher: one line, the original error's type and message."""


def _summary(exc: BaseException) -> str:
    """``Type: message`` of the error that started it all (torch wraps a stage's error in its own)."""
    root: BaseException = exc
    while root.__cause__ is not None:
        root = root.__cause__
    lines = [line.strip() for line in str(root).splitlines() if line.strip()]
    return f"{type(root).__name__}: {lines[0]}" if lines else type(root).__name__


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def worker_main(cfg: TrainConfig) -> int:
    """Run this process's rank. Returns the exit code; failures are one line on stderr."""
    from torch.distributed.elastic.multiprocessing.errors import get_error_handler

    rank = int(os.environ.get("RANK", "0"))
    handler = get_error_handler()
    handler.initialize()
    try:
        _run(cfg, rank)
        return 0
    except AutopartError as exc:
        handler.record_exception(RankFailure(str(exc)))
        if not os.environ.get("AUTOPART_LAUNCHED"):  # our launcher prints the one line itself
            _say(f"autopart train: rank {rank}: error: {exc}")
        return 2
    except Exception as exc:  # a rank that dies says which and why, in one line; the launcher stops the rest
        summary = _summary(exc)
        handler.record_exception(RankFailure(summary))
        if not os.environ.get("AUTOPART_LAUNCHED"):
            _say(f"autopart train: rank {rank} failed: {summary}")
        if os.environ.get("AUTOPART_TRACEBACK"):
            import traceback

            traceback.print_exc()
        return 1
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def _run(cfg: TrainConfig, rank: int) -> None:
    from autopart.run.checkpoint import latest_complete, load_stages, mark_complete
    from autopart.run.stages import build_pipeline, check_plan_against_model
    from autopart.measure.spec import load_model
    from autopart.formats.plan import Plan

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise AutopartError("--device cuda asked for, but CUDA is not available")
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(cfg.threads or 1)
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=cfg.timeout_s))

    plan = Plan.from_json(cfg.plan)
    torch.manual_seed(cfg.seed)
    if cfg.meta_init:
        with torch.device("meta"):
            bundle = load_model(cfg.model)
    else:
        bundle = load_model(cfg.model)
    model = bundle.module
    check_plan_against_model(plan, model, world, cfg.model)
    m = plan.microbatches
    per_mb = plan.microbatch_size or (int(bundle.example[0].shape[0]) if bundle.example else 1)
    global_batch = cfg.global_batch or per_mb * m
    if global_batch % m:
        raise AutopartError(f"global batch {global_batch} is not divisible by the plan's {m} micro-batches")
    mb = global_batch // m
    sample_shape = tuple(plan.sample_shape[1:]) if plan.sample_shape else (
        tuple(bundle.example[0].shape[1:]) if bundle.example else ())
    bn = _batchnorm_blocks(model)
    reporter = _holds_last(plan, rank)
    if bn and reporter:
        _say(f"warning: {len(bn)} BatchNorm layers ({bn[0]}, ...) normalise each micro-batch of {mb} samples on its "
             f"own: running statistics follow micro-batches, not the {global_batch}-sample mini-batch "
             f"(GPipe paper, sec. 3); use more samples per micro-batch or GroupNorm/LayerNorm to avoid it")

    ckpt_dir = latest_complete(cfg.checkpoint) if cfg.checkpoint else None
    saved = load_stages(ckpt_dir) if ckpt_dir is not None else []
    start = int(saved[0]["step"]) if saved else 0
    batches, source, loss_fn, tokens = make_batches(bundle, cfg, global_batch, sample_shape, start)
    pipe = build_pipeline(plan, model, rank, world, device, loss_fn,
                          init=lambda s, module: _initialise(s, module, cfg.seed))
    del model, bundle  # only this rank's blocks stay alive, inside its stages
    optimizer = torch.optim.AdamW(pipe.parameters(), lr=cfg.lr)
    if saved:
        _resume(pipe, optimizer, saved, reporter)
    if reporter:
        _say(f"training {cfg.model}: {plan.num_stages} stages on {world} ranks, {plan.schedule}, {m} micro-batches "
             f"of {mb} ({global_batch} per step), data: {source}" + (f", resuming after step {start}" if start else ""))

    step_ms: list[float] = []
    losses: list[float] = []
    for step in range(start, cfg.steps):
        inputs, target = next(batches)
        inputs, target = inputs.to(device), target.to(device)
        optimizer.zero_grad(set_to_none=False)  # in place, as the profile's optimizer time assumes
        dist.barrier()
        t0 = time.perf_counter()
        out = pipe.step(inputs, target)
        optimizer.step()
        if use_cuda:
            torch.cuda.synchronize()
        elapsed = (time.perf_counter() - t0) * 1e3
        step_ms.append(elapsed)
        if out is not None:
            loss = float(torch.stack([x.detach().float() for x in out]).mean())
            losses.append(loss)
            if not math.isfinite(loss):
                raise RuntimeError(f"loss is {loss} at step {step + 1}")
            rate = global_batch * tokens / (elapsed / 1e3)
            unit = "tokens/s" if tokens > 1 else "samples/s"
            _say(f"step {step + 1}/{cfg.steps}  loss {loss:.4f}  {rate:,.0f} {unit}  {elapsed:.0f} ms")
        if cfg.checkpoint and (step + 1 == cfg.steps or (cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0)):
            _save(pipe, optimizer, cfg.checkpoint, step + 1, rank)
            dist.barrier()
            if rank == 0:
                mark_complete(cfg.checkpoint, step + 1, plan.num_stages)
            dist.barrier()
    _report(cfg, plan, pipe, loss_fn, device, step_ms, losses, global_batch, mb, tokens, rank, world, reporter,
            sample_shape)


def _holds_last(plan: Any, rank: int) -> bool:
    from autopart.run.stages import local_stages

    return plan.num_stages - 1 in local_stages(plan, rank)


def _initialise(stage: int, module: Any, seed: int) -> None:
    """Fresh weights for a stage materialised from the meta device: each submodule's own
    ``reset_parameters``, seeded per block so every run draws the same."""
    for i, name in enumerate(module.block_names):
        torch.manual_seed(seed * 7919 + stage * 131 + i)
        for sub in module.get_submodule(name).modules():
            reset = getattr(sub, "reset_parameters", None)
            if callable(reset):
                reset()


def _save(pipe: Any, optimizer: torch.optim.Optimizer, root: str, step: int, rank: int) -> None:
    from autopart.run.checkpoint import save_stage

    first = True
    for s, module in pipe.modules:
        extra = {"rank": rank, "local_stages": [x for x, _ in pipe.modules]}
        save_stage(root, step, s, module.state_dict(), optimizer.state_dict() if first else None, extra)
        first = False


def _resume(pipe: Any, optimizer: torch.optim.Optimizer, stages: list[dict[str, Any]], reporter: bool) -> None:
    merged: dict[str, torch.Tensor] = {}
    for stage in stages:
        for k, v in stage["model"].items():
            merged.setdefault(k, v)
    for s, module in pipe.modules:
        wanted = module.state_dict().keys()
        missing = [k for k in wanted if k not in merged]
        if missing:
            raise AutopartError(f"checkpoint lacks {missing[0]} (and {len(missing) - 1} more) for stage {s}")
        module.load_state_dict({k: merged[k] for k in wanted})
    ours = [s for s, _ in pipe.modules]
    first = stages[ours[0]] if ours[0] < len(stages) else {}
    if first.get("local_stages") == ours and first.get("optimizer") is not None and len(stages) == pipe.plan.num_stages:
        optimizer.load_state_dict(first["optimizer"])
    elif reporter:
        _say("warning: the plan changed since the checkpoint; weights restored, optimizer state starts fresh")


def _report(cfg: TrainConfig, plan: Any, pipe: Any, loss_fn: Any, device: torch.device, step_ms: list[float],
            losses: list[float], global_batch: int, mb: int, tokens: int, rank: int, world: int, reporter: bool,
            sample_shape: tuple[int, ...]) -> None:
    """Measure each local stage on a real micro-batch, gather, and print measured against predicted."""
    from autopart.formats.plan import simulate_plan
    from autopart.measure.profiler import time_block

    measured: dict[int, tuple[float, float]] = {}
    for s, module in pipe.modules:
        captured = pipe.captured.get(s)
        if captured is None:
            continue
        loss = None
        if s == plan.num_stages - 1 and pipe.last_target is not None:
            target = pipe.last_target
            loss = lambda out, t=target: loss_fn(out, t)  # noqa: E731
        measured[s] = time_block(module, captured, device, warmup=1, repeats=3, loss=loss)
    profiles: list[Any] = []
    if cfg.replan:
        profiles = _reprofile(pipe, loss_fn, device)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, {"rank": rank, "measured": measured, "step_ms": step_ms, "profiles": profiles})
    if not reporter:
        return
    stage_ms = {s: v for item in gathered for s, v in item["measured"].items()}
    steady = step_ms[max(1, math.ceil(len(step_ms) / 4)):] if len(step_ms) > 1 else step_ms  # skip warm-up steps
    measured_step = statistics.median(steady) if steady else float("nan")
    same_size = plan.microbatch_size in (None, mb)
    rows = []
    for s, st in enumerate(plan.stages):
        f, b = stage_ms.get(s, (float("nan"), float("nan")))
        predicted = st.forward_ms + st.backward_ms
        rows.append({"stage": s, "blocks": len(st.blocks), "predicted_compute_ms": predicted if same_size else None,
                     "measured_compute_ms": f + b, "measured_forward_ms": f, "measured_backward_ms": b,
                     "error": (f + b) / predicted - 1 if same_size and predicted > 0 else None})
    # the same schedule replayed with the measured stage times
    replay = [dataclasses.replace(st, forward_ms=stage_ms[s][0], backward_ms=stage_ms[s][1]) if s in stage_ms else st
              for s, st in enumerate(plan.stages)]
    replayed = simulate_plan(dataclasses.replace(plan, stages=tuple(replay)), microbatches=plan.microbatches)
    predicted_step = plan.predicted.step_ms if same_size else None
    report = {
        "plan": cfg.plan, "model": cfg.model, "schedule": plan.schedule, "microbatches": plan.microbatches,
        "microbatch_size": mb, "global_batch": global_batch, "ranks": world, "steps": len(step_ms),
        "losses": losses, "step_ms": step_ms, "measured_step_ms": measured_step,
        "predicted_step_ms": predicted_step, "predicted_bubble_fraction": plan.predicted.bubble_fraction,
        "step_error": measured_step / predicted_step - 1 if predicted_step else None,
        "simulated_with_measured_stages_ms": replayed.step_ms,
        "throughput_per_s": global_batch * tokens / (measured_step / 1e3) if measured_step > 0 else None,
        "throughput_unit": "tokens" if tokens > 1 else "samples", "stages": rows,
    }
    _print_report(report, plan, same_size)
    if cfg.report:
        from autopart.formats.atomic import write_json_atomic

        write_json_atomic(cfg.report, json.loads(json.dumps(report, default=float)))
    if cfg.replan:
        _suggest(cfg, plan, [p for item in gathered for p in item["profiles"]], mb, report)


def _print_report(report: dict[str, Any], plan: Any, same_size: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    from autopart.formats.units import format_ms

    console = Console(stderr=True)
    if not console.is_terminal:
        console = Console(stderr=True, width=120)
    table = Table(title="compute per micro-batch", title_justify="left")
    for col in ("stage", "blocks", "predicted", "measured", "error"):
        table.add_column(col, justify="right")
    for row in report["stages"]:
        pred = row["predicted_compute_ms"]
        err = row["error"]
        table.add_row(str(row["stage"]), str(row["blocks"]), format_ms(pred) if pred is not None else "-",
                      format_ms(row["measured_compute_ms"]), f"{err:+.1%}" if err is not None else "-")
    console.print(table)
    pred = report["predicted_step_ms"]
    line = f"step: measured {format_ms(report['measured_step_ms'])}"
    if pred is not None:
        line += f", predicted {format_ms(pred)} (error {report['step_error']:+.1%}, bubble " \
                f"{report['predicted_bubble_fraction']:.1%})"
    else:
        line += f" (the plan is for micro-batches of {plan.microbatch_size}, this run used {report['microbatch_size']})"
    line += f"; simulated with the measured stage times {format_ms(report['simulated_with_measured_stages_ms'])}"
    console.print(line, highlight=False, soft_wrap=True)
    if report["throughput_per_s"]:
        console.print(f"throughput {report['throughput_per_s']:,.0f} {report['throughput_unit']}/s", highlight=False)


def _reprofile(pipe: Any, loss_fn: Any, device: torch.device) -> list[Any]:
    """Per-block profiles of this rank's stages, measured on the real micro-batch they received."""
    from collections import OrderedDict

    from autopart.measure.profiler import profile_model

    out = []
    for s, module in pipe.modules:
        captured = pipe.captured.get(s)
        if captured is None:
            continue
        names = module.block_names
        seq = nn.Sequential(OrderedDict((f"b{i}", module.get_submodule(n)) for i, n in enumerate(names)))
        last = s == pipe.plan.num_stages - 1
        prof = profile_model(seq, captured, name="stage", warmup=1, repeats=3,
                             loss_fn=loss_fn if last else None, target=pipe.last_target if last else None)
        out.append((s, [dataclasses.replace(layer, name=names[i]) for i, layer in enumerate(prof.layers)],
                    prof.device, prof.dtype))
    return out


def _suggest(cfg: TrainConfig, plan: Any, stage_profiles: list[Any], mb: int, report: dict[str, Any]) -> None:
    from autopart.formats.devices import Device
    from autopart.formats.profile import Profile
    from autopart.core.search import Settings, plan_search
    from autopart.formats.units import format_ms

    stage_profiles.sort(key=lambda item: item[0])
    layers = tuple(layer for _, ls, _, _ in stage_profiles for layer in ls)
    profile = Profile(model=cfg.model, device=stage_profiles[0][2], dtype=stage_profiles[0][3], microbatch_size=mb,
                      sample_shape=tuple(plan.sample_shape) or (mb,), torch=torch.__version__.split("+")[0],
                      layers=layers, loss_in_last_block=True)
    devices = [Device(name=plan.stages[s].device, memory_bytes=plan.stages[s].memory_limit_bytes,
                      speed=plan.stages[s].speed) for s in range(plan.num_ranks)]
    settings = Settings(optimizer_states=plan.optimizer_states,
                        bandwidth_bytes_per_ms=plan.bandwidth_bytes_per_s / 1e3 if plan.bandwidth_bytes_per_s else None,
                        latency_ms=plan.latency_ms)
    per_rank = plan.stages_per_rank
    new = plan_search(profile, devices, settings, microbatches=plan.microbatches,
                      schedules=[(plan.schedule, per_rank)], profile_path="(re-profiled during training)")
    assert cfg.replan is not None
    new.to_json(cfg.replan)
    _say(f"replan: measured blocks suggest balance {list(new.balance)} (now {list(plan.balance)}), predicted step "
         f"{format_ms(new.predicted.step_ms)} against {format_ms(report['measured_step_ms'])} measured; "
         f"wrote {cfg.replan}")

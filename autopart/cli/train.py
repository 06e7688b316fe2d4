"""``autopart train``: run a plan with torch.distributed.pipelining, on this machine or under torchrun."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path

from autopart.cli.common import Subcommands, path_arg, unused_loss_note
from autopart.errors import AutopartError
from autopart.formats.plan import Plan
from autopart.formats.precision import PRECISIONS
from autopart.run.config import TrainConfig

__all__: list[str] = []

MAX_TIMEOUT_S = 1e9
"""The longest --timeout: 31 years, well inside what ``datetime.timedelta`` and c10d's milliseconds hold."""

HELP = """Train MODEL split as PLAN says, one process per pipeline rank (of every
data-parallel replica the plan has: each replica takes its share of every
global batch, and the stages' gradients are averaged over the replicas), with PyTorch's
own pipelining runtime (gloo on CPU, NCCL on GPUs). Started plainly, autopart
launches the ranks on this machine through torchrun's API; started by torchrun
(torchrun --nnodes 2 --nproc-per-node 4 ... -m autopart train ...), it is one
of the ranks, so several machines use torchrun's own multi-node flags.

Built-in GPT models train as byte-level language models on --data (a file or
folder of text; default: the Python standard library's sources); an hf:PATH
model whose folder has a tokenizer.json reads the same text (or .jsonl
documents, field "text") as its own tokens; resnet-mini and mlp-hetero train
on scikit-learn's digits. At the end, a table compares each
stage's measured compute and the measured step with the plan's prediction."""


def add_parser(sub: Subcommands) -> None:
    p = sub.add_parser("train", help="train a plan with torch.distributed.pipelining", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  autopart train plan.json --model gpt2-tiny --steps 20\n"
                              "  torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 "
                              "-m autopart train plan.json --model gpt2-xl")
    p.add_argument("plan", metavar="PLAN", type=path_arg, help="plan JSON written by autopart partition")
    p.add_argument("--model", required=True, help="the model the plan was made for (built-in or factory spec)")
    p.add_argument("--steps", type=int, default=10, help="training steps (default: 10)")
    p.add_argument("--global-batch", type=int, metavar="N",
                   help="samples per step, every data-parallel replica's together (default: the plan's "
                   "micro-batch size x its micro-batches x its replicas)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate of the optimizer the plan names; 0 runs "
                   "the steps without changing the weights (default: 1e-3)")
    p.add_argument("--data", metavar="PATH", type=path_arg,
                   help="text file or folder for text models, .jsonl read as one document per line (field \"text\"; "
                        "default: Python's own sources)")
    p.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="every N steps and after the last, the loss on held-out data (the last 5%% of the text's "
                        "tokens, or of the digits; training then never draws from it), forward only, dropout off")
    p.add_argument("--eval-batches", type=int, metavar="K",
                   help="global batches of the held-out data each --eval-every runs (default: 2)")
    p.add_argument("--checkpoint", metavar="DIR", type=path_arg,
                   help="save stage checkpoints here and resume from the latest")
    p.add_argument("--checkpoint-every", type=int, default=0, metavar="N",
                   help="save every N steps (default: only at the end)")
    p.add_argument("--max-restarts", type=int, default=0, metavar="N",
                   help="when a rank dies, stop the others and start the whole group again, up to N times, resuming "
                        "from the last complete checkpoint (needs --checkpoint; default 0: stop with the error). "
                        "Under your own torchrun, pass torchrun's --max-restarts instead")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and data (default: 0)")
    p.add_argument("--threads", type=int, help="CPU threads per rank (default: the profile's, where the cores "
                   "allow, else cores / ranks; a different count than the profile's is said before training)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda:LOCAL_RANK with NCCL when CUDA is there, else CPU with gloo")
    p.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                   help="how long a rank waits for a peer before giving up (default: 300)")
    p.add_argument("--report", metavar="FILE", type=path_arg, help="write measured-against-predicted as JSON")
    p.add_argument("--trace", metavar="FILE", type=path_arg,
                   help="write the measured step (the median one) and the predicted one "
                   "as Chrome trace JSON (open in https://ui.perfetto.dev)")
    p.add_argument("--svg", metavar="FILE", type=path_arg,
                   help="write the predicted step above the measured one, same time axis, "
                   "as an SVG picture")
    p.add_argument("--replan", metavar="FILE", type=path_arg,
                   help="re-profile every block where it ran and write the plan "
                   "those measurements suggest")
    p.add_argument("--precision", choices=list(PRECISIONS),
                   help="the precision to train in; the plan's is what runs (its memory and times are for it), so "
                        "another is refused with the commands that re-plan for it (default: the plan's)")
    p.add_argument("--batchnorm", choices=("deferred", "micro"),
                   help="BatchNorm layers normalise each micro-batch on its own either way; deferred (the default, "
                        "or the plan's profile's choice) commits their running mean and variance once per step over "
                        "the whole mini-batch, as the unpartitioned model would; micro updates them once per "
                        "micro-batch (PyTorch's own BatchNorm)")
    p.add_argument("--weights", metavar="FILE|DIR", type=path_arg,
                   help="start from these weights: a safetensors file or folder (model.safetensors, or shards with "
                        "model.safetensors.index.json), a torch.save'd state dict, or an autopart checkpoint folder; "
                        "each rank reads only its stages' tensors (default: an hf:PATH model's folder, else the "
                        "model's own initialisation)")
    # Each rank builds only its own stages now, always (docs/train.md): the old flag is accepted and does nothing.
    p.add_argument("--meta-init", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(run=run)


def _config(args: argparse.Namespace) -> TrainConfig:
    for flag, value, low in (("--steps", args.steps, 1), ("--checkpoint-every", args.checkpoint_every, 0),
                             ("--eval-every", args.eval_every, 0),
                             ("--max-restarts", args.max_restarts, 0),
                             ("--threads", args.threads, 1), ("--global-batch", args.global_batch, 1)):
        if value is not None and value < low:
            raise AutopartError(f"{flag} must be >= {low}, got {value}")
    if args.eval_batches is not None and args.eval_batches < 1:
        raise AutopartError(f"--eval-batches must be >= 1, got {args.eval_batches}")
    if args.eval_batches is not None and not args.eval_every:
        raise AutopartError(f"--eval-batches {args.eval_batches} needs --eval-every N (how often to evaluate)")
    if args.max_restarts and not args.checkpoint:
        raise AutopartError(f"--max-restarts {args.max_restarts} needs --checkpoint DIR: a restarted group resumes "
                            f"from the last complete checkpoint")
    if not (math.isfinite(args.lr) and args.lr >= 0):  # 0: a legitimate check run, weights unchanged
        raise AutopartError(f"--lr must be a finite number >= 0, got {args.lr:g}")
    if not 0 < args.timeout <= MAX_TIMEOUT_S:  # also refuses nan; inf and more overflow torch's timedelta
        raise AutopartError(f"--timeout must be > 0 seconds (and at most 1e9), got {args.timeout:g}")
    return TrainConfig(plan=args.plan, model=args.model, steps=args.steps, global_batch=args.global_batch,
                       lr=args.lr, data=args.data, checkpoint=args.checkpoint, checkpoint_every=args.checkpoint_every,
                       seed=args.seed, threads=args.threads, report=args.report, replan=args.replan,
                       trace=args.trace, svg=args.svg,
                       device=args.device, timeout_s=args.timeout,
                       batchnorm=args.batchnorm, max_restarts=args.max_restarts, eval_every=args.eval_every,
                       eval_batches=args.eval_batches or 2,
                       weights=args.weights or _folder_weights(args.model))


def _folder_weights(model: str) -> str | None:
    """The weights an ``hf:PATH`` model implies: its folder's when it holds ``model.safetensors`` (or shards with
    ``model.safetensors.index.json``); else none: the model's own initialisation (:func:`_no_weights_note`)."""
    from autopart.measure.hf import hf_folder
    from autopart.run.weights import folder_has_safetensors

    folder = hf_folder(model)
    return str(folder) if folder is not None and folder_has_safetensors(folder) else None


def _no_weights_note(model: str) -> str | None:
    """The note for an ``hf:PATH`` folder without safetensors weights (a config, perhaps a tokenizer): training
    starts from the model's own initialisation; it names ``pytorch_model.bin`` when the folder has one."""
    from autopart.measure.hf import hf_folder

    folder = hf_folder(model)
    if folder is None or _folder_weights(model) is not None:
        return None
    legacy = folder / "pytorch_model.bin"
    hint = (f"give --weights {legacy} to start from its pytorch_model.bin" if legacy.is_file()
            else "give --weights FILE to start from weights")
    return (f"note: {model} holds no model.safetensors: training starts from the model's own initialisation "
            f"({hint})")


def check_plan_precision(plan: Plan, path: str, asked: str, model: str) -> None:
    """Refuse ``--precision asked`` for a plan made under another: its memory and times are for its own, and
    ``train`` runs the plan's. The error gives the commands that make a plan for ``asked``."""
    if asked != plan.precision:
        profile = f"{Path(plan.profile).stem if plan.profile else 'profile'}-{asked}.json"
        raise AutopartError(f"--precision {asked}, but plan {path!r} was made for {plan.precision} (its memory and "
                            f"times are for that, and train runs it): re-plan with `autopart profile {model} "
                            f"--precision {asked} -o {profile}` then `autopart partition {profile} ...`, or leave "
                            f"out --precision")


def _worker_args(cfg: TrainConfig) -> list[str]:
    out = [cfg.plan, "--model", cfg.model, "--steps", str(cfg.steps), "--lr", repr(cfg.lr), "--seed", str(cfg.seed),
           "--device", cfg.device, "--timeout", repr(cfg.timeout_s), "--checkpoint-every", str(cfg.checkpoint_every),
           "--eval-every", str(cfg.eval_every)]
    if cfg.eval_every:
        out += ["--eval-batches", str(cfg.eval_batches)]
    for flag, value in (("--global-batch", cfg.global_batch), ("--data", cfg.data), ("--checkpoint", cfg.checkpoint),
                        ("--threads", cfg.threads), ("--report", cfg.report), ("--replan", cfg.replan),
                        ("--trace", cfg.trace), ("--svg", cfg.svg), ("--batchnorm", cfg.batchnorm),
                        ("--weights", cfg.weights)):
        if value is not None:
            out += [flag, str(value)]
    return out


def run(args: argparse.Namespace) -> int:
    from autopart.run.launch import inside_torchrun

    cfg = _config(args)
    if args.precision is not None:  # under torchrun too: every rank runs the plan's precision
        check_plan_precision(Plan.from_json(cfg.plan), cfg.plan, args.precision, cfg.model)
    if inside_torchrun():
        if cfg.max_restarts:
            raise AutopartError("--max-restarts is for autopart's own launcher; under torchrun, pass torchrun's "
                                "--max-restarts (the ranks resume from --checkpoint either way)")
        from autopart.run.worker import worker_main

        return worker_main(cfg)
    # Check everything we can before starting any process: one line and exit 2 for bad input.
    no_weights = None if args.weights else _no_weights_note(cfg.model)
    if no_weights:
        sys.stderr.write(no_weights + "\n")
    import torch

    from autopart.core.planner import simulate_plan
    from autopart.formats.atomic import check_writable
    from autopart.measure.blocks import split_blocks
    from autopart.measure.empty import on_meta_device
    from autopart.measure.spec import load_model, require_parameters
    from autopart.run.data import TEXT_KINDS, text_corpus, training_data
    from autopart.run.microbatch import microbatch_shape
    from autopart.run.stages import check_evaluable, check_plan_against_model

    plan = Plan.from_json(cfg.plan)
    simulate_plan(plan)  # what simulate checks: a schedule the plan's ranks and micro-batches can run
    _check_microbatch_size(cfg, plan)
    for path in (cfg.report, cfg.replan, cfg.trace, cfg.svg):
        if path:
            check_writable(path)
    if cfg.checkpoint:
        _check_checkpoint(cfg.checkpoint)
        from autopart.run.resume import run_complete

        complete = run_complete(cfg.checkpoint, cfg.steps)
        if complete:  # a rerun of a finished job: no rank needs to start
            sys.stderr.write(f"autopart train: {complete}\n")
            return 0
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise AutopartError("--device cuda asked for, but CUDA is not available on this machine")
    if cfg.device != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() < plan.world_size:
        raise AutopartError(f"the plan needs {plan.world_size} GPUs, this machine has {torch.cuda.device_count()}")
    try:
        with on_meta_device():  # names and shapes; a factory's .to("cpu") / .cuda() stays on meta
            bundle = load_model(cfg.model)
    except AutopartError:  # a factory that cannot run on meta (it reads a weight): as the ranks, build it whole
        from autopart.measure.stream import load_with_weights

        bundle = load_with_weights(cfg.model)  # a bad spec fails here as it is
    require_parameters(bundle)
    note = unused_loss_note(bundle)
    if note:
        sys.stderr.write(note)
    if cfg.weights:  # the names and shapes, on the meta device: every rank checks them again, and reads its own
        from autopart.run.weights import check_keys, model_names, open_weights, tie_note

        source, names = open_weights(cfg.weights), model_names(bundle.module)
        check_keys(source, names, cfg.model)
        differ = tie_note(source, names)
        if differ:
            sys.stderr.write(differ + "\n")
    if isinstance(bundle.module, torch.nn.Sequential):  # cheap on the meta device; other models: the ranks check
        check_plan_against_model(plan, [name for name, _ in split_blocks(bundle.module)], plan.world_size, cfg.model)
    if bundle.data is None and bundle.data_kind in TEXT_KINDS:
        # fail now, not in every rank: a missing or empty corpus, a bad line, a token the model has no row for; and
        # tokenize here, once, into the token cache that every rank then maps (run/token_cache.py)
        corpus = text_corpus(bundle, cfg.data)
        if corpus.unit == "tokens":
            sys.stderr.write(f"tokens: {corpus.source}\n")
        del corpus  # the launcher holds no text while the ranks train
    if cfg.eval_every:  # the same, and a held-out split that holds --eval-batches (or data that has none)
        check_evaluable(plan)
        per_mb, sample_shape = microbatch_shape(plan, bundle)
        training_data(bundle, cfg.data, cfg.global_batch or per_mb * plan.microbatches * plan.data_parallel,
                      sample_shape, cfg.seed, 0,
                      cfg.eval_batches)
    threads, repriced = _threads(cfg, plan)
    if cfg.max_restarts and not cfg.checkpoint_every:
        sys.stderr.write(f"note: --max-restarts without --checkpoint-every saves only after step {cfg.steps}, so a "
                         f"restart starts over\n")
    return _launch_and_report(dataclasses.replace(cfg, threads=threads), plan, repriced)


def _launch_and_report(cfg: TrainConfig, plan: Plan, repriced: Plan | None) -> int:
    """Launch the ranks; print the report the reporting rank hands over (a file in a private folder) when the
    job succeeds. ``repriced``: the plan at the ranks' threads, which they run and report against instead (from a
    file in that folder; the report names ``cfg.plan``)."""
    import tempfile

    from autopart.run.launch import launch
    from autopart.run.report import REPORT_HANDOFF_ENV, print_report, read_handed_report, write_report

    assert cfg.threads is not None
    with tempfile.TemporaryDirectory(prefix="autopart-train-") as folder:
        path = os.path.join(folder, "report.json")
        run_cfg = cfg
        if repriced is not None:
            run_cfg = dataclasses.replace(cfg, plan=str(repriced.to_json(os.path.join(folder, "plan.json"))))
        before = os.environ.get(REPORT_HANDOFF_ENV)
        os.environ[REPORT_HANDOFF_ENV] = path  # the ranks inherit it
        try:
            code = launch(_worker_args(run_cfg), plan.world_size, cfg.threads, cfg.max_restarts)  # every replica's
        finally:
            if before is None:
                os.environ.pop(REPORT_HANDOFF_ENV, None)
            else:
                os.environ[REPORT_HANDOFF_ENV] = before
        report = read_handed_report(path) if code == 0 else None
    if report is not None:
        if repriced is not None:  # the ranks read the re-priced copy; the report is of the user's plan
            report = dataclasses.replace(report, plan=cfg.plan)
            if cfg.report:
                write_report(report, cfg.report)
        print_report(report, plan.microbatch_size)
    return code


def _check_checkpoint(folder: str) -> None:
    """``--checkpoint``: a folder autopart can create and write in, and whose latest complete step (the one
    the ranks would resume from) has stage files that can be read; checked before any rank starts."""
    from autopart.formats.atomic import check_writable
    from autopart.run.checkpoint import latest_complete, load_stages, remove_stale_temporaries

    path = Path(folder)
    if path.exists() and not path.is_dir():
        raise AutopartError(f"--checkpoint {folder!r} is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AutopartError(f"--checkpoint {folder!r}: cannot create the folder: {exc.strerror or exc}") from None
    try:
        check_writable(path / "COMPLETE")
    except AutopartError as exc:
        raise AutopartError(f"--checkpoint {folder!r}: {exc}") from None
    remove_stale_temporaries(path)  # of writers killed mid-write, before any rank writes again
    saved = latest_complete(path)
    if saved is not None:
        load_stages(saved, mmap=True)  # reads each file's index, maps the tensors: cheap at any size


def _check_microbatch_size(cfg: TrainConfig, plan: Plan) -> None:
    """``--global-batch`` that changes the plan's micro-batch size: refused with the commands that re-plan, or
    (the profile measured that size) the new peaks said before any rank starts (:mod:`autopart.run.microbatch`)."""
    from autopart.run.microbatch import plan_for_run

    note = plan_for_run(plan, cfg.plan, cfg.global_batch).note
    if note:
        sys.stderr.write(note + "\n")


def _threads(cfg: TrainConfig, plan: Plan) -> tuple[int, Plan | None]:
    """CPU threads per rank (:func:`autopart.run.resources.rank_threads`), and, when they are not the plan's, the
    plan re-priced at them from its profile (None: the same count, a GPU run, or a profile that cannot say:
    :func:`autopart.run.resources.plan_at_threads`); said when the prediction assumes another count than the
    ranks get."""
    from autopart.measure.profiler import cpu_cores
    from autopart.run.microbatch import profile_of_plan
    from autopart.run.resources import plan_at_threads, rank_threads, threads_note

    cores = cpu_cores()
    threads = rank_threads(cfg.threads, plan.threads, cores, plan.world_size)
    if cfg.device == "cuda" or threads == plan.threads or not plan.threads:
        return threads, None
    profile, where, found = profile_of_plan(plan, cfg.plan)
    why_not = "" if profile is not None or not plan.profile else f"profile {where}"
    try:
        repriced = plan_at_threads(plan, profile, threads) if profile is not None and _same_size(cfg, plan) else None
    except AutopartError as exc:  # the profile no longer fits the plan (re-profiled since): a note, not a refusal
        repriced, why_not = None, f"profile {where}: {exc}"
    if repriced is not None:  # the ranks read the copy from another folder
        repriced = dataclasses.replace(repriced, profile=os.path.abspath(found))
    note = threads_note(plan, threads, cores, repriced, where, why_not)
    if note:
        sys.stderr.write(note + "\n")
    return threads, repriced


def _same_size(cfg: TrainConfig, plan: Plan) -> bool:
    """The run's micro-batches are the plan's size (``--global-batch`` keeps it, or is not given)."""
    from autopart.run.microbatch import replica_batch

    if cfg.global_batch is None or plan.microbatch_size is None:
        return True
    return plan.microbatch_size_for(replica_batch(plan, cfg.global_batch)) == plan.microbatch_size

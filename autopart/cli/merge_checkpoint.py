"""``autopart merge-checkpoint``: the trained model from a run's stage files, as one state_dict or a model folder."""
from __future__ import annotations

import argparse

from autopart.cli.common import Subcommands, path_arg

__all__: list[str] = []


def add_parser(sub: Subcommands) -> None:
    p = sub.add_parser("merge-checkpoint",
                       help="merge a run's per-stage checkpoint into one state_dict or model folder",
                       description="Merge the per-stage files of the latest complete checkpoint under DIR (or of "
                                   "one step-NNNNNN folder) into the unpartitioned model's weights: --format pt "
                                   "(default) one state_dict file, model.load_state_dict(torch.load(FILE)); "
                                   "--format safetensors a folder that transformers' from_pretrained(OUT) loads "
                                   "for an hf: model (config.json, model.safetensors or one shard per stage with "
                                   "its index, and hf:PATH's tokenizer files), and safetensors or --weights OUT "
                                   "reads for any model. The stage files are mapped, not read whole.")
    p.add_argument("checkpoint", metavar="DIR", type=path_arg, help="the --checkpoint folder of autopart train")
    p.add_argument("-o", "--output", required=True, metavar="OUT", type=path_arg,
                   help="where to write: a file for pt, a folder for safetensors (atomically, whole or not at all)")
    p.add_argument("--format", choices=("pt", "safetensors"), default="pt",
                   help="pt: one torch.save'd state_dict with every name (default); safetensors: a model folder")
    p.add_argument("--config", metavar="FILE|hf:SPEC|none", type=path_arg, default=None,
                   help="safetensors: the model's config when the checkpoint does not record its model (older "
                        "autopart), or to override it: a config.json, an hf: spec, or none (weights alone)")
    p.add_argument("--force", action="store_true",
                   help="safetensors: replace an OUT folder that exists and is not empty")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autopart.errors import AutopartError

    if args.format == "pt" and (args.config is not None or args.force):
        raise AutopartError(f"{'--config' if args.config is not None else '--force'} is for --format safetensors "
                            f"(--format pt writes the file -o names, replacing it)")
    return _pt(args) if args.format == "pt" else _safetensors(args)


def _pt(args: argparse.Namespace) -> int:
    import torch

    from autopart.formats.atomic import check_writable, write_atomic
    from autopart.formats.units import format_bytes, plural
    from autopart.run.checkpoint import read_checkpoint

    check_writable(args.output)
    ckpt = read_checkpoint(args.checkpoint, mmap=True)
    state = ckpt.state
    write_atomic(args.output, lambda handle: torch.save(state, handle))  # streamed from the stage files' maps
    unique = {id(t): t for t in state.values()}.values()
    total = sum(t.numel() * t.element_size() for t in unique)
    dtypes = ", ".join(sorted({str(t.dtype).removeprefix("torch.") for t in unique}))
    print(f"wrote {args.output}: {plural(len(state), 'tensor')}, {format_bytes(total)} {dtypes} "
          f"(step {ckpt.meta['step']})")
    return 0


def _safetensors(args: argparse.Namespace) -> int:
    from autopart.formats.atomic import check_folder_writable
    from autopart.formats.units import format_bytes, plural
    from autopart.run.checkpoint import read_checkpoint
    from autopart.run.export import model_source, write_safetensors

    check_folder_writable(args.output, replace=args.force)
    ckpt = read_checkpoint(args.checkpoint, mmap=True)
    source = model_source(ckpt, args.config)
    done = write_safetensors(ckpt, args.output, source, replace=args.force)
    beside = f"; {', '.join(done.copied)}" if done.copied else "; weights only, no config.json"
    tied = "".join(f"; {name} tied to {kept}, left out" for name, kept in sorted(done.left_out.items())[:3])
    if len(done.left_out) > 3:
        tied += f" (and {len(done.left_out) - 3} more tied names)"
    print(f"wrote {args.output}: {plural(done.shards, 'shard')}, {plural(done.tensors, 'tensor')}, "
          f"{format_bytes(done.size_bytes)} {', '.join(done.dtypes)} (step {ckpt.meta['step']}){beside}{tied}")
    return 0

"""``autopart merge-checkpoint``: one state_dict with the original names, from a run's stage files."""
from __future__ import annotations

import argparse
import io

from autopart.cli.common import Subcommands, path_arg

__all__: list[str] = []


def add_parser(sub: Subcommands) -> None:
    p = sub.add_parser("merge-checkpoint", help="merge a run's per-stage checkpoint into one state_dict",
                       description="Merge the per-stage files of the latest complete checkpoint under DIR (or of "
                                   "one step-NNNNNN folder) into a single state_dict file with the unpartitioned "
                                   "model's names: model.load_state_dict(torch.load(FILE)).")
    p.add_argument("checkpoint", metavar="DIR", type=path_arg, help="the --checkpoint folder of autopart train")
    p.add_argument("-o", "--output", required=True, metavar="FILE", type=path_arg,
                   help="where to write the state_dict (atomically)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from autopart.formats.atomic import check_writable, write_atomic
    from autopart.formats.units import plural
    from autopart.run.checkpoint import merge_checkpoint

    check_writable(args.output)
    state = merge_checkpoint(args.checkpoint)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(args.output, lambda handle: handle.write(buffer.getvalue()))
    total = sum(t.numel() * t.element_size() for t in state.values())
    print(f"wrote {args.output}: {plural(len(state), 'tensor')}, {total / 2**20:.1f} MiB")
    return 0

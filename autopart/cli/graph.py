"""``autopart graph``: the blocks autopart cuts a model into, and the bytes that cross each cut."""
from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from autopart.cli.common import Subcommands

if TYPE_CHECKING:
    from autopart.measure.blocks import Chain

__all__: list[str] = []

HELP = """Show how MODEL is cut into blocks, the units pipeline stages are made of
(built as profile builds it: whole, and run once on the input to check it,
when its weights fit in half the memory available, else on the meta device,
so any size works): the children of an nn.Sequential (or of a module whose
children run in order), or else its torch.export graph cut at module
boundaries. For every cut between two blocks, the bytes that would cross it
for one micro-batch: the main path (what the block before made) and the skips
(values made earlier, or model inputs, that a later block needs). Nothing is
timed; see autopart profile. For hf:NAME:FIELD=VALUE,... the first line says
which config fields were given and which the config class derived from them
(head_dim from hidden_size and num_attention_heads ...)."""


def add_parser(sub: Subcommands) -> None:
    p = sub.add_parser("graph", help="show a model's blocks and what crosses each cut", description=HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="examples:\n  autopart graph my_unet.py:make\n  autopart graph hf:gpt2:n_layer=4 --json")
    p.add_argument("model", metavar="MODEL", help="built-in name, hf:NAME, pkg.mod:factory or file.py:factory")
    p.add_argument("--microbatch-size", type=int, metavar="B", help="rows in one micro-batch (default: the example's)")
    p.add_argument("--input-shape", metavar="SHAPE", help="shape of one micro-batch input, e.g. 8,1024")
    p.add_argument("--input-dtype", metavar="DTYPE", help="dtype of that input: long for token ids, float32 ...")
    p.add_argument("--json", action="store_true", help="print the blocks and cuts as JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from autopart.measure.graphview import GraphConfig, block_rows, build_chain
    from autopart.measure.hf import hf_fields, is_hf_spec
    from autopart.measure.spec import parse_shape

    config = GraphConfig(microbatch_size=args.microbatch_size,
                         input_shape=parse_shape(args.input_shape) if args.input_shape else None,
                         input_dtype=args.input_dtype or None)
    chain = build_chain(args.model, config)
    rows = block_rows(chain, args.model)
    fields = hf_fields(args.model) if is_hf_spec(args.model) else None
    if args.json:
        cuts = [{"after": after, "module": module, "bytes": size} for after, module, size in chain.cut_points()]
        shown: dict[str, Any] = {"model": args.model}
        if fields is not None:
            shown["fields"] = {"given": fields.given, "derived": fields.derived}
        print(json.dumps({**shown, "captured": chain.captured, "blocks": rows, "cut_points": cuts}, indent=2,
                         default=str))
        return 0
    _print(args.model, chain, rows, fields.describe(args.model) if fields is not None and fields.given else None)
    return 0


def _print(model: str, chain: Chain, rows: list[dict[str, Any]], fields: str | None) -> None:
    from rich.table import Table

    from autopart.cli.console import stdout_console
    from autopart.formats.units import format_bytes

    console = stdout_console(140)
    if fields is not None:
        console.print(fields, highlight=False, soft_wrap=True)
    console.print(f"{model}: {len(rows)} blocks, {chain.description}", highlight=False, soft_wrap=True)
    table = Table()
    captured = chain.captured
    columns = ["block", "params"] + (["ops"] if captured else []) + ["cut after: main", "skips", "skip values"]
    for col in columns:
        table.add_column(col, justify="left" if col in ("block", "skip values") else "right")
    for row in rows:
        params = format_bytes(row["param_bytes"]) + (" + tied" if row["tied"] else "")
        cells = [row["block"], params] + ([str(row["operations"])] if captured else [])
        if "main_bytes" in row:
            values = ", ".join(f"{s['value']} ({s['from']}, {format_bytes(s['bytes'])})" for s in row["skips"])
            cells += [format_bytes(row["main_bytes"]), format_bytes(row["skip_bytes"]) if row["skips"] else "-",
                      values]
        else:
            cells += ["(output)", "", ""]
        table.add_row(*cells)
    console.print(table)
    if chain.recomputed():
        console.print(f"{len(chain.recomputed())} values computed from the inputs alone (masks, positions) are "
                      f"recomputed on each stage instead of sent", highlight=False)

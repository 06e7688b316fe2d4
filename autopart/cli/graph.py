"""``autopart graph``: the blocks autopart cuts a model into, and the bytes that cross each cut."""
from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from autopart.cli.common import Subcommands
from autopart.errors import AutopartError

if TYPE_CHECKING:
    from autopart.measure.blocks import Chain
    from autopart.measure.spec import ModelBundle

__all__: list[str] = []

HELP = """Show how MODEL is cut into blocks, the units pipeline stages are made of
(built as profile builds it: whole, and run once on the input to check it,
when its weights fit in half the memory available, else on the meta device,
so any size works): the children of an nn.Sequential (or of a module whose
children run in order), or else its torch.export graph cut at module
boundaries. For every cut between two blocks, the bytes that would cross it
for one micro-batch: the main path (what the block before made) and the skips
(values made earlier, or model inputs, that a later block needs). Nothing is
timed; see autopart profile."""


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
    import torch

    from autopart.measure.api import meta_build
    from autopart.measure.blocks import chain_of
    from autopart.measure.spec import parse_dtype, parse_shape, shape_example
    from autopart.measure.stream import load_with_weights, on_meta

    if args.microbatch_size is not None and args.microbatch_size < 1:
        raise AutopartError(f"--microbatch-size must be >= 1, got {args.microbatch_size}")
    input_shape = parse_shape(args.input_shape) if args.input_shape else None
    input_dtype = parse_dtype(args.input_dtype) if args.input_dtype else None
    torch.manual_seed(0)
    # built as profile builds it: whole where it fits (one real forward then checks the input as profile's
    # does, and runs what the meta device cannot), else on the meta device
    bundle = meta_build(args.model, torch.float32, "auto", None)
    if bundle is None:
        torch.manual_seed(0)
        bundle = load_with_weights(args.model)
    meta = on_meta(bundle.module)
    example = tuple(t.to("meta") if meta else t
                    for t in shape_example(bundle, input_shape, input_dtype, args.microbatch_size))
    if not meta:
        _check_runs(bundle, example)
    chain = chain_of(bundle.module, example, args.model, bundle.input_names)
    rows = _rows(chain, args.model)
    if args.json:
        cuts = [{"after": after, "module": module, "bytes": size} for after, module, size in chain.cut_points()]
        print(json.dumps({"model": args.model, "captured": chain.captured, "blocks": rows,
                          "cut_points": cuts}, indent=2))
        return 0
    _print(args.model, chain, rows)
    return 0


def _rows(chain: Chain, model: str) -> list[dict[str, Any]]:
    """One row per block: its parameters and operations, and what crosses the cut after it."""
    seen: set[int] = set()
    out = []
    boundaries = _crossings(chain, model)
    for i, (name, block) in enumerate(chain.blocks):
        params, tied = 0, []
        for pname, p in block.named_parameters(remove_duplicate=False):
            if id(p) not in seen:
                seen.add(id(p))
                params += p.numel() * p.element_size()
            else:
                tied.append(pname)
        row: dict[str, Any] = {"block": name, "param_bytes": params, "tied": tied}
        row.update(chain.block_facts(i))
        if i < len(boundaries):
            b = boundaries[i]
            row["main_bytes"], row["skip_bytes"] = b.main_bytes, b.skip_bytes
            row["skips"] = [{"value": c.name, "from": c.made_by, "bytes": c.bytes} for c in b.skips]
        out.append(row)
    return out


def _check_runs(bundle: ModelBundle, example: tuple[Any, ...]) -> None:
    """One forward of the model on (a copy of) ``example``, no gradients: an input it cannot take is the line
    profile gives."""
    import torch

    from autopart.measure.blocks import cannot_run
    from autopart.measure.spec import call_model

    modes = {m: m.training for m in bundle.module.modules()}
    try:
        bundle.module.eval()
        with torch.no_grad():
            call_model(bundle.module, [t.clone() for t in example], bundle.input_names)
    except Exception as exc:
        raise cannot_run(bundle.name, example, exc) from None
    finally:
        for m, training in modes.items():
            m.training = training


def _crossings(chain: Chain, model: str) -> list[Any]:
    """What crosses each cut; a block that fails (a chain of children runs its blocks to know) is the line
    profile gives, or on the meta device, that it cannot run there."""
    from autopart.measure.blocks import cannot_run
    from autopart.measure.stream import on_meta

    try:
        return chain.crossings()
    except Exception as exc:
        if not on_meta(chain.root):
            raise cannot_run(model, chain.example, exc) from None
        raise AutopartError(f"model {model!r} is built on the meta device (its weights need more than half the "
                            f"memory available), where its blocks cannot run: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from None


def _print(model: str, chain: Chain, rows: list[dict[str, Any]]) -> None:
    from rich.table import Table

    from autopart.cli.console import stdout_console
    from autopart.formats.units import format_bytes

    console = stdout_console(140)
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

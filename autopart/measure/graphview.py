"""``autopart graph``'s library side: a model spec built as profile builds it, cut into blocks, and what
crosses each cut. The CLI parses its flags into a :class:`GraphConfig`, calls :func:`build_chain` and
:func:`block_rows`, and prints."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from autopart.errors import AutopartError
from autopart.measure.api import meta_build
from autopart.measure.blocks import Chain, cannot_run, chain_of
from autopart.measure.spec import ModelBundle, call_model, parse_dtype, shape_example
from autopart.measure.stream import load_with_weights, on_meta

__all__ = ["GraphConfig", "block_rows", "build_chain"]


@dataclass(frozen=True)
class GraphConfig:
    """The input ``autopart graph`` cuts the model on: its flags, with its defaults."""

    microbatch_size: int | None = None
    """Rows in one micro-batch; None: the example's."""
    input_shape: tuple[int, ...] | None = None
    """Shape of one micro-batch input, for a factory that gives no example."""
    input_dtype: str | None = None
    """dtype of that input (``long`` for token ids ...); None: the example's, else float32."""

    def __post_init__(self) -> None:
        if self.microbatch_size is not None and self.microbatch_size < 1:
            raise AutopartError(f"--microbatch-size must be >= 1, got {self.microbatch_size}")
        if self.input_dtype:
            parse_dtype(self.input_dtype)  # checked now


def build_chain(spec: str, config: GraphConfig | None = None) -> Chain:
    """The model ``spec`` as a chain of blocks, built as profile builds it: whole where it fits (one real
    forward then checks the input as profile's does, and runs what the meta device cannot), else on the meta
    device."""
    config = config or GraphConfig()
    input_dtype = parse_dtype(config.input_dtype) if config.input_dtype else None
    torch.manual_seed(0)
    bundle = meta_build(spec, torch.float32, "auto", None)
    if bundle is None:
        torch.manual_seed(0)
        bundle = load_with_weights(spec)
    meta = on_meta(bundle.module)
    example = tuple(t.to("meta") if meta else t
                    for t in shape_example(bundle, config.input_shape, input_dtype, config.microbatch_size))
    if not meta:
        _check_runs(bundle, example)
    return chain_of(bundle.module, example, spec, bundle.input_names)


def block_rows(chain: Chain, model: str) -> list[dict[str, Any]]:
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
    try:
        return chain.crossings()
    except Exception as exc:
        if not on_meta(chain.root):
            raise cannot_run(model, chain.example, exc) from None
        raise AutopartError(f"model {model!r} is built on the meta device (its weights need more than half the "
                            f"memory available), where its blocks cannot run: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}") from None

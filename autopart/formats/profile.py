"""The profile: what one model costs, block by block (``schema: "autopart.profile/1"``).

Pure data: no torch import, so the partitioner and the simulator can read
profiles in milliseconds. The measuring lives in :mod:`autopart.measure.profiler`.
Reading refuses numbers no device can have, which only a damaged or edited
file holds: a block's time (or the runtime's ``action_ms``) above 1e9 ms
(11.6 days) or a size above 2**50 bytes (1 PiB), naming the block and the value.
"""
from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autopart.errors import AutopartError
from autopart.formats.atomic import write_json_atomic
from autopart.formats.jsonfields import Fields, check_plausible, load_json_file
from autopart.formats.precision import DEFAULT_PRECISION, check_precision, precision_of_old_file
from autopart.formats.record import read_record, saved, write_record
from autopart.formats.units import plural
from autopart.formats.version import check_version

__all__ = ["PROFILE_SCHEMA", "PROFILE_FEATURES", "BATCHNORM_MODES", "LayerProfile", "Profile", "Tie"]

PROFILE_SCHEMA = "autopart.profile/1"
PROFILE_FEATURES: frozenset[str] = frozenset({"precision", "split_backward"})
"""Features (:mod:`autopart.formats.version`) this autopart reads in a profile's ``features``: ``precision``,
which a profile measured under another precision than fp32 lists (an older autopart would plan it, and
train the plan, in float32); ``split_backward``, which a profile with ``weight_grad_ms`` lists (an older
autopart would take W as the rest of the backward, short of what torch's halves take)."""


@dataclass(frozen=True)
class LayerProfile:
    """Costs of one block for one micro-batch."""

    name: str
    """Module name of the block (``"h.3"``), as ``named_modules`` spells it."""
    forward_ms: float
    """Median time of one forward pass of one micro-batch."""
    backward_ms: float
    """Median time of one backward pass (input and weight gradients)."""
    param_bytes: int
    """Bytes of the block's parameters; a tied weight counts in its first block only."""
    activation_bytes: int
    """Bytes autograd keeps alive for backward (parameters excluded), each storage
    charged to the first block that saves it."""
    output_bytes: int
    """Bytes of the block's output (the main path): what crosses a stage boundary after it, besides skips."""
    forward_iqr_ms: float = 0.0
    """Spread of the forward timings: interquartile range."""
    backward_iqr_ms: float = 0.0
    """Spread of the backward timings: interquartile range."""
    input_grad_ms: float | None = field(default=None, metadata=saved(omit=(None,)))
    """Median time of the backward for the input's gradient alone: what a zero-bubble schedule's ``I``
    action runs (torch.distributed.pipelining's ``stage_backward_input``, in profiles with ``weight_grad_ms``).
    0 when the input needs no gradient; None in profiles from before it was measured (the simulator then
    assumes half of ``backward_ms``)."""
    weight_grad_ms: float | None = field(default=None, metadata=saved(omit=(None,)))
    """Median time of the weights' gradients after ``input_grad_ms``: a zero-bubble schedule's ``W`` action
    (``stage_backward_weight``). The two halves together take longer than ``backward_ms`` (torch walks the
    graph in Python between them: 1.3-1.5x on this project's CPU blocks). None in profiles from before it was
    measured (the simulator then takes the rest of ``backward_ms``)."""
    buffer_bytes: int = 0
    """Bytes of buffers (BatchNorm running statistics and the like)."""
    cuda_peak_bytes: int | None = field(default=None, metadata=saved(omit=(None,)))
    """CUDA only: the allocator's peak above the block's inputs and weights during
    its forward and backward."""
    optimizer_ms: float = 0.0
    """One AdamW step over the block's parameters, with zeroing their gradients:
    paid once per training step, not per micro-batch."""
    optimizer_ms_by_name: tuple[tuple[str, float], ...] = field(default=(), metadata=saved(omit=((),)))
    """The same for every optimizer a plan can name (adamw, adam, sgd-momentum, sgd), written as a JSON
    object; empty in profiles from before they were timed (AdamW's time then stands for all)."""
    loss_activation_bytes: int | None = field(default=None, metadata=saved(omit=(None,)))
    """Last block only, when the profile includes the loss: the part of ``activation_bytes`` the loss saves
    (cross-entropy: its log-softmax). The loss runs outside a recomputed stage, so a recomputing last stage
    still holds it per in-flight micro-batch. None: not measured (older profiles; docs/cost-model.md)."""
    largest_param_bytes: int | None = field(default=None, metadata=saved(omit=(None,)))
    """Bytes of the largest parameter tensor the block uses (a tied one included, whichever block owns it):
    what one parameter's gradient holds while the backward makes it, before it is added into ``.grad``, and
    what a per-tensor optimizer step's temporaries scale with. None in profiles from before it was recorded
    (the planner then takes an upper bound: docs/cost-model.md, "Memory")."""
    output_saved_bytes: int | None = field(default=None, metadata=saved(omit=(None,)))
    """Bytes of the block's output storage that the block itself saved for its backward in the profile's
    connected forward (a block ending in ReLU saves its output), so charged to it in ``activation_bytes``
    and to no block after it: a stage ending here already holds its output there, and a stage starting
    after it holds its received input apart (docs/cost-model.md, "Memory"). None in profiles from before
    it was recorded (counted as 0)."""
    skip_bytes: int = field(default=0, metadata=saved(omit=(0,)))
    """Bytes of skips that also cross the boundary after the block: values made by earlier blocks (or
    model inputs) that a later block needs. A stage boundary here sends them too, and the stage after
    it holds them until the micro-batch's backward. 0 for a chain of children."""

    same_as: str = field(default="", metadata=saved(omit=("",)))
    """Not measured: identical to this earlier block (same operations, shapes and dtypes), whose numbers
    these are. Only profiles taken one block at a time (models too big to build) reuse measurements."""
    loss_forward_ms: float = field(default=0.0, metadata=saved(omit=(0.0,)))
    """Last block only: the loss function on the block's output, one micro-batch, timed alone (median). Part
    of ``forward_ms`` when the profile's ``loss_in_last_block``; 0: not measured (older profiles, no loss)."""
    loss_backward_ms: float = field(default=0.0, metadata=saved(omit=(0.0,)))
    """Last block only: the loss's backward to the block's output (median); part of ``backward_ms`` (and of
    ``input_grad_ms``) when the profile's ``loss_in_last_block``; 0: not measured."""

    def to_dict(self) -> dict[str, Any]:
        return write_record(self)

    @staticmethod
    def from_dict(obj: Any, where: str) -> "LayerProfile":
        layer = read_record(LayerProfile, Fields(obj, where))
        name = layer.name
        if not name:
            raise AutopartError(f"{where}.name is empty")
        check_plausible(f"{where} (block {name!r})",
                        [(k, v) for k, v in asdict(layer).items() if isinstance(v, (int, float))]
                        + [(f"{optimizer} optimizer_ms", ms) for optimizer, ms in layer.optimizer_ms_by_name])
        return layer


@dataclass(frozen=True)
class Tie:
    """A parameter shared by several blocks: counted once, in ``owner``."""

    params: tuple[str, ...]
    """Every fully qualified name the parameter has."""
    owner: str
    """The block whose ``param_bytes`` includes it: the first that uses it."""
    blocks: tuple[str, ...]
    """Every block that uses it."""
    bytes: int


BATCHNORM_MODES = ("deferred", "micro")
"""How BatchNorm keeps running statistics under micro-batches: "deferred", once per mini-batch
(:mod:`autopart.measure.batchnorm`), or "micro", PyTorch's own, once per micro-batch."""


@dataclass(frozen=True, kw_only=True)
class Profile:
    """One model at one micro-batch size on one device. The fields are in the file's order."""

    schema: str = PROFILE_SCHEMA
    features: tuple[str, ...] = field(default=(), metadata=saved(omit=((),)))
    """What a reader must understand to read the file (:mod:`autopart.formats.version`); written when not empty."""
    model: str
    device: str
    dtype: str
    """The parameters' dtype (float32 under a mixed precision)."""
    precision: str = field(default=DEFAULT_PRECISION, metadata=saved(omit=(DEFAULT_PRECISION,)))
    """The training precision measured under (:mod:`autopart.formats.precision`); written when not fp32. A file
    without it (from before precisions) reads as bf16-true when its ``dtype`` is bfloat16, fp16-mixed when
    float16, else fp32."""
    microbatch_size: int = field(metadata=saved(minimum=1))
    sample_shape: tuple[int, ...]
    torch: str = field(metadata=saved(absent="unknown"))
    threads: int | None = field(default=None, metadata=saved(minimum=1))
    """CPU threads torch used while measuring (the times depend on it)."""
    input_bytes: int = 0
    """Bytes of one micro-batch's input: what the first stage keeps per micro-batch
    when it recomputes its activations."""
    loss_in_last_block: bool = False
    """The last block's time and activations include computing the loss."""
    warmup: int = 0
    repeats: int = 0
    layers: tuple[LayerProfile, ...]
    by_microbatch_size: tuple[tuple[int, tuple[LayerProfile, ...]], ...] = field(default=(), metadata=saved(omit=((),)))
    """The same blocks measured at other micro-batch sizes (``--microbatch-size 1,2,4,8``), written as an
    object of size: layers."""
    cpu_cores: int | None = field(default=None, metadata=saved(minimum=1, omit=(None,)))
    """CPU cores the profiling process could use (``os.sched_getaffinity``): what ranks on this machine share.
    None: a GPU profile, or one from before it was recorded."""
    by_threads: tuple[tuple[int, tuple[LayerProfile, ...]], ...] = field(default=(), metadata=saved(omit=((),)))
    """The same blocks timed at other CPU thread counts (``--threads``; by default 1 besides all cores), at
    ``microbatch_size``, written as an object of threads: layers. Only the times differ from ``layers``
    (:meth:`Profile.at_threads` reads them)."""
    batchnorm: str | None = field(default=None, metadata=saved(omit=(None, "")))
    """How BatchNorm layers kept their running statistics while measured: "deferred" (once per mini-batch,
    :mod:`autopart.measure.batchnorm`) or "micro" (PyTorch's, per micro-batch); None: the model has none."""
    ties: tuple[Tie, ...] = field(default=(), metadata=saved(omit=((),)))
    action_ms: float = field(default=0.0, metadata=saved(omit=(0.0,)))
    """The pipelining runtime's own time per forward or backward action of a stage, beyond the stage's module
    (its input and output checks, detaching, ``stage_backward``'s bookkeeping): a tiny stage run by
    ``PipelineStage`` and a one-stage schedule, less the same module called directly, per action
    (:mod:`autopart.measure.runtime_cost`). 0: not measured (older profiles)."""

    def __post_init__(self) -> None:
        if not self.layers:
            raise AutopartError(f"profile of {self.model!r} has no layers")
        check_precision(self.precision, f"profile of {self.model!r}: precision")
        if self.precision != DEFAULT_PRECISION and "precision" not in self.features:
            object.__setattr__(self, "features", (*self.features, "precision"))
        if any(x.weight_grad_ms is not None for x in self.layers) and "split_backward" not in self.features:
            object.__setattr__(self, "features", (*self.features, "split_backward"))
        names = [layer.name for layer in self.layers]
        if len(set(names)) != len(names):
            dup = sorted({n for n in names if names.count(n) > 1})
            raise AutopartError(f"profile of {self.model!r} repeats block names {dup}")
        for size, layers in self.by_microbatch_size:
            if [x.name for x in layers] != names:
                raise AutopartError(f"profile of {self.model!r}: the blocks measured at micro-batch size {size} "
                                    f"are not the same as at {self.microbatch_size}")
        if self.by_threads and not self.threads:
            raise AutopartError(f"profile of {self.model!r} has by_threads but no threads (the main layers' count)")
        for threads, layers in self.by_threads:
            if [x.name for x in layers] != names:
                raise AutopartError(f"profile of {self.model!r}: the blocks timed at {plural(threads, 'thread')} "
                                    f"are not the same as at {self.threads}")
            if threads == self.threads:
                raise AutopartError(f"profile of {self.model!r}: by_threads repeats the main thread count {threads}")

    def sizes(self) -> dict[int, tuple[LayerProfile, ...]]:
        """Every measured micro-batch size and its layers, smallest first."""
        found = {self.microbatch_size: self.layers, **dict(self.by_microbatch_size)}
        return dict(sorted(found.items()))

    def thread_counts(self) -> dict[int, tuple[LayerProfile, ...]]:
        """Every thread count the blocks were timed at and its layers, fewest first; empty when the profile does
        not say (a GPU's, or one from before threads were recorded)."""
        found = {**({self.threads: self.layers} if self.threads else {}), **dict(self.by_threads)}
        return dict(sorted(found.items()))

    def at_threads(self, threads: int) -> "Profile":
        """This profile's blocks at ``threads`` CPU threads: a measured count's own times; between two measured
        counts, per block and per time, ``a + b / threads`` through the two nearest; beyond the measured range
        (or for a profile timed at one count), the nearest measured count's (:meth:`thread_counts` says the
        range). ``threads`` of the result is the count its times are for: ``threads`` when measured or between
        measured counts, else the nearest measured count (so a plan never records a count its times were not
        for); unchanged for a profile that records no count. Blocks at other micro-batch sizes
        (``by_microbatch_size``, timed at ``threads`` only) are scaled by the same per-block ratio as the main
        size's. Bytes are the same at any count. The result holds that count only (no ``by_threads``): its times
        are what a cost model reads."""
        if threads < 1:
            raise AutopartError(f"threads must be >= 1, got {threads}")
        counts = self.thread_counts()
        if not counts:
            return dataclasses.replace(self, by_threads=())
        threads = min(max(threads, min(counts)), max(counts))  # beyond the range: the nearest measured count
        if threads == self.threads:
            return dataclasses.replace(self, by_threads=())
        layers = tuple(_between(counts, threads, i) for i in range(len(self.layers)))
        sizes = tuple((size, tuple(_scaled(other, before, after) for other, before, after
                                   in zip(others, self.layers, layers)))
                      for size, others in self.by_microbatch_size)
        return dataclasses.replace(self, threads=threads, layers=layers, by_microbatch_size=sizes, by_threads=())

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    @property
    def param_bytes(self) -> int:
        return sum(layer.param_bytes for layer in self.layers)

    @property
    def step_ms(self) -> float:
        """Forward plus backward of the whole chain for one micro-batch."""
        return sum(layer.forward_ms + layer.backward_ms for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        return write_record(self, by_microbatch_size={str(size): [x.to_dict() for x in layers]
                                                      for size, layers in self.by_microbatch_size},
                            by_threads={str(threads): [x.to_dict() for x in layers]
                                        for threads, layers in self.by_threads})

    def to_json(self, path: str | Path) -> Path:
        """Write the profile to ``path`` atomically."""
        return write_json_atomic(path, self.to_dict())

    @staticmethod
    def from_dict(obj: Any, source: str = "profile") -> "Profile":
        """Validate and build; every problem is an :class:`AutopartError` naming the field."""
        f = Fields(obj, source)
        schema, features = check_version(f, PROFILE_SCHEMA, PROFILE_FEATURES)
        raw_layers = f.array("layers")
        if not raw_layers:
            raise AutopartError(f"{source}: 'layers' is empty")
        layers = tuple(LayerProfile.from_dict(item, f"{source}: layers[{i}]") for i, item in enumerate(raw_layers))
        ties = []
        for i, item in enumerate(f.array("ties", required=False)):
            ties.append(read_record(Tie, Fields(item, f"{source}: ties[{i}]")))
            check_plausible(f"{source}: ties[{i}]", [("tie_bytes", ties[-1].bytes)])
        check_plausible(source, [("input_bytes", f.integer("input_bytes", required=False, default=0)),
                                 ("action_ms", f.number("action_ms", required=False, default=0.0))])
        others = _layer_sets(f, "by_microbatch_size", "size", "a micro-batch size", len(layers))
        by_threads = _layer_sets(f, "by_threads", "threads", "a thread count", len(layers))
        dtype = f.string("dtype")
        precision = f.string("precision", required=False) or precision_of_old_file(dtype)
        check_precision(precision, f.at("precision"))
        return read_record(Profile, f, schema=schema, features=features, layers=layers, ties=tuple(ties),
                           by_microbatch_size=others, by_threads=by_threads, batchnorm=f.choice("batchnorm", BATCHNORM_MODES),
                           dtype=dtype, precision=precision)

    @staticmethod
    def from_json(path: str | Path) -> "Profile":
        """Read and validate a profile file."""
        return Profile.from_dict(load_json_file(path, "profile"), source=f"profile {str(path)!r}")



def _layer_sets(f: Fields, key: str, what: str, meaning: str, count: int
                ) -> tuple[tuple[int, tuple[LayerProfile, ...]], ...]:
    """An object of ``what`` (a positive integer) -> ``count`` layers, such as ``by_microbatch_size``."""
    raw = f.obj.get(key) or {}
    if not isinstance(raw, dict):
        raise AutopartError(f"{f.at(key)} must be an object of {what} -> layers")
    out = []
    for name, items in raw.items():
        if not str(name).isdigit() or int(name) < 1:
            raise AutopartError(f"{f.where}: {key} key {name!r} is not {meaning}")
        if not isinstance(items, list) or len(items) != count:
            raise AutopartError(f"{f.where}: {key}[{name}] must list {count} layers")
        out.append((int(name), tuple(LayerProfile.from_dict(item, f"{f.where}: {key}[{name}][{i}]")
                                     for i, item in enumerate(items))))
    return tuple(out)


_THREAD_TIMES = ("forward_ms", "backward_ms", "forward_iqr_ms", "backward_iqr_ms", "optimizer_ms",
                 "loss_forward_ms", "loss_backward_ms")
"""The fields of :class:`LayerProfile` that depend on the CPU thread count (with :data:`_SPLIT_TIMES` and
``optimizer_ms_by_name``); the rest are bytes."""
_SPLIT_TIMES = ("input_grad_ms", "weight_grad_ms")
"""Thread-dependent too; None in profiles from before they were measured."""


def _through(low: tuple[int, float], high: tuple[int, float], threads: int) -> float:
    """``a + b / threads`` through the points (threads, time) ``low`` and ``high`` (fewer threads first)."""
    (t1, y1), (t2, y2) = low, high
    b = (y1 - y2) / (1 / t1 - 1 / t2)
    return y1 - b / t1 + b / threads


def _between(counts: dict[int, tuple[LayerProfile, ...]], threads: int, i: int) -> LayerProfile:
    """Block ``i`` at ``threads``: measured, interpolated between the two nearest counts, or the nearest's."""
    if threads in counts:
        return counts[threads][i]
    below = [t for t in counts if t < threads]
    above = [t for t in counts if t > threads]
    if not below or not above:
        return counts[max(below) if below else min(above)][i]
    lo, hi = counts[max(below)][i], counts[min(above)][i]
    t1, t2 = max(below), min(above)

    def at(a: float, b: float) -> float:
        return _through((t1, a), (t2, b), threads)

    changes: dict[str, Any] = {name: at(getattr(lo, name), getattr(hi, name)) for name in _THREAD_TIMES}
    for name in _SPLIT_TIMES:
        if getattr(lo, name) is not None and getattr(hi, name) is not None:
            changes[name] = at(getattr(lo, name), getattr(hi, name))
    high_by_name = dict(hi.optimizer_ms_by_name)
    changes["optimizer_ms_by_name"] = tuple((name, at(ms, high_by_name[name])) for name, ms in lo.optimizer_ms_by_name
                                            if name in high_by_name)
    return dataclasses.replace(lo, **changes)


def _scaled(other: LayerProfile, before: LayerProfile, after: LayerProfile) -> LayerProfile:
    """``other`` (the same block at another micro-batch size) with each time scaled as ``before`` became ``after``."""

    def ratio(name: str) -> float:
        was = getattr(before, name)
        return getattr(after, name) / was if was else 1.0

    changes: dict[str, Any] = {name: getattr(other, name) * ratio(name) for name in _THREAD_TIMES}
    for name in _SPLIT_TIMES:
        if getattr(other, name) is not None and getattr(before, name) and getattr(after, name) is not None:
            changes[name] = getattr(other, name) * getattr(after, name) / getattr(before, name)
    was, now = dict(before.optimizer_ms_by_name), dict(after.optimizer_ms_by_name)
    changes["optimizer_ms_by_name"] = tuple((name, ms * now[name] / was[name] if was.get(name) and name in now else ms)
                                            for name, ms in other.optimizer_ms_by_name)
    return dataclasses.replace(other, **changes)

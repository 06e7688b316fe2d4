"""The plan: which blocks each stage holds, and what the cost model predicts (``schema: "autopart.plan/1"``).

Pure data (standard library only). ``Plan.to_json`` / ``Plan.from_json`` save and
validate it; :func:`autopart.core.planner.make_plan` makes one from a split.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from autopart.errors import AutopartError
from autopart.formats.cluster import Cluster
from autopart.formats.atomic import write_json_atomic
from autopart.formats.devices import Device
from autopart.formats.jsonfields import Fields, check_plausible, load_json_file
from autopart.formats.optimizers import DEFAULT_OPTIMIZER, OPTIMIZER_STATES, check_optimizer
from autopart.formats.precision import DEFAULT_PRECISION, check_precision
from autopart.formats.profile import BATCHNORM_MODES
from autopart.formats.record import read_record, saved, write_record
from autopart.formats.schedule_kinds import canonical_schedule, stage_ranks
from autopart.formats.stage import StageCost
from autopart.formats.version import check_version

__all__ = ["PLAN_SCHEMA", "PLAN_FEATURES", "Plan", "PlanStage", "Predicted", "Candidate"]

PLAN_SCHEMA = "autopart.plan/1"
PLAN_FEATURES: frozenset[str] = frozenset({"precision", "data_parallel", "split_backward"})
"""Features (:mod:`autopart.formats.version`) this autopart reads in a plan's ``features``: ``precision``,
which a plan under another precision than fp32 lists (an older autopart would train it in float32);
``data_parallel``, which a plan of several replicas lists (an older autopart would run one pipeline);
``split_backward``, which a plan with a stage's ``weight_grad_ms`` lists (an older autopart would simulate W as
the rest of the backward)."""

MAX_STAGE_MS = 1e12
"""The longest time a plan may hold (a stage's per micro-batch, a step): a thousand times a block's bound
(:data:`autopart.formats.jsonfields.MAX_BLOCK_MS`), since a stage holds many blocks and a step many
micro-batches. More is a damaged or edited file."""
MAX_STAGE_BYTES = 2**60
"""The largest size a plan may hold (a stage's memory, a device's limit): 1 EiB, a thousand blocks' bound."""


@dataclass(frozen=True)
class PlanStage:
    """One stage of a plan: its blocks, the device that holds it, and what the cost model says it costs."""

    blocks: tuple[str, ...]
    """Module names of the blocks, in order (``named_modules`` spelling)."""
    device: Device
    """Name, memory limit (``memory_limit_bytes`` in the file) and speed of the stage's device."""
    cost: StageCost

    def to_dict(self) -> dict[str, Any]:
        return {"blocks": list(self.blocks), **self.cost.to_dict(), "device": self.device.name,
                "memory_limit_bytes": self.device.memory_bytes, "speed": self.device.speed}

    @staticmethod
    def from_dict(raw: Any, where: str) -> "PlanStage":
        sf = Fields(raw, where)
        blocks = sf.array("blocks")
        if not blocks or not all(isinstance(b, str) and b for b in blocks):
            raise AutopartError(f"{where}.blocks must be a non-empty list of module names")
        device = Device(name=sf.string("device", required=False, default=""),
                        memory_bytes=sf.integer("memory_limit_bytes", required=False),
                        speed=sf.number("speed", False, 1.0))
        stage = PlanStage(blocks=tuple(blocks), device=device, cost=StageCost.from_fields(sf))
        check_plausible(where, [*asdict(stage.cost).items(), ("memory_limit_bytes", device.memory_bytes)],
                        MAX_STAGE_MS, MAX_STAGE_BYTES)
        return stage


@dataclass(frozen=True)
class Candidate:
    """A configuration the joint search tried."""

    schedule: str
    microbatches: int = field(metadata=saved(minimum=1))
    stages_per_rank: int = field(metadata=saved(minimum=1, absent=1))
    step_ms: float
    balance: tuple[int, ...] = field(metadata=saved(minimum=1))
    data_parallel: int = field(default=1, metadata=saved(minimum=1, omit=(1,)))
    """Replicas of the pipeline (:attr:`Plan.data_parallel`); written when more than 1."""
    allreduce_ms: float = field(default=0.0, metadata=saved(omit=(0.0,)))
    """The exposed gradient all-reduce in ``step_ms`` (:attr:`Predicted.allreduce_ms`); written when not 0."""
    busiest_ms: float = field(default=0.0, metadata=saved(omit=(0.0,)))
    """Its busiest rank's compute per step (micro-batches x forward and backward per micro-batch): what the
    choice prefers less of within the noise band (:attr:`Predicted.noise`); 0 in files from before it was
    recorded."""

    @property
    def label(self) -> str:
        """``ZBVZeroBubble M=4 [8, 8, 9, 1]`` (with ``2x2`` before it for a replicated pipeline)."""
        replicas = f"{len(self.balance) // self.stages_per_rank}x{self.data_parallel} " if self.data_parallel > 1 \
            else ""
        return f"{replicas}{self.schedule} M={self.microbatches} {list(self.balance)}"


@dataclass(frozen=True)
class Predicted:
    step_ms: float
    """One training step of all micro-batches."""
    bubble_fraction: float
    """Share of device time spent idle in a step."""
    bottleneck_ms: float
    """The slowest stage's time per micro-batch."""
    lower_bound_ms: float
    """No split has a faster slowest stage than this."""
    source: str = field(default="simulated", metadata=saved(absent=""))
    """Where the numbers come from: "simulated" (the schedule simulator); "" in files that do not say."""
    allreduce_ms: float = field(default=0.0, metadata=saved(omit=(0.0,)))
    """The part of the gradient all-reduce over the data-parallel replicas that the pipeline's drain does not
    hide (the slowest stage's), included in ``step_ms``; 0 with one replica."""
    margin: float | None = field(default=None, metadata=saved(minimum=-1.0, omit=(None,)))
    """How much slower the fastest other configuration the search scored is than this plan, relative
    (0.12: 12% slower; negative when a faster one lost to this within the noise band); None: nothing else was
    scored, or a file from before it was recorded (docs/partition.md, "The choice and the noise band")."""
    noise: float | None = field(default=None, metadata=saved(omit=(None,)))
    """The relative band of the fastest scored configuration's step implied by the profile's spread: its
    busiest rank's blocks' interquartile ranges over their medians. Steps within it of the fastest are ties,
    won by the more balanced split. None: not computed (a single scored split, or an older file)."""

    @property
    def decisive(self) -> bool | None:
        """Whether the plan beats every other scored configuration by more than the noise band (None: not
        known)."""
        if self.margin is None or self.noise is None:
            return None
        return self.margin > self.noise


def _optimizer_name(f: Fields) -> str:
    """The plan's optimizer (the default when the file names none); its ``optimizer_states``, which the file
    also records, must be the table's for it."""
    name = check_optimizer(f.string("optimizer", required=False, default=DEFAULT_OPTIMIZER), f.at("optimizer"))
    states = f.integer("optimizer_states", required=False)
    if states is not None and states != OPTIMIZER_STATES[name]:
        named = (f"optimizer {name!r}" if "optimizer" in f.obj
                 else f"the default optimizer {name!r} (the plan names none)")
        raise AutopartError(f"{f.at('optimizer_states')} is {states}, but {named} keeps {OPTIMIZER_STATES[name]} "
                            f"(known: {', '.join(f'{k} {v}' for k, v in OPTIMIZER_STATES.items())})")
    return name


@dataclass(frozen=True, kw_only=True)
class Plan:
    """Which blocks each stage holds, how the step runs, and what the cost model predicts. The fields are in
    the file's order."""

    schema: str = PLAN_SCHEMA
    features: tuple[str, ...] = field(default=(), metadata=saved(omit=((),)))
    """What a reader must understand to read the file (:mod:`autopart.formats.version`); written when not empty."""
    profile: str = field(metadata=saved(absent=""))
    model: str = field(metadata=saved(absent=""))
    method: str
    schedule: str
    microbatches: int = field(metadata=saved(minimum=1))
    balance: tuple[int, ...]
    precision: str = field(default=DEFAULT_PRECISION, metadata=saved(omit=(DEFAULT_PRECISION,)))
    """The training precision (:mod:`autopart.formats.precision`), the profile's: what the memory and times are
    for and what ``autopart train`` runs. Written when not fp32; a plan without it is fp32."""
    optimizer_states: int = field(init=False, default=0)
    """Copies of the parameters the optimizer keeps: the table's for ``optimizer``, which the file records for
    its readers (set from ``optimizer``, never given)."""
    optimizer: str = DEFAULT_OPTIMIZER
    """The optimizer whose step and state the prediction pays and ``autopart train`` runs."""
    bandwidth_bytes_per_s: float | None = None
    latency_ms: float = 0.0
    fits: bool = True
    stages_per_rank: int = field(default=1, metadata=saved(minimum=1))
    data_parallel: int = field(default=1, metadata=saved(minimum=1, omit=(1,)))
    """Replicas of the whole pipeline, each on its own ``num_ranks`` devices, each training on its share of the
    global batch (``microbatches x microbatch_size`` samples); gradients averaged over them. 1: one pipeline."""
    microbatch_size: int | None = field(default=None, metadata=saved(minimum=1))
    """Rows per micro-batch the times are for (the profile's, or the search's choice)."""
    scaling: str = ""
    """How times were scaled to ``microbatch_size`` when it differs from the profile's."""
    sample_shape: tuple[int, ...] = field(default=(), metadata=saved(minimum=1))
    """Shape of one micro-batch's input (the profile's, at ``microbatch_size``)."""
    threads: int | None = field(default=None, metadata=saved(minimum=1, omit=(None, 0)))
    """CPU threads the profile was measured with (its times assume them); None: not recorded, or a GPU."""
    batchnorm: str | None = field(default=None, metadata=saved(omit=(None, "")))
    """The profile's BatchNorm mode ("deferred" or "micro"; None: no BatchNorm): ``train``'s default."""
    cluster: Cluster | None = field(default=None, metadata=saved(omit=(None,)))
    """The nodes and links the plan was made for (None: a list of devices, links as ``bandwidth_bytes_per_s``)."""
    placement: tuple[tuple[int, ...], ...] = field(default=(), metadata=saved(omit=((),)))
    """The global rank (torchrun's) of each replica's pipeline ranks: ``placement[replica][pipeline_rank]``.
    Empty: replica after replica, ``replica * num_ranks + pipeline_rank``."""
    stages: tuple[PlanStage, ...]
    runners_up: tuple[Candidate, ...] = ()
    """What the joint search beat, best first."""
    predicted: Predicted

    def __post_init__(self) -> None:
        check_optimizer(self.optimizer)
        check_precision(self.precision, f"plan of {self.model!r}: precision")
        if self.precision != DEFAULT_PRECISION and "precision" not in self.features:
            object.__setattr__(self, "features", (*self.features, "precision"))
        if self.data_parallel > 1 and "data_parallel" not in self.features:
            object.__setattr__(self, "features", (*self.features, "data_parallel"))
        if any(st.cost.weight_grad_ms is not None for st in self.stages) and "split_backward" not in self.features:
            object.__setattr__(self, "features", (*self.features, "split_backward"))
        if self.placement:
            ranks = sorted(r for row in self.placement for r in row)
            if len(self.placement) != self.data_parallel or any(len(row) != self.num_ranks for row in self.placement) \
                    or ranks != list(range(self.world_size)):
                raise AutopartError(f"plan of {self.model!r}: placement {[list(r) for r in self.placement]} is not "
                                    f"{self.data_parallel} replicas x {self.num_ranks} ranks numbering ranks "
                                    f"0..{self.world_size - 1} once each")
        if self.cluster is not None and self.cluster.num_devices != self.world_size:
            raise AutopartError(f"plan of {self.model!r}: its cluster has {self.cluster.nodes} nodes x "
                                f"{self.cluster.devices_per_node} devices = {self.cluster.num_devices}, but the plan "
                                f"runs on {self.data_parallel} replicas x {self.num_ranks} ranks = {self.world_size}")
        object.__setattr__(self, "optimizer_states", OPTIMIZER_STATES[self.optimizer])

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    @property
    def num_ranks(self) -> int:
        return len(self.stages) // self.stages_per_rank

    @property
    def world_size(self) -> int:
        """Processes the plan runs on: every replica's pipeline ranks."""
        return self.num_ranks * self.data_parallel

    def mesh(self) -> list[list[int]]:
        """Global ranks as a ``data_parallel x num_ranks`` grid (``DeviceMesh`` dims ("dp", "pp"))."""
        if self.placement:
            return [list(row) for row in self.placement]
        k = self.num_ranks
        return [[d * k + r for r in range(k)] for d in range(self.data_parallel)]

    def position_of(self, rank: int) -> tuple[int, int]:
        """(replica, pipeline rank) of global ``rank``."""
        for d, row in enumerate(self.mesh()):
            if rank in row:
                return d, row.index(rank)
        raise AutopartError(f"rank {rank} is not in the plan's {self.world_size} ranks")

    def microbatch_size_for(self, global_batch: int) -> int:
        """Samples per micro-batch when a step has ``global_batch`` samples (which the micro-batches must divide)."""
        if global_batch < self.microbatches:
            raise AutopartError(f"global batch {global_batch} < the plan's {self.microbatches} micro-batches: each "
                                f"needs at least one sample")
        if global_batch % self.microbatches:
            raise AutopartError(f"global batch {global_batch} is not divisible by the plan's {self.microbatches} "
                                f"micro-batches")
        return global_batch // self.microbatches

    def stage_ranks(self) -> tuple[int, ...]:
        """The rank that holds each stage, under the plan's schedule."""
        return stage_ranks(self.schedule, self.num_ranks, self.stages_per_rank)

    def stages_of(self, rank: int) -> list[int]:
        """The stages ``rank`` runs, in increasing order (as multi-stage schedules need)."""
        return [s for s, r in enumerate(self.stage_ranks()) if r == rank]

    def split_points(self) -> list[str]:
        """The first block of every stage but the first: where each stage begins."""
        return [stage.blocks[0] for stage in self.stages[1:]]

    def split_spec_code(self) -> str:
        """Python that defines torch.distributed.pipelining's ``split_spec`` (``SplitPoint.BEGINNING`` at each
        of :meth:`split_points`), to paste before ``pipeline(model, mb_args=..., split_spec=split_spec)``.

        The keys are the blocks' module names, which ``pipeline()`` finds by ``getattr`` one name at a time
        (``h.3``: ``model.h`` then its child ``3``); nested ``nn.Sequential`` children are found the same way.
        """
        entries = "".join(f"    {json.dumps(name)}: SplitPoint.BEGINNING,\n" for name in self.split_points())
        return (f"from torch.distributed.pipelining import SplitPoint\n\n"
                f"# {self.model or 'the model'}: {self.num_stages} stage{'s' * (self.num_stages != 1)}, balance "
                f"{list(self.balance)}; "
                f"pipeline(model, mb_args=..., split_spec=split_spec)\n"
                f"split_spec = {{\n{entries}}}\n")

    def fqns(self) -> list[list[str]]:
        """Module names per stage, as torchtitan's ``module_names_per_stage`` takes them."""
        return [list(stage.blocks) for stage in self.stages]

    def to_dict(self) -> dict[str, Any]:
        return write_record(self, stages=[stage.to_dict() for stage in self.stages],
                            placement=[list(row) for row in self.placement],
                            cluster=self.cluster.to_dict() if self.cluster is not None else None)

    def to_json(self, path: str | Path) -> Path:
        return write_json_atomic(path, self.to_dict())

    @staticmethod
    def from_dict(obj: Any, source: str = "plan") -> "Plan":
        f = Fields(obj, source)
        schema, features = check_version(f, PLAN_SCHEMA, PLAN_FEATURES)
        stages = [PlanStage.from_dict(raw, f"{source}: stages[{k}]") for k, raw in enumerate(f.array("stages"))]
        if not stages:
            raise AutopartError(f"{source}: 'stages' is empty")
        balance = tuple(f.int_list("balance", minimum=1))
        if list(balance) != [len(s.blocks) for s in stages]:
            raise AutopartError(f"{source}: balance {list(balance)} does not match the stages' block counts "
                                f"{[len(s.blocks) for s in stages]}")
        pf = Fields(f.obj.get("predicted"), f"{source}: predicted")
        predicted = read_record(Predicted, pf)
        check_plausible(f"{source}: predicted", asdict(predicted).items(), MAX_STAGE_MS, MAX_STAGE_BYTES)
        runners = []
        for k, raw in enumerate(f.array("runners_up", required=False)):
            cf = Fields(raw, f"{source}: runners_up[{k}]")
            runners.append(read_record(Candidate, cf))
            check_plausible(f"{source}: runners_up[{k}]", [("step_ms", runners[-1].step_ms),
                                                           ("allreduce_ms", runners[-1].allreduce_ms)], MAX_STAGE_MS)
        stages_per_rank = f.integer("stages_per_rank", required=False, default=1, minimum=1)
        if len(stages) % stages_per_rank:
            raise AutopartError(f"{source}: {len(stages)} stages do not divide into {stages_per_rank} per rank")
        check_plausible(source, [("latency_ms", f.number("latency_ms", False, 0.0))], MAX_STAGE_MS)
        placement = tuple(tuple(Fields({"row": row}, f.at(f"placement[{d}]")).int_list("row"))
                          for d, row in enumerate(f.array("placement", required=False)))
        cluster = Cluster.from_dict(f.obj["cluster"], f.at("cluster")) if f.obj.get("cluster") is not None else None
        return read_record(Plan, f, schema=schema, placement=placement, cluster=cluster, features=features,
                           schedule=canonical_schedule(f.string("schedule")),
                           balance=balance, optimizer=_optimizer_name(f),
                           precision=check_precision(f.string("precision", False, DEFAULT_PRECISION),
                                                     f.at("precision")).name, stages_per_rank=stages_per_rank,
                           stages=tuple(stages), runners_up=tuple(runners), predicted=predicted,
                           batchnorm=f.choice("batchnorm", BATCHNORM_MODES))

    @staticmethod
    def from_json(path: str | Path) -> "Plan":
        return Plan.from_dict(load_json_file(path, "plan"), source=f"plan {str(path)!r}")

"""Data parallel x pipeline on clusters of 80 GB devices: autopart's joint plan against what a torchtitan user writes.

    python benchmarks/cluster_plans.py              # writes results/cluster_plans.{json,md}
    python benchmarks/cluster_plans.py --dry-run    # only prints the configurations it would score

For Llama-3-8B and Llama-3-70B (the by-block CPU profiles in profiles/) on 64,
256 and 1,024 devices (nodes of 8 x H100-80GB, 450 GB/s per device inside a
node, 50 GB/s between nodes), a fixed global batch of 1,024 sequences (of the
profiles' tokens: 1,024 for 8B, 512 for 70B) and AdamW in fp32, two plans are scored by the same
cost model (``autopart.core.dataparallel``):

* autopart: ``plan_cluster`` chooses the pipeline depth K, the data-parallel
  width D (K x D = devices), the micro-batches, the schedule and the split;
* torchtitan: ``score_configuration`` of what a torchtitan user writes for
  data parallel x pipeline: ``pipeline_parallel_degree = 8`` (the one depth
  torchtitan's Llama-3 configurations and published benchmarks use, 405B on
  512 H100s), its default schedule ``1F1B``, its default micro-batch of one
  sequence (so M = the replica's batch), and the layers per stage its
  ``_generate_llm_fqn_per_model_part`` gives (embedding and norm+head each
  weigh one layer: ``pipeline_parallel_first/last_stage_less_layers = 1``),
  D = devices / 8. When that does not fit in 80 GB (70B: 16 bytes of
  parameters, gradients and AdamW state per parameter is 1.1 TB, 140 GB a
  device at depth 8), the shallowest deeper power of two that fits is scored
  too ("torchtitan, deepened"), as a user would deepen it.

Reported: predicted time per global batch, the largest memory of a device,
the bubble, the exposed all-reduce and its share of the step, and whether it
fits. Caveats (docs/benchmarks.md): the times are CPU times (a 2-core Xeon),
scaled by nothing, so compute dwarfs every link; no tensor, sequence or
context parallelism, and no FSDP sharding of parameters (torchtitan's own 8B
and 70B configurations use FSDP, and TP 8 for 70B, and no pipeline).
torchtitan: github.com/pytorch/torchtitan at b5bcd76c66d0acb1a08b176d9639425bc55e0b2a
(torchtitan/config/configs.py, torchtitan/distributed/pipeline_parallel.py,
torchtitan/models/llama3/config_registry.py, benchmarks/llama3_h100_202412_torchtitan.md).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

from autopart.core.training import CostModel  # noqa: E402
from autopart.formats.cluster import Cluster  # noqa: E402
from autopart.formats.devices import KNOWN_MEMORY  # noqa: E402
from autopart.formats.plan import Plan  # noqa: E402
from autopart.formats.profile import Profile  # noqa: E402
from autopart.formats.units import format_bytes, parse_bandwidth  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROFILES = {"Llama-3-8B": ROOT / "profiles" / "hf-llama3-8b-cpu-mb1.json",
            "Llama-3-70B": ROOT / "profiles" / "hf-llama3-70b-cpu-mb1.json"}
DEVICES = (64, 256, 1024)
GLOBAL_BATCH = 1024
"""Sequences per step, every replica's together: divisible by every power-of-two D up to 1,024."""
DEVICES_PER_NODE = 8
DEVICE = "H100-80GB"
INTRA_NODE, INTER_NODE = "450GB/s", "50GB/s"
OPTIMIZER = "adamw"
TORCHTITAN_PP = 8
"""``parallelism.pipeline_parallel_degree`` in torchtitan's only Llama-3 pipeline configuration (405B, 512 GPUs)."""
TORCHTITAN_SCHEDULE = "1F1B"
"""``parallelism.pipeline_parallel_schedule``'s default (torchtitan/config/configs.py)."""
TORCHTITAN_MICROBATCH_SIZE = 1
"""``parallelism.pipeline_parallel_microbatch_size``'s default (torchtitan, 2025-04 to 2026-08): M = local batch."""
_LAYER = re.compile(r"(^|\.)layers\.\d+$")


SPEEDS = (1.0, 1000.0)
"""Device speed relative to the profiled CPU: 1 (the CPU's own times, where compute dwarfs every link), and
1,000: the 8B profile's layer forward runs 2 x 218 M parameters x 1,024 tokens in 2.08 s, 0.21 TFLOP/s; 1,000
times that, 215 TFLOP/s, is about 43% of an H100's dense TF32 peak (495 TFLOP/s), a plausible fp32 (TF32)
training rate. An assumption, not a measurement: it puts compute and the links in proportions like a GPU's."""


def cluster_of(devices: int, speed: float = 1.0) -> Cluster:
    """``devices / 8`` nodes of 8 x H100-80GB, NVLink inside a node, one network port a device between nodes."""
    if devices % DEVICES_PER_NODE:
        raise SystemExit(f"{devices} devices are not whole nodes of {DEVICES_PER_NODE}")
    return Cluster(nodes=devices // DEVICES_PER_NODE, devices_per_node=DEVICES_PER_NODE, device_name=DEVICE,
                   memory_bytes=KNOWN_MEMORY[DEVICE], speed=speed, intra_node_bytes_per_s=parse_bandwidth(INTRA_NODE),
                   inter_node_bytes_per_s=parse_bandwidth(INTER_NODE))


def torchtitan_balance(block_names: Sequence[str], stages: int, input_weight: int = 1,
                       output_weight: int = 1) -> tuple[int, ...] | None:
    """Blocks per stage as torchtitan's ``_generate_llm_fqn_per_model_part`` splits an LLM: the decoder layers
    plus ``input_weight`` for the embedding and ``output_weight`` for norm+head, spread evenly (the first stages
    take the remainder); the blocks before the first layer go to the first stage, those after the last to the
    last. None where torchtitan refuses (more stages than weighted layers, or a weight above a stage's share)."""
    layer_at = [i for i, name in enumerate(block_names) if _LAYER.search(name)]
    if not layer_at or layer_at != list(range(layer_at[0], layer_at[-1] + 1)):
        raise SystemExit(f"the profile's blocks are not embedding, consecutive layers.N, then the head: "
                         f"{list(block_names)[:4]}...")
    layers, before, after = len(layer_at), layer_at[0], len(block_names) - 1 - layer_at[-1]
    if stages == 1:
        return (len(block_names),)
    effective = layers + input_weight + output_weight
    share, extra = divmod(effective, stages)
    if stages > effective or share == 0 or input_weight > share or output_weight > share:
        return None
    per_stage = [share + (1 if s < extra else 0) for s in range(stages)]
    counts = list(per_stage)
    counts[0] += before - input_weight
    counts[-1] += after - output_weight
    return tuple(counts)


@dataclass(frozen=True)
class Config:
    """One torchtitan-style configuration to score."""

    label: str
    stages: int
    data_parallel: int
    microbatches: int
    schedule: str
    balance: tuple[int, ...]


def torchtitan_configs(profile: Profile, devices: int, global_batch: int) -> list[Config]:
    """torchtitan's depth, then every deeper power of two torchtitan accepts (the run keeps the shallowest that
    fits, when depth 8 does not)."""
    names = [layer.name for layer in profile.layers]
    configs = []
    depth = TORCHTITAN_PP
    while depth <= devices:
        balance = torchtitan_balance(names, depth)
        replicas = devices // depth
        if balance is None or global_batch % replicas:
            break
        microbatches = global_batch // replicas // TORCHTITAN_MICROBATCH_SIZE
        label = "torchtitan" if depth == TORCHTITAN_PP else "torchtitan, deepened"
        configs.append(Config(label, depth, replicas, microbatches, TORCHTITAN_SCHEDULE, balance))
        depth *= 2
    return configs


def rank_memory_bytes(plan: Plan) -> int:
    """The most memory any device of the plan holds: the sum of its stages' (several under interleaved
    schedules)."""
    per_rank: dict[int, int] = {}
    for stage, rank in zip(plan.stages, plan.stage_ranks()):
        per_rank[rank] = per_rank.get(rank, 0) + stage.cost.memory_bytes
    return max(per_rank.values())


def _record(value: Any) -> Any:
    """A tried configuration as JSON: its fields (with why it lost), whatever the planner's record holds."""
    return asdict(value) if is_dataclass(value) and not isinstance(value, type) else str(value)


def row(model: str, devices: int, speed: float, label: str, plan: Plan, seconds: float | None = None) -> list[Any]:
    step_ms = plan.predicted.step_ms
    allreduce = plan.predicted.allreduce_ms
    return [model, devices, f"x{speed:g}", label, plan.num_ranks, plan.data_parallel, plan.microbatches,
            plan.schedule + (f" x{plan.stages_per_rank}" if plan.stages_per_rank > 1 else ""),
            step_ms / 1000, format_bytes(rank_memory_bytes(plan)), f"{plan.predicted.bubble_fraction:.1%}",
            allreduce / 1000, f"{100 * allreduce / step_ms:.2g}%" if step_ms else "-", "yes" if plan.fits else "no",
            "-" if seconds is None else f"{seconds:.2f}"]


COLUMNS = ["model", "devices", "speed", "plan", "K", "D", "M", "schedule", "s / batch", "memory", "bubble", "all-reduce s",
           "comm", "fits", "plan s"]
"""speed: the devices' speed over the profiled CPU (:data:`SPEEDS`); K: pipeline depth, D: replicas, M: micro-batches per replica; s / batch: predicted seconds per global batch;
memory: the fullest device's; all-reduce s: the exposed part (in the step), comm: its share of the step."""


def dry_run(profiles: dict[str, Profile], devices: Sequence[int], global_batch: int) -> None:
    """Print what a full run scores, without scoring it."""
    print(f"cost model: {OPTIMIZER}, {global_batch} sequences per global batch")
    for model, profile in profiles.items():
        for n in devices:
            cluster = cluster_of(n)
            print(f"{model} on {cluster.nodes} x {DEVICES_PER_NODE}x{DEVICE} ({n} devices, links "
                  f"{INTRA_NODE} inside a node, {INTER_NODE} between), {len(profile.layers)} blocks:")
            print(f"  autopart: plan_cluster, every K x D = {n}, micro-batches and schedule searched")
            for c in torchtitan_configs(profile, n, global_batch):
                when = "" if c.stages == TORCHTITAN_PP else " (scored when no shallower one fits)"
                print(f"  {c.label}{when}: K {c.stages} x D {c.data_parallel}, {c.schedule}, {c.microbatches} micro-batches "
                      f"of {global_batch // c.data_parallel // c.microbatches}, balance {list(c.balance)}")


def full_run(profiles: dict[str, Profile], devices: Sequence[int], global_batch: int) -> None:
    from autopart.core.dataparallel import plan_cluster, score_configuration  # Part B of issue 20

    cost = CostModel(optimizer=OPTIMIZER)
    rows: list[list[Any]] = []
    details: dict[str, Any] = {}
    for model, profile in profiles.items():
        for n, speed in ((n, speed) for speed in SPEEDS for n in devices):
            cluster = cluster_of(n, speed)
            start = time.perf_counter()
            search = plan_cluster(profile, cluster, cost, global_batch=global_batch,
                                  profile_path=str(PROFILES[model].relative_to(ROOT)))
            seconds = time.perf_counter() - start
            best = search.best
            rows.append(row(model, n, speed, "autopart", best, seconds))
            entry: dict[str, Any] = {"autopart": {"balance": list(best.balance), "mesh_first_two_replicas": best.mesh()[:2],
                                                  "configurations_tried": len(search.tried),
                                                  "best_tried": [_record(c) for c in search.tried[:8]]}}
            for c in torchtitan_configs(profile, n, global_batch):
                plan = score_configuration(profile, cluster, cost, global_batch=global_batch, stages=c.stages,
                                           data_parallel=c.data_parallel, microbatches=c.microbatches,
                                           schedule=c.schedule, balance=c.balance)
                if c.label == "torchtitan" or plan.fits:
                    rows.append(row(model, n, speed, c.label, plan))
                    entry[f"{c.label} (K {c.stages})"] = {"balance": list(c.balance), "fits": plan.fits}
                if plan.fits:
                    break
            details[f"{model} x {n} at speed {speed:g}"] = entry
    report("cluster_plans", f"Data parallel x pipeline, {GLOBAL_BATCH} sequences per global batch, AdamW, "
                            f"nodes of 8 x {DEVICE}: autopart's plan against torchtitan's configuration",
           COLUMNS, rows, extra={"global_batch": global_batch, "device": DEVICE,
                                 "links": {"intra_node": INTRA_NODE, "inter_node": INTER_NODE}, "speeds": list(SPEEDS),
                                 "profiles": {m: str(p.relative_to(ROOT)) for m, p in PROFILES.items()},
                                 "details": details})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the configurations it would score; score none")
    args = parser.parse_args()
    profiles = {model: Profile.from_json(str(path)) for model, path in PROFILES.items() if path.exists()}
    missing = [str(path.relative_to(ROOT)) for path in PROFILES.values() if not path.exists()]
    if missing:
        raise SystemExit(f"missing profiles: {', '.join(missing)} (profiles/README.md says how they were made)")
    (dry_run if args.dry_run else full_run)(profiles, DEVICES, GLOBAL_BATCH)


if __name__ == "__main__":
    main()

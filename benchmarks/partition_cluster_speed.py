"""How long the joint data-parallel x pipeline planner takes as the cluster and the model grow.

    python benchmarks/partition_cluster_speed.py [--quick]

The profile is ``profiles/hf-llama-7b-cpu-mb1.json`` (Llama-2-7B's shapes,
timed block by block on a CPU) stretched to 32 and 80 blocks by repeating its
decoder layer (embedding, N - 3 decoder layers, norm, head). The clusters are
nodes of 8 devices of 80 GB with 450 GB/s inside a node and 50 GB/s between
nodes; the global batch is 1,024 samples; every schedule is tried
(``plan_cluster``: every pipeline depth K dividing the devices, D = devices /
K, every micro-batch count dividing a replica's share, the exact split for
each, pruned by lower bounds). Issue #20's target: 1,024 devices x 80 blocks
under 2 s. One run per cell (a 2-core shared machine: wall times vary with
the neighbours' load; "CPU seconds" is this process's own time).
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, report  # noqa: E402

from autopart.core.costmodel import CostModel  # noqa: E402
from autopart.core.dataparallel import Placer, plan_cluster  # noqa: E402
from autopart.formats.cluster import Cluster  # noqa: E402
from autopart.formats.profile import Profile  # noqa: E402

PROFILE = ROOT / "profiles" / "hf-llama-7b-cpu-mb1.json"


def stretched(profile: Profile, blocks: int) -> Profile:
    """The profile with its first decoder layer repeated so that it has ``blocks`` blocks."""
    layer = profile.layers[1]
    middle = tuple(dataclasses.replace(layer, name=f"model.layers.{i}", same_as="") for i in range(blocks - 3))
    return dataclasses.replace(profile, layers=(profile.layers[0], *middle, *profile.layers[-2:]), ties=(),
                               by_microbatch_size=())


def placer() -> tuple[Placer, str]:
    """Part A's placement, or (before it is merged) the tests' stand-in."""
    try:
        module = importlib.import_module("autopart.core.placement")
        return module.place, "autopart.core.placement"
    except ImportError:
        sys.path.insert(0, str(ROOT / "tests"))
        module = importlib.import_module("placement_standin")
        return module.place, "tests/placement_standin.py (autopart.core.placement not merged yet)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only 64 and 256 devices")
    args = parser.parse_args()
    place, placed_by = placer()
    base = Profile.from_json(PROFILE)
    rows = []
    for devices in ((64, 256) if args.quick else (64, 256, 1024)):
        cluster = Cluster(nodes=devices // 8, devices_per_node=8, device_name="H100-80GB", memory_bytes=80 * 10**9,
                          intra_node_bytes_per_s=450e9, inter_node_bytes_per_s=50e9)
        for blocks in (32, 80):
            profile = stretched(base, blocks)
            t0, c0 = time.perf_counter(), time.process_time()
            search = plan_cluster(profile, cluster, CostModel(), global_batch=1024, placer=place)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            best = search.best
            scored = sum(c.scored for c in search.tried)
            row = [devices, blocks, f"{seconds:.2f}", f"{cpu:.2f}", len(search.tried), scored,
                   f"{best.num_ranks}x{best.data_parallel} {best.schedule} M={best.microbatches}"]
            rows.append(row)
            print(*row, flush=True)
    report("partition_cluster_speed", "plan_cluster wall time: global batch 1024, every schedule, 80 GB devices",
           ["devices", "blocks", "seconds", "CPU seconds", "configurations", "split and simulated", "chosen (K x D)"],
           rows,
           extra={"placement": placed_by, "profile": str(PROFILE.relative_to(ROOT))})


if __name__ == "__main__":
    main()

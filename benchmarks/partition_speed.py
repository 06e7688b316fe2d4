"""How long the partitioner takes as blocks and stages grow, with and without memory limits and sends.

    python benchmarks/partition_speed.py [--quick]

Block times are lognormal (sigma 1), parameter/activation/output bytes uniform
random; "constrained" adds a memory limit of 1.5x the per-stage average need
under 1F1B with 8 micro-batches, 25 GB/s links and 10 us latency. Each cell
is the best of 3 runs. Targets (issue #3, 2-core CPU): ``bottleneck``
10,000 blocks / 64 stages under 50 ms plain and under 0.5 s constrained.

``exact`` (the default since issue #10: the smallest predicted step under
1F1B with M = K micro-batches, forward = 1/3 of each block, an optimizer
step of 1/10 of it) is timed for up to 64 stages; issue #10's targets:
1,000 x 64 under 0.5 s, 10,000 x 64 under 2 s. Its cost: each round of the
local search simulates the current split once (O(K·M) actions) and at most
64 moves at once, in about 2(K + M) array operations over O(K² log(n/K))
candidate moves, whose stage costs take O(K) array operations; rounds
continue while the step improves (10-20 here). Enumerating every split
instead takes C(n-1, K-1) simulations: 1.9e17 for 1,000 blocks into 8
stages, 6.4e100 into 64.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

from autopart.core.costmodel import CostModel, Problem  # noqa: E402
from autopart.formats.devices import Device  # noqa: E402
from autopart.core.costmodel import BlockCosts  # noqa: E402
from autopart.core.fastest import split_fastest  # noqa: E402
from autopart.core.partition import split_bottleneck  # noqa: E402


def problem(n: int, k: int, constrained: bool, seed: int = 0) -> Problem:
    rng = np.random.default_rng(seed)
    compute = rng.lognormal(0.0, 1.0, n)
    params = rng.integers(1, 10**7, n)
    acts = rng.integers(1, 10**6, n)
    outs = rng.integers(1, 10**6, n)
    if not constrained:
        return Problem(compute, [Device("d")] * k, CostModel())
    model = CostModel(schedule="1f1b", microbatches=8, bandwidth_bytes_per_ms=25e9 / 1e3, latency_ms=0.01)
    need = (params.sum() * 4 + 8 * acts.sum()) / k
    devices = [Device("d", memory_bytes=int(1.5 * need))] * k
    return Problem(compute, devices, model, forward_ms=compute / 3, param_bytes=params, activation_bytes=acts,
                   output_bytes=outs)


def step_problem(n: int, k: int, seed: int = 0) -> Problem:
    compute = np.random.default_rng(seed).lognormal(0.0, 1.0, n)
    blocks = BlockCosts.of(compute, forward_ms=compute / 3, optimizer_ms=compute / 10)
    return Problem(blocks, [Device("d")] * k, CostModel(schedule="1f1b", microbatches=k))


def best_of(p: Problem, runs: int) -> tuple[float, float]:
    times, gap = [], 0.0
    for _ in range(runs):
        t0 = time.perf_counter()
        result = split_bottleneck(p)
        times.append(time.perf_counter() - t0)
        gap = result.gap
    return min(times), gap


def best_of_exact(p: Problem, runs: int) -> tuple[float, str]:
    times, method = [], ""
    for _ in range(runs):
        t0 = time.perf_counter()
        method = split_fastest(p).method
        times.append(time.perf_counter() - t0)
    return min(times), method


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="only 1k and 10k blocks")
    args = parser.parse_args()
    sizes = [1000, 10000] if args.quick else [1000, 10000, 100000]
    rows = []
    for n in sizes:
        for k in (8, 64, 512):
            if k > n:
                continue
            row: list[object] = [n, k]
            for constrained in (False, True):
                p = problem(n, k, constrained)
                seconds, gap = best_of(p, 3 if n <= 10000 else 1)
                row += [f"{seconds * 1e3:.1f}", f"{max(gap, 0.0):.2%}"]
            if k <= 64 and n <= 10000:
                seconds, method = best_of_exact(step_problem(n, k), 3)
                row += [f"{seconds * 1e3:.1f}", method]
            else:
                row += ["-", "-"]
            rows.append(row)
            print(*row, flush=True)
    report("partition_speed", "bottleneck: wall time (ms) and gap to the lower bound; exact (step): wall time",
           ["blocks", "stages", "plain ms", "plain gap", "constrained ms", "constrained gap", "exact ms",
            "exact search"], rows)


if __name__ == "__main__":
    main()

"""How good is each method's split? Its slowest stage against the lower bound, and its predicted step.

    bash benchmarks/baselines-env.sh                       # autopart + torchgpipe + DeepSpeed from PyPI
    benchmarks/.venv/bin/python benchmarks/partition_quality.py

Costs: the CPU profiles shipped in profiles/, and forward+backward FLOP counts
of GPT-2 XL (seq 1024), BERT-large (seq 512) and ResNet-50 (224x224) per
block, plus 1000 lognormal blocks. Every method's split is scored with the
same cost model (free sends, no memory limit): its slowest stage divided by
the lower bound max(total / K, largest block). torchgpipe's
``blockpartition.solve`` (also fairscale's) and DeepSpeed's
``partition_balanced`` get the same per-block times; ``parameters`` balances
parameter bytes, DeepSpeed's default. Missing baselines print "-".

The second table (results/partition_step) scores every method's split by
the step the simulator predicts under 1F1B and GPipe with M = K and 1F1B
with M = 2K micro-batches: ``exact`` (the default) minimises it,
``bottleneck`` the slowest stage. Profiles bring their own forward,
backward and optimizer times; the FLOP and lognormal cases take forward =
1/3 of the block and no optimizer step (lognormal: optimizer = 1/10 of the
block, so the last backward's rank matters).
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

from autopart.core.costmodel import CostModel, Problem  # noqa: E402
from autopart.formats.devices import Device  # noqa: E402
from autopart.core.costmodel import BlockCosts  # noqa: E402
from autopart.core.fastest import split_fastest  # noqa: E402
from autopart.core.partition import split_bottleneck, split_minvar, split_parameters, split_uniform  # noqa: E402
from autopart.core.schedules import build_schedule  # noqa: E402
from autopart.core.simulate import simulate  # noqa: E402
from autopart.formats.profile import Profile  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
Case = tuple[str, list[float], list[float]]  # name, time per block, parameter bytes per block
STEP_CONFIGS = [("1F1B", 1), ("GPipe", 1), ("1F1B", 2)]  # schedule, micro-batches per stage


def gpt2_xl(seq: int = 1024, d: int = 1600, layers: int = 48, vocab: int = 50257) -> Case:
    layer = 24 * seq * d * d + 4 * seq * seq * d
    flops = [seq * d] + [layer] * layers + [2 * seq * d * vocab]
    params = [(vocab + 1024) * d] + [12 * d * d] * layers + [vocab * d]
    return "GPT-2 XL FLOPs", [3.0 * f for f in flops], [4.0 * p for p in params]


def bert_large(seq: int = 512, d: int = 1024, layers: int = 24, vocab: int = 30522) -> Case:
    layer = 24 * seq * d * d + 4 * seq * seq * d
    flops = [seq * d] + [layer] * layers + [2 * seq * d * d + 2 * seq * d * vocab]
    params = [(vocab + 512 + 2) * d] + [12 * d * d] * layers + [d * d + vocab * d]
    return "BERT-large FLOPs", [3.0 * f for f in flops], [4.0 * p for p in params]


def resnet50() -> Case:
    flops, params = [2 * 112 * 112 * 64 * 3 * 49], [64 * 3 * 49]
    in_ch = 64
    for width, depth, hw in ((256, 3, 56), (512, 4, 28), (1024, 6, 14), (2048, 3, 7)):
        mid = width // 4
        for b in range(depth):
            f = hw * hw * (in_ch * mid + 9 * mid * mid + mid * width)
            p = in_ch * mid + 9 * mid * mid + mid * width
            if b == 0:
                f += hw * hw * in_ch * width
                p += in_ch * width
            flops.append(2 * f)
            params.append(p)
            in_ch = width
    flops.append(2 * 2048 * 1000)
    params.append(2048 * 1000)
    return "ResNet-50 FLOPs", [3.0 * f for f in flops], [4.0 * p for p in params]


def lognormal(n: int = 1000) -> Case:
    rng = np.random.default_rng(0)
    return "1000 lognormal", rng.lognormal(0.0, 1.0, n).tolist(), rng.integers(1, 10**6, n).astype(float).tolist()


def profile_case(path: Path) -> Case:
    p = Profile.from_json(path)
    return (path.stem, [x.forward_ms + x.backward_ms for x in p.layers],
            [float(x.param_bytes) for x in p.layers])


def step_blocks(name: str, costs: list[float], params: list[float]) -> BlockCosts:
    """What the step table splits: a profile's own times, or forward = 1/3 of each block."""
    path = ROOT / "profiles" / f"{name}.json"
    if path.exists():
        return BlockCosts.from_profile(Profile.from_json(path))
    optimizer = [c / 10 for c in costs] if name.endswith("lognormal") else [0.0] * len(costs)
    return BlockCosts.of(costs, forward_ms=[c / 3 for c in costs], param_bytes=params, optimizer_ms=optimizer)


def step_rows(cases: list[Case], baselines: dict[str, Callable[[list[float], int], list[int]]]) -> list[list[object]]:
    """Predicted step of each method's split, as % above exact's, per case, K and schedule."""
    methods: dict[str, Callable[[Problem], tuple[int, ...]]] = {
        "bottleneck": lambda p: split_bottleneck(p).balance, "minvar": lambda p: split_minvar(p).balance,
        "uniform": lambda p: split_uniform(p).balance, "parameters": lambda p: split_parameters(p).balance}
    rows = []
    for name, costs, params in cases:
        blocks = step_blocks(name, costs, params)
        ks = [64] if len(costs) >= 1000 else [k for k in (2, 4, 8) if k <= len(costs)]
        for k in ks:
            for schedule, per_stage in STEP_CONFIGS:
                m = k * per_stage
                problem = Problem(blocks, [Device("d")] * k, CostModel(schedule=schedule, microbatches=m))
                plan = build_schedule(schedule, k, m)

                def step(balance: tuple[int, ...] | list[int]) -> float:
                    return simulate(plan, problem.stages(balance)).step_ms
                t0 = time.perf_counter()
                exact = split_fastest(problem)
                exact_ms = (time.perf_counter() - t0) * 1e3
                best = step(exact.balance)
                excess = {m_: step(fn(problem)) / best - 1 for m_, fn in methods.items()}
                for b_name, solve in baselines.items():
                    excess[b_name] = step(solve(list(blocks.compute_ms), k)) / best - 1
                row: list[object] = [name, k, f"{schedule} M={m}", exact.method, f"{best:.4g}"]
                row += [f"{excess[c]:+.1%}" if c in excess else "-"
                        for c in ("bottleneck", "minvar", "uniform", "parameters", "torchgpipe", "deepspeed")]
                rows.append(row + [f"{exact_ms:.1f}"])
                print(*row, flush=True)
    return rows


def _baselines() -> dict[str, Callable[[list[float], int], list[int]]]:
    found: dict[str, Callable[[list[float], int], list[int]]] = {}
    try:
        from torchgpipe.balance import blockpartition

        found["torchgpipe"] = lambda costs, k: [len(part) for part in blockpartition.solve(costs, k)]
    except ImportError:
        pass
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from deepspeed.runtime.utils import partition_balanced

        def deepspeed(costs: list[float], k: int) -> list[int]:
            bounds = [int(b) for b in partition_balanced(costs, k)]
            return [bounds[i + 1] - bounds[i] for i in range(k)]

        found["deepspeed"] = deepspeed
    except ImportError:
        pass
    return found


def main() -> None:
    cases = [profile_case(p) for p in sorted((ROOT / "profiles").glob("*.json"))]
    cases += [gpt2_xl(), bert_large(), resnet50(), lognormal()]
    baselines = _baselines()
    columns = ["costs", "K", "bottleneck", "minvar", "uniform", "parameters", "torchgpipe", "deepspeed",
               "bottleneck ms", "torchgpipe ms", "deepspeed ms"]
    rows = []
    for name, costs, params in cases:
        ks = [64] if len(costs) >= 1000 else [k for k in (2, 4, 8) if k <= len(costs)]
        for k in ks:
            problem = Problem(costs, [Device("d")] * k, CostModel(), param_bytes=params)
            lb = problem.lower_bound_ms()
            t0 = time.perf_counter()
            exact = split_bottleneck(problem)
            exact_ms = (time.perf_counter() - t0) * 1e3
            ratios = {"bottleneck": exact.bottleneck_ms / lb}
            for method, fn in (("minvar", split_minvar), ("uniform", split_uniform),
                               ("parameters", split_parameters)):
                ratios[method] = fn(problem).bottleneck_ms / lb
            timings: dict[str, float] = {}
            for method, solve in baselines.items():
                t0 = time.perf_counter()
                balance = solve(list(costs), k)
                timings[method] = (time.perf_counter() - t0) * 1e3
                ratios[method] = max(s.time_ms for s in problem.stages(balance)) / lb
            row: list[object] = [name, k]
            row += [f"{ratios[m]:.3f}" if m in ratios else "-" for m in columns[2:8]]
            row += [f"{exact_ms:.1f}"] + [f"{timings[m]:.1f}" if m in timings else "-"
                                          for m in ("torchgpipe", "deepspeed")]
            rows.append(row)
    report("partition_quality", "slowest stage / lower bound (1.000 = provably optimal), and solve time",
           columns, rows, extra={"baselines": sorted(baselines)})
    report("partition_step", "predicted step of exact's split (ms), and how much slower each other split is",
           ["costs", "K", "schedule", "search", "exact step ms", "bottleneck", "minvar", "uniform", "parameters",
            "torchgpipe", "deepspeed", "exact solve ms"], step_rows(cases, baselines),
           extra={"baselines": sorted(baselines)})


if __name__ == "__main__":
    main()

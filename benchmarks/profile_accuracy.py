"""Is the per-block profile faithful? Sum of block times against one whole forward+backward.

    python benchmarks/profile_accuracy.py [--models gpt2-tiny,gpt2-small] [--threads N]

For each model: the wall time that profiling took, the sum of per-block
``forward_ms + backward_ms``, and the median time of one forward+backward of
the whole model at the same micro-batch (same output gradient, same threads).
Target (issue #2): sum within 10% of whole; gpt2-small at micro-batch 1 x 128
tokens profiled in under 60 s on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

from autopart.measure.spec import load_model, shape_example  # noqa: E402
from autopart.measure.profiler import profile_model  # noqa: E402

SHAPES = {"gpt2-tiny": (4, 64), "gpt2-small": (1, 128), "gpt2-medium": (1, 128)}


def whole_model_ms(module: torch.nn.Module, example: tuple[torch.Tensor, ...], warmup: int, repeats: int) -> float:
    module.train()
    out = module(*example)
    grad = torch.randn_like(out) * 1e-3
    times = []
    for i in range(warmup + repeats):
        t0 = time.perf_counter()
        out = module(*example)
        out.backward(grad)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
        del out
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="gpt2-tiny,gpt2-small")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.models.split(","):
        torch.manual_seed(0)
        bundle = load_model(name)
        example = shape_example(bundle, input_shape=SHAPES.get(name))
        t0 = time.perf_counter()
        profile = profile_model(bundle.module, example, name=name, repeats=args.repeats)
        profile_s = time.perf_counter() - t0
        whole = whole_model_ms(bundle.module, example, warmup=2, repeats=args.repeats)
        summed = profile.step_ms
        rows.append([name, "x".join(map(str, example[0].shape)), len(profile.layers), torch.get_num_threads(),
                     round(summed, 1), round(whole, 1), f"{(summed / whole - 1) * 100:+.1f}%", round(profile_s, 1)])
    report("profile_accuracy", "per-block profile against the whole model (forward+backward, one micro-batch)",
           ["model", "input", "blocks", "threads", "sum of blocks ms", "whole model ms", "error", "profiling s"], rows)


if __name__ == "__main__":
    main()

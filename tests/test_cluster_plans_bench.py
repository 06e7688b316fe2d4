"""benchmarks/cluster_plans.py: torchtitan's layers per stage, and the configurations its dry run would score."""
from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
from types import ModuleType

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "cluster_plans.py"


@functools.cache
def _bench() -> ModuleType:
    """The script as a module (registered, as its dataclass needs), loaded once."""
    spec = importlib.util.spec_from_file_location("cluster_plans", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["cluster_plans"] = module
    spec.loader.exec_module(module)
    return module


def _torchtitan(num_stages: int, num_layers: int, input_weight: int = 1, output_weight: int = 1) -> list[list[str]]:
    """torchtitan's ``_generate_llm_fqn_per_model_part`` (torchtitan/distributed/pipeline_parallel.py at
    b5bcd76c66d0acb1a08b176d9639425bc55e0b2a), its logic verbatim, its messages shortened: the known answer."""
    if num_stages < 1:
        raise ValueError("Number of stages must be at least 1")
    if num_stages == 1:
        return [["tok_embeddings"] + [f"layers.{i}" for i in range(num_layers)] + ["norm", "lm_head"]]
    num_effective_layers = num_layers + input_weight + output_weight
    if num_stages > num_effective_layers:
        raise ValueError("more stages than effective layers")
    layers_per_stage = num_effective_layers // num_stages
    extra_layers = num_effective_layers % num_stages
    if layers_per_stage == 0:
        raise ValueError("empty stages")
    if input_weight > layers_per_stage:
        raise ValueError("input_weight exceeds minimum layers per stage")
    if output_weight > layers_per_stage:
        raise ValueError("output_weight exceeds minimum layers per stage")
    module_names_per_stage = []
    current_layer = 0
    for stage_idx in range(num_stages):
        stage_modules = []
        effective_layers_for_stage = layers_per_stage
        if stage_idx < extra_layers:
            effective_layers_for_stage += 1
        if stage_idx == 0:
            stage_modules.append("tok_embeddings")
            for _ in range(effective_layers_for_stage - input_weight):
                if current_layer < num_layers:
                    stage_modules.append(f"layers.{current_layer}")
                    current_layer += 1
        elif stage_idx == num_stages - 1:
            for _ in range(effective_layers_for_stage - output_weight):
                if current_layer < num_layers:
                    stage_modules.append(f"layers.{current_layer}")
                    current_layer += 1
            stage_modules.extend(["norm", "lm_head"])
        else:
            for _ in range(effective_layers_for_stage):
                if current_layer < num_layers:
                    stage_modules.append(f"layers.{current_layer}")
                    current_layer += 1
        module_names_per_stage.append(stage_modules)
    return module_names_per_stage


def _llama_blocks(layers: int) -> list[str]:
    """The blocks of an ``hf:llama`` profile (as in profiles/hf-llama-7b-cpu-mb1.json)."""
    return ["model.embed_tokens", *(f"model.layers.{i}" for i in range(layers)), "model.norm", "lm_head"]


@settings(max_examples=300, deadline=None)
@given(layers=st.integers(1, 100), stages=st.integers(1, 120), input_weight=st.integers(1, 3),
       output_weight=st.integers(1, 3))
def test_torchtitan_balance_is_torchtitans_split(layers: int, stages: int, input_weight: int,
                                                 output_weight: int) -> None:
    bench = _bench()
    ours = bench.torchtitan_balance(_llama_blocks(layers), stages, input_weight, output_weight)
    try:
        theirs = _torchtitan(stages, layers, input_weight, output_weight)
    except ValueError:
        assert ours is None
        return
    # torchtitan keeps "norm" and "lm_head" as two modules, as the profile has them as two blocks
    assert ours == tuple(len(part) for part in theirs)
    assert sum(ours) == layers + 3


def test_torchtitan_balance_of_llama3_8b_at_depth_8() -> None:
    # 32 layers + 1 + 1 = 34 over 8 stages: 5, 5, then 4s; the embedding and norm+head count as one layer each
    assert _bench().torchtitan_balance(_llama_blocks(32), 8) == (5, 5, 4, 4, 4, 4, 4, 5)


def test_dry_run_prints_every_configuration_and_writes_nothing() -> None:
    results = [ROOT / "benchmarks" / "results" / f"cluster_plans.{ext}" for ext in ("json", "md")]
    before = [p.stat().st_mtime_ns if p.exists() else None for p in results]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run"], env=env, text=True, capture_output=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "cost model: adamw, 1024 sequences per global batch" in out
    for model, blocks in (("Llama-3-8B", 35), ("Llama-3-70B", 83)):
        for devices in (64, 256, 1024):
            assert f"{model} on {devices // 8} x 8xH100-80GB ({devices} devices, links 450GB/s inside a node, " \
                   f"50GB/s between), {blocks} blocks:" in out
    assert "torchtitan: K 8 x D 8, 1F1B, 128 micro-batches of 1, balance [5, 5, 4, 4, 4, 4, 4, 5]" in out
    assert "torchtitan: K 8 x D 128, 1F1B, 8 micro-batches of 1, balance [11, 11, 10, 10, 10, 10, 10, 11]" in out
    # 8B: torchtitan refuses 64 stages of 34 weighted layers; 70B: 64 stages of 82 are fine
    deepened = "torchtitan, deepened (scored when no shallower one fits): "
    assert deepened + "K 32 x D 2, 1F1B, 512 micro-batches of 1, balance [2, 2, 1," in out
    assert deepened + "K 64 x D 1, 1F1B" not in out.split("Llama-3-70B")[0]
    # 70B at depth 64: 82 weighted layers, 18 stages of 2 first; the last holds only norm and head
    assert deepened + "K 64 x D 1, 1F1B, 1024 micro-batches of 1, balance [2, 2, 2," in out
    assert out.count(deepened) == 15
    assert out.count("autopart: plan_cluster") == 6
    assert [p.stat().st_mtime_ns if p.exists() else None for p in results] == before

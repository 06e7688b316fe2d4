"""The model zoo: models the project does not define, each through graph -> profile -> partition -> train on 2 real
ranks (2 steps) -> merge-checkpoint, whose result loads strictly into a fresh model with exactly its keys.

Hugging Face families are built offline from shrunk configs (2 layers, hidden 32, byte vocabularies); torchvision
classifiers run when torchvision can be imported next to the installed torch.

    python -m pytest -q tests/test_zoo.py
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from autopart.measure.spec import load_model
from autopart.run.build import build_model
from tests.conftest import ROOT, run_cli, run_cli_here
from tests.test_build import HF_GPT2, HF_LLAMA, reference_losses

_DECODER = "num_hidden_layers=2,hidden_size=32,intermediate_size=64,num_attention_heads=2,max_position_embeddings=32," \
           "vocab_size=256"
HF_ZOO = {
    "gpt2": HF_GPT2,  # without dropout (see AS_ONE_PROCESS)
    "bert": "hf:bert:num_hidden_layers=2,hidden_size=32,num_attention_heads=2,intermediate_size=64,"
            "max_position_embeddings=32,vocab_size=260",  # a mask id (259) that is no byte
    "llama": HF_LLAMA,  # the decoder fields above, one key-value head
    "qwen2": f"hf:qwen2:{_DECODER},num_key_value_heads=1",
    "mistral": f"hf:mistral:{_DECODER},num_key_value_heads=1",
    "gemma": f"hf:gemma:{_DECODER},num_key_value_heads=1,head_dim=16",
    "gpt_neox": f"hf:gpt_neox:{_DECODER}",
    "t5": "hf:t5:num_layers=2,num_decoder_layers=2,d_model=32,d_kv=16,d_ff=64,num_heads=2,vocab_size=256",
    "bart": "hf:bart:encoder_layers=2,decoder_layers=2,d_model=32,encoder_attention_heads=2,decoder_attention_heads=2,"
            "encoder_ffn_dim=64,decoder_ffn_dim=64,max_position_embeddings=32,vocab_size=256",
}
"""The families run, each as small as its config allows."""

AS_ONE_PROCESS = ("gpt2", "llama")
"""Families whose 2-rank losses are also checked against one process from the same weights (no dropout: GPT-2's is
set to 0): tests/test_build.py's known answer for a model the ranks build stage by stage, on the zoo's one launch."""

LR = 1e-3

TORCHVISION_ZOO = {name: f"{ROOT / 'tests' / 'zoo_models.py'}:{name}" for name in ("resnet18", "mobilenet_v3_small")}


def _torchvision_problem() -> str | None:
    """Why torchvision cannot run here (its only wheel for this torch is a CUDA build), or None."""
    try:
        import torchvision  # noqa: F401
    except ModuleNotFoundError:
        return (f"torchvision is not installed: the registry's build for torch {torch.__version__.split('+')[0]} "
                f"(torchvision 0.28.0) is a CUDA build whose operators do not load beside a CPU torch")
    except Exception as exc:  # ImportError, or the CUDA build's "operator torchvision::nms does not exist"
        return f"torchvision cannot be imported next to torch {torch.__version__}: {type(exc).__name__}: " \
               f"{str(exc).splitlines()[0] if str(exc) else ''}"
    return None


def _zoo_run(spec: str, tmp_path: Path, as_one_process: bool = False) -> None:
    graph = run_cli_here("graph", spec)
    assert graph.returncode == 0, graph.stderr
    profile, plan, ckpt, report = (tmp_path / n for n in ("profile.json", "plan.json", "ckpt", "report.json"))
    made = run_cli_here("profile", spec, "--microbatch-size", "2", "--repeats", "1", "--warmup", "0",
                        "-o", str(profile))
    assert made.returncode == 0, made.stderr
    # split by parameters: the same stages on every run, whatever this machine's timings (one repeat, shared CPUs)
    parted = run_cli_here("partition", str(profile), "--stages", "2", "--method", "parameters", "-o", str(plan))
    assert parted.returncode == 0, parted.stderr
    assert len(json.loads(plan.read_text())["stages"]) == 2

    trained = run_cli("train", str(plan), "--model", spec, "--steps", "2", "--checkpoint", str(ckpt),
                      "--report", str(report), "--lr", str(LR))
    assert trained.returncode == 0, trained.stderr[-3000:]
    done = json.loads(report.read_text())
    losses = done["losses"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    if as_one_process:  # each rank built its own stages: the losses of one process from build_model's weights
        expected = reference_losses(spec, plan, 2, lr=LR)
        assert losses == pytest.approx(expected, rel=1e-6, abs=1e-6), (losses, expected)
        assert all(r["build_peak_bytes"] is not None for r in done["ranks_detail"])

    merged_file = tmp_path / "merged.pt"
    merged = run_cli_here("merge-checkpoint", str(ckpt), "-o", str(merged_file))
    assert merged.returncode == 0, merged.stderr
    state = torch.load(merged_file)
    model = build_model(spec, 0).module  # as every rank built its stages (train's --seed 0)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    assert set(state) == set(fresh)  # exactly the model's own keys: no non-persistent buffer, every tied name
    model.load_state_dict(state, strict=True)
    weights = [k for k, _ in model.named_parameters(remove_duplicate=False)]
    moved = max(float((state[k] - fresh[k]).abs().max()) for k in weights)
    assert 0 < moved < 10 * LR  # two AdamW steps of LR from the weights the ranks built (another draw: ~0.1)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(HF_ZOO))
def test_a_hugging_face_family_trains_on_two_ranks(family: str, tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    _zoo_run(HF_ZOO[family], tmp_path, as_one_process=family in AS_ONE_PROCESS)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TORCHVISION_ZOO))
def test_a_torchvision_classifier_trains_on_two_ranks(name: str, tmp_path: Path) -> None:
    problem = _torchvision_problem()
    if problem:
        pytest.skip(problem)
    _zoo_run(TORCHVISION_ZOO[name], tmp_path)


@pytest.mark.slow
def test_t5_on_three_stages_reads_the_decoder_ids_on_the_last(tmp_path: Path) -> None:
    """Issue #16 item 2: the decoder's token ids come in with the source on stage 0 and cross two cuts to the
    decoder's embedding, which starts stage 2; the stages are sized without running on uninitialised ids (the
    runtime's own inference fed them garbage: "IndexError: index out of range in self")."""
    pytest.importorskip("transformers")
    from autopart.measure.blocks import chain_of
    from tests.helpers import plan_for

    spec = HF_ZOO["t5"]
    bundle = load_model(spec)
    names = chain_of(bundle.module, bundle.example or (), spec, bundle.input_names).names
    decoder = names.index("decoder.embed_tokens")
    balance = [2, decoder - 2, len(names) - decoder]
    plan_for(spec, balance, "1F1B", 3, tmp_path / "plan.json")
    report = tmp_path / "report.json"
    trained = run_cli("train", str(tmp_path / "plan.json"), "--model", spec, "--steps", "2", "--report", str(report))
    assert trained.returncode == 0, trained.stderr[-3000:]
    losses = json.loads(report.read_text())["losses"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)

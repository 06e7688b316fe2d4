"""``--eval-every``: the held-out loss, forward only through torch's own schedule, on real ranks, equals the
one-process model's on the same held-out batches with the same weights (gpt2-tiny's, with the weights of each
step's checkpoint: tests/test_dp_train.py's one-pipeline run, whose 2 replicas then evaluate the same)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from autopart.formats.plan import Plan
from autopart.measure.batchnorm import defer_batchnorm, deferred_layers
from autopart.measure.spec import load_model
from autopart.run.data import default_corpus_files, training_data
from tests.conftest import ROOT, run_cli, run_cli_here
from tests.helpers import plan_for



@pytest.mark.slow
def test_an_evaluation_commits_nothing_and_training_goes_on_after_it(tmp_path: Path) -> None:
    """Deferred BatchNorm on 2 ranks: an evaluation runs on the running statistics (no batch statistics, no
    commit, no gradient), the step after it commits only its own batch, and an evaluation after the step sees its
    weights."""
    spec = "tests.helpers:batchnorm_spec"
    plan = plan_for(spec, [9, 9], "GPipe", 2, tmp_path / "plan.json")  # 18 blocks: its layers
    g = torch.Generator().manual_seed(5)
    inputs, target = torch.randn(8, 12, generator=g), torch.randn(8, 4, generator=g)
    torch.save((inputs, target), tmp_path / "batch.pt")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                             str(plan.num_ranks), str(ROOT / "tests" / "eval_check.py"), str(tmp_path / "plan.json"),
                             spec, str(tmp_path), str(tmp_path / "batch.pt")],
                            cwd=tmp_path, env=env, text=True, capture_output=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(plan.num_ranks)]
    last = ranks[-1]
    for r in ranks:
        assert not r["grads"] and all(r["modes"])  # no gradient made; every module back in training mode
        assert r["before"].keys() == r["evaluated"].keys()
        assert all(torch.equal(r["before"][k], r["evaluated"][k]) for k in r["before"])  # nothing committed
    torch.manual_seed(0)  # as join_rank builds it (tests/eval_check.py builds its stages itself)
    model = load_model(spec).module
    model.eval()
    with torch.no_grad():
        assert sum(last["first"]) / 2 == pytest.approx(float(F.mse_loss(model(inputs), target)), abs=1e-6)
        model.train()
        assert defer_batchnorm(model)
        for layer in deferred_layers(model):
            layer.reset()
        for x in inputs.tensor_split(2):  # the step's micro-batches, each normalised on its own, then one commit
            model(x)
        for layer in deferred_layers(model):
            layer.commit()
    # the statistics are the step's alone: an evaluation merged nothing that the step's commit took in
    stepped = {k: v for r in ranks for k, v in r["stepped"].items()}
    for name, buffer in model.named_buffers():
        assert torch.allclose(stepped[name].float(), buffer.float(), atol=1e-5), name
    model.load_state_dict(stepped)
    model.eval()
    with torch.no_grad():
        assert sum(last["second"]) / 2 == pytest.approx(float(F.mse_loss(model(inputs), target)), abs=1e-6)


def _saved_llama_with_tokenizer(folder: Path) -> int:
    """A byte-level BPE tokenizer (vocabulary 300) trained on a few standard library sources and a 2-layer Llama
    of that vocabulary, saved (in shards) into ``folder``; returns the vocabulary size."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    texts = [f.read_text(errors="replace") for f in default_corpus_files()[:10]]
    tokenizer.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                             initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    folder.mkdir(parents=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    vocab = int(tokenizer.get_vocab_size())
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, bos_token_id=1,
                         eos_token_id=2, use_cache=False)
    torch.manual_seed(3)
    LlamaForCausalLM(config).save_pretrained(folder, max_shard_size="40KB")
    return vocab


@pytest.mark.slow
def test_a_saved_llama_evaluates_on_its_own_tokens_on_two_ranks(tmp_path: Path) -> None:
    """The whole path: a folder saved by transformers with its tokenizer, .jsonl documents tokenized by it, the
    held-out loss on 2 ranks equal to from_pretrained's on the same held-out token batches (--lr 0)."""
    pytest.importorskip("transformers")
    from autopart.measure.hf import causal_lm_loss
    from transformers import LlamaForCausalLM

    folder = tmp_path / "llama"
    _saved_llama_with_tokenizer(folder)
    spec = f"hf:{folder}"
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": f.read_text(errors="replace")[:3000]}) + "\n"
                            for f in default_corpus_files()[10:40]))
    profile, plan_path, report = tmp_path / "p.json", tmp_path / "plan.json", tmp_path / "r.json"
    assert run_cli("profile", spec, "--microbatch-size", "2", "--repeats", "1", "--threads", "1",
                   "-o", str(profile)).returncode == 0
    assert run_cli_here("partition", str(profile), "--stages", "2", "--microbatches", "2",
                        "-o", str(plan_path)).returncode == 0
    result = run_cli("train", str(plan_path), "--model", spec, "--data", str(data), "--steps", "2", "--lr", "0",
                     "--eval-every", "2", "--threads", "1", "--report", str(report))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "30 documents" in result.stderr and f"by {folder / 'tokenizer.json'}" in result.stderr
    evals = json.loads(report.read_text())["eval_losses"]
    plan = Plan.from_json(plan_path)
    bundle = load_model(spec)
    held = training_data(bundle, str(data), 4, tuple(plan.sample_shape[1:]), 0, 0, eval_batches=2).held_out
    assert held is not None
    model = LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = sum(float(causal_lm_loss(model(input_ids=x), y)) for x, y in held) / len(held)
    assert [e["step"] for e in evals] == [2] and evals[0]["loss"] == pytest.approx(expected, abs=1e-5)

"""A merged checkpoint holds exactly the keys of the model's own ``state_dict()``: every name of a tied weight,
the ones no stage uses included. (Non-persistent buffers: ``tests/test_hf.py``; both, for real models: the zoo.)"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autopart.measure.spec import load_model
from autopart.run.checkpoint import mark_complete, merge_checkpoint, save_stage
from tests.conftest import run_cli, run_cli_here

TIED = '''
import torch
from torch import nn


class Tied(nn.Module):
    """One weight under three names: the embedding's, a second name of that module that forward never calls (as
    T5's ``shared``), and the head's."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.spare = self.embed
        self.body = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x):
        h = self.embed(x)
        for layer in self.body:
            h = torch.tanh(layer(h))
        return self.head(h)


def make():
    return Tied(), torch.randint(0, 16, (2, 4))
'''


@pytest.mark.slow
def test_every_name_of_a_tied_weight_is_in_the_merged_checkpoint(tmp_path: Path) -> None:
    model_file = tmp_path / "tied.py"
    model_file.write_text(TIED)
    spec = f"{model_file}:make"
    profile, plan, ckpt = tmp_path / "profile.json", tmp_path / "plan.json", tmp_path / "ckpt"
    assert run_cli_here("profile", spec, "--repeats", "1", "--warmup", "0", "-o", str(profile)).returncode == 0
    assert run_cli_here("partition", str(profile), "--stages", "2", "--method", "uniform",
                        "-o", str(plan)).returncode == 0
    trained = run_cli("train", str(plan), "--model", spec, "--steps", "1", "--checkpoint", str(ckpt))
    assert trained.returncode == 0, trained.stderr[-2000:]
    merged = merge_checkpoint(ckpt)
    model = load_model(spec).module
    assert "spare.weight" in model.state_dict()
    assert set(merged) == set(model.state_dict())
    model.load_state_dict(merged, strict=True)
    assert torch.equal(merged["spare.weight"], merged["head.weight"])


def test_merge_writes_the_names_only_the_aliases_give(tmp_path: Path) -> None:
    weight = torch.arange(4.0).reshape(2, 2)
    save_stage(tmp_path, 1, 0, {"embed.weight": weight}, None, 0, [0], {"spare.weight": "embed.weight"})
    save_stage(tmp_path, 1, 1, {"head.weight": weight}, None, 1, [1],
               {"head.weight": "embed.weight", "spare.weight": "embed.weight"})
    mark_complete(tmp_path, 1, 2)
    merged = merge_checkpoint(tmp_path)
    assert sorted(merged) == ["embed.weight", "head.weight", "spare.weight"]
    assert all(torch.equal(t, weight) for t in merged.values())

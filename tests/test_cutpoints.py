"""Graph capture and cut points: blocks along module boundaries, and the bytes that cross each cut,
checked against numbers worked out by hand."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from autopart.errors import AutopartError
from autopart.formats.profile import Profile
from autopart.measure.blocks import ChildrenChain, GraphChain, call_block, chain_of
from autopart.measure.capture import capture
from autopart.measure.cutpoints import graph_blocks
from autopart.measure.profiler import profile_model
from tests.graph_models import TwoInTwoOut, UNet, hf_gpt2

F32 = 4


def test_unet_blocks_follow_its_modules_and_count_the_skips_by_hand() -> None:
    chain = chain_of(UNet(), (torch.randn(2, 1, 8, 8),), "unet")
    assert chain.names == ["down1", "down2", "mid", "up2", "up1"]
    assert isinstance(chain, GraphChain)
    d1 = 2 * 4 * 8 * 8 * F32  # down1's output: 4 channels at 8x8, skips to the last block
    d2 = 2 * 8 * 4 * 4 * F32  # down2's output: 8 channels at 4x4, skips over mid
    cat = 2 * 16 * 4 * 4 * F32  # mid ends with cat([mid, d2]) (glue code joins the block before it)
    cat1 = 2 * 8 * 8 * 8 * F32  # up2 ends with cat([up2, d1])
    assert [(b.main_bytes, b.skip_bytes) for b in chain.graph.boundaries] == [
        (d1, 0), (d2, d1), (cat, d1), (cat1, 0)]
    assert [c.made_by for c in chain.graph.boundaries[2].skips] == ["down1"]
    assert chain.crossing_bytes() == [(d1, 0), (d2, d1), (cat, d1), (cat1, 0)]


def test_a_model_input_needed_later_crosses_every_cut_before_its_use() -> None:
    chain = chain_of(TwoInTwoOut(), (torch.randn(4, 6), torch.rand(4, 1)), "two")
    assert chain.names == ["enc", "body", "head_a", "head_b"]
    assert isinstance(chain, GraphChain)
    scale = 4 * 1 * F32
    skips = [[(c.name, c.made_by, c.bytes) for c in b.skips] for b in chain.graph.boundaries]
    assert skips[0] == [("scale", "input", scale)] and skips[1] == [("scale", "input", scale)]
    assert skips[2][0][1] == "body"  # head_b still needs the hidden state head_a read
    # the live sets are made with the blocks, one per block, and never changed after
    assert len(chain.graph.live) == len(chain.names) and chain.graph.live[0][0] == "scale"
    with pytest.raises(dataclasses.FrozenInstanceError):
        chain.graph.live = []  # type: ignore[misc]


def test_stage_modules_compose_to_the_model_and_keep_its_names() -> None:
    torch.manual_seed(0)
    model = UNet()
    x = torch.randn(2, 1, 8, 8)
    chain = chain_of(model, (x,), "unet")
    first, second = chain.stage_module(0, 1), chain.stage_module(2, 4)
    assert set(first.state_dict()) | set(second.state_dict()) == set(model.state_dict())
    assert first.get_parameter("down1.0.weight") is model.down1[0].weight  # shared, not copied
    reference = UNet()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        out = second(*first(x))
        torch.testing.assert_close(out[0], reference.train()(x))


def test_hf_gpt2_masks_are_recomputed_and_the_tied_embedding_keeps_both_names() -> None:
    pytest.importorskip("transformers")
    made = hf_gpt2()
    chain = chain_of(made["module"], (made["example"],), "gpt2")
    assert chain.names == ["transformer.wte", "transformer.wpe", "transformer.h.0", "transformer.h.1",
                           "transformer.ln_f", "lm_head"]
    assert isinstance(chain, GraphChain)
    assert all(b.skip_bytes == 0 for b in chain.graph.boundaries)  # masks and positions: recomputed, not sent
    hidden = 2 * 16 * 32 * F32
    assert [b.main_bytes for b in chain.graph.boundaries] == [hidden] * 5
    head = chain.stage_module(5, 5)
    assert [n for n, _ in head.named_parameters()] == ["lm_head.weight"]
    assert head.get_parameter("lm_head.weight") is chain.stage_module(0, 0).get_parameter("transformer.wte.weight")


def test_profile_records_skip_bytes_and_old_profiles_still_load(tmp_path: Path) -> None:
    torch.manual_seed(0)
    profile = profile_model(UNet(), torch.randn(2, 1, 8, 8), name="unet", warmup=0, repeats=1)
    assert [x.skip_bytes for x in profile.layers] == [0, 2048, 2048, 0, 0]
    assert [x.output_bytes for x in profile.layers[:4]] == [2048, 1024, 2048, 4096]
    again = Profile.from_json(profile.to_json(tmp_path / "unet.json"))
    assert again == profile
    old = Profile.from_json(Path(__file__).resolve().parent.parent / "profiles" / "gpt2-tiny-cpu-mb4.json")
    assert all(x.skip_bytes == 0 for x in old.layers)


class _DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = _Gate()
        self.out = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.gate(x)) + x


class _Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: no graph can hold both branches
            return x * 2
        return x


def test_a_model_that_cannot_be_captured_names_the_module_and_the_way_out() -> None:
    with pytest.raises(AutopartError, match=r"could not capture its forward in 'gate'.*nn.Sequential"):
        capture(_DataDependent(), (torch.randn(2, 4),), name="dd")


class _Widen(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(32, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x).repeat(1, 8))  # code between the modules that makes 8x the bytes


def test_code_between_modules_goes_where_the_cut_is_cheapest() -> None:
    chain = chain_of(_Widen(), (torch.randn(3, 4),), "widen")
    assert isinstance(chain, GraphChain)
    assert chain.graph.cuts == [3 * 4 * 4, 3 * 32 * 4, 3 * 2 * 4]  # after a, after repeat, after b (the output)
    assert chain.names == ["a", "b"] and chain.graph.spans == [(0, 1), (1, 3)]  # repeat runs in b's block
    assert [(b.main_bytes, b.skip_bytes) for b in chain.graph.boundaries] == [(48, 0)]


class _DictHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"y": self.proj(x)}


def test_both_kinds_of_chain_agree_on_a_model_that_is_a_chain_of_its_children() -> None:
    """The same Sequential cut as its children and as its captured graph: the same blocks, parameter names,
    stage keys, bytes crossing each cut, and loss (of the whole model as one stage, and of its blocks run in
    order) as the model's own, its dict output rebuilt by each kind its own way."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 6), _DictHead())
    x, target = torch.randn(5, 4), torch.randn(5, 3)
    children = chain_of(model, (x,), "seq")
    graph = GraphChain(model, graph_blocks(capture(model, (x,)), model), (x,))
    assert isinstance(children, ChildrenChain) and (children.captured, graph.captured) == (False, True)
    assert children.names == graph.names == ["0", "1", "2"]
    for first in range(3):
        for last in range(first, 3):
            assert children.parameter_names(first, last) == graph.parameter_names(first, last)
            assert (sorted(children.stage_module(first, last).state_dict())
                    == sorted(graph.stage_module(first, last).state_dict()))
    hidden = 5 * 6 * F32
    assert [(b.main_bytes, b.skip_bytes) for b in children.crossings()] == [(hidden, 0)] * 2
    assert [(b.main_bytes, b.skip_bytes) for b in graph.crossings()] == [(hidden, 0)] * 2
    assert (children.crossing_bytes(), graph.crossing_bytes()) == ([], [(hidden, 0)] * 2)

    def loss_fn(out: dict[str, torch.Tensor], t: torch.Tensor) -> torch.Tensor:
        return ((out["y"] - t) ** 2).mean()

    expected = loss_fn(model(x), target)
    for chain in (children, graph):
        torch.testing.assert_close(chain.model_loss(loss_fn)(chain.stage_module(0, 2)(x), target), expected)
        out = x
        for _, block in chain.blocks:
            out = call_block(block, out)
        torch.testing.assert_close(chain.block_loss(loss_fn)(out, target), expected)

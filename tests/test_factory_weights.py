"""A factory that sets weights itself once its model is made (issue #19, part A2): loading a state dict, zeroing a
head, copying under ``no_grad``, ``.data.fill_``, ``assign=True``. On the meta device those writes would be lost, so
every rank builds the whole model, with the factory's weights, and says so once; the model's own construction
(writes in ``__init__`` and ``reset_parameters``, transformers' init) stays per stage."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from autopart.measure.spec import ModelBundle, load_model
from autopart.run.build import build_for_rank, build_model
from tests.build_models import Net
from tests.conftest import ROOT
from tests.test_build import HF_GPT2, HF_LLAMA, MODELS, UNET, _train, reference_losses

WRITES = {"loads_state_dict": ("load_state_dict", "gain"), "zeroes_head": ("zero_", "head.weight"),
          "copies_under_no_grad": ("copy_", "body.weight"), "fills_data": ("fill_", "body.bias"),
          "assigns": ("load_state_dict", "head.weight"), "sets_data": (".data =", "head.weight"),
          "helper_loads": ("load_state_dict", "gain")}


@pytest.fixture()
def saved_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, torch.Tensor]:
    """A state dict of :class:`Net` with values its own init never draws, where ``loads_state_dict`` reads it."""
    state = {name: torch.full_like(t, 0.125 * (i + 1)) for i, (name, t) in enumerate(Net().state_dict().items())}
    torch.save(state, tmp_path / "state.pt")
    monkeypatch.setenv("AUTOPART_TEST_STATE", str(tmp_path / "state.pt"))
    return state


@pytest.mark.parametrize("factory", sorted(WRITES))
def test_a_factory_that_sets_weights_is_built_whole_with_its_weights(factory: str,
                                                                     saved_state: dict[str, torch.Tensor]) -> None:
    spec = f"{MODELS}:{factory}"
    built = build_for_rank(spec, 0)
    how, name = WRITES[factory]
    assert not built.empty and built.note is not None
    assert (f"note: model factory {spec!r} sets weights itself ({how} into {name!r} at build_models.py:"
            in built.note), built.note
    assert "every rank builds the whole model to keep them; give them with --weights FILE" in built.note
    torch.manual_seed(0)
    expected = load_model(spec).module.state_dict()  # the factory's own weights, as before issue #19
    for model in (built.bundle.module, build_model(spec, 0).module):  # a rank's build, the one-process reference
        got = model.state_dict()
        assert set(got) == set(expected) and not any(t.is_meta for t in got.values())
        for key, tensor in expected.items():
            assert torch.equal(got[key], tensor), key
    weights = built.bundle.module.state_dict()
    if factory == "loads_state_dict":
        assert all(torch.equal(weights[k], v) for k, v in saved_state.items())
    elif factory == "zeroes_head":
        assert torch.equal(weights["head.weight"], torch.zeros(4, 8))
    elif factory == "copies_under_no_grad":
        assert torch.equal(weights["body.weight"], torch.eye(8))
    elif factory == "helper_loads":  # the factory's line, not the helper's
        assert "at build_models.py:" in built.note and f":{_line('return _net(_pretrained())')})" in built.note


def _line(text: str) -> int:
    lines = (ROOT / "tests" / "build_models.py").read_text().splitlines()
    return next(i for i, line in enumerate(lines, 1) if text in line)


@pytest.mark.parametrize("spec", [f"{MODELS}:own_init", f"{MODELS}:sinusoidal", "gpt2-tiny", "resnet-mini",
                                  "mlp-hetero", UNET, f"{ROOT / 'tests' / 'graph_models.py'}:hf_gpt2", HF_GPT2,
                                  HF_LLAMA])
def test_the_models_own_construction_is_not_a_factory_write(spec: str) -> None:
    """Writes in ``__init__`` (``nn.Linear``'s, ``zeros_`` of ``Net``'s head bias), in ``reset_parameters`` (``Net``
    fills ``gain``) and transformers' ``post_init`` / ``_init_weights`` / ``tie_weights``: each rank builds its
    stages only."""
    if "hf" in spec:
        pytest.importorskip("transformers")
    built = build_for_rank(spec, 0)
    assert built.empty and built.note is None
    assert all(p.is_meta for p in built.bundle.module.parameters())


@pytest.mark.slow
def test_two_ranks_keep_a_loaded_state_dict_and_say_so_once(saved_state: dict[str, torch.Tensor],
                                                           tmp_path: Path) -> None:
    spec = f"{MODELS}:loads_state_dict"
    report, said = _train(spec, [1, 1], tmp_path, steps=2)
    assert said.count("sets weights itself (load_state_dict into 'gain'") == 1, said
    def factory_weights(name: str, seed: int) -> ModelBundle:  # as every rank built it before issue #19
        torch.manual_seed(seed)
        return load_model(name)

    expected = reference_losses(spec, tmp_path / "plan.json", 2, build=factory_weights)
    assert report["losses"] == pytest.approx(expected, rel=1e-6, abs=1e-6)

"""A factory that sets weights itself once its model is made (issue #19, part A2): loading a state dict, zeroing a
head, copying under ``no_grad``, ``.data.fill_``, ``assign=True``. On the meta device those writes would be lost, so
every rank builds the whole model, with the factory's weights, and says so once; the model's own construction
(writes in ``__init__`` and ``reset_parameters``, transformers' init) stays per stage."""
from __future__ import annotations

from pathlib import Path
from typing import Any

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


HF_BERT = "hf:bert:num_hidden_layers=2,hidden_size=32,intermediate_size=64,num_attention_heads=2,vocab_size=256"
HF_T5 = "hf:t5:num_layers=2,d_model=32,d_ff=64,num_heads=2,d_kv=16,vocab_size=256"


@pytest.mark.parametrize("spec", [f"{MODELS}:own_init", f"{MODELS}:sinusoidal", "gpt2-tiny", "resnet-mini",
                                  "mlp-hetero", UNET, f"{ROOT / 'tests' / 'graph_models.py'}:hf_gpt2", HF_GPT2,
                                  HF_LLAMA, HF_BERT, HF_T5, f"{MODELS}:nanogpt_fixed", f"{MODELS}:torch_parts",
                                  f"{MODELS}:clones"])
def test_the_models_own_construction_is_not_a_factory_write(spec: str) -> None:
    """Writes in ``reset_parameters`` (``nn.Linear``'s from its ``__init__``, torch's Conv, Embedding with
    ``padding_idx``, norms, LSTM/GRU; ``Net``'s zeroed head bias and ``gain``), in ``_init_weights`` (nanoGPT's with
    its scaled ``c_proj`` moved into it) and transformers' ``post_init`` / ``_init_weights`` / ``tie_weights``
    (which overwrite what ``Conv1D.__init__`` draws), blocks cloned with ``deepcopy``: each rank builds its stages
    only."""
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
    _assert_trained_from_the_factorys_weights(spec, report, tmp_path)


def _factory_bundle(spec: str, seed: int) -> ModelBundle:
    """The model as its factory builds it from the seed: what every rank built before issue #19."""
    torch.manual_seed(seed)
    return load_model(spec)


def _assert_trained_from_the_factorys_weights(spec: str, report: dict[str, Any], tmp_path: Path) -> None:
    """The 2-step run's losses are one process's from the factory's own weights."""
    expected = reference_losses(spec, tmp_path / "plan.json", 2, build=_factory_bundle)
    assert report["losses"] == pytest.approx(expected, rel=1e-6, abs=1e-6)


INIT_WRITES = {"init_writes": ("InitZeroes.__init__", "head.bias"), "nanogpt": ("NanoGPT.__init__", "h.0.c_proj.weight"),
               "attention": ("MultiheadAttention.__init__", "in_proj_weight"),
               "transformer": ("MultiheadAttention.__init__", "in_proj_weight")}


def _factory_weights(spec: str, seed: int = 0) -> dict[str, torch.Tensor]:
    return _factory_bundle(spec, seed).module.state_dict()  # the factory's own weights, as before issue #19


def _assert_factory_weights(spec: str, *models: torch.nn.Module) -> dict[str, torch.Tensor]:
    expected = _factory_weights(spec)
    for model in models:
        got = model.state_dict()
        assert set(got) == set(expected) and not any(t.is_meta for t in got.values())
        for key, tensor in expected.items():
            assert torch.equal(got[key], tensor), key
    return expected


@pytest.mark.parametrize("factory", sorted(INIT_WRITES))
def test_a_write_in_init_outside_its_init_methods_is_built_whole(factory: str) -> None:
    """nanoGPT scales ``c_proj.weight`` in ``GPT.__init__`` after ``apply(_init_weights)``; ``nn.MultiheadAttention``
    (and so ``nn.Transformer``) draws xavier in ``_reset_parameters`` from ``__init__``: neither is redone by the
    per-module init, so every rank builds the whole model with those weights and says which write."""
    spec = f"{MODELS}:{factory}"
    built = build_for_rank(spec, 0)
    inside, name = INIT_WRITES[factory]
    assert not built.empty and built.note is not None
    assert built.note.startswith(f"note: {inside!r} writes "), built.note
    assert f"{name}' outside reset_parameters/_init_weights (" in built.note, built.note
    assert "every rank builds the whole model to keep it; move the write into _init_weights" in built.note
    weights = _assert_factory_weights(spec, built.bundle.module, build_model(spec, 0).module)
    if factory == "init_writes":
        assert torch.equal(weights["head.bias"], torch.full((4,), 0.5))
        assert built.note.endswith(f"(build_models.py:{_line('nn.init.constant_(self.head.bias, 0.5)')}): every rank "
                                   "builds the whole model to keep it; move the write into _init_weights or "
                                   "reset_parameters, or give every weight with --weights FILE, to build only each "
                                   "rank's stages")
    elif factory == "nanogpt":  # its scaled init kept: std 0.02 / sqrt(2 * n_layer) = 0.01
        assert float(weights["h.0.c_proj.weight"].std()) == pytest.approx(0.01, rel=0.3)
    elif factory == "attention":
        assert torch.equal(weights["attn.out_proj.bias"], torch.zeros(16))


@torch.no_grad()
def test_an_init_moved_into_init_weights_is_kept_per_stage() -> None:
    """nanoGPT with its ``c_proj`` scaling moved into ``_init_weights``: per stage, with that scaling."""
    model = build_model(f"{MODELS}:nanogpt_fixed", 0).module
    assert float(model.get_parameter("h.0.c_proj.weight").std()) == pytest.approx(0.01, rel=0.3)
    assert float(model.get_parameter("h.0.c_attn.weight").std()) == pytest.approx(0.02, rel=0.3)
    parts = build_model(f"{MODELS}:torch_parts", 0).module
    assert torch.equal(parts.get_parameter("embed.weight")[0], torch.zeros(8))  # padding_idx row, as torch makes it


@pytest.mark.parametrize("factory", ["ends_to_cpu", "ends_cuda", "ends_float", "ends_bf16"])
def test_a_factory_that_moves_or_casts_its_model_is_built_per_stage(factory: str) -> None:
    """``model.to("cpu")``, ``.cuda()``, ``.float()``, ``.to(torch.bfloat16)`` at the end of a factory: the
    parameters stay on meta (a rank gives them storage on its own device), a cast is kept; the weights are
    ``Net``'s per-stage ones, drawn in the cast's dtype."""
    spec = f"{MODELS}:{factory}"
    built = build_for_rank(spec, 0)
    assert built.empty and built.note is None
    dtype = torch.bfloat16 if factory == "ends_bf16" else torch.float32
    assert all(p.is_meta and p.dtype == dtype for p in built.bundle.module.parameters())
    got = build_model(spec, 0).module.state_dict()
    expected = build_model(f"{MODELS}:own_init", 0).module.state_dict()
    assert set(got) == set(expected)
    for key, tensor in expected.items():
        assert got[key].dtype == dtype and got[key].device.type == "cpu"
        assert torch.allclose(got[key].float(), tensor, rtol=0, atol=0 if dtype == torch.float32 else 2e-3), key


def test_a_device_move_on_the_meta_device_stays_there() -> None:
    """What ``autopart train``'s launcher builds (names and shapes): ``.cuda()`` / ``.to("cpu")`` keep meta."""
    from autopart.measure.empty import on_meta_device

    for factory in ("ends_cuda", "ends_to_cpu", "ends_bf16", "sinusoidal_to_cpu"):
        with on_meta_device():
            module = load_model(f"{MODELS}:{factory}").module
        assert all(t.is_meta for t in [*module.parameters(), *module.buffers()]), factory


@pytest.mark.slow
def test_two_ranks_train_a_factory_ending_in_to_cpu_per_stage(tmp_path: Path) -> None:
    spec = f"{MODELS}:sinusoidal_to_cpu"
    report, said = _train(spec, [2, 3], tmp_path, steps=2)
    assert "note:" not in said, said
    assert report["losses"] == pytest.approx(reference_losses(spec, tmp_path / "plan.json", 2), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("factory, said", [
    ("reads_a_weight", "fails with its parameters on the meta device (model factory "
                       "'{spec}' raised RuntimeError: Tensor.item() cannot be called on meta tensors)"),
    ("weight_norm", "makes 'body.parametrizations.weight.original0' from a parameter on the meta device")])
def test_a_factory_that_cannot_run_on_meta_is_built_whole(factory: str, said: str) -> None:
    """A factory that reads a weight's value (``.item()``) or applies ``weight_norm``: the whole build, with the
    factory's weights, said once."""
    spec = f"{MODELS}:{factory}"
    built = build_for_rank(spec, 0)
    assert not built.empty and built.note is not None
    assert built.note.startswith(f"note: model factory {spec!r} {said.format(spec=spec)}"), built.note
    assert built.note.endswith(": every rank builds the whole model")
    _assert_factory_weights(spec, built.bundle.module, build_model(spec, 0).module)


@pytest.mark.slow
def test_two_ranks_keep_nanogpts_init_and_say_so_once(tmp_path: Path) -> None:
    spec = f"{MODELS}:nanogpt"
    report, said = _train(spec, [2, 2], tmp_path, steps=2)
    assert said.count("'NanoGPT.__init__' writes 'h.0.c_proj.weight' outside reset_parameters") == 1, said
    _assert_trained_from_the_factorys_weights(spec, report, tmp_path)


@pytest.mark.slow
def test_two_ranks_train_a_factory_that_fails_on_meta_whole_and_say_so_once(tmp_path: Path) -> None:
    spec = f"{MODELS}:chain_reads_a_weight"
    report, said = _train(spec, [1, 2], tmp_path, steps=2)
    assert said.count("fails with its parameters on the meta device (model factory ") == 1, said
    _assert_trained_from_the_factorys_weights(spec, report, tmp_path)


@pytest.mark.parametrize("factory", ["loads_state_dict", "assigns", "zeroes_head", "init_writes", "nanogpt",
                                     "uncovered"])
def test_with_weights_given_a_factory_that_sets_weights_is_built_per_stage(factory: str,
                                                                          saved_state: dict[str, torch.Tensor]) -> None:
    """With ``--weights`` every parameter comes from the file (its keys are checked to cover them all), so neither
    the factory's own writes nor a parameter nothing initialises needs the whole model: per stage, no note."""
    spec = f"{MODELS}:{factory}"
    assert not build_for_rank(spec, 0).empty  # without the file: whole
    built = build_for_rank(spec, 0, weights=True)
    assert built.empty and built.note is None
    assert all(p.is_meta for p in built.bundle.module.parameters())


def test_with_weights_given_a_factory_that_cannot_run_on_meta_is_still_built_whole() -> None:
    spec = f"{MODELS}:reads_a_weight"
    built = build_for_rank(spec, 0, weights=True)
    assert not built.empty and built.note is not None and "fails with its parameters on the meta device" in built.note


@pytest.mark.slow
def test_two_ranks_train_a_factory_that_loads_its_file_per_stage_with_weights(saved_state: dict[str, torch.Tensor],
                                                                              tmp_path: Path) -> None:
    """The factory loads ``state.pt`` itself and ``--weights`` gives the same file: each rank builds only its
    stages (no note), loads its tensors from the file, and trains as one process from the factory's weights."""
    spec = f"{MODELS}:loads_state_dict"
    state = tmp_path / "state.pt"
    report, said = _train(spec, [1, 1], tmp_path, "--weights", str(state), steps=2)
    assert "builds the whole model" not in said and "sets weights itself" not in said, said

    def factory_weights(name: str, seed: int) -> ModelBundle:  # the file's weights, as the factory loads them
        torch.manual_seed(seed)
        return load_model(name)

    expected = reference_losses(spec, tmp_path / "plan.json", 2, build=factory_weights)
    assert report["losses"] == pytest.approx(expected, rel=1e-6, abs=1e-6)

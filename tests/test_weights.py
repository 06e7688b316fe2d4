"""Weights in (:mod:`autopart.run.weights`): safetensors shards, a torch.save'd state dict and an autopart checkpoint
load exactly what ``from_pretrained`` loads; weights that do not fit the model are one line before any rank starts;
and on real torchrun/gloo ranks, the first step's loss from a folder's weights equals the unpartitioned model's."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from autopart.errors import AutopartError
from tests.conftest import ROOT, assert_one_line_error, run_cli, run_cli_here
from tests.hf_folders import as_published, from_folder, save_bf16, save_model

pytest.importorskip("transformers")

UNET = f"{ROOT / 'tests' / 'graph_models.py'}:unet"


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {kind: save_model(kind, root / kind) for kind in ("llama", "gpt2")}


def _fresh(folder: Path, seed: int = 99) -> Any:
    """The folder's model with other random weights than the saved ones."""
    from autopart.measure.hf import build_hf

    torch.manual_seed(seed)
    return build_hf(f"hf:{folder}")["module"]


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert not different, different[:3]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_shards_load_exactly_what_from_pretrained_loads(kind: str, folders: dict[str, Path]) -> None:
    from autopart.run.weights import check_keys, load_into, model_names, open_weights

    source = open_weights(folders[kind])
    shards = len(list(folders[kind].glob("model-*.safetensors")))
    assert shards > 1 and source.description == f"{folders[kind]} (safetensors, {shards} shards)"
    model = _fresh(folders[kind])
    names = model_names(model)
    assert names.aliases == ({"lm_head.weight": "transformer.wte.weight"} if kind == "gpt2" else {})
    assert ("lm_head.weight" in source.keys()) == (kind == "llama")  # GPT-2 saves its tied head once
    load_into(model, source, check_keys(source, names, kind))
    _assert_same(model.state_dict(), from_folder(folders[kind]).state_dict())


def test_a_stage_reads_only_its_own_tensors(folders: dict[str, Path]) -> None:
    from autopart.measure.blocks import chain_of
    from autopart.measure.spec import load_model
    from autopart.run.weights import check_keys, load_into, model_names, open_weights

    bundle = load_model(f"hf:{folders['gpt2']}")
    chain = chain_of(bundle.module, bundle.example if isinstance(bundle.example, tuple) else (bundle.example,),
                     "gpt2", bundle.input_names)
    last = chain.stage_module(len(chain.names) - 2, len(chain.names) - 1)  # ln_f and the tied head
    source = open_weights(folders["gpt2"])
    reads: list[str] = []
    read = source.read
    source.read = lambda key: reads.append(key) or read(key)  # type: ignore[method-assign]
    load_into(last, source, check_keys(source, model_names(bundle.module), "gpt2"))
    assert sorted(reads) == ["transformer.ln_f.bias", "transformer.ln_f.weight", "transformer.wte.weight"]
    want = from_folder(folders["gpt2"]).state_dict()
    _assert_same(last.state_dict(), {k: want[k] for k in last.state_dict()})


def test_a_saved_state_dict_and_a_checkpoint_folder_are_sources(folders: dict[str, Path], tmp_path: Path) -> None:
    from autopart.run.checkpoint import mark_complete, save_stage
    from autopart.run.weights import check_keys, load_into, model_names, open_weights

    want = from_folder(folders["gpt2"]).state_dict()
    torch.save(want, tmp_path / "state.pt")
    head = {k: v for k, v in want.items() if k.startswith(("transformer.ln_f", "lm_head"))}
    body = {k: v for k, v in want.items() if k not in head}
    aliases = {"lm_head.weight": "transformer.wte.weight"}
    for stage, part in enumerate((body, head)):  # two stages, as two ranks save them
        save_stage(tmp_path / "ckpt", 3, stage, part, None, stage, [stage], aliases)
    mark_complete(tmp_path / "ckpt", 3, 2)
    for path, kind in ((tmp_path / "state.pt", "torch.save state dict"),
                       (tmp_path / "ckpt", "autopart checkpoint, 2 stages"),
                       (tmp_path / "ckpt" / "step-000003", "autopart checkpoint, 2 stages")):
        source = open_weights(path)
        assert source.description.endswith(f"({kind})"), source.description
        model = _fresh(folders["gpt2"])
        load_into(model, source, check_keys(source, model_names(model), "gpt2"))
        _assert_same(model.state_dict(), want)


def _stages_loaded(spec: str, source_path: Path, stages: int) -> dict[str, torch.Tensor]:
    """The state of every stage of ``spec``'s chain in ``stages`` near-equal stages, each loaded from the weights at
    ``source_path`` as a rank loads its own."""
    from autopart.measure.blocks import chain_of
    from autopart.measure.spec import load_model
    from autopart.run.weights import check_keys, load_into, model_names, open_weights

    torch.manual_seed(99)  # other weights than the saved ones
    bundle = load_model(spec)
    chain = chain_of(bundle.module, bundle.example if isinstance(bundle.example, tuple) else (bundle.example,),
                     spec, bundle.input_names)
    source = open_weights(source_path)
    keys = check_keys(source, model_names(bundle.module), spec)
    bounds = [round(i * len(chain.names) / stages) for i in range(stages + 1)]
    state: dict[str, torch.Tensor] = {}
    for first, end in zip(bounds, bounds[1:]):
        stage = chain.stage_module(first, end - 1)
        load_into(stage, source, keys)
        state.update(stage.state_dict())
    return state


def test_a_bf16_folder_builds_float32_and_starts_from_its_values_upcast(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from autopart.measure.spec import load_model

    folder = save_bf16("llama", tmp_path / "bf16")
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    spec = f"hf:{folder}"
    assert {p.dtype for p in load_model(spec).module.parameters()} == {torch.float32}
    want = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).state_dict()
    saved = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.bfloat16).state_dict()
    assert all(torch.equal(want[k], saved[k].float()) for k in want)  # from_pretrained's float32 is bf16 upcast
    got = _stages_loaded(spec, folder, 2)
    assert {v.dtype for v in got.values()} == {torch.float32}
    _assert_same(got, want)


@pytest.mark.parametrize("kind, prefix, stale", [
    ("gpt2", "transformer.", ("h.0.attn.bias", "h.1.attn.bias")),  # as the Hub's gpt2 file has them
    ("llama", "model.", ("layers.0.self_attn.rotary_emb.inv_freq",)),  # as older Llama checkpoints have them
])
def test_names_as_published_on_the_hub_load_what_from_pretrained_loads(kind: str, prefix: str, stale: tuple[str, ...],
                                                                       folders: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    from safetensors import safe_open

    from autopart.run.weights import model_names

    extra = {key: torch.tril(torch.ones(1, 1, 8, 8)) for key in stale}
    published = as_published(folders[kind], tmp_path / "published", prefix, extra)
    with safe_open(str(published / "model.safetensors"), framework="pt") as handle:
        keys = set(handle.keys())
    assert not any(key.startswith(prefix) for key in keys) and set(stale) <= keys
    want = from_folder(folders[kind]).state_dict()
    _assert_same(from_folder(published).state_dict(), want)  # transformers reads them alike
    _assert_same(_stages_loaded(f"hf:{published}", published, 3), want)
    assert model_names(_fresh(published)).prefix == prefix.rstrip(".")


def test_other_models_match_names_exactly(tmp_path: Path) -> None:
    from autopart.measure.spec import load_model
    from autopart.run.weights import ModelNames, check_keys, model_names, open_weights

    model = load_model(UNET).module
    names = model_names(model)
    assert names == ModelNames(names.shapes, names.aliases)  # no prefix, nothing ignored
    first = next(iter(names.shapes)).partition(".")[0]
    torch.save({k.removeprefix(f"{first}."): v for k, v in model.state_dict().items()}, tmp_path / "stripped.pt")
    with pytest.raises(AutopartError, match=r"keys? of model 'unet' missing .* that model 'unet' does not have"):
        check_keys(open_weights(tmp_path / "stripped.pt"), names, "unet")


def test_a_name_the_model_may_lack_stays_as_built(tmp_path: Path) -> None:
    from autopart.run.weights import ModelNames, check_keys, load_into, open_weights

    model = torch.nn.Linear(3, 2)
    built = model.bias.detach().clone()
    torch.save({"weight": torch.ones(2, 3)}, tmp_path / "weight-only.pt")
    source = open_weights(tmp_path / "weight-only.pt")
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    with pytest.raises(AutopartError, match="1 key of model 'linear' missing from .*: 'bias'"):
        check_keys(source, ModelNames(shapes, {}), "linear")
    keys = check_keys(source, ModelNames(shapes, {}, ignore_missing=(r"\.?bias$",)), "linear")
    assert keys.kept == {"bias"}
    load_into(model, source, keys)
    assert torch.equal(model.weight, torch.ones(2, 3)) and torch.equal(model.bias, built)


@pytest.fixture(scope="module")
def llama_plan(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers import plan_for

    path = tmp_path_factory.mktemp("plan") / "plan.json"
    plan_for(f"hf:{folders['llama']}", [2, 3], "1F1B", 2, path)
    return path


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def _rename_key(folder: Path, old: str, new: str) -> None:
    """Rename a tensor in its shard and in the index, as a checkpoint of another model version would have it."""
    from safetensors.torch import load_file, save_file

    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard = folder / index["weight_map"].pop(old)
    index["weight_map"][new] = shard.name
    tensors = load_file(shard)
    tensors[new] = tensors.pop(old)
    save_file(tensors, shard, metadata={"format": "pt"})
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def _break(how: str, folder: Path) -> tuple[str, list[str], tuple[str, ...]]:
    """Spoil a copy of the Llama's folder ``how``: (model spec, extra train flags, what the one line says)."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    second = sorted(set(index["weight_map"].values()))[1]
    if how == "missing-shard":
        (folder / second).unlink()
        return f"hf:{folder}", [], (f"name shard {second!r}, which is missing",)
    if how == "damaged-shard":
        (folder / second).write_bytes(b"\x00" * 64)
        return f"hf:{folder}", [], (f"{second}' is damaged or not safetensors",)
    if how == "renamed-key":
        _rename_key(folder, "model.norm.weight", "model.final_norm.weight")
        return f"hf:{folder}", [], (f"1 key of model 'hf:{folder}' missing from {folder}/model.safetensors.index.json: "
                                    f"'model.norm.weight'; 1 key in ", "does not have: 'model.final_norm.weight'")
    if how == "more-layers":
        return f"hf:{folder}:num_hidden_layers=3", [], ("9 keys of model", "'model.layers.2.self_attn.q_proj.weight', "
                                                        "'model.layers.2.self_attn.k_proj.weight', "
                                                        "'model.layers.2.self_attn.v_proj.weight' (and 6 more)")
    if how == "other-width":
        return f"hf:{folder}:intermediate_size=96", [], (
            "(another config?): 'model.layers.0.mlp.gate_proj.weight' is [128, 64] there but [96, 64] in the model "
            "(and 5 more)",)
    if how == "no-weights":
        for shard in folder.glob("model*"):
            shard.unlink()
        return f"hf:{folder}", ["--weights", str(folder)], ("holds no model.safetensors, model.safetensors.index.json, "
                                                            "nor a complete",)
    if how == "weights-absent":
        return f"hf:{folder}", ["--weights", str(folder / "absent.safetensors")], ("absent.safetensors' do not exist",)
    assert how == "not-a-state-dict"
    torch.save([torch.zeros(1)], folder / "list.pt")
    return f"hf:{folder}", ["--weights", str(folder / "list.pt")], ("holds a list, not a state dict",)


@pytest.mark.parametrize("how", ["missing-shard", "damaged-shard", "renamed-key", "more-layers", "other-width",
                                 "no-weights", "weights-absent", "not-a-state-dict"])
def test_weights_that_do_not_fit_are_one_line_before_any_rank_starts(how: str, folders: dict[str, Path],
                                                                      llama_plan: Path, tmp_path: Path) -> None:
    spec, flags, shown = _break(how, _copy(folders["llama"], tmp_path))
    result = run_cli_here("train", str(llama_plan), "--model", spec, "--steps", "1", "--threads", "1", *flags)
    assert_one_line_error(result, *shown)


def test_a_key_no_model_has_is_still_one_line_among_published_names(folders: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    from tests.helpers import plan_for

    stale = {"h.0.attn.bias": torch.tril(torch.ones(1, 1, 8, 8)), "h.0.attn.gate.weight": torch.ones(2)}
    published = as_published(folders["gpt2"], tmp_path / "published", "transformer.", stale)
    spec = f"hf:{published}"
    plan_for(spec, [3, 3], "1F1B", 2, tmp_path / "plan.json")
    result = run_cli_here("train", str(tmp_path / "plan.json"), "--model", spec, "--steps", "1", "--threads", "1")
    assert_one_line_error(result, f"1 key in {published}/model.safetensors that model {spec!r} does not have: "
                                  f"'h.0.attn.gate.weight'")


def _first_loss(spec: str, plan_path: Path, model: torch.nn.Module) -> float:
    """``model``'s loss on the run's first batch (seed 0), averaged over the plan's micro-batches, in this process."""
    from autopart.formats.plan import Plan
    from autopart.measure.spec import call_model, load_model
    from autopart.run.data import training_data
    from autopart.run.microbatch import microbatch_shape

    plan = Plan.from_json(plan_path)
    m = plan.microbatches
    torch.manual_seed(0)
    bundle = load_model(spec)
    size, sample_shape = microbatch_shape(plan, bundle)  # as the ranks draw it
    data = training_data(bundle, None, size * m, sample_shape, 0, 0)
    inputs, target = next(data.batches)
    assert isinstance(inputs, torch.Tensor) and data.loss_fn is not None
    model.train()
    with torch.no_grad():
        losses = [data.loss_fn(call_model(model, [x], None), t)
                  for x, t in zip(inputs.tensor_split(m), target.tensor_split(m))]
    return float(torch.stack(losses).mean())


def _train_one_step(plan: Path, spec: str, tmp_path: Path, *flags: str) -> tuple[float, str]:
    result = run_cli("train", str(plan), "--model", spec, "--steps", "1", "--threads", "1", "--report",
                     str(tmp_path / "r.json"), *flags, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    header = next(line for line in result.stderr.splitlines() if line.startswith("training "))
    return float(json.loads((tmp_path / "r.json").read_text())["losses"][0]), header


@pytest.fixture(scope="module")
def profiles(folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``autopart profile hf:PATH`` of each folder, once (in this process: no interpreter to start)."""
    root, out = tmp_path_factory.mktemp("profiles"), {}
    for kind, folder in folders.items():
        result = run_cli_here("profile", f"hf:{folder}", "--repeats", "1", "--warmup", "0", "-o",
                              str(root / f"{kind}.json"))
        assert result.returncode == 0, result.stderr[-3000:]
        out[kind] = root / f"{kind}.json"
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kind, stages", [("llama", 2), ("gpt2", 3)])
def test_a_saved_model_trains_from_its_weights_on_real_ranks(kind: str, stages: int, folders: dict[str, Path],
                                                             profiles: dict[str, Path], tmp_path: Path) -> None:
    """Each family once: the Llama on 2 stages (a first and a last), GPT-2 on 3 (a middle stage too, and its
    tied embedding and head on the first and last ranks); every stage's weights feed the first loss."""
    spec, plan = f"hf:{folders[kind]}", tmp_path / "plan.json"
    result = run_cli("partition", str(profiles[kind]), "--stages", str(stages), "--microbatches", str(stages), "-o",
                     str(plan))
    assert result.returncode == 0, result.stderr[-3000:]
    loss, header = _train_one_step(plan, spec, tmp_path)
    shards = len(list(folders[kind].glob("model-*.safetensors")))
    assert header.endswith(f"weights: {folders[kind]} (safetensors, {shards} shards)"), header
    want = _first_loss(spec, plan, from_folder(folders[kind]))
    assert loss == pytest.approx(want, rel=1e-5, abs=1e-5), (loss, want)
    assert abs(loss - _first_loss(spec, plan, _fresh(folders[kind], seed=0))) > 1e-3  # the saved weights, not others


@pytest.mark.slow
def test_a_factory_trains_from_a_saved_state_dict_on_real_ranks(tmp_path: Path) -> None:
    from autopart.measure.spec import load_model
    from autopart.run.build import build_model
    from tests.helpers import plan_for

    plan = tmp_path / "plan.json"
    plan_for(UNET, [2, 3], "1F1B", 2, plan)
    torch.manual_seed(1234)  # not the run's seed: the weights must come from the file
    model = load_model(UNET).module
    torch.save(model.state_dict(), tmp_path / "unet.pt")
    loss, header = _train_one_step(plan, UNET, tmp_path, "--weights", str(tmp_path / "unet.pt"))
    assert header.endswith(f"weights: {tmp_path / 'unet.pt'} (torch.save state dict)"), header
    assert loss == pytest.approx(_first_loss(UNET, plan, model), rel=1e-5, abs=1e-6)
    # what the run's own seed would start from without --weights
    assert abs(loss - _first_loss(UNET, plan, build_model(UNET, 0).module)) > 1e-4


def _tied_pair() -> torch.nn.Module:
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 5, bias=False))
    model[1].weight = model[0].weight
    return model


@pytest.mark.parametrize("kind", ["state-dict", "safetensors"])
def test_a_tied_weight_saved_twice_with_different_values_loads_one_value_on_every_rank(kind: str,
                                                                                        tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from autopart.run.weights import check_keys, load_into, model_names, open_weights, tie_note

    model = _tied_pair()
    tensors = {"0.weight": torch.zeros(5, 4), "1.weight": torch.ones(5, 4)}
    path = tmp_path / ("w.pt" if kind == "state-dict" else "w.safetensors")
    torch.save(tensors, path) if kind == "state-dict" else save_file(tensors, path)
    source = open_weights(path)
    keys = check_keys(source, model_names(model), "pair")
    assert dict(keys.keys) == {"0.weight": "0.weight", "1.weight": "0.weight"}  # the first name's, on every stage
    assert tie_note(source, model_names(model)) == (
        f"note: weights {path} hold tied parameter '0.weight' under 2 names with different values ('0.weight', "
        f"'1.weight'): the model ties them, so every stage starts from '0.weight''s (transformers' from_pretrained "
        f"unties them)")
    from collections import OrderedDict

    stages = [torch.nn.Sequential(OrderedDict({"0": torch.nn.Embedding(5, 4)})),  # as 2 ranks build them
              torch.nn.Sequential(OrderedDict({"1": torch.nn.Linear(4, 5, bias=False)}))]
    for stage in stages:
        load_into(stage, source, keys)
        assert [torch.equal(v, torch.zeros(5, 4)) for v in stage.state_dict().values()] == [True]


@pytest.mark.parametrize("kind", ["state-dict", "safetensors"])
def test_a_tied_weight_saved_twice_alike_or_once_has_no_note(kind: str, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from autopart.run.weights import check_keys, model_names, open_weights, tie_note

    for name, tensors in (("twice", {"0.weight": torch.ones(5, 4), "1.weight": torch.ones(5, 4)}),
                          ("last-only", {"1.weight": torch.ones(5, 4)})):
        path = tmp_path / (f"{name}.pt" if kind == "state-dict" else f"{name}.safetensors")
        torch.save(tensors, path) if kind == "state-dict" else save_file(tensors, path)
        source, names = open_weights(path), model_names(_tied_pair())
        keys = check_keys(source, names, "pair")
        assert set(keys.keys.values()) == {next(iter(tensors))} and tie_note(source, names) is None, (name, keys)


def test_an_hf_folder_without_safetensors_notes_where_training_starts(folders: dict[str, Path],
                                                                      tmp_path: Path) -> None:
    from autopart.cli.train import _folder_weights, _no_weights_note

    folder = _copy(folders["llama"], tmp_path)
    spec = f"hf:{folder}"
    assert _folder_weights(spec) == str(folder) and _no_weights_note(spec) is None
    state = from_folder(folder).state_dict()
    for shard in folder.glob("model*"):
        shard.unlink()
    assert _folder_weights(spec) is None
    assert _no_weights_note(spec) == (f"note: {spec} holds no model.safetensors: training starts from the model's "
                                      f"own initialisation (give --weights FILE to start from weights)")
    torch.save(state, folder / "pytorch_model.bin")
    assert _folder_weights(spec) is None
    assert _no_weights_note(spec) == (f"note: {spec} holds no model.safetensors: training starts from the model's "
                                      f"own initialisation (give --weights {folder}/pytorch_model.bin to start from "
                                      f"its pytorch_model.bin)")


@pytest.mark.slow
def test_an_hf_folder_with_only_a_config_trains_from_the_models_own_initialisation(folders: dict[str, Path],
                                                                                    llama_plan: Path,
                                                                                    tmp_path: Path) -> None:
    folder = tmp_path / "config-only"
    folder.mkdir()
    shutil.copy(folders["llama"] / "config.json", folder / "config.json")
    spec = f"hf:{folder}"
    result = run_cli("train", str(llama_plan), "--model", spec, "--steps", "1", "--threads", "1", "--report",
                     str(tmp_path / "r.json"), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    notes = [line for line in result.stderr.splitlines() if "holds no model.safetensors" in line]
    assert notes == [f"note: {spec} holds no model.safetensors: training starts from the model's own initialisation "
                     f"(give --weights FILE to start from weights)"]  # once, from the launcher, not per rank
    loss = float(json.loads((tmp_path / "r.json").read_text())["losses"][0])
    from autopart.run.build import build_model

    assert loss == pytest.approx(_first_loss(spec, llama_plan, build_model(spec, 0).module), rel=1e-5, abs=1e-5)

"""``hf:PATH``: a folder ``save_pretrained`` wrote is built from its own config.json, offline, as
``from_pretrained`` reads it; a folder that is not one is one line."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, run_cli_here
from tests.hf_folders import save_model

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {kind: save_model(kind, root / kind) for kind in ("llama", "gpt2")}


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_a_folder_builds_the_config_from_pretrained_reads(kind: str, folders: dict[str, Path]) -> None:
    from transformers import AutoConfig

    from autopart.measure.hf import build_hf

    built = build_hf(f"hf:{folders[kind]}")["module"].config.to_dict()
    saved = AutoConfig.from_pretrained(folders[kind], local_files_only=True).to_dict()
    assert saved["model_type"] == kind and built.pop("use_cache") is False
    saved.pop("use_cache")
    assert built == saved


def test_fields_after_a_second_colon_change_the_folders_config(folders: dict[str, Path]) -> None:
    from autopart.measure.hf import build_hf

    config = build_hf(f"hf:{folders['llama']}:num_hidden_layers=1,rms_norm_eps=0.001")["module"].config
    assert (config.num_hidden_layers, config.rms_norm_eps, config.hidden_size) == (1, 0.001, 64)


def test_graph_draws_a_folders_model(folders: dict[str, Path]) -> None:
    result = run_cli_here("graph", f"hf:{folders['gpt2']}")
    assert result.returncode == 0, result.stderr
    assert "transformer.h.1" in result.stdout and "lm_head" in result.stdout


@pytest.mark.parametrize("make, shown", [
    (lambda f: f / "absent", "does not exist"),
    (lambda f: (f / "file.txt").write_text("x") and f / "file.txt", "is not a folder"),
    (lambda f: f, "has no config.json"),
    (lambda f: (f / "config.json").write_text("{oops") and f, "config.json is not JSON: "),
    (lambda f: (f / "config.json").write_text('{"hidden_size": 8}') and f, 'config.json has no "model_type"'),
    (lambda f: (f / "config.json").write_text('{"model_type": "no-such-type"}') and f,
     "model_type 'no-such-type' is not one transformers"),
], ids=["missing", "a-file", "no-config", "not-json", "no-model-type", "unknown-model-type"])
def test_a_folder_that_is_not_a_saved_model_is_one_line(make: object, shown: str, tmp_path: Path) -> None:
    folder = make(tmp_path)  # type: ignore[operator]
    assert_one_line_error(run_cli_here("graph", f"hf:{folder}"), f"hf:{folder}", shown)


def test_a_config_without_weights_builds_for_profile_and_graph(folders: dict[str, Path], tmp_path: Path) -> None:
    from autopart.measure.hf import build_hf

    shutil.copy(folders["llama"] / "config.json", tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
    assert build_hf(f"hf:{tmp_path}")["module"].config.num_hidden_layers == 2

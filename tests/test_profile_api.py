"""The Python API profiles a model as ``autopart profile`` does: same blocks, bytes and flags."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

import autopart
from autopart.errors import AutopartError
from tests.conftest import ROOT, run_cli


def _untimed(value: Any) -> Any:
    """``value`` (a profile's JSON) without what depends on time or on the process's thread count."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items()
                if not (k.endswith("_ms") or k.endswith("_ms_by_name") or k == "threads")}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return value


@pytest.mark.slow
@pytest.mark.parametrize("model, sizes", [("gpt2-tiny", ()), (f"{ROOT}/tests/graph_models.py:unet", (1, 2))])
def test_api_profile_equals_cli(tmp_path: Path, model: str, sizes: tuple[int, ...]) -> None:
    flags = ["--microbatch-size", ",".join(map(str, sizes))] if sizes else []
    result = run_cli("profile", model, "--threads", "1", "--repeats", "1", "--warmup", "0", *flags,
                     "-o", str(tmp_path / "cli.json"))
    assert result.returncode == 0, result.stderr
    cli = json.loads((tmp_path / "cli.json").read_text())
    api = autopart.profile(model, autopart.ProfileConfig(microbatch_sizes=sizes, repeats=1, warmup=0, threads=1))
    api.to_json(tmp_path / "api.json")
    assert _untimed(json.loads((tmp_path / "api.json").read_text())) == _untimed(cli)
    if model == "gpt2-tiny":  # the built-in brings its loss: the last block measures it, both ways
        assert cli["loss_in_last_block"] is True and api.loss_in_last_block


@pytest.mark.parametrize("field, value, message", [("repeats", 0, "repeats must be >= 1, got 0"),
                                                   ("warmup", -1, "warmup must be >= 0, got -1"),
                                                   ("threads", 0, "threads must be >= 1, got 0"),
                                                   ("device", "mps", "unsupported device 'mps'"),
                                                   ("dtype", "int64", "dtype must be a floating type, got 'int64'")])
def test_config_refuses_bad_values(field: str, value: int | str, message: str) -> None:
    """A config is checked when made, so the CLI refuses a bad flag before it checks -o or builds anything; the
    message names the config's field, not a command-line flag (a Python caller passed no flag)."""
    with pytest.raises(AutopartError, match="^" + re.escape(message)):
        autopart.ProfileConfig(**{field: value})


@pytest.mark.slow
def test_api_graph_equals_cli() -> None:
    """``autopart graph --json`` prints what :func:`build_chain` and :func:`block_rows` give."""
    from autopart.measure.graphview import GraphConfig, block_rows, build_chain

    model = f"{ROOT}/tests/graph_models.py:unet"
    result = run_cli("graph", model, "--microbatch-size", "2", "--json")
    assert result.returncode == 0, result.stderr
    chain = build_chain(model, GraphConfig(microbatch_size=2))
    assert json.loads(result.stdout)["blocks"] == json.loads(json.dumps(block_rows(chain, model)))
    assert len(block_rows(chain, model)) > 1


def test_graph_config_refuses_bad_values() -> None:
    from autopart.measure.graphview import GraphConfig

    with pytest.raises(AutopartError, match="--microbatch-size must be >= 1, got 0"):
        GraphConfig(microbatch_size=0)
    with pytest.raises(AutopartError, match="unknown dtype 'foo'"):
        GraphConfig(input_dtype="foo")

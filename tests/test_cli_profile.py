"""`autopart profile` as a user runs it: real processes, real files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from autopart.formats.profile import Profile
from tests.conftest import ROOT, assert_one_line_error, run_cli


@pytest.mark.slow
def test_profile_gpt2_small_writes_14_blocks(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    result = run_cli("profile", "gpt2-small", "--microbatch-size", "1", "--input-shape", "1,128",
                     "--repeats", "1", "--warmup", "0", "-o", str(out))
    assert result.returncode == 0, result.stderr
    profile = Profile.from_json(out)
    assert len(profile.layers) == 14 and profile.names[0] == "embed" and profile.names[-1] == "head"
    assert profile.param_bytes == (124_439_808 + 50257 * 768) * 4
    assert profile.sample_shape == (1, 128) and profile.microbatch_size == 1
    assert "head" in result.stdout and "total" in result.stdout


@pytest.mark.slow
def test_default_output_name_and_threads(tmp_path: Path) -> None:
    result = run_cli("profile", "mlp-hetero", "--repeats", "1", "--warmup", "0", "--threads", "1",
                     "--microbatch-size", "8", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "mlp-hetero-cpu-mb8.json").read_text())
    assert data["threads"] == 1 and data["microbatch_size"] == 8


@pytest.mark.slow
def test_user_file_model_with_input_shape(tmp_path: Path) -> None:
    (tmp_path / "net.py").write_text("import torch\ndef make():\n"
                                     "    return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU())\n")
    result = run_cli("profile", f"{tmp_path / 'net.py'}:make", "--input-shape", "3,6", "--repeats", "1",
                     "-o", str(tmp_path / "net.json"))
    assert result.returncode == 0, result.stderr
    assert Profile.from_json(tmp_path / "net.json").names == ["0", "1"]


def test_help_documents_every_flag() -> None:
    result = run_cli("profile", "--help")
    assert result.returncode == 0
    for flag in ("--microbatch-size", "--input-shape", "--input-dtype", "--device", "--dtype", "--repeats",
                 "--warmup", "--threads", "--output", "gpt2-small"):
        assert flag in result.stdout


@pytest.mark.parametrize("args, fragments", [
    (["gpt5"], ["unknown model 'gpt5'"]),
    (["missing_file.py:make"], ["model file 'missing_file.py' does not exist"]),
    (["no_such_module_q:make"], ["cannot import module 'no_such_module_q'"]),
    (["gpt2-tiny", "--input-shape", "2,4096"], ["cannot run input of shape [2, 4096]"]),
    (["gpt2-tiny", "--input-shape", "2,x"], ["not a list of integers"]),
    (["gpt2-tiny", "-o", "/no/such/folder/p.json"], ["folder '/no/such/folder' does not exist"]),
    (["gpt2-tiny", "--dtype", "int8"], ["unknown dtype 'int8'"]),
    (["gpt2-tiny", "--repeats", "0"], ["argument --repeats: must be >= 1, got 0"]),
    (["gpt2-tiny", "--warmup", "-1"], ["argument --warmup: must be >= 0, got -1"]),
    (["gpt2-tiny", "--threads", "two"], ["argument --threads: needs a whole number, got 'two'"]),
    (["gpt2-tiny", "--device", "tpu"], ["device 'tpu'"]),
    ([], ["required: MODEL"]),
])
@pytest.mark.slow
def test_bad_input_is_one_line_and_exit_2(args: list[str], fragments: list[str]) -> None:
    assert_one_line_error(run_cli("profile", *args), *fragments)


def test_factory_that_raises(tmp_path: Path) -> None:
    (tmp_path / "boom.py").write_text("def make():\n    raise RuntimeError('out of ideas')\n")
    assert_one_line_error(run_cli("profile", f"{tmp_path / 'boom.py'}:make"),
                          "raised RuntimeError: out of ideas")


def test_cuda_asked_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert_one_line_error(run_cli("profile", "gpt2-tiny", "--device", "cuda"), "CUDA is not available")


@pytest.mark.slow
def test_existing_output_survives_a_failed_run(tmp_path: Path) -> None:
    out = tmp_path / "p.json"
    out.write_text("precious")
    result = run_cli("profile", "gpt2-tiny", "--input-shape", "2,4096", "-o", str(out))
    assert result.returncode == 2 and out.read_text() == "precious"


@pytest.mark.slow
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_profile_and_plan_get_the_mode_the_umask_gives(tmp_path: Path, umask: int, mode: int) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    profile, plan = tmp_path / "p.json", tmp_path / "plan.json"
    for args in (["profile", "mlp-hetero", "--microbatch-size", "8", "--repeats", "1", "--warmup", "0",
                  "--threads", "1", "-o", str(profile)], ["partition", str(profile), "--stages", "2", "-o", str(plan)]):
        made = subprocess.run([sys.executable, "-m", "autopart", *args], env=env, text=True, capture_output=True,
                              preexec_fn=lambda: os.umask(umask), timeout=300)
        assert made.returncode == 0, made.stderr
    assert (profile.stat().st_mode & 0o777, plan.stat().st_mode & 0o777) == (mode, mode)

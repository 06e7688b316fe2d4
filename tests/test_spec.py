"""Loading models from specs: built-ins, files, modules, and every way a spec fails."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from autopart.measure.blocks import split_blocks
from autopart.errors import AutopartError
from autopart.measure.spec import load_model, parse_dtype, parse_shape, shape_example
from autopart.measure.models.registry import BUILTINS


@pytest.mark.parametrize("name, n_blocks", [("gpt2-tiny", 6), ("resnet-mini", 10), ("mlp-hetero", 9)])
def test_builtins_run_their_example_and_loss(name: str, n_blocks: int) -> None:
    bundle = load_model(name)
    assert bundle.builtin and len(split_blocks(bundle.module)) == n_blocks
    out = bundle.module(*bundle.example)
    assert bundle.loss_fn is not None
    target = torch.randint(0, out.shape[-1], out.shape[:-1])
    assert torch.isfinite(bundle.loss_fn(out, target))


def test_gpt2_small_has_the_real_shapes() -> None:
    module = load_model("gpt2-small").module
    names = [n for n, _ in split_blocks(module)]
    assert names == ["embed"] + [f"h.{i}" for i in range(12)] + ["head"]
    n_params = sum(p.numel() for p in module.parameters())
    # 124,439,808 in GPT-2 small with a tied head, plus the untied head's own 50257 x 768.
    assert n_params == 124_439_808 + 50257 * 768
    assert module.get_submodule("head.lm_head").weight is not module.get_submodule("embed.wte").weight


def test_every_builtin_is_documented() -> None:
    assert all(factory.__doc__ for factory in BUILTINS.values())


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_file_factory_forms(tmp_path: Path) -> None:
    spec = _write(tmp_path / "m.py", "import torch\n"
                  "def plain(): return torch.nn.Sequential(torch.nn.Linear(3, 2))\n"
                  "def pair(): return torch.nn.Sequential(torch.nn.Linear(3, 2)), torch.randn(4, 3)\n"
                  "def mapping(): return {'module': torch.nn.Linear(3, 2), 'example': (torch.randn(4, 3),),"
                  " 'loss_fn': torch.nn.functional.mse_loss}\n")
    assert load_model(f"{spec}:plain").example is None
    assert load_model(f"{spec}:pair").example[0].shape == (4, 3)  # type: ignore[index]
    bundle = load_model(f"{spec}:mapping")
    assert bundle.loss_fn is torch.nn.functional.mse_loss and not bundle.builtin


def test_module_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "usermodels_x.py", "import torch\ndef make(): return torch.nn.Sequential(torch.nn.ReLU())\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert isinstance(load_model("usermodels_x:make").module, nn.Sequential)
    sys.modules.pop("usermodels_x", None)


@pytest.mark.parametrize("body, spec_suffix, message", [
    ("def f(): raise ValueError('bad width 3')\n", ":f", "raised ValueError: bad width 3"),
    ("def f(): return 42\n", ":f", "returned int"),
    ("def f(): return {'example': 1}\n", ":f", "without 'module'"),
    ("x = 1\n", ":f", "has no attribute 'f'"),
    ("raise ImportError('no numpy here')\n", ":f", "raised ImportError: no numpy here"),
])
def test_bad_factories(tmp_path: Path, body: str, spec_suffix: str, message: str) -> None:
    spec = _write(tmp_path / "bad.py", body) + spec_suffix
    with pytest.raises(AutopartError, match=message.replace("(", r"\(")):
        load_model(spec)


def test_bad_specs(tmp_path: Path) -> None:
    with pytest.raises(AutopartError, match="unknown model 'gpt5'"):
        load_model("gpt5")
    with pytest.raises(AutopartError, match="does not exist"):
        load_model(str(tmp_path / "none.py") + ":f")
    with pytest.raises(AutopartError, match=r"cannot import module 'no_such_pkg_xyz\.mod'"):
        load_model("no_such_pkg_xyz.mod:f")


def test_shape_example() -> None:
    bundle = load_model("gpt2-tiny")
    (tokens,) = shape_example(bundle, microbatch_size=3)
    assert tokens.shape == (3, 64) and tokens.dtype == torch.long and int(tokens.max()) < 50257
    (tokens,) = shape_example(bundle, input_shape=(2, 16))
    assert tokens.shape == (2, 16) and tokens.dtype == torch.long
    plain = load_model.__globals__["ModelBundle"](name="p", module=nn.Linear(2, 2), example=None)
    with pytest.raises(AutopartError, match="pass --input-shape"):
        shape_example(plain)
    (x,) = shape_example(plain, input_shape=(4, 2))
    assert x.dtype == torch.float32


def test_parsers() -> None:
    assert parse_shape("8,1024") == (8, 1024) and parse_shape("8x1024") == (8, 1024)
    assert parse_dtype("bf16") == torch.bfloat16
    for bad in ("8,a", "", "0,3"):
        with pytest.raises(AutopartError):
            parse_shape(bad)
    with pytest.raises(AutopartError, match="unknown dtype 'float8'"):
        parse_dtype("float8")


def test_builtin_names_without_torch_match_the_registry() -> None:
    from autopart.measure.models import BUILTIN_NAMES

    assert list(BUILTIN_NAMES) == list(BUILTINS)

"""profiles/profile_lowmem.py: the slice of a block's parameters its optimizer step is timed on."""
from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

import torch

from tests.conftest import ROOT


def _lowmem() -> ModuleType:
    spec = importlib.util.spec_from_file_location("profile_lowmem", ROOT / "profiles" / "profile_lowmem.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["profile_lowmem"] = module
    spec.loader.exec_module(module)
    return module


def test_the_slice_is_the_first_elements_of_the_parameters_in_order() -> None:
    params = [torch.arange(6.0).reshape(2, 3), torch.arange(10.0, 14.0), torch.arange(20.0, 25.0)]
    flat = torch.cat([p.reshape(-1) for p in params])
    lowmem = _lowmem()
    for elements in (1, 5, 6, 7, 10, 15, 100):
        pieces = lowmem.parameter_slice(params, elements)
        assert torch.equal(torch.cat([p.detach() for p in pieces]), flat[:elements])
        assert len(pieces) == sum(1 for start in (0, 6, 10) if start < elements)  # no empty pieces
        assert all(p.requires_grad and p.data_ptr() not in {q.data_ptr() for q in params} for p in pieces)

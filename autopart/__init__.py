"""autopart: automatic pipeline-parallel partitioning for PyTorch.

    import autopart
    bundle = autopart.load_model("gpt2-tiny")
    profile = autopart.profile_model(bundle.module, bundle.example, name="gpt2-tiny")
    profile.to_json("gpt2-tiny.json")

The pure parts (profiles, plans, the partitioner and the simulator) import no
torch; the names that need torch are loaded on first use.
"""
from __future__ import annotations

from typing import Any

from autopart.errors import AutopartError
from autopart.formats.profile import LayerProfile, Profile

__all__ = ["AutopartError", "LayerProfile", "Profile", "load_model", "profile_model"]

_LAZY = {"load_model": "autopart.measure.spec", "profile_model": "autopart.measure.profiler"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'autopart' has no attribute {name!r}")

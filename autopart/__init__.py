"""autopart: automatic pipeline-parallel partitioning for PyTorch.

    import autopart
    profile = autopart.profile("gpt2-tiny", autopart.ProfileConfig(repeats=3))  # as `autopart profile` does
    plan = autopart.plan_partition(profile, 2)            # 2 ranks, 1F1B, 2 micro-batches
    print(plan.balance, autopart.simulate(plan).step_ms)

The data flow is the package layout: ``measure`` (model -> blocks -> profile,
torch), ``formats`` (the saved profile and plan), ``core`` (plan and
simulation, no torch), ``run`` (the plan on torch.distributed.pipelining),
``cli``. Names that need torch (or numpy) are loaded on first use, so
``import autopart`` stays light.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from autopart.errors import AutopartError
from autopart.formats.devices import Device
from autopart.formats.plan import Plan
from autopart.formats.profile import LayerProfile, Profile
from autopart.formats.stage import StageCost

if TYPE_CHECKING:
    from autopart.core.training import CostModel
    from autopart.core.planner import simulate_plan as simulate
    from autopart.core.search import plan_partition
    from autopart.core.simulate import Simulation
    from autopart.measure.api import NoteFn, ProfileConfig
    from autopart.measure.timing import ProgressFn
    from autopart.measure.profiler import profile_model
    from autopart.measure.spec import load_model
    from autopart.run.build import build_model

__all__ = ["AutopartError", "CostModel", "build_model", "Device", "LayerProfile", "Plan", "Profile", "ProfileConfig", "Simulation",
           "StageCost", "load_model", "plan_partition", "profile", "profile_model", "simulate"]

_LAZY = {
    "load_model": ("autopart.measure.spec", "load_model"),
    "build_model": ("autopart.run.build", "build_model"),
    "ProfileConfig": ("autopart.measure.api", "ProfileConfig"),
    "profile_model": ("autopart.measure.profiler", "profile_model"),
    "CostModel": ("autopart.core.training", "CostModel"),
    "plan_partition": ("autopart.core.search", "plan_partition"),
    "simulate": ("autopart.core.planner", "simulate_plan"),
    "Simulation": ("autopart.core.simulate", "Simulation"),
}


def profile(spec: str, config: "ProfileConfig | None" = None, *, progress: "ProgressFn | None" = None,
            note: "NoteFn | None" = None) -> Profile:
    """Profile the model ``spec`` as ``autopart profile`` does (:func:`autopart.measure.api.profile`), with the
    pipelining runtime's own costs the command records: its cost per action (``action_ms``) and its two halves of
    a backward (``input_grad_ms``, ``weight_grad_ms``)."""
    from autopart.measure.api import profile as measure_profile
    from autopart.run.stages import one_stage_world, split_backward

    return measure_profile(spec, config, progress=progress, note=note, runtime=one_stage_world,
                           split_backward=split_backward)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'autopart' has no attribute {name!r}")

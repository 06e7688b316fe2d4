"""The one module that speaks to torch.distributed.pipelining: stages from a plan, and its schedule.

    pipe = build_pipeline(plan, model, rank, world_size, device, loss_fn)
    losses = pipe.step(inputs, targets)     # one training step of M micro-batches

Each rank keeps only its own stages' blocks (``StageModule``), under the
unpartitioned model's own module names, so ``state_dict`` keys of every stage
merge back into the original model's. The schedule is the torch class of the
plan's name (``get_schedule_class``), with ``scale_grads=True``: gradients are
the mean over micro-batches, which equals the gradient of the mean loss over
the mini-batch when every micro-batch has the same size and the loss is a mean.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, _PipelineSchedule, get_schedule_class

from autopart.errors import AutopartError
from autopart.formats.plan import Plan
from autopart.measure.blocks import call_block, split_blocks

__all__ = ["StageModule", "Pipeline", "build_pipeline", "check_plan_against_model"]


class StageModule(nn.Module):
    """Blocks of one stage, run in order; submodule paths are the original model's (``h.3``)."""

    def __init__(self, root: nn.Module, block_names: Sequence[str]) -> None:
        super().__init__()
        self.block_names = list(block_names)
        for name in self.block_names:
            parent: nn.Module = self
            *path, leaf = name.split(".")
            for part in path:
                if part not in parent._modules:
                    parent.add_module(part, nn.Module())
                child = parent._modules[part]
                assert child is not None
                parent = child
            parent.add_module(leaf, root.get_submodule(name))

    def forward(self, *args: Any) -> Any:
        out: Any = args if len(args) > 1 else args[0]
        for name in self.block_names:
            out = call_block(self.get_submodule(name), out)
        return out


def check_plan_against_model(plan: Plan, model: nn.Module, world_size: int, model_name: str) -> None:
    """Refuse, before any training, a plan that does not fit the model or the number of processes."""
    expected = plan.num_ranks
    if world_size != expected:
        raise AutopartError(f"the plan has {plan.num_stages} stages on {expected} ranks "
                            f"({plan.stages_per_rank} per rank) but {world_size} processes were started")
    ours = [name for name, _ in split_blocks(model)]
    planned = [name for stage in plan.stages for name in stage.blocks]
    if planned != ours:
        diff = next((i for i, (a, b) in enumerate(zip(planned, ours)) if a != b), min(len(planned), len(ours)))
        got = planned[diff] if diff < len(planned) else "(end)"
        want = ours[diff] if diff < len(ours) else "(end)"
        raise AutopartError(f"the plan's blocks do not match model {model_name!r}: block {diff} is {got!r} in the "
                            f"plan but {want!r} in the model ({len(planned)} vs {len(ours)} blocks)")


class Pipeline:
    """This rank's stages and the schedule that drives them."""

    def __init__(self, plan: Plan, modules: list[tuple[int, StageModule]], schedule: _PipelineSchedule) -> None:
        self.plan = plan
        self.modules = modules
        self.schedule = schedule
        self.has_first = any(s == 0 for s, _ in modules)
        self.has_last = any(s == plan.num_stages - 1 for s, _ in modules)
        self.captured: dict[int, tuple[Any, ...]] = {}
        """Each local stage's inputs of its first micro-batch (for measuring it alone afterwards)."""
        self.last_target: torch.Tensor | None = None
        """The first micro-batch's target, kept on the last stage's rank (for measuring it alone)."""
        for s, module in modules:
            module.register_forward_pre_hook(self._capture(s))

    def _capture(self, stage: int) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_: nn.Module, args: tuple[Any, ...]) -> None:
            if stage not in self.captured:
                self.captured[stage] = tuple(a.detach().clone() if isinstance(a, torch.Tensor) else a for a in args)
        return hook

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, m in self.modules for p in m.parameters()]

    def state_dicts(self) -> dict[int, dict[str, torch.Tensor]]:
        return {s: m.state_dict() for s, m in self.modules}

    def step(self, inputs: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor] | None:
        """One training step of the plan's micro-batches; the per-micro-batch losses on the last stage's rank."""
        losses: list[torch.Tensor] = []
        if self.has_last and self.last_target is None:
            self.last_target = target.tensor_split(self.plan.microbatches)[0].detach().clone()
        if self.has_first and self.has_last:
            self.schedule.step(inputs, target=target, losses=losses, return_outputs=False)
        elif self.has_first:
            self.schedule.step(inputs, return_outputs=False)
        elif self.has_last:
            self.schedule.step(target=target, losses=losses, return_outputs=False)
        else:
            self.schedule.step(return_outputs=False)
        return losses if self.has_last else None


def build_pipeline(plan: Plan, model: nn.Module, rank: int, world_size: int, device: torch.device,
                   loss_fn: Callable[[Any, Any], torch.Tensor], group: dist.ProcessGroup | None = None,
                   init: Callable[[int, StageModule], None] | None = None) -> Pipeline:
    """This rank's stages of ``model`` (moved to ``device``) wrapped for ``plan``'s schedule.

    Blocks built on the meta device get storage on ``device`` here and are then
    handed to ``init(stage, module)`` to fill it.
    """
    ours = plan.stages_of(rank)
    modules = []
    for s in ours:
        module = StageModule(model, plan.stages[s].blocks)
        if any(t.is_meta for t in list(module.parameters()) + list(module.buffers())):
            module.to_empty(device=device)
            if init is None:
                raise AutopartError(f"stage {s} was built on the meta device and nothing initialises it")
            init(s, module)
        else:
            module.to(device)
        modules.append((s, module))
    stages = [PipelineStage(module, s, plan.num_stages, device, group=group) for s, module in modules]
    cls = get_schedule_class(plan.schedule)
    schedule: _PipelineSchedule
    if issubclass(cls, PipelineScheduleMulti):
        schedule = cls(stages, n_microbatches=plan.microbatches, loss_fn=loss_fn)
    else:
        if len(stages) != 1:
            raise AutopartError(f"{plan.schedule} runs one stage per rank, the plan gives rank {rank} {len(stages)}")
        schedule = cls(stages[0], n_microbatches=plan.microbatches, loss_fn=loss_fn)
    return Pipeline(plan, modules, schedule)

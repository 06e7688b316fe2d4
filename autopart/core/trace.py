"""A pipeline step as a Chrome trace: the JSON ``torch.profiler`` exports, which Perfetto and chrome://tracing open.

    write_trace(simulate_plan(plan), "step.json", label="predicted")

One row (thread) per rank, one complete event (``"ph": "X"``) per action:
forward, backward, its input- and weight-gradient halves, sends and the
optimizer step, named in torch's notation (``1F0``). Times are microseconds
from the start of the step. Pure standard library and the simulator's types.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from autopart.core.simulate import Simulation
from autopart.formats.atomic import write_json_atomic

__all__ = ["chrome_trace", "write_trace"]

_CATEGORY = {"F": "forward", "B": "backward", "I": "backward (input grad)", "W": "backward (weight grad)",
             "SEND": "send", "OPT": "optimizer"}


def chrome_trace(sim: Simulation, label: str = "predicted") -> dict[str, Any]:
    """The trace of one simulated (or measured) step; ``label`` names its process row."""
    events: list[dict[str, Any]] = [{"name": "process_name", "ph": "M", "pid": 0, "tid": 0,
                                     "args": {"name": f"{label}: {sim.schedule}, {sim.microbatches} micro-batches"}}]
    for rank in range(sim.num_ranks):
        events.append({"name": "thread_name", "ph": "M", "pid": 0, "tid": rank, "args": {"name": f"rank {rank}"}})
        events.append({"name": "thread_sort_index", "ph": "M", "pid": 0, "tid": rank, "args": {"sort_index": rank}})
    for e in sim.events:
        events.append({"name": e.action, "cat": _CATEGORY.get(e.kind, e.kind), "ph": "X", "pid": 0, "tid": e.rank,
                       "ts": round(e.start_ms * 1e3, 3), "dur": round((e.end_ms - e.start_ms) * 1e3, 3),
                       "args": {"kind": e.kind, "start_ms": e.start_ms, "end_ms": e.end_ms}})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"step_ms": sim.step_ms, "bubble_fraction": sim.bubble_fraction, "label": label}}


def write_trace(sim: Simulation, path: str | Path, label: str = "predicted") -> Path:
    """Write :func:`chrome_trace` to ``path``, atomically."""
    return write_json_atomic(path, chrome_trace(sim, label))

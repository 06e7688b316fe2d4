"""A pipeline step as a Chrome trace: the JSON ``torch.profiler`` exports, which Perfetto and chrome://tracing open.

    write_trace("step.json", ("predicted", simulate_plan(plan)), ("measured", timeline))

One process per timeline, one row (thread) per rank, one complete event (``"ph": "X"``) per action:
forward, backward, its input- and weight-gradient halves, sends and the
optimizer step, named in torch's notation (``1F0``). Times are microseconds
from the start of the step. Pure standard library and the simulator's types.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from autopart.core.simulate import Timeline
from autopart.formats.atomic import write_json_atomic
from autopart.formats.units import plural

__all__ = ["chrome_trace", "write_trace"]

_CATEGORY = {"F": "forward", "B": "backward", "I": "backward (input grad)", "W": "backward (weight grad)",
             "SEND": "send", "TIE": "tie sum", "OPT": "optimizer"}


def chrome_trace(*processes: tuple[str, Timeline]) -> dict[str, Any]:
    """The trace of one or more steps, each ``(label, timeline)`` a process row (predicted, measured)."""
    events: list[dict[str, Any]] = []
    for pid, (label, t) in enumerate(processes):
        events.append({"name": "process_name", "ph": "M", "pid": pid, "tid": 0,
                       "args": {"name": f"{label}: {t.schedule}, {plural(t.microbatches, 'micro-batch')}"}})
        events.append({"name": "process_sort_index", "ph": "M", "pid": pid, "tid": 0, "args": {"sort_index": pid}})
        for rank in range(t.num_ranks):
            events.append({"name": "thread_name", "ph": "M", "pid": pid, "tid": rank, "args": {"name": f"rank {rank}"}})
            events.append({"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": rank,
                           "args": {"sort_index": rank}})
        for e in t.events:
            events.append({"name": e.action, "cat": _CATEGORY.get(e.kind, e.kind), "ph": "X", "pid": pid,
                           "tid": e.rank, "ts": round(e.start_ms * 1e3, 3), "dur": round((e.end_ms - e.start_ms) * 1e3, 3),
                           "args": {"kind": e.kind, "start_ms": e.start_ms, "end_ms": e.end_ms}})
    summary = [{"label": label, "step_ms": t.step_ms, "bubble_fraction": t.bubble_fraction} for label, t in processes]
    other: dict[str, Any] = dict(summary[0]) if len(summary) == 1 else {"steps": summary}
    return {"traceEvents": events, "displayTimeUnit": "ms", "otherData": other}


def write_trace(path: str | Path, *processes: tuple[str, Timeline]) -> Path:
    """Write :func:`chrome_trace` to ``path``, atomically."""
    return write_json_atomic(path, chrome_trace(*processes))

"""The memory meter (autopart/measure/memory.py) on known allocations."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from autopart.formats.units import format_bytes
from autopart.measure.memory import MemoryMeter, lower_mmap_threshold
from tests.conftest import ROOT, run_cli
from tests.helpers import plan_for
from tests.memory_models import WIDTH

MiB = 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc")
def test_the_cpu_peak_is_the_most_held_at_once_and_freed_memory_leaves_it() -> None:
    """64 tensors of 1 MiB, then every other one freed: the peak reads 64 MiB and, once reset, 32 MiB (the
    live half). With glibc's own threshold the freed 1 MiB blocks, lying between live ones, stay resident
    and the reset reads 64 MiB: that is what lowering the mmap threshold fixes."""
    assert lower_mmap_threshold()
    torch.ones(MiB // 4).sum()  # as in any training process, a 1 MiB block freed: glibc's own threshold rises
    meter = MemoryMeter(torch.device("cpu"))
    meter.start()
    assert meter.read().peak_bytes is not None and meter.read().peak_bytes < 2 * MiB  # type: ignore[operator]
    held = [torch.ones(MiB // 4) for _ in range(64)]  # written, so resident
    kept = held[::2]
    del held
    peak = meter.peak_bytes()
    assert peak is not None and abs(peak - 64 * MiB) < 4 * MiB, peak / MiB
    meter.reset_peak()
    after = meter.peak_bytes()
    assert after is not None and abs(after - 32 * MiB) < 4 * MiB, after / MiB
    assert sum(t.numel() for t in kept) * 4 == 32 * MiB
    assert meter.read().reserved_bytes is None  # CPU: nothing reserved apart from what is held
    assert "VmHWM" in meter.method


def test_without_proc_nothing_is_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where /proc is missing the meter says so rather than guessing."""
    import autopart.measure.memory as memory

    monkeypatch.setattr(memory, "_STATUS", "/nonexistent/status")
    meter = MemoryMeter(torch.device("cpu"))
    meter.start()
    assert meter.read() == memory.MemoryPeak(peak_bytes=None, reserved_bytes=None)
    assert meter.method == "not measured: /nonexistent/status is missing (not Linux)"


@pytest.mark.cuda
def test_the_cuda_peak_is_the_allocators() -> None:
    device = torch.device("cuda", torch.cuda.current_device())
    meter = MemoryMeter(device)
    meter.start()
    held = [torch.ones(MiB // 4, device=device) for _ in range(64)]
    kept = held[::2]
    del held
    assert meter.peak_bytes() == 64 * MiB
    meter.reset_peak()
    assert meter.peak_bytes() == 32 * MiB and len(kept) == 32
    reserved = meter.reserved_bytes()
    assert reserved is not None and reserved >= 32 * MiB


@pytest.mark.slow
def test_each_ranks_measured_memory_stands_beside_its_planned(tmp_path: Path) -> None:
    """2 ranks, 2 blocks each: every rank's peak in the steps holds at least its weights, gradients and AdamW's
    two states (2 x 16 MiB, all live at the end of the optimizer step), and not much more than the plan's
    count of the same (its activations are small); the report JSON and the printed table both show it."""
    spec = f"{ROOT / 'tests' / 'memory_models.py'}:wide_linear_spec"
    plan = plan_for(spec, [2, 2], "GPipe", 2, tmp_path / "plan.json")
    report = tmp_path / "r.json"
    ran = run_cli("train", str(tmp_path / "plan.json"), "--model", spec, "--steps", "2", "--threads", "1",
                  "--report", str(report))
    assert ran.returncode == 0, ran.stderr[-2000:]
    rows = json.loads(report.read_text())["ranks_detail"]
    weights = 2 * (WIDTH * WIDTH + WIDTH) * 4  # two blocks' parameters, bytes
    for r, row in enumerate(rows):
        planned = plan.stages[r].cost.memory_bytes
        assert row["memory_planned_bytes"] == planned and planned >= 4 * weights
        measured = row["memory_measured_bytes"]
        assert 4 * weights <= measured < 1.5 * planned, (measured / MiB, planned / MiB)
        assert row["memory_ratio"] == pytest.approx(measured / planned) and row["memory_reserved_bytes"] is None
    assert "per rank, peak memory in the training steps" in ran.stdout
    for row in rows:
        assert f"{row['memory_ratio']:.2f}x" in ran.stdout and format_bytes(row["memory_planned_bytes"]) in ran.stdout
    assert "memory per rank: peak resident memory (VmHWM)" in ran.stdout


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux's /proc")
def test_a_files_pages_are_not_the_processs_memory(tmp_path: Path) -> None:
    """A 32 MiB file mapped and read: its pages become resident (``RssFile``), but they are the page cache's,
    as the libraries' code is, and the peak leaves them out."""
    import mmap

    data = tmp_path / "data.bin"
    data.write_bytes(b"\x01" * (32 * MiB))
    meter = MemoryMeter(torch.device("cpu"))
    meter.start()
    with open(data, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        total = sum(mapped[i] for i in range(0, 32 * MiB, 4096))  # one read per page
        peak = meter.peak_bytes()
    assert total == 32 * MiB // 4096
    assert peak is not None and peak < 2 * MiB, peak / MiB

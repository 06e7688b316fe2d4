"""The layout is a contract: the planner and the formats never need torch, and only autopart/run speaks
torch.distributed (pipelining only in run/stages.py)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "autopart"
PROFILE = ROOT / "profiles" / "gpt2-small-cpu-mb1-2-4-8.json"


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (top level or inside functions)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _files(folder: str) -> list[Path]:
    return sorted((PACKAGE / folder).rglob("*.py"))


def test_core_and_formats_never_import_torch() -> None:
    for path in _files("core") + _files("formats"):
        bad = {m for m in _imports(path) if m == "torch" or m.startswith(("torch.", "autopart.measure",
                                                                          "autopart.run", "autopart.cli"))}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"
    for path in _files("formats"):
        bad = {m for m in _imports(path) if m.split(".")[0] in ("numpy", "scipy") or m.startswith("autopart.core")}
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_only_run_speaks_torch_distributed() -> None:
    for path in sorted(PACKAGE.rglob("*.py")):
        mods = _imports(path)
        distributed = {m for m in mods if m.startswith("torch.distributed")}
        if path.parent.name != "run":
            assert not distributed, f"{path.relative_to(ROOT)} imports {sorted(distributed)}"
        if path != PACKAGE / "run" / "stages.py":
            assert not {m for m in mods if m.startswith("torch.distributed.pipelining")}, path


_PLANNING_WITHOUT_TORCH = f"""
import sys
import autopart
import autopart.core.costmodel, autopart.core.partition, autopart.core.planner, autopart.core.scaling
import autopart.core.schedules, autopart.core.search, autopart.core.simulate
import autopart.formats.plan, autopart.formats.profile, autopart.formats.stage, autopart.formats.devices
from autopart.cli import main

plan, svg = sys.argv[1], sys.argv[2]
assert main(["partition", {str(PROFILE)!r}, "--stages", "4", "--format", "balance"]) == 0
assert main(["partition", {str(PROFILE)!r}, "--stages", "2", "--global-batch", "16", "--microbatches", "auto",
             "--schedule", "auto", "-o", plan]) == 0
assert main(["simulate", plan, "--svg", svg]) == 0
profile = autopart.Profile.from_json({str(PROFILE)!r})
assert autopart.simulate(autopart.plan_partition(profile, 2)).step_ms > 0
try:
    main(["partition", "--help"])
except SystemExit:
    pass
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not loaded, loaded
print("no torch")
"""


def test_planning_end_to_end_leaves_torch_unimported(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-c", _PLANNING_WITHOUT_TORCH, str(tmp_path / "plan.json"),
                             str(tmp_path / "step.svg")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("no torch") and (tmp_path / "step.svg").exists()

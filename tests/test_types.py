"""The package type-checks under the strict settings in setup.cfg (disallow_untyped_defs)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT


def test_mypy_is_clean() -> None:
    pytest.importorskip("mypy")
    result = subprocess.run([sys.executable, "-m", "mypy", "autopart"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def seed() -> None:
    """Every test starts from the same random state."""
    try:
        import torch
    except ImportError:  # the pure-core tests do not need torch
        return
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def token_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test has its own empty token cache (``AUTOPART_CACHE``, inherited by the CLI and its ranks): nothing
    is written to the user's home, and no test reads another's streams."""
    folder = tmp_path_factory.mktemp("autopart-cache")
    monkeypatch.setenv("AUTOPART_CACHE", str(folder))
    return folder


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords and not has_cuda:
            item.add_marker(skip)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run ``python -m autopart ARGS`` as a user would, capturing its output."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="200")
    env.pop("AUTOPART_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "autopart", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout)


def run_two_agents(cwd: Path, nproc_per_node: int, *args: str, timeout: float = 300) -> list[tuple[int, str, str]]:
    """``python -m autopart ARGS --report CWD/nodeN.json`` under two torchrun agents on 127.0.0.1 as two nodes of
    ``nproc_per_node`` ranks each (c10d rendezvous, node 0 hosting it): (exit code, stdout, stderr) per node."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{s.getsockname()[1]}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    env.pop("AUTOPART_TRACEBACK", None)
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", str(nproc_per_node),
         "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "autopart-two-nodes",
         "--rdzv-conf", f"is_host={'true' if node == 0 else 'false'}",
         "-m", "autopart", *args, "--report", str(cwd / f"node{node}.json")],
        cwd=cwd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE) for node in range(2)]
    results = []
    try:
        for proc in nodes:
            out, err = proc.communicate(timeout=timeout)
            results.append((proc.returncode, out, err))
    finally:
        for proc in nodes:
            proc.kill()
    return results


def run_cli_here(*args: str) -> subprocess.CompletedProcess[str]:
    """``autopart ARGS`` in this process (its ``main``, stdout and stderr captured): for commands that end
    before any real work, where a new interpreter would cost more than the check."""
    import contextlib
    import io

    from autopart.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exc:  # argparse's own usage errors
            code = exc.code if isinstance(exc.code, int) else 2
    return subprocess.CompletedProcess(["autopart", *args], code, out.getvalue(), err.getvalue())


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """Exit code 2, no traceback, one line on stderr that contains every fragment."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


try:
    from hypothesis import settings

    settings.register_profile("default", max_examples=300, deadline=None)
    settings.register_profile("thorough", max_examples=5000, deadline=None)  # HYPOTHESIS_PROFILE=thorough
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
except ImportError:
    pass

"""The README and docs/ cannot go stale: every Python block runs, every commented ``print`` prints its comment,
every link resolves, every module is in the layout page, and no code cites a document the project lacks."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from benchmarks.readme import PAGES, console_blocks, expected_output, fences, python_blocks
from tests.conftest import ROOT, run_cli_here

def test_fences_pairs_openings_with_closings() -> None:
    text = "a\n```bash\nx\n```\nprose\n  ```\n  $ y\n    z\n  ```\n```python\n  z\n```\n"
    assert fences(text) == [(2, "bash", ["x"]), (6, "", ["$ y", "  z"]), (10, "python", ["  z"])]


BLOCKS = python_blocks()


def test_the_pages_have_python_blocks() -> None:
    pages = {page for page, _, _ in BLOCKS}
    assert {"README.md", "docs/python-api.md", "docs/formats.md"} <= pages


def _param(page: str, line: int, code: str) -> object:
    """A block that imports torch (to profile a model) takes seconds: slow."""
    marks = [pytest.mark.slow] if re.search(r"^(import|from) torch\b", code, re.M) else []
    return pytest.param(page, line, code, id=f"{page}:{line}", marks=marks)


@pytest.mark.parametrize("page, line, code", [_param(*block) for block in BLOCKS])
def test_python_block_runs_and_prints_its_comments(page: str, line: int, code: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Each block runs in a fresh namespace in an empty folder that sees the shipped ``profiles/``."""
    (tmp_path / "profiles").symlink_to(ROOT / "profiles")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, f"{page}:{line}", "exec"), {"__name__": "__readme__"})
    assert out.getvalue().splitlines() == expected_output(code), f"{page}:{line}"


def test_expected_output_reads_print_comments() -> None:
    code = "x = 1  # not a print\nprint(x)  # 1\nprint(x)\nprint([x], x)   # [1] 1\n"
    assert expected_output(code) == ["1", "[1] 1"]


LINK = re.compile(r"\]\(([^)#:]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_links_between_pages_resolve(page: Path) -> None:
    missing = [target for target in LINK.findall(page.read_text()) if not (page.parent / target).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to {missing}"


def layout_tree(text: str) -> set[str]:
    """The module paths the first code block of docs/layout.md lists, as a tree: a name ending in ``/`` is
    a folder holding the names indented under it."""
    block = text.split("```\n", 2)[1]
    folders: list[tuple[int, str]] = []
    paths = set()
    for line in block.splitlines():
        if not line.strip():
            continue
        indent, name = len(line) - len(line.lstrip()), line.split()[0]
        while folders and folders[-1][0] >= indent:
            folders.pop()
        if name.endswith("/"):
            folders.append((indent, name))
        elif name.endswith(".py"):
            paths.add("".join(f for _, f in folders) + name)
    return paths


def test_layout_tree_reads_folders_by_indent() -> None:
    text = "x\n```\nautopart/\n  a.py  one\n  core/  the core\n    b.py  two\n  c.py\n```\n"
    assert layout_tree(text) == {"autopart/a.py", "autopart/core/b.py", "autopart/c.py"}


def test_layout_page_lists_every_module() -> None:
    """docs/layout.md lists every module of the package in its folder, and no module that is gone."""
    listed = layout_tree((ROOT / "docs" / "layout.md").read_text())
    actual = {str(path.relative_to(ROOT)) for path in (ROOT / "autopart").rglob("*.py") if path.name != "__init__.py"}
    assert sorted(actual - listed) == [], "modules missing from docs/layout.md"
    assert sorted(listed - actual) == [], "docs/layout.md lists modules that do not exist"


def test_no_code_cites_a_document_the_project_lacks() -> None:
    """Code cites docs/ pages that exist, and never DESIGN.md (a design note outside the project)."""
    cited: list[str] = []
    for folder in ("autopart", "tests", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if any(part.startswith(".") for part in path.relative_to(ROOT).parts):
                continue  # a virtual environment (benchmarks/.venv), not the project's code
            text = path.read_text()
            if path.name != "test_readme.py" and "DESIGN" + ".md" in text:
                cited.append(f"{path.relative_to(ROOT)}: DESIGN.md")
            for page in re.findall(r"docs/[\w-]+\.md", text):
                if not (ROOT / page).exists():
                    cited.append(f"{path.relative_to(ROOT)}: {page}")
    assert not cited, cited


def reads_what_it_has(args: list[str], written: set[str]) -> bool:
    """The command's input is a shipped profile, or a file an earlier command of the page wrote."""
    return args[1].startswith("profiles/") or args[1] in written


def shown_lines_missing(shown: list[str], printed: list[str]) -> list[str]:
    """The lines a page shows (``...`` stands for lines left out) that the command did not print."""
    have = {line.rstrip() for line in printed}
    return [line for line in shown if line.strip() != "..." and line.rstrip() not in have]


def test_shown_lines_missing_skips_elisions() -> None:
    assert shown_lines_missing(["a", "...", "c "], ["a", "b", "c"]) == []
    assert shown_lines_missing(["a", "d"], ["a", "b"]) == ["d"]


CONSOLE_PAGES = [page for page in PAGES if any(args[1].startswith("profiles/") for _, args, _ in console_blocks(page))]


@pytest.mark.parametrize("page", CONSOLE_PAGES, ids=[str(p.relative_to(ROOT)) for p in CONSOLE_PAGES])
def test_planning_outputs_shown_are_what_the_commands_print(page: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Every planning command a page shows runs again (in order, in one folder: a plan written by one is
    read by the next) and prints every line the page shows."""
    (tmp_path / "profiles").symlink_to(ROOT / "profiles")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "200")
    written: set[str] = set()
    for line, args, shown in console_blocks(page):
        if not reads_what_it_has(args, written):
            continue
        written |= {args[i + 1] for i, word in enumerate(args[:-1]) if word in ("-o", "--output")}
        result = run_cli_here(*args)
        assert result.returncode == 0, f"{page.name}:{line}: {result.stderr}"
        printed = (result.stdout + result.stderr).splitlines()
        assert shown_lines_missing(shown, printed) == [], f"{page.name}:{line}: autopart {' '.join(args)}"

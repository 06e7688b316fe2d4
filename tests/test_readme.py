"""The README and docs/ cannot go stale: every Python block runs, every commented ``print`` prints its comment,
every link resolves, every module is in the layout page, and no code cites a document the project lacks."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)
PRINT_WITH_OUTPUT = re.compile(r"^print\(.*\)\s+# (.*)$")


def python_blocks() -> list[tuple[str, int, str]]:
    """(page, line, code) of every ```python block of the README and docs/."""
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            found.append((str(page.relative_to(ROOT)), line, match.group(1)))
    return found


def expected_output(code: str) -> list[str]:
    """What the block must print: the comment of every top-level ``print(...)  # OUTPUT`` line, in order."""
    return [m.group(1).strip() for m in map(PRINT_WITH_OUTPUT.match, code.splitlines()) if m]


BLOCKS = python_blocks()


def test_the_pages_have_python_blocks() -> None:
    pages = {page for page, _, _ in BLOCKS}
    assert {"README.md", "docs/python-api.md", "docs/formats.md"} <= pages


@pytest.mark.parametrize("page, line, code", BLOCKS, ids=[f"{p}:{n}" for p, n, _ in BLOCKS])
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
            text = path.read_text()
            if path.name != "test_readme.py" and "DESIGN" + ".md" in text:
                cited.append(f"{path.relative_to(ROOT)}: DESIGN.md")
            for page in re.findall(r"docs/[\w-]+\.md", text):
                if not (ROOT / page).exists():
                    cited.append(f"{path.relative_to(ROOT)}: {page}")
    assert not cited, cited

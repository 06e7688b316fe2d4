"""The README and docs/ cannot go stale: every Python block runs, every commented ``print`` prints its comment,
every link resolves, every module is in the layout page, and no code cites a document the project lacks."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_cli_here

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PRINT_WITH_OUTPUT = re.compile(r"^print\(.*\)\s+# (.*)$")


def fences(text: str) -> list[tuple[int, str, list[str]]]:
    """(line, info string, lines) of every fenced code block of a Markdown text, indented ones (in a list
    item) dedented."""
    found: list[tuple[int, str, list[str]]] = []
    opened: tuple[int, int, str] | None = None
    body: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.lstrip()
        if opened is None and stripped.startswith("```"):
            opened, body = (number, len(line) - len(stripped), stripped[3:].strip()), []
        elif opened is not None and stripped.startswith("```"):
            found.append((opened[0], opened[2], body))
            opened = None
        elif opened is not None:
            indent = opened[1]
            body.append(line[indent:] if not line[:indent].strip() else line.lstrip())
    return found


def test_fences_pairs_openings_with_closings() -> None:
    text = "a\n```bash\nx\n```\nprose\n  ```\n  $ y\n    z\n  ```\n```python\n  z\n```\n"
    assert fences(text) == [(2, "bash", ["x"]), (6, "", ["$ y", "  z"]), (10, "python", ["  z"])]


def python_blocks() -> list[tuple[str, int, str]]:
    """(page, line, code) of every ```python block of the README and docs/."""
    return [(str(page.relative_to(ROOT)), line, "\n".join(body) + "\n")
            for page in PAGES for line, info, body in fences(page.read_text()) if info == "python"]


def expected_output(code: str) -> list[str]:
    """What the block must print: the comment of every top-level ``print(...)  # OUTPUT`` line, in order."""
    return [m.group(1).strip() for m in map(PRINT_WITH_OUTPUT.match, code.splitlines()) if m]


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
            text = path.read_text()
            if path.name != "test_readme.py" and "DESIGN" + ".md" in text:
                cited.append(f"{path.relative_to(ROOT)}: DESIGN.md")
            for page in re.findall(r"docs/[\w-]+\.md", text):
                if not (ROOT / page).exists():
                    cited.append(f"{path.relative_to(ROOT)}: {page}")
    assert not cited, cited


PLANNING = ("autopart partition ", "autopart simulate ")
"""Commands whose output follows from the shipped profiles alone (no timing, no torch): their blocks are rerun."""


def console_blocks(page: Path) -> list[tuple[int, list[str], list[str]]]:
    """(line, command words, output lines) of every plain code block of ``page`` that shows a planning
    command (``$ autopart partition ...``, continued by trailing backslashes) and what it printed."""
    found = []
    for line, info, body in fences(page.read_text()):
        lines = [x.rstrip() for x in body]
        if info or not lines or not lines[0].startswith("$ ") or not lines[0][2:].startswith(PLANNING):
            continue
        command = lines.pop(0)[2:]
        while command.endswith("\\"):
            command = command[:-1] + " " + lines.pop(0).strip()
        found.append((line, command.split()[1:], lines))
    return found


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

"""Regenerate the outputs the README and docs/ show from the shipped profiles, after they change.

    python benchmarks/readme.py            # rewrite them in place
    python benchmarks/readme.py --check    # say what is stale, change nothing (exit 1 if any)

Two kinds of output are regenerated (``tests/test_readme.py`` checks both with the same parsing):

- in every torch-free ```python block, the comment of each top-level ``print(...)  # OUTPUT`` line;
- every plain block that shows ``$ autopart partition ...`` or ``$ autopart simulate ...`` on a shipped
  profile (or a plan an earlier block of the page wrote): its output lines; a block that shows ``...``
  and then the output's last lines keeps that many; other elisions are listed for a person to redo.

Blocks that profile or train (they import torch, or run other commands) show measured times that vary
from run to run: they name their machine and are not rewritten.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from autopart.formats.atomic import write_atomic  # noqa: E402

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PRINT_WITH_OUTPUT = re.compile(r"^(print\(.*\)\s+# )(.*)$")
PLANNING = ("autopart partition ", "autopart simulate ")
"""Commands whose output follows from the shipped profiles alone (no timing, no torch)."""


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


def python_blocks(pages: list[Path] = PAGES) -> list[tuple[str, int, str]]:
    """(page, line, code) of every ```python block of the README and docs/."""
    return [(str(page.relative_to(ROOT)), line, "\n".join(body) + "\n")
            for page in pages for line, info, body in fences(page.read_text()) if info == "python"]


def expected_output(code: str) -> list[str]:
    """What the block must print: the comment of every top-level ``print(...)  # OUTPUT`` line, in order."""
    return [m.group(2).strip() for m in map(PRINT_WITH_OUTPUT.match, code.splitlines()) if m]


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


def run_block(code: str, where: Path) -> list[str]:
    """What a Python block prints, run in ``where``."""
    out = io.StringIO()
    cwd = os.getcwd()
    os.chdir(where)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "block", "exec"), {"__name__": "__readme__"})
    finally:
        os.chdir(cwd)
    return out.getvalue().splitlines()


def refresh_python(text: str, where: Path) -> tuple[str, int]:
    """``text`` with every torch-free block's print comments replaced by what it prints; how many changed."""
    lines, changed = text.splitlines(keepends=True), 0
    for start, info, body in fences(text):
        code = "\n".join(body) + "\n"
        if info != "python" or re.search(r"^(import|from) torch\b", code, re.M):
            continue
        printed = iter(run_block(code, where))
        for k in range(len(body)):
            number = start + k  # 0-based index of the block's k-th line in ``lines``
            m = PRINT_WITH_OUTPUT.match(lines[number].strip())
            if m:
                new = next(printed)
                if new != m.group(2).strip():
                    lines[number] = lines[number].replace("# " + m.group(2), "# " + new, 1)
                    changed += 1
    return "".join(lines), changed


def refresh_console(page: Path, text: str, where: Path) -> tuple[str, int, list[str]]:
    """``text`` with every planning block's output replaced by what the command prints; how many blocks
    changed; the blocks that elide lines and are stale (for a person)."""
    from autopart.cli import main

    lines, changed, by_hand = text.splitlines(keepends=True), 0, []
    written: set[str] = set()
    blocks = console_blocks(page)  # run in page order (a plan one writes, the next reads), rewritten from the end
    outputs = []
    for start, args, shown in blocks:
        if not (args[1].startswith("profiles/") or args[1] in written):
            outputs.append(None)
            continue
        written |= {args[i + 1] for i, word in enumerate(args[:-1]) if word in ("-o", "--output")}
        out, err = io.StringIO(), io.StringIO()
        cwd = os.getcwd()
        os.chdir(where)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                main(list(args))
        finally:
            os.chdir(cwd)
        outputs.append([x.rstrip() for x in (out.getvalue() + err.getvalue()).splitlines()])
    for (start, args, shown), printed in reversed(list(zip(blocks, outputs))):
        if printed is None or shown == printed:
            continue
        elided = [k for k, x in enumerate(shown) if x.strip() == "..."]
        if elided == [0] and len(printed) >= len(shown) - 1:  # "..." then the output's last lines
            printed = ["..."] + printed[len(printed) - (len(shown) - 1):]
        elif elided:
            if [x for x in shown if x.strip() != "..." and x not in printed]:
                by_hand.append(f"{page.relative_to(ROOT)}:{start}: autopart {' '.join(args)}")
            continue
        if shown == printed:
            continue
        first = start  # the block's first body line, 0-based (``start`` is the opening fence's, 1-based)
        command_lines = 1
        while lines[first + command_lines - 1].rstrip().endswith("\\"):
            command_lines += 1
        indent = re.match(r"\s*", lines[first]).group(0)  # type: ignore[union-attr]
        body_start, body_end = first + command_lines, first + command_lines + len(shown)
        lines[body_start:body_end] = [indent + x + "\n" if x else "\n" for x in printed]
        changed += 1
    return "".join(lines), changed, by_hand


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="say what is stale; change nothing")
    args = parser.parse_args()
    os.environ["COLUMNS"] = "200"
    stale, by_hand = 0, []
    for page in PAGES:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "profiles").symlink_to(ROOT / "profiles")
            text = page.read_text()
            new, changed = refresh_python(text, Path(tmp))
            new, blocks, hand = refresh_console(page, new, Path(tmp))
        by_hand += hand
        if changed or blocks:
            stale += 1
            print(f"{page.relative_to(ROOT)}: {changed} print comment(s), {blocks} command output(s) "
                  f"{'stale' if args.check else 'rewritten'}")
            if not args.check:
                write_atomic(page, new.encode())
    for line in by_hand:
        print(f"by hand (the page elides lines): {line}")
    return 1 if args.check and (stale or by_hand) else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How autopart's modules depend on each other: no circles, no private names across modules, and the layers
(formats, core, render below measure and run, the CLI on top) never depending upward."""
from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

from tests.conftest import ROOT

PACKAGE = ROOT / "autopart"

def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names taken from it) for every absolute import in the file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def _graph() -> nx.DiGraph:
    files = {_module(p): p for p in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    for name, path in files.items():
        graph.add_node(name)
        for module, names in _imported(path):
            for target in [module] + [f"{module}.{n}" for n in names]:
                if target in files and target != name and not name.startswith(target + "."):
                    graph.add_edge(name, target)
    return graph


def test_no_import_circles() -> None:
    circles = [set(c) for c in nx.simple_cycles(_graph())]
    assert circles == []


def test_no_private_name_is_imported_from_another_module() -> None:
    taken = [(str(path.relative_to(ROOT)), module, name) for path in sorted(PACKAGE.rglob("*.py"))
             for module, names in _imported(path) if module.startswith("autopart")
             for name in names if name.startswith("_")]
    assert taken == []


def test_lower_layers_never_import_higher_ones() -> None:
    above = {"formats": ("core", "render", "measure", "run", "cli"), "core": ("render", "measure", "run", "cli"),
             "render": ("measure", "run", "cli"), "measure": ("run", "cli"), "run": ("cli",)}
    graph = _graph()
    upward = [(a, b) for a, b in graph.edges if a.count(".") >= 2 and b.count(".") >= 1
              and b.split(".")[1] in above.get(a.split(".")[1], ())]
    assert upward == []


def test_render_never_imports_torch() -> None:
    for path in sorted((PACKAGE / "render").rglob("*.py")):
        torch = [m for m, _ in _imported(path) if m == "torch" or m.startswith("torch.")]
        assert torch == [], path


def _mutated_module_names(path: Path) -> list[str]:
    """Module-level names that a function of the file changes: assigns into, calls a mutating method of,
    or declares ``global``."""
    tree = ast.parse(path.read_text())
    top = {t.id for node in tree.body if isinstance(node, (ast.Assign, ast.AnnAssign))
           for t in (node.targets if isinstance(node, ast.Assign) else [node.target]) if isinstance(t, ast.Name)}
    changed = []
    for func in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
        for node in ast.walk(func):
            if isinstance(node, ast.Global):
                changed += node.names
            elif isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
                targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
                changed += [t.value.id for t in targets
                            if isinstance(t, ast.Subscript) and isinstance(t.value, ast.Name)]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and isinstance(node.func.value, ast.Name) and node.func.attr in
                  ("pop", "popitem", "append", "extend", "setdefault", "update", "clear", "add", "insert", "remove")):
                changed.append(node.func.value.id)
    return sorted({name for name in changed if name in top})


def test_the_planner_keeps_no_state_between_calls() -> None:
    """core/ and formats/ hold constants only: a function's answer depends on its arguments alone."""
    state = {str(p.relative_to(ROOT)): names for p in sorted((PACKAGE / "core").glob("*.py"))
             + sorted((PACKAGE / "formats").glob("*.py")) if (names := _mutated_module_names(p))}
    assert state == {}

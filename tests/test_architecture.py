"""The house's rules, checked: no import circle in phd_flow (imports inside functions count,
``TYPE_CHECKING`` ones do not), every module imports on its own in a fresh interpreter, storage
never imports run semantics, and nothing outside the run object touches Node's private state."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "phd_flow"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path) -> set[str]:
    """phd_flow modules that ``path`` imports at run time (module level or inside functions)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import sub` imports the submodule; `from pkg import name` the package itself
            subs = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
            found.update(subs)
            if len(subs) < len(node.names):
                found.add(node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {name for name in found if name in MODULES and name != "phd_flow"}


def graph() -> dict[str, set[str]]:
    return {name: _imports(path) - {name} for name, path in MODULES.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a path, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := dfs(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := dfs(start)):
            return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    planted = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}
    assert find_cycle(planted) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_phd_flow_has_no_import_circles() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle or [])


def test_storage_never_imports_run_semantics() -> None:
    above = ("phd_flow.run", "phd_flow.runs", "phd_flow.stages", "phd_flow.sweeps", "phd_flow.cli", "phd_flow.project")
    for name, targets in graph().items():
        if name.startswith("phd_flow.storage"):
            assert not [t for t in targets if t.startswith(above)], f"{name} imports {targets}"


def test_nothing_below_cli_imports_cli() -> None:
    for name, targets in graph().items():
        if not name.startswith("phd_flow.cli") and name != "phd_flow":
            assert not [t for t in targets if t.startswith("phd_flow.cli")], f"{name} imports {targets}"


def test_only_the_run_object_touches_node_private_state() -> None:
    private = re.compile(r"\b(?!self\b)\w+\._active\b")
    for name, path in MODULES.items():
        if name in ("phd_flow.run.node", "phd_flow.run.active"):
            continue
        hits = [line for line in path.read_text().splitlines() if private.search(line)]
        assert not hits, f"{name} reaches into a Node's private state: {hits}"


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_interpreter() -> None:
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    for name in MODULES:  # one interpreter per module: the order of earlier imports cannot help
        proc = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"import {name} failed:\n{proc.stderr[-2000:]}"

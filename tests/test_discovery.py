"""Finding nodes from the package's source: the same nodes and the same ``--help`` as importing,
without importing the user's modules (issue 17), and importing where the source cannot decide."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest

from phd_flow.run.args import polish_help
from phd_flow.run.discovery import NodeView, find_nodes, list_nodes, node_view, resolve_node
from tests.conftest import EXAMPLES, cli, write_config

REPO = Path(__file__).resolve().parents[1]


def _help(node_cls: object, prog: str) -> str:
    parser = node_cls.argument_parser(prog=prog)  # type: ignore[attr-defined]
    polish_help(parser)
    return str(parser.format_help())


def _same_help_from_source(package: str, names: list[str]) -> None:
    for name in names:
        view = node_view(package, name)
        assert isinstance(view, NodeView), f"{name}: not decided from source"
        real = resolve_node(package, name)
        assert _help(view, name) == _help(real, name), name
        assert view.description() == real.description()


def test_example_help_from_source_is_the_imported_help(monkeypatch: pytest.MonkeyPatch) -> None:
    # an earlier test of this worker may have imported another copy of my_project (one with a
    # train.py, by loading a result in-process): find_nodes must not list that copy's classes
    for name in [n for n in sys.modules if n == "my_project" or n.startswith("my_project.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    assert set(list_nodes("my_project")) == set(find_nodes("my_project"))
    _same_help_from_source("my_project", ["FitOLS", "Prepare"])


@pytest.mark.slow
def test_test_nodes_help_from_source_is_the_imported_help() -> None:
    """Every node of the tests' node modules: frozen Args, fields named like run options,
    Literal fields, nested dataclasses, docstrings and comments as help."""
    names = [
        f"tests.{module}.{cls}"
        for module, classes in {
            "nodes": ["Add", "Fail", "Unpicklable", "Sleep"],
            "user_nodes": ["Frozen", "FrozenParent", "Collide", "FromFile"],
            "stage_nodes": ["Prepare", "Broken", "Outer", "Flaky"],
            "pipeline_nodes": ["Prepare", "Train", "Evaluate"],
            "sweep_nodes": ["Scale", "Nap", "Steps", "Quadratic"],
        }.items()
        for cls in classes
    ]
    _same_help_from_source("tests", names)


def _package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, str]) -> str:
    name = f"pkg_{uuid.uuid4().hex[:8]}"
    root = tmp_path / name
    root.mkdir()
    (root / "__init__.py").write_text("")
    for path, text in files.items():
        (root / path).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def _module(text: str) -> str:
    return "import dataclasses\nfrom phd_flow import Node, node\n" + textwrap.dedent(text)


def test_shapes_the_source_decides_are_found_without_importing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = _package(
        tmp_path,
        monkeypatch,
        {
            "common.py": _module(
                """
            import enum
            from typing import Generic, Literal, TypeVar

            A = TypeVar("A")
            DEFAULT_LR = 0.1

            class Color(enum.Enum):
                RED = 1
                BLUE = 2

            def default_layers() -> list[int]:
                return [DEFAULT_LR and 8, 16]

            @dataclasses.dataclass
            class Inner:
                depth: int = 2  # depth of the inner thing

            @dataclasses.dataclass
            class SharedArgs(node.Args):
                '''Shared arguments.'''

                lr: float = DEFAULT_LR
                '''the learning rate'''
                color: Color = Color.RED
                mode: Literal["a", "b"] = "a"  # a or b
                layers: list[int] = dataclasses.field(default_factory=default_layers)
                inner: Inner = dataclasses.field(default_factory=Inner)
                name: str | None = None

            class Base(Node[A, int], Generic[A]):
                '''An abstract base: no _run, Args left open.'''

            class Mixin:
                def _run(self) -> int:
                    return 1
            """
            ),
            "models.py": textwrap.dedent(
                """
            import json  # stdlib: fine
            import this_library_does_not_exist  # never imported by nodes or --help
            from phd_flow import node as pf
            from .common import Base, Mixin, SharedArgs

            class Generic(Base[SharedArgs]):
                '''A node whose Args come through a generic base.'''

                def _run(self) -> int:
                    return 2

            class Mixed(Mixin, pf.Node[SharedArgs, int]):
                '''_run from a mixin.'''

            class Child(Mixed):
                '''Args inherited from a node parent.'''

            class Abstract(pf.Node[SharedArgs, int]):
                '''No _run: not listed.'''

            class Outer:
                class Nested(pf.Node[SharedArgs, int]):
                    '''A nested node.'''

                    def _run(self) -> int:
                        return 3
            """
            ),
        },
    )
    found = list_nodes(package)
    assert sorted(found) == [
        f"{package}.models.Child",
        f"{package}.models.Generic",
        f"{package}.models.Mixed",
        f"{package}.models.Outer.Nested",
    ]
    assert all(isinstance(view, NodeView) for view in found.values())
    assert f"{package}.models" not in sys.modules and f"{package}.common" not in sys.modules
    view = node_view(package, "Generic")
    assert view is not None
    text = _help(view, "Generic")
    assert "the learning rate (default: 0.1)" in text and "a or b" in text and "depth of the inner thing" in text
    assert f"{package}.models" not in sys.modules
    # the same help as the imported node, once the missing library is there
    (tmp_path / "this_library_does_not_exist.py").write_text("")
    importlib.invalidate_caches()
    assert set(find_nodes(package)) == set(found)
    for name in ["Generic", "Mixed", "Child"]:
        assert _help(node_view(package, name), name) == _help(resolve_node(package, name), name), name


def test_modules_the_source_cannot_decide_are_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = _package(
        tmp_path,
        monkeypatch,
        {
            "plain.py": _module(
                """
            @dataclasses.dataclass
            class PArgs(node.Args):
                x: int = 1

            class Plain(Node[PArgs, int]):
                def _run(self) -> int:
                    return 1
            """
            ),
            "dynamic.py": _module(
                """
            from .plain import PArgs

            def make_base():
                return Node[PArgs, int]

            class FromCall(make_base()):
                def _run(self) -> int:
                    return 1

            def factory(name):
                class Made(Node[PArgs, int]):
                    def _run(self) -> int:
                        return 1
                Made.__qualname__ = Made.__name__ = name
                return Made

            Made = factory("Made")
            Typed = type("Typed", (FromCall,), {"__doc__": "made by type()"})
            """
            ),
            "computed.py": _module(
                """
            import random

            def seed_default() -> int:
                return random.Random(0).randint(0, 10) + len(EXTERNAL)

            from os import sep as EXTERNAL
            import this_library_does_not_exist_either

            @dataclasses.dataclass
            class CArgs(node.Args):
                seed: int = dataclasses.field(default_factory=seed_default)
                scale: float = this_library_does_not_exist_either.SCALE  # from a library

            class Computed(Node[CArgs, int]):
                '''Args that need a library: --help imports the module.'''

                def _run(self) -> int:
                    return 1
            """
            ),
        },
    )
    (tmp_path / "this_library_does_not_exist_either.py").write_text("SCALE = 2.5\n")
    (tmp_path / package / "branches.py").write_text(
        _module(
            """
            try:  # which import ran is decided at run time
                import tomllib as reader
            except ImportError:
                reader = None
            FORMAT = "toml" if reader else "none"

            @dataclasses.dataclass
            class BArgs(node.Args):
                fmt: str = FORMAT  # the format

            class Branches(Node[BArgs, int]):
                def _run(self) -> int:
                    return 1
            """
        )
    )
    found = list_nodes(package)
    assert isinstance(found[f"{package}.plain.Plain"], NodeView)
    assert not isinstance(found[f"{package}.dynamic.FromCall"], NodeView)
    assert f"{package}.dynamic" in sys.modules  # undecided: imported
    assert set(found) == set(find_nodes(package))
    assert node_view(package, "Computed") is None  # the Args need the library: import instead
    assert "(default: 2.5)" in _help(resolve_node(package, "Computed"), "Computed")
    assert node_view(package, "Branches") is None
    assert "the format (default: toml)" in _help(resolve_node(package, "Branches"), "Branches")


def test_a_syntax_error_is_reported_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = _package(tmp_path, monkeypatch, {"broken.py": "class (:\n"})
    with pytest.raises(SyntaxError):
        list_nodes(package)


def _heavy_project(project: Path) -> Path:
    marker = project / "heavy-imported"
    (project / "my_project" / "heavy.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "import dataclasses\nfrom phd_flow import Node, node\n\n\n"
        "@dataclasses.dataclass\nclass HArgs(node.Args):\n    y: str  # the y\n    x: int = 1  # the x\n\n\n"
        "class Heavy(Node[HArgs, int]):\n    '''A node whose module is slow to import.'''\n\n"
        "    def _run(self) -> int:\n        return 1\n"
    )
    write_config(project, 'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nenabled = false\n')
    return marker


@pytest.mark.parametrize(
    "argv",
    [["nodes"], ["run", "Heavy", "--help"], ["run", "--help"], ["run", "FitOLS", "--help"], ["run", "Nope"]],
)
def test_nodes_and_help_do_not_import_the_users_modules(project: Path, argv: list[str]) -> None:
    marker = _heavy_project(project)
    code = textwrap.dedent(
        f"""
        import sys
        from phd_flow.cli import main
        try:
            code = main("my_project", {argv!r})
        except SystemExit as exc:
            code = exc.code
        print("EXIT", code or 0)
        print("HEAVY", sorted({{m.split(".")[0] for m in sys.modules}} & {{"pandas", "sklearn", "mlflow"}}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=60, check=False
    )
    assert "HEAVY []" in proc.stdout, proc.stdout + proc.stderr
    assert not marker.exists()
    if argv[-1] == "Nope":
        assert (
            "EXIT 2" in proc.stdout
            and "No node named 'Nope'" in proc.stderr
            and "Known nodes: FitOLS, Heavy, Prepare" in (proc.stderr)
        )
    else:
        assert "EXIT 0" in proc.stdout
    if argv[:2] == ["run", "Heavy"]:
        assert "the x (default: 1)" in proc.stdout and "the y (required)" in proc.stdout


def test_run_help_from_source_equals_the_help_after_import(project: Path) -> None:
    """The CLI's help read from source is the help of the imported node (here forced by a
    module-level marker check: the same text, once with the module imported)."""
    _heavy_project(project)
    from_source = cli(project, "run", "Heavy", "--help")
    assert from_source.returncode == 0, from_source.stderr
    code = textwrap.dedent(
        """
        import my_project.heavy  # imported first: resolve_node finds the same class
        from phd_flow.cli import main
        from phd_flow.run import discovery
        discovery.node_view = lambda package, name: None  # the import path
        main("my_project", ["run", "Heavy", "--help"])
        """
    )
    imported = subprocess.run(
        [sys.executable, "-c", code], cwd=project, capture_output=True, text=True, timeout=60, check=False
    )
    assert imported.returncode == 0, imported.stderr
    assert from_source.stdout == imported.stdout


def test_run_still_imports_the_node_and_reports_bad_args(project: Path) -> None:
    marker = _heavy_project(project)
    proc = cli(project, "run", "Heavy", "--x", "abc", "--y", "b")
    assert proc.returncode == 2 and "invalid int value: 'abc'" in proc.stderr
    proc = cli(project, "run", "Heavy", "--y", "b")
    assert proc.returncode == 0, proc.stderr
    assert marker.exists()

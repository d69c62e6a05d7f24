"""The code part of a reuse fingerprint: which files of the user's package a node's module runs."""

from __future__ import annotations

from pathlib import Path

from phd_flow import reuse


def make_package(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


PACKAGE = {
    "pkg/__init__.py": "",
    "pkg/nodes.py": "import os\nfrom phd_flow import Node\nfrom pkg import helper\nfrom .sub import deep\n",
    "pkg/helper.py": "from . import shared\n",
    "pkg/shared.py": "VALUE = 1\n",
    "pkg/sub/__init__.py": "",
    "pkg/sub/deep.py": "from ..shared import VALUE\n",
    "pkg/unused.py": "X = 2\n",
}


def files_of(root: Path) -> dict[str, str]:
    return reuse.code_files(root, "pkg", "pkg.nodes", root / "pkg" / "nodes.py")


def test_the_modules_a_node_imports_transitively_and_nothing_else(tmp_path: Path) -> None:
    make_package(tmp_path, PACKAGE)
    assert sorted(files_of(tmp_path)) == [
        "pkg/__init__.py",
        "pkg/helper.py",
        "pkg/nodes.py",
        "pkg/shared.py",
        "pkg/sub/__init__.py",
        "pkg/sub/deep.py",
    ]


def test_an_edit_two_imports_away_changes_the_code_and_is_named(tmp_path: Path) -> None:
    make_package(tmp_path, PACKAGE)
    before = {"module": "pkg.nodes", "files": files_of(tmp_path), "git": None}
    (tmp_path / "pkg" / "shared.py").write_text("VALUE = 2\n")
    (tmp_path / "pkg" / "unused.py").write_text("X = 3\n")  # not imported: no effect
    after = {"module": "pkg.nodes", "files": files_of(tmp_path), "git": None}
    assert reuse.explain_changes({"code": before}, {"code": after}) == "code of pkg/shared.py changed"
    assert reuse.fingerprint("s", {"code": before}) != reuse.fingerprint("s", {"code": after})


def test_a_dynamic_import_covers_the_whole_package(tmp_path: Path) -> None:
    make_package(tmp_path, {**PACKAGE, "pkg/helper.py": "import importlib\nimportlib.import_module('pkg.unused')\n"})
    files = files_of(tmp_path)
    assert "pkg/unused.py" in files and "pkg/sub/deep.py" in files


def test_a_module_that_does_not_parse_covers_the_whole_package(tmp_path: Path) -> None:
    make_package(tmp_path, {**PACKAGE, "pkg/helper.py": "def broken(:\n"})
    assert "pkg/unused.py" in files_of(tmp_path)


def test_a_new_import_and_a_commit_are_named(tmp_path: Path) -> None:
    old = {"module": "pkg.nodes", "files": {"pkg/nodes.py": "a"}, "git": {"commit": "1" * 40, "diff_sha256": "d"}}
    new = {
        "module": "pkg.nodes",
        "files": {"pkg/nodes.py": "a", "pkg/extra.py": "b"},
        "git": {"commit": "2" * 40, "diff_sha256": "d"},
    }
    assert reuse.explain_changes({"code": old}, {"code": new}) == (
        "code of pkg/extra.py is new, git commit changed 1111111111 → 2222222222"
    )


def test_an_edit_during_a_run_does_not_change_its_later_fingerprints(tmp_path: Path) -> None:
    make_package(tmp_path, PACKAGE)
    with reuse.pinned():
        first = files_of(tmp_path)
        (tmp_path / "pkg" / "shared.py").write_text("VALUE = 22\n")  # the run keeps the imported code
        assert files_of(tmp_path) == first
    assert files_of(tmp_path)["pkg/shared.py"] != first["pkg/shared.py"]  # the next run sees the edit

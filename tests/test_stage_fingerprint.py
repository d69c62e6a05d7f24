"""A stage's code fingerprint covers the code that stage really runs: its ``with`` block and the
functions of the user's package it uses, transitively, on a normalized AST (issue 19)."""

from __future__ import annotations

import importlib
import json
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from phd_flow import Config, RunOptions, load_config, reuse
from tests.conftest import write_config

NODES = '''
import dataclasses

from phd_flow import Node, node

from PKG import helper


def unrelated(x):
    """Not called by any stage."""
    return x + 1


@dataclasses.dataclass
class ThreeArgs(node.Args):
    n: int = 3
    lr: float = 0.1


class Three(Node[ThreeArgs, str]):
    def _run(self) -> str:
        with self.stage("load_data", depends_on=["n"]) as data:
            if not data.loaded:
                (data.path / "rows.txt").write_text(helper.load(self.args.n))
        with self.stage("train", depends_on=["lr", "load_data"]) as train:
            if not train.loaded:
                (train.path / "model.txt").write_text(self.fit((data.path / "rows.txt").read_text()))
        return (train.path / "model.txt").read_text()

    def fit(self, rows: str) -> str:
        return helper.fit(rows, self.args.lr)


@dataclasses.dataclass
class OuterArgs(node.Args):
    n: int = 3


class Outer(Node[OuterArgs, str]):
    def _run(self) -> str:
        return self.require(Three, ThreeArgs(n=self.args.n))
'''

HELPER = """
SCALE = 2


def load(n):
    return " ".join(str(i * SCALE) for i in range(n))


def fit(rows, lr):
    return f"{len(rows.split())} rows at lr {lr}"
"""


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A fresh user package ``pkg_<random>`` with ``nodes.py`` and ``helper.py``."""
    name = f"pkg_{uuid.uuid4().hex[:8]}"
    root = tmp_path / "src" / name
    root.mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "nodes.py").write_text(NODES.replace("PKG", name))
    (root / "helper.py").write_text(HELPER)
    monkeypatch.syspath_prepend(str(tmp_path / "src"))
    yield name, root
    forget(name)


def config_of(tmp_path: Path) -> Config:
    text = f'local_path = "{tmp_path / "store"}"\n[mlflow]\nenabled = false\n'
    text += "[stages.load_data]\ncache = true\n[stages.train]\ncache = true\n"
    return load_config(tmp_path, write_config(tmp_path, text))


def forget(name: str) -> None:
    for module in [m for m in sys.modules if m == name or m.startswith(f"{name}.")]:
        del sys.modules[module]


def run(package: tuple[str, Path], config: Config) -> Any:
    """A run of ``Three`` with the package's code as it is now (as a new process would import it)."""
    forget(package[0])
    module = importlib.import_module(f"{package[0]}.nodes")
    node = module.Three({}, config=config, options=RunOptions())
    node.run()
    return node


def stages(node: Any) -> dict[str, Any]:
    return dict(json.loads((node.output_dir / "run.json").read_text())["stages"])


def log_of(node: Any) -> str:
    return str((node.output_dir / "output.log").read_text())


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


def test_a_comment_or_docstring_edit_recomputes_nothing(tmp_path: Path, package: tuple[str, Path]) -> None:
    config = config_of(tmp_path)
    first = run(package, config)
    assert not stages(first)["load_data"]["cached"]
    three = sys.modules[f"{package[0]}.nodes"].Three
    for stage in ("load_data", "train"):  # the fingerprint a run computes, computed without running it
        assert stages(first)[stage]["inputs"]["code"] == reuse.code_of_stage(three, stage)

    edit(package[1] / "nodes.py", "    return x + 1\n", "    # a comment\n    return x + 1  # and another\n")
    edit(package[1] / "nodes.py", '"""Not called by any stage."""', '"""Reworded docstring."""')
    edit(package[1] / "helper.py", "def load(n):\n", "def load(n):  # loads\n\n")
    second = run(package, config)

    assert stages(second)["load_data"]["cached"] is True
    assert stages(second)["train"]["cached"] is True
    assert f"Stage 'load_data': reused from {first.key}" in log_of(second)


def test_a_real_edit_of_an_unrelated_function_recomputes_nothing(tmp_path: Path, package: tuple[str, Path]) -> None:
    config = config_of(tmp_path)
    first = run(package, config)

    edit(package[1] / "nodes.py", "    return x + 1\n", "    return x + 100\n")
    second = run(package, config)

    assert stages(second)["load_data"]["cached"] is True
    assert stages(second)["load_data"]["loaded_from"] == str(first.key)
    assert stages(second)["train"]["cached"] is True


def test_an_edit_in_what_one_stage_calls_recomputes_only_that_stage_and_names_the_function(
    tmp_path: Path, package: tuple[str, Path]
) -> None:
    config = config_of(tmp_path)
    first = run(package, config)
    name = package[0]

    edit(package[1] / "helper.py", 'f"{len(rows.split())} rows', 'f"{len(rows.split())} rows (v2)')
    second = run(package, config)  # fit is called by train only, through the method Three.fit

    assert stages(second)["load_data"]["cached"] is True
    assert stages(second)["train"]["cached"] is False
    assert (
        f"Stage 'train': recomputed because code of {name}.helper.fit changed (compared with {first.key})."
        in log_of(second)
    )

    edit(package[1] / "helper.py", "SCALE = 2", "SCALE = 3")  # a module-level value load() reads
    third = run(package, config)

    assert stages(third)["load_data"]["cached"] is False
    assert f"Stage 'load_data': recomputed because code of {name}.helper.SCALE changed" in log_of(third)
    assert "Stage 'train': recomputed because stage load_data changed" in log_of(third)


def test_an_edit_in_the_stage_block_itself_is_named(tmp_path: Path, package: tuple[str, Path]) -> None:
    config = config_of(tmp_path)
    first = run(package, config)
    name = package[0]

    edit(package[1] / "nodes.py", "write_text(self.fit(", "write_text('fitted ' + self.fit(")
    second = run(package, config)

    assert stages(second)["load_data"]["cached"] is True  # train's block is not load_data's code
    assert (
        f"Stage 'train': recomputed because code of {name}.nodes.Three._run [stage train] changed "
        f"(compared with {first.key})."
    ) in log_of(second)


def test_a_dynamic_call_falls_back_to_the_module_fingerprint(tmp_path: Path, package: tuple[str, Path]) -> None:
    edit(package[1] / "nodes.py", "helper.load(self.args.n)", 'getattr(self, "load_" + "rows")(self.args.n)')
    edit(
        package[1] / "nodes.py",
        "    def fit(self, rows: str) -> str:",
        "    def load_rows(self, n):\n        return helper.load(n)\n\n    def fit(self, rows: str) -> str:",
    )
    config = config_of(tmp_path)
    first = run(package, config)
    code = stages(first)["load_data"]["inputs"]["code"]
    assert sorted(code["files"]) == [f"{package[0]}/__init__.py", f"{package[0]}/helper.py", f"{package[0]}/nodes.py"]
    assert "functions" in stages(first)["train"]["inputs"]["code"]  # train's block has no dynamic call

    edit(package[1] / "nodes.py", "    return x + 1\n", "    return x + 100\n")
    second = run(package, config)

    assert stages(second)["load_data"]["cached"] is False  # cannot be decided: the module counts
    assert stages(second)["train"]["cached"] is False  # it depends on load_data


def test_require_reuses_a_node_unless_code_it_runs_changed(tmp_path: Path, package: tuple[str, Path]) -> None:
    """The same mechanism covers a node for ``require()``: the class and what it uses."""
    config = load_config(
        tmp_path, write_config(tmp_path, f'local_path = "{tmp_path / "store"}"\n[mlflow]\nenabled = false\n')
    )

    def outer() -> Any:
        forget(package[0])
        node = importlib.import_module(f"{package[0]}.nodes").Outer({}, config=config)
        node.run()
        return node

    outer()
    edit(package[1] / "nodes.py", "    return x + 1\n", "    return x + 100  # unrelated to Three\n")
    second = outer()
    assert second.record.data["children"][0]["reused"] is True

    edit(package[1] / "helper.py", 'f"{len(rows.split())} rows', 'f"{len(rows.split())} rows (v2)')
    third = outer()
    assert third.record.data["children"][0]["reused"] is False
    assert f"code of {package[0]}.helper.fit changed" in log_of(third)


WRAPPED = """
import contextlib
import dataclasses

from phd_flow import Node, node


@dataclasses.dataclass
class WrappedArgs(node.Args):
    n: int = 3


class Wrapped(Node[WrappedArgs, int]):
    @contextlib.contextmanager
    def my_stage(self, name):
        with self.stage(name) as st:
            yield st

    def _run(self) -> int:
        with self.my_stage("numbers") as st:
            (st.path / "n.txt").write_text(str(self.args.n))
        return self.args.n
"""


def test_a_stage_opened_through_a_context_manager_of_the_user_counts_the_whole_module(
    tmp_path: Path, package: tuple[str, Path]
) -> None:
    """The block that does the work is the caller's, not the wrapper's: not decidable, so the
    module fingerprint is used (never a fingerprint that misses the code that made the files)."""
    (package[1] / "wrapped.py").write_text(WRAPPED)
    forget(package[0])
    node = importlib.import_module(f"{package[0]}.wrapped").Wrapped({}, config=config_of(tmp_path))
    node.run()
    code = stages(node)["numbers"]["inputs"]["code"]
    assert "functions" not in code and f"{package[0]}/wrapped.py" in code["files"]


PLAIN = """
import dataclasses

from phd_flow import Node, node


@dataclasses.dataclass
class PlainArgs(node.Args):
    n: int = 3


class Base(Node[PlainArgs, str]):
    def shape(self, text):
        return text.upper()


class Plain(Base):
    def shape(self, text):
        return super().shape(text) + "!"

    def _run(self) -> str:
        with self.stage("first") as one:
            rows = " ".join(str(i) for i in range(self.args.n))
            (one.path / "rows.txt").write_text(rows)
        with self.stage("second") as two:  # no depends_on: it uses what first made, unsaid
            (two.path / "out.txt").write_text(self.shape(rows))
        return rows
"""


def test_a_stage_without_depends_on_counts_the_code_of_the_stages_before_it(
    tmp_path: Path, package: tuple[str, Path]
) -> None:
    (package[1] / "plain.py").write_text(PLAIN)
    text = f'local_path = "{tmp_path / "store"}"\n[mlflow]\nenabled = false\n'
    config = load_config(tmp_path, write_config(tmp_path, text))

    def plain() -> Any:
        forget(package[0])
        node = importlib.import_module(f"{package[0]}.plain").Plain({}, config=config, options=RunOptions(cache=True))
        node.run()
        return node

    plain()
    edit(package[1] / "plain.py", "str(i) for i", "str(2 * i) for i")  # first's block
    second = plain()
    assert not stages(second)["first"]["cached"] and not stages(second)["second"]["cached"]

    edit(package[1] / "plain.py", "return text.upper()", "return text.lower()")  # Base.shape, via super()
    third = plain()
    assert stages(third)["first"]["cached"] is True
    assert not stages(third)["second"]["cached"]
    assert f"code of {package[0]}.plain.Base.shape changed" in log_of(third)


LOOP = """
import dataclasses

from phd_flow import Node, node


@dataclasses.dataclass
class LoopArgs(node.Args):
    n: int = 3


class Loop(Node[LoopArgs, int]):
    def _run(self) -> int:
        for part in range(self.args.n):
            with self.stage(f"part{part}", depends_on=["n"]) as st:
                (st.path / "part.txt").write_text(str(part))
        return self.args.n
"""


def test_stages_opened_in_a_loop_share_the_code_of_their_block(tmp_path: Path, package: tuple[str, Path]) -> None:
    (package[1] / "loop.py").write_text(LOOP)
    forget(package[0])
    node = importlib.import_module(f"{package[0]}.loop").Loop({}, config=config_of(tmp_path))
    node.run()
    codes = [stages(node)[f"part{i}"]["inputs"]["code"]["functions"] for i in range(3)]
    assert [list(code) for code in codes] == [[f"{package[0]}.loop.Loop._run [stage part{i}]"] for i in range(3)]
    assert len({digest for code in codes for digest in code.values()}) == 1

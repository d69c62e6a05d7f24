"""Every command block of README.md and docs/*.md that drives the example project runs as written.

A doc example that fails is a bug. Each page's blocks run in order, in one bash, in a fresh copy
of ``examples/`` (``. .venv/bin/activate && cd examples`` becomes "this venv, in the copy"). A
command annotated ``# exit N`` (or ``(exit N)``) must exit with N, every other one with 0.
Every page but the README runs ``python -m my_project`` through this worker's CLI fork server
(tests/cli_client.py: the same process minus ~1.5 s of imports per call); the README's commands
run in new interpreters and create the MLflow store, as on a fresh clone (the other pages start
with an empty migrated store in place). Left out, by rule: blocks that install (``pip install``), run the test suite or linters, need an
account (``aws``, ``b2``), and the long-running ``ui`` command.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import REPO, with_cli_shim

PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```sh\n(.*?)^```", re.MULTILINE | re.DOTALL)
_EXIT = re.compile(r"#.*\bexit (\d+)")
_LEAVE_OUT = ("pip install", "pytest", "ruff ", "mypy", "aws ", "b2 ", "benchmarks/")
ACTIVATE = ". .venv/bin/activate && cd examples"


def runnable_blocks(page: Path) -> list[tuple[int, str]]:
    """(line number, text) of the blocks of ``page`` that run against the example project."""
    text = page.read_text()
    blocks = []
    for match in _FENCE.finditer(text):
        block = match.group(1)
        if "python -m my_project" not in block or any(word in block for word in _LEAVE_OUT):
            continue
        blocks.append((text.count("\n", 0, match.start()) + 1, block))
    return blocks


def as_script(block: str, tmp: Path) -> str:
    """The block as bash: continuation lines joined, ``# exit N`` checked, ``ui`` left out."""
    block = block.replace("\\\n", " ").replace("/tmp/", f"{tmp}/")
    lines = []
    heredoc: str | None = None
    for line in block.splitlines():
        if heredoc is not None:  # inside a here-document: verbatim
            lines.append(line)
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        if (start := re.search(r"<<'?(\w+)'?", line)) is not None:
            heredoc = start.group(1)
        stripped = line.strip()
        if stripped == ACTIVATE:
            continue  # the venv is this interpreter's; the cwd is the copy of examples/
        if stripped == "cd ..":
            continue  # the README's tour ends at the repo root; the next block starts again
        if re.search(r"my_project ui\b", stripped):
            lines.append(f": left out: {stripped!r}")
            continue
        code = _EXIT.search(line)
        expected = int(code.group(1)) if code else 0
        command = line.split("  #")[0].rstrip() if "  #" in line else line
        if not command.strip() or command.strip().startswith("#") or "() {" in command:
            lines.append(command)
            continue
        quoted = command.strip().replace("'", "'\\''")
        lines.append(
            f"rc=0; {command} || rc=$?; "
            f"if [ $rc -ne {expected} ]; then echo 'DOC COMMAND EXITED '$rc' (expected {expected}): {quoted}' >&2; exit 99; fi"
        )
    return "\n".join(lines) + "\n"


PAGES_WITH_BLOCKS = [page for page in PAGES if runnable_blocks(page)]


def first_command_run() -> str:
    """The run that the README's first command ends with: every page starts "after the README's
    first command", so each page's copy has that run first."""
    first = _FENCE.search((REPO / "README.md").read_text())
    assert first is not None
    found = re.search(r"python -m my_project (run [^)\n]*)", first.group(1))
    assert found is not None, "the README's first command no longer runs the example"
    return f"python -m my_project {found.group(1)}"


def test_the_runnable_pages_are_found() -> None:
    names = {page.name for page in PAGES_WITH_BLOCKS}
    assert {"README.md", "runs.md", "stages.md", "sweeps.md", "cli.md"} <= names, names


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES_WITH_BLOCKS, ids=lambda p: p.name)
def test_every_command_block_runs_as_written(page: Path, tmp_path: Path, migrated_store: Callable[[Path], str]) -> None:
    root = tmp_path / "repo"
    shutil.copytree(REPO / "examples", root / "examples", ignore=shutil.ignore_patterns("__pycache__", "data_storage"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "MLFLOW_", "PHD_FLOW_"))}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        MLFLOW_DISABLE_TELEMETRY="true",
        NO_COLOR="1",
        HOME=str(tmp_path / "home"),
    )
    (tmp_path / "home").mkdir()
    if page.name != "README.md":  # the README's commands run in new interpreters on a new store: a fresh clone
        env = with_cli_shim(env, tmp_path / "bin")
        migrated_store(root / "examples" / "data_storage" / "mlflow.db")
    blocks = [(0, first_command_run()), *runnable_blocks(page)]
    for line, block in blocks:
        script = "set -u\n" + as_script(block, tmp_path)
        proc = subprocess.run(
            ["bash", "-c", script],
            cwd=root / "examples",
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
        )
        assert proc.returncode == 0, f"{page.name}:{line}\n{script}\n--- stderr (end) ---\n{proc.stderr[-3000:]}"

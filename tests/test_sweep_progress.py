"""A local sweep's live ``[done/total] ETA`` line (issue 16): redrawn in place on a terminal (a
real pseudo-terminal here), never written when stdout is a pipe; every finished point's line
says the ETA of the rest."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import _ENV_VARS, cli
from tests.test_sweep_local import make_project

SWEEP = ["sweep", "Nap", "--grid", "seconds=1.2,1.3,1.4", "--max-parallel", "1"]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _ENV_VARS and not k.startswith("PYTEST")}
    return {**env, "MLFLOW_DISABLE_TELEMETRY": "true", "TERM": "xterm"}


def _run_on_a_terminal(project: Path) -> tuple[int, str]:
    """Run the CLI with its stdout and stderr on a pseudo-terminal; (exit code, what it wrote)."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "my_project", *SWEEP],
        cwd=project,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=slave,
        stderr=slave,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every writer closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return proc.wait(timeout=120), b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_a_local_sweep_draws_a_live_done_total_eta_line_on_a_terminal(tmp_path: Path) -> None:
    project = make_project(tmp_path / "proj")
    code, text = _run_on_a_terminal(project)
    assert code == 0, text
    live = re.findall(r"\r\x1b\[K(\[\d/3\] \d running, \d+ s elapsed[^\r\n]*)", text)
    assert live, text
    assert any(line.startswith("[0/3] 1 running") and line.endswith("ETA ?") for line in live), live
    assert any(re.match(r"\[[12]/3\] 1 running, \d+ s elapsed  ETA \d+s$", line) for line in live), live
    finished = re.findall(r"\[(\d)/3\] completed [^\r\n]*", text)
    assert finished == ["1", "2", "3"], text
    assert re.search(r"\[1/3\] completed .*\(\d+\.\d s\)  ETA \d+s", text), text
    assert "finished: 3 completed" in text.split("\r\x1b[K")[-1]  # the live line was cleared first


@pytest.mark.slow
def test_no_live_line_when_stdout_is_not_a_terminal(tmp_path: Path) -> None:
    project = make_project(tmp_path / "proj")
    proc = cli(project, *SWEEP)
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[K" not in proc.stdout and "running," not in proc.stdout
    assert re.search(r"\[2/3\] completed .*  ETA \d+s", proc.stdout), proc.stdout
    assert re.search(r"\[3/3\] completed .*\(\d+\.\d s\)\n", proc.stdout), proc.stdout  # nothing left

"""A node's print() and stderr output reach output.log as well as the terminal; ``logs`` shows it
(issue 16, "Captured output")."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import cli, run_dirs

NODES = """
import dataclasses, sys, time, warnings
from pathlib import Path
from phd_flow import Node, node


@dataclasses.dataclass
class TalkArgs(node.Args):
    wait_for: str = ""  # a file to wait for before the last line


class Talk(Node[TalkArgs, int]):
    def _run(self) -> int:
        print("hello from print")
        print("two", "pieces", sep=" ", end="")
        print(" make one line")
        sys.stderr.write("to stderr\\n")
        for i in range(3):
            sys.stderr.write(f"\\rprogress {i}/3")
        sys.stderr.write("\\n")
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.warn("careful", UserWarning, stacklevel=1)
        if self.args.wait_for:
            while not Path(self.args.wait_for).exists():
                time.sleep(0.05)
            print("after the wait")
        print("no newline at the end", end="")
        return 1
"""


def _project(project: Path) -> Path:
    (project / "my_project" / "talk.py").write_text(NODES)
    init = project / "my_project" / "__init__.py"
    init.write_text(init.read_text() + "\nfrom my_project import talk  # noqa: F401\n")
    return project


@pytest.mark.slow
def test_print_and_stderr_reach_output_log_and_the_terminal(project: Path) -> None:
    proc = cli(_project(project), "run", "Talk")
    assert proc.returncode == 0, proc.stderr
    assert "hello from print" in proc.stdout and "two pieces make one line" in proc.stdout
    assert "to stderr" in proc.stderr
    (run_dir,) = run_dirs(project / "data_storage")
    log = (run_dir / "output.log").read_text().splitlines()
    for line in ("hello from print", "two pieces make one line", "to stderr", "progress 2/3", "no newline at the end"):
        assert line in log, (line, log)
    assert not any("progress 0/3" in line for line in log), "a redrawn progress bar keeps its last state only"
    assert sum("careful" in line for line in log) == 1  # warnings go through the logger, once
    assert sum("Run node" in line or "Talk" in line for line in log) >= 1
    # every loguru line once: the tee is not a second sink for the logger's own stderr lines
    lines = [line for line in log if " | INFO " in line]
    assert len(lines) == len(set(lines))


@pytest.mark.slow
def test_logs_prints_a_runs_output_log(project: Path) -> None:
    assert cli(_project(project), "run", "Talk").returncode == 0
    (run_dir,) = run_dirs(project / "data_storage")
    proc = cli(project, "logs", run_dir.name[:8])  # a unique prefix
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == (run_dir / "output.log").read_text().splitlines()
    tail = cli(project, "logs", run_dir.name, "-n", "1")
    assert tail.stdout.splitlines() == ["no newline at the end"]


def test_logs_of_an_unknown_key_is_one_clear_error(project: Path) -> None:
    proc = cli(project, "logs", "nosuchkey")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "nosuchkey" in proc.stderr


@pytest.mark.slow
def test_logs_follow_prints_new_lines_and_stops_when_the_run_ends(project: Path, tmp_path: Path) -> None:
    go = tmp_path / "go"
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("PYTEST")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    runner = subprocess.Popen(
        [sys.executable, "-m", "my_project", "run", "Talk", "--wait_for", str(go)],
        cwd=_project(project),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while not any("hello from print" in p.read_text() for p in (project / "data_storage").glob("*/output.log")):
            assert time.monotonic() < deadline and runner.poll() is None, "the run never printed"
            time.sleep(0.1)
        (run_dir,) = run_dirs(project / "data_storage")
        follower = subprocess.Popen(
            [sys.executable, "-m", "my_project", "logs", "-f", run_dir.name],
            cwd=project,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert follower.stdout is not None
        first = follower.stdout.readline()  # it printed what was there and keeps going
        assert first.strip()
        go.touch()
        out, err = follower.communicate(timeout=120)  # returns by itself once the run ends
        assert follower.returncode == 0, err
        assert "after the wait" in out and "no newline at the end" in out
        assert runner.wait(timeout=120) == 0
        assert json.loads((run_dir / "run.json").read_text())["status"] == "completed"
    finally:
        runner.kill()

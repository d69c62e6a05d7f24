"""Issue 14 row 9: ``autolog = true`` never hangs (MLflow's telemetry thread against autolog's
import hook once deadlocked on the import lock). 20 runs, two at a time, each in a process that
has never imported mlflow. The first two are new interpreters, start-up and exit included; the
other 18 are forked from the CLI fork server (tests/cli_server.py: phd_flow, pandas and
scikit-learn imported, mlflow never), so each still imports mlflow, starts or skips its telemetry
and sets up autolog's import hooks as a new interpreter does. Every run logs its model with
MLflow's requirement inference (a new interpreter of its own), as a user's run does."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import popen_cli, run_dirs, write_config

AUTOLOG_NODE = """
import dataclasses

import sklearn.linear_model  # imported before the run: mlflow.autolog hooks it at once

from phd_flow import Node, node


@dataclasses.dataclass
class FitArgs(node.Args):
    alpha: float = 0.5


class AutoFit(Node[FitArgs, float]):
    def _run(self) -> float:
        from sklearn.datasets import load_diabetes

        x, y = load_diabetes(return_X_y=True)
        return float(sklearn.linear_model.Ridge(alpha=self.args.alpha).fit(x, y).score(x, y))
"""

RUNS, AT_ONCE, TIMEOUT, NEW_INTERPRETERS = 20, 2, 240, 2
CI_VARS = ("CI", "GITHUB_ACTIONS", "GITLAB_CI", "JENKINS_URL", "TRAVIS", "BUILDKITE", "DO_NOT_TRACK")


@pytest.mark.slow
@pytest.mark.timeout(1200)  # 20 runs that import mlflow and log a model: ~150 s on 2 busy cores
def test_row9_autolog_runs_twenty_times_without_a_hang(project: Path) -> None:
    pytest.importorskip("sklearn")
    (project / "my_project" / "autofit.py").write_text(AUTOLOG_NODE)
    write_config(
        project, 'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nexperiment = "test"\nautolog = true\n'
    )
    # phd_flow's own defaults only: no MLFLOW_* from the test session, no CI marker that would
    # switch MLflow's telemetry off behind phd_flow's back
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTEST")) and k not in CI_VARS}
    running: list[tuple[subprocess.Popen[str], float]] = []
    codes: list[int] = []
    started = 0
    while started < RUNS or running:
        while started < RUNS and len(running) < AT_ONCE:
            if started < NEW_INTERPRETERS:
                command = [sys.executable, "-m", "my_project", "run", "AutoFit"]
                proc = subprocess.Popen(
                    command, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
                )
            else:
                proc = popen_cli(project, "run", "AutoFit", env=env, stdout=subprocess.DEVNULL)
            running.append((proc, time.monotonic()))
            started += 1
        for proc, since in list(running):
            if proc.poll() is not None:
                _, err = proc.communicate()
                assert proc.returncode == 0, err[-3000:]
                codes.append(proc.returncode)
                running.remove((proc, since))
            elif time.monotonic() - since > TIMEOUT:
                proc.kill()
                _, err = proc.communicate()
                pytest.fail(f"an autolog run hung for {TIMEOUT} s (run {len(codes) + 1} of {RUNS}): {err[-2000:]}")
        time.sleep(0.05)
    assert codes == [0] * RUNS
    assert len(run_dirs(project / "data_storage")) == RUNS

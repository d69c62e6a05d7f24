"""Issue 14 row 9: ``autolog = true`` never hangs (MLflow's telemetry thread against autolog's
import hook once deadlocked on the import lock). 20 fresh processes, two at a time."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import run_dirs, write_config

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

RUNS, AT_ONCE, TIMEOUT = 20, 2, 240
CI_VARS = ("CI", "GITHUB_ACTIONS", "GITLAB_CI", "JENKINS_URL", "TRAVIS", "BUILDKITE", "DO_NOT_TRACK")


@pytest.mark.slow
@pytest.mark.timeout(1200)  # 20 processes that import mlflow + sklearn: ~200 s on 2 busy cores
def test_row9_autolog_runs_twenty_times_without_a_hang(project: Path) -> None:
    pytest.importorskip("sklearn")
    (project / "my_project" / "autofit.py").write_text(AUTOLOG_NODE)
    write_config(
        project, 'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nexperiment = "test"\nautolog = true\n'
    )
    # phd_flow's own defaults only: no MLFLOW_* from the test session, no CI marker that would
    # switch MLflow's telemetry off behind phd_flow's back
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTEST")) and k not in CI_VARS}
    command = [sys.executable, "-m", "my_project", "run", "AutoFit"]
    running: list[tuple[subprocess.Popen[str], float]] = []
    codes: list[int] = []
    started = 0
    while started < RUNS or running:
        while started < RUNS and len(running) < AT_ONCE:
            proc = subprocess.Popen(
                command, cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
            )
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

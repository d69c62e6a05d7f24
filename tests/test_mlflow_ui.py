"""MLflow's own UI shows a phd_flow run completely (issue 16): the example's FitOLS run through
the CLI, ``python -m my_project ui`` on its sqlite store, and headless Chromium reading the run's
page as a user would see it: its params, its metric and its artifacts (output.log, args.json).

Chromium comes from Debian's packages (``apt-get install -y chromium``). Without it the test is
skipped with that reason, except in CI (``CI`` set), where a missing browser is a failure; a
Chromium that is installed but cannot start is a skip naming its error.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from phd_flow.tracking import CLASSIC_VIEW
from tests.conftest import _ENV_VARS, cli

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
INSTALL = "apt-get update && apt-get install -y chromium"


def _browser() -> str:
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    reason = f"headless Chromium is not installed (install it with `{INSTALL}`)"
    if os.environ.get("CI"):
        pytest.fail(reason + ": CI must run the MLflow UI test")
    pytest.skip(reason)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _dom(browser: str, url: str, tmp_path: Path, must_show: list[str], screenshot: Path | None = None) -> str:
    """The page's DOM once the single-page app has drawn ``must_show`` (retried until a deadline:
    the app loads its data after the page itself)."""
    deadline = time.monotonic() + 120
    profile = tmp_path / "chromium-profile"  # a fresh profile: no saved UI state
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    base += [f"--user-data-dir={profile}", "--window-size=1400,2200", "--virtual-time-budget=20000"]
    if screenshot is not None:  # taken by the same browser, of the page the DOM below is read from
        base.append(f"--screenshot={screenshot}")
    while True:
        proc = subprocess.run(
            [*base, "--dump-dom", url], capture_output=True, text=True, timeout=180, check=False, cwd=tmp_path
        )
        if proc.returncode != 0 and not proc.stdout:
            pytest.skip(f"Chromium cannot start here: {proc.stderr.strip().splitlines()[-1:]}")
        if all(word in proc.stdout for word in must_show) or time.monotonic() > deadline:
            break
    return proc.stdout


@pytest.mark.slow
def test_mlflow_ui_shows_the_runs_params_metrics_and_artifacts(project: Path, tmp_path: Path) -> None:
    browser = _browser()
    run = ["run", "FitOLS", "--dataset", "data/diabetes.csv", "--target", "target", "--seed", "3"]
    if "--wait-mlflow" in cli(project, *run[:2], "--help").stdout:
        run.append("--wait-mlflow")  # MLflow fed in the background: wait until it shows the run
    proc = cli(project, *run)
    assert proc.returncode == 0, proc.stderr
    (run_json,) = (project / "data_storage").glob("FitOLS_*/run.json")
    mlflow = json.loads(run_json.read_text())["mlflow"]
    run_id, experiment_id = mlflow["run_id"], mlflow["experiment_id"]

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k not in _ENV_VARS and not k.startswith("PYTEST")}
    server = subprocess.Popen(
        [sys.executable, "-m", "my_project", "ui", "--port", str(port)],
        cwd=project,
        env={**env, "MLFLOW_DISABLE_TELEMETRY": "true"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "mlflow ui did not answer"
                time.sleep(0.5)
        page = f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs/{run_id}"
        screenshot = tmp_path / "mlflow-run.png"
        overview = _dom(browser, page, tmp_path, ["Parameters", "mse"], screenshot)
        artifacts = _dom(browser, page + "/artifacts", tmp_path, ["output.log"])
        classic = _dom(browser, page + CLASSIC_VIEW, tmp_path, ["Parameters", "mse"])  # the links phd_flow prints
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)

    assert "Parameters (3)" in overview, overview[-3000:]
    for param in ("dataset", "target", "seed"):
        assert f">{param}<" in overview, param
    assert ">mse<" in overview and "Metrics (1)" in overview
    assert "No Artifacts Recorded" not in artifacts
    for name in ("output.log", "args.json", "run.json"):
        assert name in artifacts, f"{name} is not among the run's artifacts in MLflow's UI"
    # MLflow 3 opens in its GenAI view (evaluation runs, traces); phd_flow's links ask for model training
    assert "Evaluation runs" in overview and "Evaluation runs" not in classic, classic[-3000:]
    assert "Parameters (3)" in classic and ">mse<" in classic
    assert screenshot.stat().st_size > 20_000 and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

"""Shared fixtures: clean global state around every test, a copy of the example project, the CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Before any test module imports mlflow (collection runs before fixtures): with telemetry on,
# mlflow's config-fetching thread and `mlflow.autolog`'s import hook can deadlock on the import
# lock (seen as a hang in test_tracking's autolog test). CI=true turns it off too; a laptop doesn't.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
EXAMPLES = REPO / "examples"
# Tests read MLflow right after a run: every run waits until MLflow has it ([mlflow] wait = true).
# Tests of the background feeder (test_feeder.py) pass PHD_FLOW_WAIT_MLFLOW=false to the CLI.
os.environ["PHD_FLOW_WAIT_MLFLOW"] = "true"

# Environment that would leak the developer's machine into a test.
_ENV_VARS = [
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_RUN_ID",
    "PHD_FLOW_CONFIG",
    "B2_APPLICATION_KEY_ID",
    "B2_APPLICATION_KEY",
]


@pytest.fixture(autouse=True)
def clean_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Reset env vars, loguru sinks and MLflow's active run around each test."""
    for name in _ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    from loguru import logger

    yield
    logger.remove()
    logger.add(sys.stderr, level="DEBUG")
    if "mlflow" in sys.modules:
        import mlflow

        while mlflow.active_run() is not None:
            mlflow.end_run()


def write_config(project: Path, text: str) -> Path:
    """Write ``project/config/default.toml``."""
    path = project / "config" / "default.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow sqlite DB, created and migrated once per session.

    A fresh store costs every CLI run ~3 s of alembic migrations; the ``project`` fixture copies
    this one instead. Tests about creating a store (``test_fifty_processes_at_once_on_a_fresh_store``)
    delete the copy first.
    """
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    code = f"from mlflow.tracking import MlflowClient; MlflowClient('sqlite:///{path}').search_experiments()"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    return path


@pytest.fixture
def project(tmp_path: Path, mlflow_db_template: Path) -> Path:
    """A copy of the example project (my_project + data) with a config in tmp_path, and an empty
    migrated MLflow DB in its data_storage."""
    root = tmp_path / "proj"
    shutil.copytree(EXAMPLES / "my_project", root / "my_project", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(EXAMPLES / "data", root / "data")
    write_config(root, 'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nexperiment = "test"\n')
    (root / "data_storage").mkdir()
    shutil.copy(mlflow_db_template, root / "data_storage" / "mlflow.db")
    return root


def nothing_created(local_path: Path) -> bool:
    """True when no command wrote into ``local_path`` (beyond the ``project`` fixture's MLflow DB)."""
    return not local_path.exists() or {p.name for p in local_path.iterdir()} <= {"mlflow.db"}


def cli(
    project: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 180
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m my_project ARGS`` in ``project`` like a user would."""
    full_env = {k: v for k, v in os.environ.items() if k not in _ENV_VARS and not k.startswith("PYTEST")}
    full_env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "my_project", *args],
        cwd=project,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_dirs(local_path: Path) -> list[Path]:
    """Run directories (those with a run.json) directly below local_path."""
    return sorted(p for p in local_path.iterdir() if (p / "run.json").exists()) if local_path.exists() else []

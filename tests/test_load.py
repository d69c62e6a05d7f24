"""Load held (README "Guarantees"): many processes starting at the same instant.

Its own module so that pytest-xdist (``--dist loadfile``) schedules it beside the rest.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import run_dirs
from tests.test_guarantees import FAULT_NODES, _env


@pytest.fixture
def fproject(project: Path) -> Path:
    (project / "my_project" / "faults.py").write_text(FAULT_NODES)
    return project


def _nice() -> None:
    os.nice(10)


@pytest.mark.slow
@pytest.mark.timeout(900)  # 50 niced processes on 2 cores next to another test worker
def test_fifty_processes_at_once_on_a_fresh_store(fproject: Path) -> None:
    """50 runs started together against one fresh local_path and one fresh sqlite MLflow store."""
    shutil.rmtree(fproject / "data_storage")  # no pre-made MLflow DB: the 50 must create it
    n = 50
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "my_project", "run", "ManyFiles", "--files", str(i)],
            cwd=fproject,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=_nice,  # the 50 start together but yield the CPU to tests running beside
        )
        for i in range(n)
    ]
    outputs = [p.communicate(timeout=900) for p in procs]
    failures = [(p.returncode, err[-2000:]) for p, (_, err) in zip(procs, outputs, strict=True) if p.returncode]
    assert not failures
    errors = [err for _, err in outputs if "| ERROR" in err or "| WARNING" in err]
    assert not errors, errors[0][-2000:]
    dirs = run_dirs(fproject / "data_storage")
    assert len({d.name for d in dirs}) == n
    records = [json.loads((d / "run.json").read_text()) for d in dirs]
    assert all(r["status"] == "completed" and r["mlflow"]["state"] == "synced" for r in records)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{fproject / 'data_storage' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id], max_results=1000)
    assert len(runs) == n and {r.info.status for r in runs} == {"FINISHED"}
    assert sorted(int(r.data.params["files"]) for r in runs) == list(range(n))

"""Failure semantics through the real CLI: exceptions, SIGTERM (scancel), Ctrl-C, parallel starts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import cli, run_dirs

EXTRA_NODES = '''
import dataclasses, time
from phd_flow import Node, logger, node


@dataclasses.dataclass
class SleepArgs(node.Args):
    seconds: float = 60.0
    marker: str = ""  # file created once _run started


class Sleep(Node[SleepArgs, float]):
    """Sleep, for signal tests."""

    def _run(self) -> float:
        logger.info("sleeping")
        self.log_metric("started", 1)
        open(self.args.marker, "w").close()
        end = time.time() + self.args.seconds
        while time.time() < end:
            time.sleep(0.02)
        return self.args.seconds


@dataclasses.dataclass
class CrashArgs(node.Args):
    message: str = "boom"


class Crash(Node[CrashArgs, int]):
    """Raise."""

    def _run(self) -> int:
        raise RuntimeError(self.args.message)


class Quick(Node[CrashArgs, str]):
    """Return at once."""

    def _run(self) -> str:
        self.log_metric("m", 1.0)
        return self.args.message
'''


@pytest.fixture
def sproject(project: Path) -> Path:
    (project / "my_project" / "extra.py").write_text(EXTRA_NODES)
    return project


def _mlflow_status(project: Path, run_id: str) -> str:
    from mlflow.tracking import MlflowClient

    return str(MlflowClient(f"sqlite:///{project / 'data_storage' / 'mlflow.db'}").get_run(run_id).info.status)


@pytest.mark.slow
def test_exception_in_run_exits_1_with_one_paragraph(sproject: Path) -> None:
    proc = cli(sproject, "run", "Crash", "--message", "exploded")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "RuntimeError: exploded" in last and "output.log" in last
    (run_dir,) = run_dirs(sproject / "data_storage")
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed"
    assert "Traceback" in (run_dir / "output.log").read_text()
    assert _mlflow_status(sproject, record["mlflow"]["run_id"]) == "FAILED"


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_during_run_marks_killed_everywhere(sproject: Path, tmp_path: Path, sig: int, code: int) -> None:
    marker = tmp_path / "started"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PYTEST"))}
    proc = subprocess.Popen(
        [sys.executable, "-m", "my_project", "run", "Sleep", "--marker", str(marker)],
        cwd=sproject,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == code, stderr
    (run_dir,) = run_dirs(sproject / "data_storage")
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "killed" and record["ended_at"]
    assert "sleeping" in (run_dir / "output.log").read_text()
    assert "killed" in (run_dir / "output.log").read_text()
    assert _mlflow_status(sproject, record["mlflow"]["run_id"]) == "KILLED"
    assert (run_dir / "metrics.jsonl").read_text().count("started") == 1


# Many processes at once: tests/test_load.py::test_fifty_processes_at_once_on_a_fresh_store.


@pytest.mark.slow
def test_mlflow_unreachable_run_completes_and_sync_catches_up(sproject: Path) -> None:
    from tests.conftest import write_config

    write_config(sproject, '[mlflow]\nexperiment = "test"\ntracking_uri = "http://127.0.0.1:9"\n')
    proc = cli(sproject, "run", "Quick", "--message", "offline")
    assert proc.returncode == 0, proc.stderr
    assert "could not be opened" in proc.stderr
    (run_dir,) = run_dirs(sproject / "data_storage")
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["mlflow"]["state"] == "not_synced"
    # one try at the ended run, not three: MLflow's HTTP retries (with their backoff) already
    # ran, and the run waited for every try (the suite waits for MLflow, as SLURM jobs and sweeps
    # do). The feeder's first try comes after its ~4.5 s "could not be opened yet"; should the
    # run still be live then (a very loaded machine), that try is one more.
    (log,) = (sproject / "data_storage" / ".phd_flow" / "mlflow-feed").glob("*/feeder.log")
    assert log.read_text().count(f"Feeding MLflow for {run_dir.name} failed") in (1, 2), log.read_text()
    write_config(sproject, '[mlflow]\nexperiment = "test"\n')
    # a new interpreter first, as a user's (sync imports mlflow itself; other syncs are forked from
    # a server that has it imported, tests/cli_client.py:server_for); a second sync duplicates nothing
    for fresh in (True, False):
        proc = cli(sproject, "sync", subprocess=fresh)
        assert proc.returncode == 0, proc.stderr
    record = json.loads((run_dir / "run.json").read_text())
    assert record["mlflow"]["state"] == "synced"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{sproject / 'data_storage' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.data.params["message"] == "offline"
    assert run.data.tags["phd_flow.key"] == run_dir.name
    assert len(client.get_metric_history(run.info.run_id, "m")) == 1
    proc = cli(sproject, "sync", run_dir.name[:12])
    assert proc.returncode == 0, proc.stderr
    assert len(client.get_metric_history(run.info.run_id, "m")) == 1

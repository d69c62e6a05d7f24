"""MLflow off the critical path (issue 17): runs return before MLflow has them, one feeder per
store catches up, a killed feeder is finished by the next one or by ``sync`` without duplicated
points, resumed runs keep one point per step, many parallel runs all land.

Every test runs the real CLI against a real sqlite store, in the default (background) mode:
``PHD_FLOW_WAIT_MLFLOW=false`` overrides the suite's wait (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli, popen_cli, run_dirs

PROBE = '''
import dataclasses
import json
import sys
import time
from pathlib import Path

from phd_flow import Node, node


@dataclasses.dataclass
class ProbeArgs(node.Args):
    steps: int = 20
    hold: str = ""  # wait (after the first half of the steps) until this file exists
    artifact: str = ""  # a file to log_artifact


class Plain(Node[ProbeArgs, int]):
    """Import mlflow inside _run and use its fluent API."""

    def _run(self) -> int:
        import mlflow

        mlflow.log_param("plain_param", "yes")
        mlflow.set_tag("plain_tag", "yes")
        self.log_metric("loss", 0.5, step=0)
        return 1


class Probe(Node[ProbeArgs, int]):
    """Log metrics; say whether mlflow was imported when _run started."""

    def _run(self) -> int:
        (self.output_dir / "probe.json").write_text(json.dumps({"mlflow_imported": "mlflow" in sys.modules}))
        if self.args.artifact:
            self.log_artifact(self.args.artifact, "extra")
        for step in range(self.args.steps):
            self.log_metric("loss", 1.0 / (step + 1), step=step)
            if self.args.hold and step == self.args.steps // 2:
                while not Path(self.args.hold).exists():
                    time.sleep(0.05)
        return self.args.steps
'''

BACKGROUND = {"PHD_FLOW_WAIT_MLFLOW": "false"}
DEADLINE = 120.0  # generous for a loaded 2-core CI machine; benchmarks/bench_feed.py measures it


@pytest.fixture
def fproject(project: Path) -> Path:
    (project / "my_project" / "probe.py").write_text(PROBE)
    return project


def client(project: Path) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{project / 'data_storage' / 'mlflow.db'}")


def record(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "run.json").read_text())


def poll(condition: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def mlflow_run(project: Path, key: str) -> Any:
    found = client(project).search_experiments()
    ids = [e.experiment_id for e in found]
    runs = client(project).search_runs(ids, filter_string=f"tags.`phd_flow.key` = '{key}'")
    return runs[0] if runs else None


def finished(project: Path, key: str) -> Any:
    run = mlflow_run(project, key)
    return run if run is not None and run.info.status == "FINISHED" else None


def loss_points(project: Path, run_id: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client(project).get_metric_history(run_id, "loss"))


def feeder_pid(project: Path) -> int | None:
    for lock in (project / "data_storage" / ".phd_flow" / "mlflow-feed").glob("*/feeder.lock"):
        text = lock.read_text().split()
        if len(text) == 2:
            return int(text[1])
    return None


def popen(project: Path, *args: str, fresh: bool = False) -> subprocess.Popen[str]:
    """The CLI in the background (the run's feeder too): forked from the fork server, or a new
    interpreter when ``fresh`` (processes started side by side, as a user's are)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(BACKGROUND)
    if not fresh:
        return popen_cli(project, *args, env=env)
    return subprocess.Popen(
        [sys.executable, "-m", "my_project", *args],
        cwd=project,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_run_returns_before_mlflow_which_then_shows_the_whole_run(fproject: Path, tmp_path: Path) -> None:
    extra = tmp_path / "notes.txt"
    extra.write_text("hello")
    proc = cli(fproject, "run", "Probe", "--steps", "30", "--artifact", str(extra), env=BACKGROUND)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = run_dirs(fproject / "data_storage")
    assert json.loads((run_dir / "probe.json").read_text()) == {"mlflow_imported": False}
    data = record(run_dir)
    assert data["status"] == "completed"
    assert (run_dir / "results.pickle").exists() and data["result"]["sha256"]
    run = poll(lambda: finished(fproject, data["key"]), "MLflow to show the run FINISHED")
    assert loss_points(fproject, run.info.run_id) == [(s, 1.0 / (s + 1)) for s in range(30)]
    assert run.data.params == {"steps": "30", "hold": "", "artifact": str(extra)}
    tags = run.data.tags
    assert tags["phd_flow.key"] == data["key"] and tags["phd_flow.node"] == "Probe"
    assert tags["mlflow.source.name"] == "my_project.probe" and tags["mlflow.user"]
    assert data["key"].endswith(run.info.run_name.rsplit("_", 1)[-1])
    started = int(__import__("datetime").datetime.fromisoformat(data["started_at"]).timestamp() * 1000)
    ended = int(__import__("datetime").datetime.fromisoformat(data["ended_at"]).timestamp() * 1000)
    assert (run.info.start_time, run.info.end_time) == (started, ended)
    files = {a.path for a in client(fproject).list_artifacts(run.info.run_id)}
    assert {"output.log", "args.json", "run.json", "reproducible.json", "probe.json", "extra"} <= files
    assert run.info.artifact_uri.startswith((fproject / "data_storage").as_uri())
    poll(lambda: record(run_dir)["mlflow"]["state"] == "synced", "run.json to say synced")
    assert record(run_dir)["mlflow"]["metrics_sent"] == 30


def test_show_says_when_the_mlflow_view_is_pending(fproject: Path) -> None:
    proc = popen(fproject, "run", "Probe", "--hold", str(fproject / "go"))
    try:
        poll(lambda: run_dirs(fproject / "data_storage"), "the run to start")
        (run_dir,) = run_dirs(fproject / "data_storage")
        state = poll(lambda: record(run_dir)["mlflow"].get("state"), "run.json to say how MLflow is fed")
        assert state == "pending"
        assert "pending" in cli(fproject, "show", run_dir.name).stdout
    finally:
        (fproject / "go").touch()
        proc.communicate(timeout=180)
    shown = cli(fproject, "show", run_dir.name)
    state = record(run_dir)["mlflow"]["state"]
    assert state in shown.stdout, shown.stdout


@pytest.mark.slow
def test_a_killed_feeder_is_finished_by_the_next_one_without_duplicates(fproject: Path) -> None:
    go = fproject / "go"
    proc = popen(fproject, "run", "Probe", "--steps", "4000", "--hold", str(go))
    try:
        poll(lambda: run_dirs(fproject / "data_storage"), "the run to start")
        (run_dir,) = run_dirs(fproject / "data_storage")
        poll(lambda: record(run_dir)["mlflow"].get("metrics_sent", 0) > 0, "the feeder to send the first points")
        pid = feeder_pid(fproject)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)  # midway: the run goes on, half of its points sent
    finally:
        go.touch()
        _, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err[-3000:]
    key = record(run_dir)["key"]
    try:
        run = poll(lambda: finished(fproject, key), "the next feeder to finish the run")
    except AssertionError as exc:
        logs = [p.read_text()[-3000:] for p in (fproject / "data_storage").glob(".phd_flow/mlflow-feed/*/feeder.log")]
        raise AssertionError(f"{exc}\n{record(run_dir)['mlflow']}\n{logs}\n{err[-2000:]}") from None
    assert loss_points(fproject, run.info.run_id) == [(s, 1.0 / (s + 1)) for s in range(4000)]
    assert len(client(fproject).search_runs([run.info.experiment_id])) == 1


@pytest.mark.slow
def test_a_feeder_killed_between_sending_a_batch_and_recording_it_duplicates_nothing(fproject: Path) -> None:
    """The one window where a killed feeder's successor sends points again (MLflow has the batch,
    run.json's ``metrics_sent`` does not say so yet), made deterministic: MLflow's metric key
    (name, step, timestamp, value) keeps each point once, in the same MLflow run."""
    proc = cli(fproject, "run", "Probe", "--steps", "30", env={"PHD_FLOW_WAIT_MLFLOW": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = run_dirs(fproject / "data_storage")
    data = record(run_dir)
    assert data["mlflow"]["state"] == "synced" and data["mlflow"]["metrics_sent"] == 30
    data["mlflow"].update(state="pending", metrics_sent=10)  # the last 20 points sent, not recorded
    (run_dir / "run.json").write_text(json.dumps(data))
    synced = cli(fproject, "sync", data["key"])
    assert synced.returncode == 0, synced.stderr[-3000:]
    run = mlflow_run(fproject, data["key"])
    assert loss_points(fproject, run.info.run_id) == [(s, 1.0 / (s + 1)) for s in range(30)]
    assert len(client(fproject).search_runs([run.info.experiment_id])) == 1
    assert record(run_dir)["mlflow"]["metrics_sent"] == 30


@pytest.mark.slow
def test_a_feeder_and_a_run_killed_midway_are_finished_by_sync(fproject: Path) -> None:
    proc = popen(fproject, "run", "Probe", "--steps", "4000", "--hold", str(fproject / "never"))
    try:
        poll(lambda: run_dirs(fproject / "data_storage"), "the run to start")
        (run_dir,) = run_dirs(fproject / "data_storage")
        poll(lambda: record(run_dir)["mlflow"].get("metrics_sent", 0) > 0, "the feeder to send the first points")
        pid = feeder_pid(fproject)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
    finally:
        proc.kill()  # SIGKILL: no end of run, no new feeder
        proc.communicate(timeout=60)
    lines = (run_dir / "metrics.jsonl").read_text().count("\n")
    assert lines == 2001
    synced = cli(fproject, "sync")
    assert synced.returncode in (0, 3), synced.stderr[-3000:]
    run = mlflow_run(fproject, record(run_dir)["key"])
    assert loss_points(fproject, run.info.run_id) == [(s, 1.0 / (s + 1)) for s in range(2001)]
    fixed = cli(fproject, "ls", "--stale", "--fix")
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    assert mlflow_run(fproject, record(run_dir)["key"]).info.status == "KILLED"


@pytest.mark.slow
def test_a_resumed_run_sends_no_point_twice(fproject: Path) -> None:
    proc = popen(fproject, "run", "Probe", "--steps", "40", "--hold", str(fproject / "never"))
    try:
        poll(lambda: run_dirs(fproject / "data_storage"), "the run to start")
        (run_dir,) = run_dirs(fproject / "data_storage")
        poll(lambda: record(run_dir)["mlflow"].get("metrics_sent", 0) == 21, "the feeder to send the first 21 points")
    finally:
        proc.send_signal(signal.SIGTERM)  # killed: resumed below under its key
        proc.communicate(timeout=120)
    key = record(run_dir)["key"]
    assert record(run_dir)["status"] == "killed"
    again = cli(fproject, "run", "Probe", "--steps", "40", "--key", key, env=BACKGROUND)
    assert again.returncode == 0, again.stderr[-3000:]
    run = poll(lambda: finished(fproject, key), "MLflow to show the resumed run")
    points = loss_points(fproject, run.info.run_id)
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 21 + 40  # the record keeps each attempt's points
    assert points == [(s, 1.0 / (s + 1)) for s in range(40)]  # MLflow: one per step (tests/test_attempts.py)
    assert len(client(fproject).search_runs([run.info.experiment_id])) == 1


@pytest.mark.slow
def test_twenty_parallel_runs_all_land_through_one_feeder(fproject: Path) -> None:
    procs = [popen(fproject, "run", "Probe", "--steps", "50", fresh=True) for _ in range(20)]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    dirs = run_dirs(fproject / "data_storage")
    assert len(dirs) == 20

    def all_finished() -> bool:
        return all(finished(fproject, record(d)["key"]) for d in dirs)

    poll(all_finished, "MLflow to show all 20 runs", timeout=300)
    for d in dirs:
        run = mlflow_run(fproject, record(d)["key"])
        assert len(loss_points(fproject, run.info.run_id)) == 50


@pytest.mark.slow
def test_wait_mlflow_returns_with_mlflow_complete(fproject: Path) -> None:
    proc = cli(fproject, "run", "Probe", "--wait-mlflow", "--steps", "10", env=BACKGROUND)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = run_dirs(fproject / "data_storage")
    assert record(run_dir)["mlflow"]["state"] == "synced"
    run = finished(fproject, record(run_dir)["key"])
    assert run is not None and len(loss_points(fproject, run.info.run_id)) == 10


@pytest.mark.slow
def test_plain_mlflow_calls_in_run_land_in_the_runs_mlflow_run(fproject: Path) -> None:
    proc = cli(fproject, "run", "Plain", env=BACKGROUND)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run_dir,) = run_dirs(fproject / "data_storage")
    key = record(run_dir)["key"]
    # the fluent run ends (FINISHED) with _run, before the feeder has sent the metrics: wait for it
    poll(lambda: record(run_dir)["mlflow"].get("state") == "synced", "the feeder to finish the run")
    run = poll(lambda: finished(fproject, key), "MLflow to show the run")
    assert run.data.params["plain_param"] == "yes" and run.data.tags["plain_tag"] == "yes"
    assert loss_points(fproject, run.info.run_id) == [(0, 0.5)]
    every = client(fproject).search_runs([e.experiment_id for e in client(fproject).search_experiments()])
    assert len(every) == 1, [r.data.tags for r in every]


def test_mlflow_tags_and_run_name_from_a_record() -> None:
    from phd_flow.feeder import mlflow_tags, run_name

    data = {
        "key": "FitOLS_2026-11-30T09-15-23.123456Z_x7k2m9qa",
        "node": "FitOLS",
        "node_class": "my_project.fit_ols.FitOLS",
        "host": "node7",
        "git": {"commit": "abc123"},
        "slurm": {"job_id": "12", "array_task_id": "3", "node": "gpu01"},
        "tags": {"phd_flow.key": "another run", "phd_flow.sweep": "Sweep_x"},
        "parent": "Pipeline_2026-11-30T09-15-20.000000Z_aaaaaaaa",
    }
    tags = mlflow_tags(data)
    assert tags["phd_flow.key"] == data["key"]  # a record's tags never name another run
    assert tags["slurm.job_id"] == "12" and tags["slurm.array_task_id"] == "3" and tags["slurm.node"] == "gpu01"
    assert tags["mlflow.source.name"] == "my_project.fit_ols" and tags["mlflow.source.git.commit"] == "abc123"
    assert tags["mlflow.user"] and tags["phd_flow.sweep"] == "Sweep_x"
    assert tags["phd_flow.parent_key"] == "Pipeline_2026-11-30T09-15-20.000000Z_aaaaaaaa"
    assert run_name(data) == "FitOLS_2026-11-30T09-15_x7k2m9qa"
    assert run_name({"key": "my-own-key", "node": "FitOLS"}) == "my-own-key"


def _as_mlflow_raises(cause: Exception) -> Exception:
    """``cause`` wrapped as mlflow.utils.rest_utils.http_request wraps it: raised while handling."""
    from mlflow.exceptions import MlflowException

    try:
        try:
            raise cause
        except Exception as e:
            raise MlflowException(f"API request to http://h/api failed with exception {e}")  # noqa: B904
    except MlflowException as wrapped:
        return wrapped


def _refused() -> Exception:
    """The error requests raises for a closed port (no retries: plain requests)."""
    import requests

    from tests.s3_fixtures import closed_port_url

    try:
        requests.get(closed_port_url(), timeout=5)
    except requests.exceptions.ConnectionError as exc:
        return exc
    raise AssertionError("something listens on the closed port")


def test_unreachable_means_requests_could_not_keep_a_connection_to_the_server() -> None:
    """What counts as an unreachable server: requests' ConnectionError anywhere in the chain
    (MLflow's read timeouts, retried, end as one too); a 5xx retried to the end does not."""
    import requests
    from mlflow.exceptions import MlflowException

    from phd_flow.feeder import unreachable

    assert unreachable(_as_mlflow_raises(_refused()))
    assert unreachable(_as_mlflow_raises(requests.exceptions.ConnectTimeout("dropped")))
    assert not unreachable(_as_mlflow_raises(requests.exceptions.RetryError("500, 500, 500")))
    assert not unreachable(MlflowException("database is locked"))
    looped = MlflowException("a cycle")
    looped.__context__ = MlflowException("back")
    looped.__context__.__context__ = looped
    assert not unreachable(looped)


def test_an_unreachable_server_ends_the_feed_of_an_ended_run_at_once_of_a_live_run_after_three(
    fproject: Path,
) -> None:
    """An ended run (a waiting run waits for this) is left to `sync` after one unreachable try;
    a live run keeps three tries in a row, so a server restarting mid-run does not end its feed."""
    from phd_flow.feeder import DONE, LATER, _failed

    proc = cli(fproject, "run", "Probe", "--steps", "2")
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(fproject / "data_storage")
    down = _as_mlflow_raises(_refused())
    marker = fproject / "marker"  # stands for the run's queue marker: removed when given up
    marker.touch()
    assert _failed(run_dir, marker, {}, {}, down) == DONE  # completed: one try
    assert record(run_dir)["mlflow"]["state"] == "not_synced" and not marker.exists()
    marker.touch()
    assert _failed(run_dir, marker, {}, {}, RuntimeError("database is locked")) == LATER  # others: three
    assert marker.exists()
    data = record(run_dir)
    (run_dir / "run.json").write_text(json.dumps({**data, "status": "running", "mlflow": {"state": "pending"}}))
    failures: dict[Path, int] = {}
    assert [_failed(run_dir, marker, failures, {}, down) for _ in range(3)] == [LATER, LATER, DONE]
    assert record(run_dir)["mlflow"]["state"] == "not_synced" and not marker.exists()


def test_a_live_run_whose_feed_was_given_up_is_fed_again_when_it_ends(fproject: Path, tmp_path: Path) -> None:
    """MLflow away three tries in a row during a run: the feeder leaves it (not_synced, marker
    gone). When the run ends, without waiting for MLflow, it queues itself again and says so,
    so MLflow gets the whole run once it is back, without a `sync`."""
    from phd_flow.run.record import RunRecord

    hold = tmp_path / "hold"
    proc = popen(fproject, "run", "Probe", "--steps", "10", "--hold", str(hold))
    run_dir = poll(lambda: (run_dirs(fproject / "data_storage") or [None])[0], "the run directory")
    poll(lambda: (record(run_dir).get("mlflow") or {}).get("metrics_sent") == 6, "the first points in MLflow")
    (queue,) = (fproject / "data_storage" / ".phd_flow" / "mlflow-feed").glob("*/")
    # what serve() does after the third failure in a row (marker removed, then not_synced), and
    # the feeder gone with what it held in memory: the next one reopens the run from run.json
    pid = feeder_pid(fproject)
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    for marker in queue.iterdir():
        if marker.name not in ("feeder.lock", "feeder.log"):
            marker.unlink()
    RunRecord.load(run_dir).update_section("mlflow", state="not_synced", error="ConnectionError: (test)")
    hold.touch()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    assert "Feeding MLflow failed during the run (ConnectionError: (test)); the feeder tries" in err
    poll(lambda: record(run_dir)["mlflow"]["state"] == "synced", "run.json to say synced")
    run = finished(fproject, record(run_dir)["key"])
    assert run is not None and loss_points(fproject, run.info.run_id) == [(s, 1.0 / (s + 1)) for s in range(10)]
    assert record(run_dir)["mlflow"].get("error") is None

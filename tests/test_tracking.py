"""Tracking in depth: metrics at volume, replay after an outage, params, autolog, plain mlflow calls."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from phd_flow import Config, Node, logger, node
from phd_flow.config import MlflowConfig
from phd_flow.project import Project
from phd_flow.runs.catchup import sync_runs


def make_config(tmp_path: Path, **mlflow: object) -> Config:
    return Config(
        local_path=tmp_path / "runs", project_root=tmp_path, mlflow=MlflowConfig(experiment="track", **mlflow)
    )  # type: ignore[arg-type]


def client_for(config: Config):  # type: ignore[no-untyped-def]
    from mlflow.tracking import MlflowClient

    return MlflowClient(config.tracking_uri())


@dataclasses.dataclass
class ManyArgs(node.Args):
    n: int = 100_000
    note: str = ""


class Many(Node[ManyArgs, int]):
    """Log n points of one metric and a few of another."""

    def _run(self) -> int:
        for step in range(self.args.n):
            self.log_metric("loss", float(step), step=step)
        self.log_metrics({"acc": 0.5, "f1": 0.25}, step=1)
        return self.args.n


@pytest.mark.slow
def test_hundred_thousand_metrics_arrive_in_mlflow_complete_and_in_order(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    run = Many(ManyArgs(n=100_000), config=config)
    run.run()
    client = client_for(config)
    run_id = run.record.data["mlflow"]["run_id"]
    history = client.get_metric_history(run_id, "loss")
    assert len(history) == 100_000
    ordered = sorted(history, key=lambda m: (m.timestamp, m.step))
    assert [m.step for m in ordered] == list(range(100_000))
    assert all(m.value == float(m.step) for m in history)
    assert client.get_run(run_id).data.metrics["f1"] == 0.25
    lines = (run.output_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 100_002 and json.loads(lines[5]) == {**json.loads(lines[5]), "name": "loss", "step": 5}
    assert run.record.data["mlflow"]["metrics_sent"] == 100_002


def until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll ``condition`` until it holds; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.01)


class OutageMidRun(Node[ManyArgs, int]):
    """Log; then MLflow refuses writes (fault injected at the SDK boundary); log more."""

    def _run(self) -> int:
        from mlflow.exceptions import MlflowException

        assert self.active.mlflow is not None
        mlflow_run = self.active.mlflow
        for step in range(50):
            self.log_metric("x", step, step=step)
        until(lambda: mlflow_run.sent == 50, "the writer thread to send the first 50 points")
        client = mlflow_run.client
        working = client.log_batch

        def locked(*args: object, **kwargs: object) -> None:
            raise MlflowException("(sqlite3.OperationalError) database is locked")

        client.log_batch = locked
        for step in range(50, 120):
            self.log_metric("x", step, step=step)
        until(lambda: mlflow_run.error is not None, "the writer thread to meet the outage")
        client.log_batch = working  # MLflow is back before the run ends; the rest waits for sync
        return 120


@pytest.mark.slow
def test_metrics_are_replayed_without_duplicates_after_an_mlflow_outage(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    run = OutageMidRun(ManyArgs(), config=config)
    run.run()
    section = run.record.data["mlflow"]
    assert section["state"] == "not_synced" and section["metrics_sent"] == 50
    assert len((run.output_dir / "metrics.jsonl").read_text().splitlines()) == 120
    assert "database is locked" in (run.output_dir / "output.log").read_text()
    client = client_for(config)
    assert client.get_run(section["run_id"]).info.status == "FINISHED"
    assert len(client.get_metric_history(section["run_id"], "x")) == 50
    for _ in range(2):
        assert sync_runs(Project.of(config), [str(run.key)]) == {str(run.key): True}
    history = client.get_metric_history(section["run_id"], "x")
    assert sorted(m.step for m in history) == list(range(120))
    assert run.record.__class__.load(run.output_dir).data["mlflow"]["state"] == "synced"


@pytest.mark.slow
def test_long_param_is_truncated_with_a_warning_and_kept_whole_in_args_json(tmp_path: Path) -> None:
    messages: list[str] = []
    sink = logger.add(messages.append, level="WARNING")
    config = make_config(tmp_path)
    long = "x" * 7000
    try:
        run = Many(ManyArgs(n=1, note=long), config=config)
        run.run()
    finally:
        logger.remove(sink)
    assert any("'note' is 7000 characters" in m and "args.json" in m for m in messages)
    assert json.loads((run.output_dir / "args.json").read_text())["note"] == long
    params = client_for(config).get_run(run.record.data["mlflow"]["run_id"]).data.params
    assert len(params["note"]) == 6000 and params["note"].endswith("...")


@pytest.mark.slow
def test_changed_param_on_an_existing_mlflow_run_is_a_warning_not_a_crash(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    run = Many(ManyArgs(n=1, note="a"), config=config)
    run.run()
    from phd_flow.tracking import MlflowRun

    messages: list[str] = []
    sink = logger.add(messages.append, level="WARNING")
    try:
        reopened = MlflowRun(config.tracking_uri(), "track")
        reopened.open(str(run.key), {"phd_flow.key": str(run.key)}, {"note": "b"}, activate=False)
    finally:
        logger.remove(sink)
    assert reopened.run_id == run.record.data["mlflow"]["run_id"]
    assert any("refuses to change it to 'b'" in m for m in messages)


class PlainMlflow(Node[ManyArgs, str]):
    """Uses plain mlflow.* calls inside _run."""

    def _run(self) -> str:
        import mlflow

        mlflow.log_param("extra", "yes")
        mlflow.set_tag("custom", "tag")
        (self.output_dir / "note.txt").write_text("hi")
        mlflow.log_artifact(str(self.output_dir / "note.txt"))
        run = mlflow.active_run()
        assert run is not None
        return str(run.info.run_id)


@pytest.mark.slow
def test_plain_mlflow_calls_land_in_the_nodes_run(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    run = PlainMlflow(ManyArgs(n=1), config=config)
    active_id = run.run()
    assert active_id == run.record.data["mlflow"]["run_id"]
    client = client_for(config)
    data = client.get_run(active_id).data
    assert data.params["extra"] == "yes" and data.tags["custom"] == "tag"
    assert [a.path for a in client.list_artifacts(active_id)] == ["note.txt"]


class FitSklearn(Node[ManyArgs, float]):
    """Fit a scikit-learn model with autolog on."""

    def _run(self) -> float:
        from sklearn.datasets import load_diabetes
        from sklearn.linear_model import Ridge

        x, y = load_diabetes(return_X_y=True)
        return float(Ridge(alpha=0.5).fit(x, y).score(x, y))


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::UserWarning")  # sklearn/mlflow autolog chatter
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_autolog_records_sklearn_params_and_metrics(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    config = make_config(tmp_path, autolog=True)
    run = FitSklearn(ManyArgs(n=1), config=config)
    run.run()
    data = client_for(config).get_run(run.record.data["mlflow"]["run_id"]).data
    assert data.params.get("alpha") == "0.5"
    assert any(name.startswith("training_") for name in data.metrics)
    import mlflow

    mlflow.autolog(disable=True)

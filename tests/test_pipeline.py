"""Nodes composed into pipelines: children, reuse, recomputation, failure, nested MLflow runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from phd_flow import Config, RunFailedError, RunOptions
from phd_flow.config import MlflowConfig
from tests.pipeline_nodes import Evaluate, EvaluateArgs, Report


def make_config(tmp_path: Path) -> Config:
    return Config(local_path=tmp_path / "runs", project_root=tmp_path, mlflow=MlflowConfig(experiment="pipe"))


def log_of(node: Evaluate) -> str:
    return (node.output_dir / "output.log").read_text()


def test_three_node_pipeline_runs_children_in_nested_dirs_and_mlflow_runs(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    first = Evaluate(EvaluateArgs(lr=0.1), config=config)
    assert first.run() == Report(score=-4.5)
    children = first.record.data["children"]
    assert [c["node"] for c in children] == ["Train"] and children[0]["reused"] is False
    train_dir = config.local_path / children[0]["path"]
    assert train_dir.parent == first.output_dir
    train_record = json.loads((train_dir / "run.json").read_text())
    assert train_record["status"] == "completed" and train_record["parent"] == str(first.key)
    prepare_path = train_record["children"][0]["path"]
    assert prepare_path.startswith(f"{first.key}/{train_dir.name}/Prepare_")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(config.tracking_uri())
    parent_id = first.record.data["mlflow"]["run_id"]
    train_run = client.get_run(train_record["mlflow"]["run_id"])
    assert train_run.data.tags["mlflow.parentRunId"] == parent_id
    assert train_run.data.tags["phd_flow.parent_key"] == str(first.key)
    assert train_run.info.status == "FINISHED"
    assert len(client.get_metric_history(train_run.info.run_id, "loss")) == 5
    assert "Running Train: no earlier completed Train run" in log_of(first)


@pytest.mark.slow
def test_second_run_reuses_and_an_args_change_recomputes(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    Evaluate(EvaluateArgs(lr=0.1), config=config).run()
    second = Evaluate(EvaluateArgs(lr=0.1), config=config)
    assert second.run() == Report(score=-4.5)
    assert second.record.data["children"][0]["reused"] is True
    assert "Reusing Train" in log_of(second) and "same args and code" in log_of(second)
    assert not any(p.name.startswith("Train_") for p in second.output_dir.iterdir())
    third = Evaluate(EvaluateArgs(lr=0.2), config=config)
    assert third.run() == Report(score=-9.0)
    assert "Running Train: changed since" in log_of(third) and "lr changed 0.1 → 0.2" in log_of(third)
    # Prepare's args did not change, so inside the new Train run it is reused
    train_dir = config.local_path / third.record.data["children"][0]["path"]
    assert json.loads((train_dir / "run.json").read_text())["children"][0]["reused"] is True


@pytest.mark.slow
def test_rerun_forces_a_new_child_run(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    Evaluate(EvaluateArgs(), config=config).run()
    again = Evaluate(EvaluateArgs(), config=config, options=RunOptions(rerun=["Train"]))
    again.run()
    assert again.record.data["children"][0]["reused"] is False
    assert "--rerun Train was given" in log_of(again)


@pytest.mark.slow
def test_a_failing_child_fails_the_parent_with_both_statuses(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    parent = Evaluate(EvaluateArgs(fail=True), config=config)
    with pytest.raises(RunFailedError, match="training diverged"):
        parent.run()
    assert parent.record.data["status"] == "failed"
    child = parent.record.data["children"][0]
    assert child["status"] == "failed"
    child_record = json.loads((config.local_path / child["path"] / "run.json").read_text())
    assert child_record["status"] == "failed" and "training diverged" in child_record["error"]
    from mlflow.tracking import MlflowClient

    client = MlflowClient(config.tracking_uri())
    assert client.get_run(child_record["mlflow"]["run_id"]).info.status == "FAILED"
    assert client.get_run(parent.record.data["mlflow"]["run_id"]).info.status == "FAILED"
    # a failed run is never reused
    retry = Evaluate(EvaluateArgs(fail=False), config=config)
    retry.run()
    assert retry.record.data["children"][0]["reused"] is False


def test_sync_of_a_child_run_pushes_it_where_it_lives(tmp_path: Path) -> None:
    """``sync <child key>`` pushes the child run at ``<parent>/<child>``, its place in storage
    (it pushed ``<child>``, a directory that does not exist: 'not synced')."""
    from phd_flow.config import StorageConfig
    from phd_flow.project import Project
    from phd_flow.runs.catchup import sync_runs

    config = make_config(tmp_path)
    config.storage = StorageConfig(backend="local", remote=str(tmp_path / "shared"))
    config.mlflow = MlflowConfig(enabled=False)
    first = Evaluate(EvaluateArgs(lr=0.1), config=config)
    first.run()
    child = first.record.data["children"][0]["path"]
    assert sync_runs(Project.of(config), [child.rsplit("/", 1)[-1]]) == {child.rsplit("/", 1)[-1]: True}
    assert (tmp_path / "shared" / child / "run.json").is_file()

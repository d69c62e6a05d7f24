"""Optuna studies whose trials are node runs: real Optuna, RDB storage (sqlite), real MLflow."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest

from phd_flow import optimize
from phd_flow.config import Config, parse_config
from tests.conftest import run_dirs
from tests.sweep_nodes import Quadratic, Scale

optuna = pytest.importorskip("optuna")


def space(trial: Any) -> dict[str, float]:
    return {"x": trial.suggest_float("x", -1, 5), "y": trial.suggest_float("y", -4, 2)}


def make_config(tmp_path: Path) -> Config:
    text = f'local_path = "{tmp_path / "runs"}"\n[mlflow]\nexperiment = "study"\n'
    return parse_config(text, tmp_path)


def test_ten_trials_are_ten_runs_nested_under_the_study_run(tmp_path: Path) -> None:
    config = make_config(tmp_path)
    study = optimize(
        Quadratic,
        objective="score",
        space=space,
        n_trials=10,
        config=config,
        study_name="quad",
        sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=4),
    )
    assert len(study.trials) == 10
    runs = {d.name: json.loads((d / "run.json").read_text()) for d in run_dirs(config.local_path)}
    assert len(runs) == 10 and {r["status"] for r in runs.values()} == {"completed"}
    for trial in study.trials:  # each trial's value is its run's result
        run_dir = config.local_path / trial.user_attrs["run_key"]
        result = pickle.loads((run_dir / "results.pickle").read_bytes())
        assert result.score == pytest.approx(trial.value)
        assert runs[run_dir.name]["args"] == {"x": trial.params["x"], "y": trial.params["y"]}
    assert study.best_value == min(t.value for t in study.trials)
    assert study.best_value < 1.0  # the optimum is 0 at (2, -1); a random point averages 6

    from mlflow.tracking import MlflowClient

    client = MlflowClient(config.tracking_uri())
    experiment = client.get_experiment_by_name("study")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`phd_flow.key` = 'Study_quad'")
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(r.info.run_name for r in children) == sorted(runs)
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == list(range(10))
    assert parent.info.status == "FINISHED"


def test_a_study_resumes_from_its_rdb_storage_and_failed_runs_do_not_stop_it(tmp_path: Path) -> None:
    config = parse_config(f'local_path = "{tmp_path / "runs"}"\n[mlflow]\nenabled = false\n', tmp_path)

    def scale_space(trial: Any) -> dict[str, Any]:  # the run of trial 2 raises
        return {"seed": trial.number, "alpha": trial.suggest_float("alpha", 0, 1), "fail_seed": 2}

    first = optimize(Scale, objective="value", space=scale_space, n_trials=5, config=config, study_name="s")
    assert [t.state.name for t in first.trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    failed_run = config.local_path / first.trials[2].user_attrs["run_key"] / "run.json"
    assert json.loads(failed_run.read_text())["status"] == "failed"

    second = optimize(Scale, objective="value", space=scale_space, n_trials=5, config=config, study_name="s")
    assert [t.number for t in second.trials] == list(range(10))  # the same study, continued
    assert (config.local_path / "optuna.db").exists()
    assert len(run_dirs(config.local_path)) == 10
    assert [t.state.name for t in second.trials].count("COMPLETE") == 9

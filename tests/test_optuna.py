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


@pytest.mark.slow
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
    assert sorted(r.data.tags["phd_flow.key"] for r in children) == sorted(runs)
    assert sorted(int(r.data.tags["optuna.trial"]) for r in children) == list(range(10))
    assert parent.info.status == "FINISHED"


@pytest.mark.slow
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


def _mlflow_config(tmp_path: Path) -> Config:
    return parse_config(f'local_path = "{tmp_path / "runs"}"\n[mlflow]\nexperiment = "study"\n', tmp_path)


def test_continuing_a_seeded_study_never_runs_an_evaluated_parameter_set_again(tmp_path: Path) -> None:
    """Issue 19 row 7: the README's study run twice with TPESampler(seed=0) repeated trials 0-2.
    A continued study reseeds its sampler, and a trial whose parameters equal a completed trial's
    reuses that trial's value and run (user attr ``duplicate_of``) instead of running again."""
    config = parse_config(f'local_path = "{tmp_path / "runs"}"\n[mlflow]\nenabled = false\n', tmp_path)

    def small(trial: Any) -> dict[str, Any]:  # 4 possible points for 6 trials: duplicates are certain
        return {"seed": trial.suggest_int("seed", 0, 3)}

    for _ in range(2):
        study = optimize(
            Scale, objective="value", space=small, n_trials=3, config=config, study_name="dup",
            sampler=optuna.samplers.TPESampler(seed=0),
        )  # fmt: skip
    trials = study.trials
    assert len(trials) == 6 and {t.state.name for t in trials} == {"COMPLETE"}
    distinct = {t.params["seed"] for t in trials}
    assert len(run_dirs(config.local_path)) == len(distinct)  # one run per parameter set
    seen: dict[int, Any] = {}
    for trial in trials:
        earlier = seen.setdefault(trial.params["seed"], trial)
        if earlier is not trial:
            assert trial.user_attrs["duplicate_of"] == earlier.number and trial.value == earlier.value
            assert trial.user_attrs["run_key"] == earlier.user_attrs["run_key"]
    first_three = [t.params["seed"] for t in trials[:3]]
    assert [t.params["seed"] for t in trials[3:]] != first_three  # reseeded: not a replay


@pytest.mark.slow
def test_ctrl_c_marks_the_study_mlflow_run_killed(tmp_path: Path) -> None:
    config = _mlflow_config(tmp_path)

    def interrupted(trial: Any) -> dict[str, float]:
        if trial.number == 1:
            raise KeyboardInterrupt
        return space(trial)

    with pytest.raises(KeyboardInterrupt):
        optimize(Quadratic, objective="score", space=interrupted, n_trials=3, config=config, study_name="cc")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(config.tracking_uri())
    experiment = client.get_experiment_by_name("study")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`phd_flow.key` = 'Study_cc'")
    assert parent.info.status == "KILLED"


def test_an_objective_typo_fails_before_the_first_trial_with_the_closest_field(tmp_path: Path) -> None:
    from phd_flow.errors import ArgsError

    config = parse_config(f'local_path = "{tmp_path / "runs"}"\n[mlflow]\nenabled = false\n', tmp_path)
    called: list[int] = []

    def counted(trial: Any) -> dict[str, float]:
        called.append(trial.number)
        return space(trial)

    with pytest.raises(ArgsError, match=r"objective 'scor' is not a field of Quadratic's result .*'score'"):
        optimize(Quadratic, objective="scor", space=counted, n_trials=2, config=config, study_name="t")
    assert called == [] and not (config.local_path / "optuna.db").exists()


def test_the_optimize_command_runs_a_study_from_a_search_space_syntax(tmp_path: Path) -> None:
    from tests.conftest import cli
    from tests.test_sweep_local import make_project

    project = make_project(tmp_path / "proj")
    proc = cli(
        project,
        *("optimize", "Scale", "--alpha", "0.5", "--objective", "value", "--direction", "maximize"),
        *("--n-trials", "4", "--param", "seed=int:0:10", "--param", "mode=choice:fast,slow", "--seed", "0"),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Best of study Scale: value=" in proc.stdout and proc.stdout.count("[trial ") == 4
    runs = [json.loads((d / "run.json").read_text()) for d in run_dirs(project / "data_storage")]
    assert runs and all(r["args"]["alpha"] == 0.5 and r["args"]["mode"] in ("fast", "slow") for r in runs)
    study = optuna.load_study(study_name="Scale", storage=f"sqlite:///{project / 'data_storage' / 'optuna.db'}")
    assert len(study.trials) == 4 and study.direction.name == "MAXIMIZE"

    typo = cli(project, "optimize", "Scale", "--objective", "valu", "--param", "seed=int:0:3")
    assert typo.returncode == 2 and "Did you mean 'value'?" in typo.stderr
    bad = cli(project, "optimize", "Scale", "--objective", "value", "--param", "sed=int:0:3")
    assert bad.returncode == 2 and "--param sed" in bad.stderr and "Did you mean 'seed'?" in bad.stderr
    spec = cli(project, "optimize", "Scale", "--objective", "value", "--param", "seed=int:5:1")
    assert spec.returncode == 2 and "LOW <= HIGH" in spec.stderr

"""mlflowhelper's README examples (seed 000), rewritten for phd_flow's names, against a real
sqlite MLflow store in tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest

import phd_flow
from phd_flow import StageError


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One sqlite tracking store for the module (creating one costs seconds); each test gets
    its own experiment in it."""
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def tracking(store: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Iterator[str]:
    """The tracking URI, active, with this test's own experiment; artifacts in store/mlruns."""
    monkeypatch.chdir(store)
    uri = f"sqlite:///{store}/mlflow.db"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", request.node.name)
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "data.csv"
    path.write_text("a,b\n" + "".join(f"{i},{i % 5}\n" for i in range(150)))
    return path


def artifacts(run_id: str, path: str | None = None) -> list[str]:
    from mlflow.tracking import MlflowClient

    return sorted(f.path for f in MlflowClient().list_artifacts(run_id, path))


@pytest.mark.slow
def test_managed_artifact_is_logged_from_a_private_folder(tracking: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    with mlflow.start_run() as run:
        with phd_flow.managed_artifact("plot.png") as artifact:
            fig = plt.figure()
            plt.plot([1, 2, 3], [1, 2, 3])
            fig.savefig(artifact.get_path())
            path = artifact.get_path()
            assert path.is_file()
        plt.close("all")

    assert artifacts(run.info.run_id) == ["plot.png"]
    assert not path.exists() and not path.parent.exists()  # cleaned up


@pytest.mark.slow
def test_managed_artifact_dir(tracking: str) -> None:
    with mlflow.start_run() as run, phd_flow.managed_artifact_dir("plots") as artifact_dir:
        artifact_dir.get_path("plot1.png").write_bytes(b"\x89PNG one")
        artifact_dir.get_path("plot2.png").write_bytes(b"\x89PNG two")

    assert artifacts(run.info.run_id, "plots") == ["plots/plot1.png", "plots/plot2.png"]


def prepare(dataset: Path, source_run_id: str | None = None, skip: bool = False) -> tuple[Any, bool, str]:
    """The README's plain-MLflow example; returns (train, loaded, run id)."""
    import pandas as pd

    with mlflow.start_run() as run:
        if source_run_id:
            phd_flow.set_load(run_id=source_run_id, stages=["load_data"])  # any experiment
        if skip:
            phd_flow.set_skip_log(stages=["load_data"])  # loaded, so don't log it again
        with phd_flow.managed_artifact_dir("data", stage="load_data") as artifact_dir:
            train_path = artifact_dir.get_path("train.csv")
            test_path = artifact_dir.get_path("test.csv")
            if artifact_dir.loaded:
                train, test = pd.read_csv(train_path), pd.read_csv(test_path)
            else:
                data = pd.read_csv(dataset).sample(frac=1, random_state=0)
                train, test = data.iloc[:100, :], data.iloc[100:, :]
                train.to_csv(train_path, index=False)
                test.to_csv(test_path, index=False)
    return train, artifact_dir.loaded, run.info.run_id


def test_set_load_loads_a_stage_from_a_run_in_another_experiment(
    tracking: str, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlflow.tracking import MlflowClient

    first, loaded, source = prepare(dataset)
    assert not loaded
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "training")
    dataset.write_text("a,b\n1,2\n")  # the source data changed: loading must not look at it

    second, loaded, run_id = prepare(dataset, source_run_id=source)

    assert loaded and second.equals(first.reset_index(drop=True))
    client = MlflowClient()
    assert client.get_run(source).info.experiment_id != client.get_run(run_id).info.experiment_id
    assert artifacts(run_id, "load_data/data") == ["load_data/data/test.csv", "load_data/data/train.csv"]
    tags = MlflowClient().get_run(run_id).data.tags
    assert tags["phd_flow.stage.load_data.loaded_from"] == source
    assert tags["phd_flow.stage.load_data.logged"] == "true"
    assert (
        tags["phd_flow.stage.load_data.sha256"]
        == MlflowClient().get_run(source).data.tags["phd_flow.stage.load_data.sha256"]
    )


def test_set_load_before_start_run_and_set_skip_log(tracking: str, dataset: Path) -> None:
    import pandas as pd
    from mlflow.tracking import MlflowClient

    _, _, source = prepare(dataset)
    phd_flow.set_load(run_id=source, stages=["load_data"])  # before the run: applies to the next one
    with mlflow.start_run() as run:
        phd_flow.set_skip_log(stages=["load_data"])
        with phd_flow.managed_artifact("data/train.csv", stage="load_data") as artifact:
            assert artifact.loaded
            assert len(pd.read_csv(artifact.get_path())) == 100

    assert artifacts(run.info.run_id) == []  # skipped: nothing logged
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert tags["phd_flow.stage.load_data.logged"] == "false"
    # the rule was consumed by that run
    with mlflow.start_run(), phd_flow.managed_artifact("x.txt", stage="load_data") as artifact:
        assert not artifact.loaded


def test_a_corrupted_mlflow_artifact_is_refused(tracking: str, dataset: Path) -> None:
    _, _, source = prepare(dataset)
    stored = Path(mlflow.get_run(source).info.artifact_uri.removeprefix("file://")) / "load_data/data/train.csv"
    stored.write_text(stored.read_text().replace("1", "7", 1))

    with pytest.raises(StageError, match=r"train\.csv does not match its recorded sha256"):
        prepare(dataset, source_run_id=source)


def main(param1, param2, param3="defaultvalue", verbose=0, *args, **kwargs):  # type: ignore[no-untyped-def]
    some_variable = "x"  # noqa: F841 - a local, not a parameter: not logged
    with mlflow.start_run():
        return phd_flow.log_vars(exclude=["verbose"])


def test_log_vars_logs_the_callers_parameters_and_kwargs(tracking: str, request: pytest.FixtureRequest) -> None:
    from mlflow.tracking import MlflowClient

    logged = main("a", "b", something_else=6)

    assert logged == {"param1": "a", "param2": "b", "param3": "defaultvalue", "something_else": 6}
    run = MlflowClient().search_runs([mlflow.get_experiment_by_name(request.node.name).experiment_id])[0]
    assert run.data.params == {"param1": "a", "param2": "b", "param3": "defaultvalue", "something_else": "6"}


@pytest.mark.slow
def test_mlflow_dict_comes_back_in_a_new_process(tracking: str) -> None:
    d = phd_flow.MlflowDict()
    d["a"] = 5
    d["nested"] = {"x": [1, 2]}
    del d["nested"]
    del d

    code = "import phd_flow; d = phd_flow.MlflowDict(); print(d['a'], len(d), list(d))"
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}, "MLFLOW_TRACKING_URI": tracking},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "5 1 ['a']"
    with pytest.raises(KeyError):
        phd_flow.MlflowDict()["missing"]

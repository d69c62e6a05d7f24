"""Issue 15: ``phd_flow.mlflowhelper`` is a drop-in for mlflowhelper. The examples of
mlflowhelper's README run here with only their import line changed, against runs that the real
mlflowhelper logged (files at the artifact root) and runs that phd_flow logged."""

from __future__ import annotations

import sqlite3
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest

README_RUN_ID = "e1363f760b1e4ab3a9e93f856f2e9341"
IMPORT = "import mlflowhelper"
DROP_IN = "from phd_flow import mlflowhelper"

# mlflowhelper's README, verbatim but for the import line (and the MlflowDict one).
EXAMPLE_PLOT = """
from matplotlib import pyplot as plt
import mlflowhelper

with mlflowhelper.start_run():
    with mlflowhelper.managed_artifact("plot.png") as artifact:
        fig = plt.figure()
        plt.plot([1,2,3], [1,2,3])
        fig.savefig(artifact.get_path())
"""

EXAMPLE_PLOT_DIR = """
from matplotlib import pyplot as plt
import mlflowhelper

with mlflowhelper.start_run():
    with mlflowhelper.managed_artifact_dir("plots") as artifact_dir:

        # plot 1
        fig = plt.figure()
        plt.plot([1,2,3], [1,2,3])
        fig.savefig(artifact_dir.get_path("plot1.png"))

        # plot 2
        fig = plt.figure()
        plt.plot([1,2,3], [1,2,3])
        fig.savefig(artifact_dir.get_path("plot2.png"))
"""

EXAMPLE_LOAD_FILE = """
import mlflowhelper
import pandas as pd

with mlflowhelper.start_run():
    mlflowhelper.set_load(run_id="e1363f760b1e4ab3a9e93f856f2e9341", stages=["load_data"]) # activate loading from previous run
    with mlflowhelper.managed_artifact_dir("data.csv", stage="load_data") as artifact:
        if artifact.loaded:
            # load artifact
            data = pd.read_csv(artifact.get_path())
        else:
            # create and save artifact
            data = pd.read_csv("/shared/dir/data.csv").sample(frac=1)
            data.to_csv(artifact.get_path())
"""

EXAMPLE_LOAD_DIR = """
import mlflowhelper
import pandas as pd

mlflowhelper.set_load(run_id="e1363f760b1e4ab3a9e93f856f2e9341", stages=["load_data"]) # activate loading from previous run
with mlflowhelper.start_run():
    with mlflowhelper.managed_artifact_dir("data", stage="load_data") as artifact_dir:
        train_path = artifact_dir.get_path("test.csv")
        test_path = artifact_dir.get_path("train.csv")
        if artifact_dir.loaded:
            # load artifacts
            train = pd.read_csv(train_path)
            test = pd.read_csv(test_path)
        else:
            data = pd.read_csv("/shared/dir/data.csv").sample(frac=1)
            train = data.iloc[:100,:]
            test = data.iloc[100:,:]
            # save artifacts
            train.to_csv(train_path)
            test.to_csv(test_path)
"""

EXAMPLE_CENTRAL = """
import mlflowhelper
import pandas as pd

with mlflowhelper.start_run():

    # activate loading the stage `load_data` from previous run `e1363f760b1e4ab3a9e93f856f2e9341`
    mlflowhelper.set_load(run_id="e1363f760b1e4ab3a9e93f856f2e9341", stages=["load_data"])

    # deactivate logging the stage `load_data`, in this case for example because it was loaded from a previous run
    mlflowhelper.set_skip_log(stages=["load_data"])

    with mlflowhelper.managed_artifact_dir("data", stage="load_data") as artifact_dir:
        train_path = artifact_dir.get_path("test.csv")
        test_path = artifact_dir.get_path("train.csv")
        if artifact_dir.loaded:
            # load artifacts
            train = pd.read_csv(train_path)
            test = pd.read_csv(test_path)
        else:
            data = pd.read_csv("/shared/dir/data.csv").sample(frac=1)
            train = data.iloc[:100,:]
            test = data.iloc[100:,:]
            # save artifacts
            train.to_csv(train_path)
            test.to_csv(test_path)
"""

EXAMPLE_LOG_VARS = """
import mlflowhelper

def main(param1, param2, param3="defaultvalue", verbose=0, *args, **kwargs):
    some_variable = "x"
    with mlflowhelper.start_run(): # mlflow.start_run() is also OK here
        mlflowhelper.log_vars(exclude=["verbose"])

if __name__ == '__main__':
    main("a", "b", something_else=6)
"""

EXAMPLE_DICT = """
from mlflowhelper.tracking.collections import MlflowDict
d = MlflowDict() # you can also provide tracking URI or an MlflowClient
d["a"] = 5
del d
d = MlflowDict() # you can also provide tracking URI or an MlflowClient
print(d["a"]) # will give you 5
"""


def run_example(code: str, capsys: pytest.CaptureFixture[str] | None = None) -> dict[str, Any]:
    """Exec one README example with only its import line changed."""
    code = code.replace(
        "from mlflowhelper.tracking.collections import MlflowDict", "from phd_flow.mlflowhelper import MlflowDict"
    )
    code = code.replace(IMPORT, DROP_IN)
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(compile(textwrap.dedent(code), "<mlflowhelper README>", "exec"), namespace)
    return namespace


@pytest.fixture
def tracking(tmp_path: Path, mlflow_db_template: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh sqlite tracking store (a copy of the migrated template), active; cwd tmp_path."""
    import shutil

    db = tmp_path / "mlflow.db"
    shutil.copy(mlflow_db_template, db)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "readme")
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    yield db
    mlflow.set_tracking_uri(None)


def rename_run(db: Path, old: str, new: str) -> None:
    """Give run ``old`` the id ``new`` (the README's examples name a fixed run id)."""
    with sqlite3.connect(db) as con:
        tables = [row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        for table in tables:
            columns = [row[1] for row in con.execute(f"PRAGMA table_info({table})")]
            if "run_uuid" in columns:
                con.execute(f"UPDATE {table} SET run_uuid = ? WHERE run_uuid = ?", (new, old))
    # MLflow caches each run's artifact repository by run id; an earlier test's run had this id
    from mlflow.tracking._tracking_service import utils

    utils._artifact_repos_cache.pop(new, None)


def legacy_run(db: Path, tmp_path: Path, run_id: str = README_RUN_ID, adopt: bool = True) -> str:
    """A run laid out as the real mlflowhelper logs one: files at the artifact root; adopted
    (its checksums recorded once, the migration step) unless ``adopt=False``."""
    src = tmp_path / "legacy"
    (src / "data").mkdir(parents=True)
    (src / "data.csv").write_text("a,b\n" + "".join(f"{i},{i % 5}\n" for i in range(150)))
    (src / "data" / "train.csv").write_text("a,b\n1,2\n3,4\n")
    (src / "data" / "test.csv").write_text("a,b\n5,6\n")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(src / "data.csv"))
        mlflow.log_artifacts(str(src / "data"), artifact_path="data")
    rename_run(db, run.info.run_id, run_id)
    if adopt:
        from phd_flow import mlflowhelper

        assert set(mlflowhelper.adopt_run(run_id)) == {"data.csv", "data/train.csv", "data/test.csv"}
    return run_id


def artifacts(run_id: str, path: str | None = None) -> list[str]:
    from mlflow.tracking import MlflowClient

    out: list[str] = []
    for f in MlflowClient().list_artifacts(run_id, path):
        out.extend(artifacts(run_id, f.path) if f.is_dir else [f.path])
    return sorted(out)


def last_run_id() -> str:
    (run,) = mlflow.search_runs(max_results=1, order_by=["start_time DESC"], output_format="list")
    return str(run.info.run_id)


# --- the README's examples ---------------------------------------------------------------------


def test_readme_plot_examples(tracking: Path) -> None:
    run_example(EXAMPLE_PLOT)
    assert artifacts(last_run_id()) == ["plot.png"]
    run_example(EXAMPLE_PLOT_DIR)
    assert artifacts(last_run_id()) == ["plots/plot1.png", "plots/plot2.png"]


def test_readme_loading_examples_from_a_run_the_real_mlflowhelper_logged(tracking: Path, tmp_path: Path) -> None:
    legacy_run(tracking, tmp_path)
    ns = run_example(EXAMPLE_LOAD_FILE)
    assert len(ns["data"]) == 150
    ns = run_example(EXAMPLE_LOAD_DIR)
    assert len(ns["train"]) == 1 and len(ns["test"]) == 2  # the README swaps the names
    assert "load_data/data/train.csv" in artifacts(last_run_id())
    ns = run_example(EXAMPLE_CENTRAL)
    assert len(ns["test"]) == 2
    assert [a for a in artifacts(last_run_id()) if a.startswith("load_data")] == []  # skipped


def test_readme_loading_examples_from_a_run_phd_flow_logged(tracking: Path, tmp_path: Path) -> None:
    from phd_flow import mlflowhelper

    with mlflowhelper.start_run() as run, mlflowhelper.managed_artifact_dir("data", stage="load_data") as artifact_dir:
        Path(artifact_dir.get_path("train.csv")).write_text("a\n1\n2\n3\n")
        Path(artifact_dir.get_path("test.csv")).write_text("a\n1\n")
    rename_run(tracking, run.info.run_id, README_RUN_ID)
    ns = run_example(EXAMPLE_LOAD_DIR)
    assert len(ns["train"]) == 1 and len(ns["test"]) == 3


def test_readme_log_vars_example(tracking: Path) -> None:
    run_example(EXAMPLE_LOG_VARS)
    params = mlflow.get_run(last_run_id()).data.params
    assert params == {"param1": "a", "param2": "b", "param3": "defaultvalue", "something_else": "6"}


def test_readme_mlflow_dict_example(tracking: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_example(EXAMPLE_DICT)
    assert capsys.readouterr().out.strip() == "5"


# --- mlflowhelper's signatures and behaviour ---------------------------------------------------


def test_set_load_takes_one_stage_as_a_string_or_all_stages_by_default(tracking: Path, tmp_path: Path) -> None:
    from phd_flow import mlflowhelper

    source = legacy_run(tracking, tmp_path)
    with mlflowhelper.start_run():
        mlflowhelper.set_load(source, "load_data")
        with mlflowhelper.managed_artifact("data.csv", stage="load_data") as artifact:
            assert artifact.loaded
        with mlflowhelper.managed_artifact("other.csv", stage="other") as artifact:
            assert not artifact.loaded
    with mlflowhelper.start_run():
        mlflowhelper.set_load(source)
        mlflowhelper.set_skip_log()
        with mlflowhelper.managed_artifact_dir("data", stage="whatever") as artifact_dir:
            assert artifact_dir.loaded
    assert artifacts(last_run_id()) == []  # every stage skipped


def test_set_load_of_a_missing_artifact_says_so(tracking: Path, tmp_path: Path) -> None:
    from phd_flow import StageError, mlflowhelper

    source = legacy_run(tracking, tmp_path)
    with mlflowhelper.start_run():
        mlflowhelper.set_load(source, "load_data")
        with (
            pytest.raises(StageError, match=r"nope\.csv"),
            mlflowhelper.managed_artifact("nope.csv", stage="load_data"),
        ):
            pass


def test_a_run_mlflowhelper_logged_loads_only_once_adopted_and_verified(tracking: Path, tmp_path: Path) -> None:
    from phd_flow import StageError, mlflowhelper

    source = legacy_run(tracking, tmp_path, adopt=False)
    with mlflowhelper.start_run():
        mlflowhelper.set_load(source, "load_data")
        with (
            pytest.raises(StageError, match=r"records no checksums.*adopt_run\('e1363f760b1e4ab3a9e93f856f2e9341'\)"),
            mlflowhelper.managed_artifact_dir("data", stage="load_data"),
        ):
            pass
    mlflowhelper.adopt_run(source)
    assert mlflow.get_run(source).data.tags["phd_flow.adopted"]
    stored = Path(mlflow.get_run(source).info.artifact_uri.removeprefix("file://")) / "data" / "train.csv"
    stored.write_text("a,b\n666,666\n")  # changed after adoption: refused
    with mlflowhelper.start_run():
        mlflowhelper.set_load(source, "load_data")
        with (
            pytest.raises(StageError, match=r"train\.csv does not match its recorded sha256"),
            mlflowhelper.managed_artifact_dir("data", stage="load_data"),
        ):
            pass


def test_paths_are_strings_and_parent_folders_are_created(tracking: Path) -> None:
    from phd_flow import mlflowhelper

    with mlflowhelper.start_run() as run:
        with mlflowhelper.managed_artifact_dir("losses") as artifact_dir:
            path = artifact_dir.get_path("epoch_1/loss.txt")
            assert isinstance(path, str)
            with open(path + ".bak", "w") as f:
                f.write("0.5")
            with open(path, "w") as f:
                f.write("0.4")
            assert Path(path).parent.name == "epoch_1" and path.endswith("epoch_1/loss.txt")
        with mlflowhelper.managed_artifact("a/b/c.txt", artifact_path="deep") as artifact:
            p = artifact.get_path()
            assert isinstance(p, str) and Path(p).parent.is_dir()
            Path(p).write_text("c")
    # as mlflowhelper: artifact_path is the folder the file is logged in
    assert artifacts(run.info.run_id) == ["deep/c.txt", "losses/epoch_1/loss.txt", "losses/epoch_1/loss.txt.bak"]


def test_artifact_path_is_where_the_file_is_logged_and_loaded_from(tracking: Path) -> None:
    from phd_flow import mlflowhelper

    with (
        mlflowhelper.start_run() as first,
        mlflowhelper.managed_artifact("model.txt", artifact_path="models", stage="train") as artifact,
    ):
        Path(artifact.get_path()).write_text("weights")
    assert "train/models/model.txt" in artifacts(first.info.run_id)
    with mlflowhelper.start_run():
        mlflowhelper.set_load(first.info.run_id, ["train"])
        with mlflowhelper.managed_artifact("model.txt", artifact_path="models", stage="train") as artifact:
            assert artifact.loaded and Path(artifact.get_path()).read_text() == "weights"


def test_nested_runs_inherit_the_parents_load_and_skip_settings(tracking: Path, tmp_path: Path) -> None:
    from phd_flow import mlflowhelper

    source = legacy_run(tracking, tmp_path)
    with mlflowhelper.start_run():
        mlflowhelper.set_load(source, ["load_data"])
        mlflowhelper.set_skip_log("load_data")
        with (
            mlflowhelper.start_run(nested=True) as child,
            mlflowhelper.managed_artifact("data.csv", stage="load_data") as artifact,
        ):
            assert artifact.loaded
    assert artifacts(child.info.run_id) == []


def test_mlflow_dict_takes_mlflowhelpers_arguments(tracking: Path) -> None:
    from phd_flow import mlflowhelper

    d = mlflowhelper.MlflowDict(
        mlflow.get_tracking_uri(), mlflow_tag_dict_name="mine", local_value_cache=True, lazy_value_cache=False
    )
    d["x"] = [1, 2]
    assert mlflowhelper.MlflowDict(mlflow_tag_dict_name="mine", local_value_cache=False)["x"] == [1, 2]
    frozen = mlflowhelper.MlflowDict(mlflow_tag_dict_name="mine", read_only=True)
    with pytest.raises(TypeError, match="read_only"):
        frozen["y"] = 1


def test_signatures_match_mlflowhelper() -> None:
    import inspect

    from phd_flow import mlflowhelper

    def params(func: Any) -> dict[str, Any]:
        return {n: p.default for n, p in inspect.signature(func).parameters.items()}

    assert params(mlflowhelper.set_load) == {"run_id": inspect.Parameter.empty, "stages": "all"}
    assert params(mlflowhelper.set_skip_log) == {"stages": "all"}
    assert list(params(mlflowhelper.managed_artifact))[:6] == [
        "file_path",
        "artifact_path",
        "stage",
        "load",
        "skip_log",
        "delete",
    ]
    assert list(params(mlflowhelper.managed_artifact_dir))[:5] == ["dir_path", "stage", "load", "skip_log", "delete"]
    assert list(params(mlflowhelper.start_run))[:4] == ["run_id", "experiment_id", "run_name", "nested"]
    assert list(params(mlflowhelper.log_vars))[:2] == ["include", "exclude"]


def test_docs_stages_drop_in_example(
    tracking: Path, tmp_path: Path, mlflow_db_template: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """docs/stages.md's example, line for line (test_stages checks the doc against this file)."""
    import shutil

    (tmp_path / "data_storage").mkdir()
    shutil.copy(mlflow_db_template, tmp_path / "data_storage" / "mlflow.db")
    import mlflow

    from phd_flow import mlflowhelper  # was: import mlflowhelper

    mlflow.set_tracking_uri("sqlite:///data_storage/mlflow.db")
    with mlflowhelper.start_run() as first:
        mlflow.log_param("split", "80/20")
        with mlflowhelper.managed_artifact_dir("data", stage="load_data") as artifact_dir:
            path = artifact_dir.get_path("splits/train.csv")  # splits/ is created
            with open(path, "w") as f:
                f.write("a,b\n1,2\n")

    with mlflowhelper.start_run():
        mlflowhelper.set_load(first.info.run_id)  # every stage
        mlflowhelper.set_skip_log("load_data")  # one stage, as a string
        with mlflowhelper.managed_artifact_dir("data", stage="load_data") as artifact_dir:
            assert artifact_dir.loaded
            with open(artifact_dir.get_path("splits/train.csv")) as f:
                print(f.read())
    assert capsys.readouterr().out == "a,b\n1,2\n\n"

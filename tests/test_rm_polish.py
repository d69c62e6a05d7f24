"""``rm`` polish (issue 16): no unreachable arguments, the data a run wrote through
``self.storage`` outside its run directory deleted only with ``--with-data``, and MLflow's soft
delete said out loud. Black-box: the example project's FitOLS (which writes
``datasets/<key>/datasets.pickle`` and uploads it) through the CLI, a shared-directory remote."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import cli, write_config


def _config(shared: Path) -> str:
    return (
        'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nexperiment = "test"\n'
        f'[storage]\nbackend = "local"\nremote = "{shared}"\n'
    )


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, mlflow_db_template: Path) -> Iterator[tuple[Path, list[str]]]:
    """A project (and its shared remote, ``<root>/shared``) with two completed FitOLS runs."""
    from tests.conftest import EXAMPLES

    base = tmp_path_factory.mktemp("rm_polish")
    root = base / "proj"
    shutil.copytree(EXAMPLES / "my_project", root / "my_project", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(EXAMPLES / "data", root / "data")
    write_config(root, _config(base / "shared"))
    (root / "data_storage").mkdir()
    shutil.copy(mlflow_db_template, root / "data_storage" / "mlflow.db")
    made_keys = []
    for seed in ("0", "1"):
        argv = ["run", "FitOLS", "--dataset", "data/diabetes.csv", "--target", "target", "--seed", seed]
        proc = cli(root, *argv, "--wait-mlflow")  # its MLflow run exists when rm plans
        assert proc.returncode == 0, proc.stderr
        made_keys.append(json.loads(cli(root, "ls", "--json").stdout)[-1]["key"])
    yield base, made_keys


@pytest.fixture
def copy(made: tuple[Path, list[str]], tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """A private copy: (project, shared remote, [key of seed 0, key of seed 1])."""
    base, made_keys = made
    shutil.copytree(base, tmp_path / "c")
    project, shared = tmp_path / "c" / "proj", tmp_path / "c" / "shared"
    write_config(project, _config(shared))
    return project, shared, made_keys


@pytest.mark.slow
def test_rm_usage_has_no_unreachable_arguments(copy: tuple[Path, Path, list[str]]) -> None:
    project, _, (key, _) = copy
    usage = cli(project, "rm", "--help")
    assert usage.returncode == 0
    # KEY... swallows every positional, so a PREFIX after it can never be given; a running run
    # is always refused, so --running could only ever fail.
    assert "PREFIX" not in usage.stdout and "--running" not in usage.stdout, usage.stdout
    assert "--with-data" in usage.stdout and "--stale" in usage.stdout
    remote_help = " ".join(usage.stdout.split("\n  --remote", 1)[1].split())
    assert "delete" in remote_help.split("--", 1)[0], remote_help  # says it deletes the storage copy
    proc = cli(project, "rm", "--running")
    assert proc.returncode == 2 and "--running" in proc.stderr
    assert (project / "data_storage" / key).is_dir()


@pytest.mark.slow
def test_rm_deletes_the_runs_side_data_only_with_with_data(copy: tuple[Path, Path, list[str]]) -> None:
    project, shared, (first, second) = copy
    local = project / "data_storage"
    for key in (first, second):
        assert (local / "datasets" / key / "datasets.pickle").is_file()
        assert (shared / "datasets" / key / "datasets.pickle").is_file()
    proc = cli(project, "rm", first, "--force")
    assert proc.returncode == 0, proc.stderr
    assert f"datasets/{first}" in proc.stdout and "--with-data" in proc.stdout, proc.stdout  # named, kept
    assert not (local / first).exists() and (local / "datasets" / first / "datasets.pickle").is_file()

    proc = cli(project, "rm", second, "--force", "--with-data")
    assert proc.returncode == 0, proc.stderr
    assert f"data datasets/{second} (2 files" in proc.stdout, proc.stdout  # the pickle and its manifest
    assert not (local / second).exists() and not (local / "datasets" / second).exists()
    assert (local / "datasets" / first).is_dir()  # another run's data is not touched
    assert (shared / "datasets" / second).is_dir()  # without --remote the storage copy stays

    # the first run is now only in storage: --remote --with-data deletes its data there and here
    proc = cli(project, "rm", first, "--remote", "--force", "--with-data")
    assert proc.returncode == 0, proc.stderr
    assert f"datasets/{first}" in proc.stdout
    assert not (shared / first).exists() and not (shared / "datasets" / first).exists()
    assert not (local / "datasets" / first).exists()
    assert (shared / "datasets" / second / "datasets.pickle").is_file()


@pytest.mark.slow
def test_rm_says_mlflow_runs_are_soft_deleted_unless_purge(copy: tuple[Path, Path, list[str]]) -> None:
    project, _, (first, second) = copy
    proc = cli(project, "rm", first, "--force")
    assert proc.returncode == 0, proc.stderr
    said = " ".join(proc.stdout.split())
    assert "soft-deleted" in said and "restore" in said and "mlflow gc" in said and "--purge" in said, said
    proc = cli(project, "rm", second, "--force", "--purge")
    assert proc.returncode == 0, proc.stderr
    said = " ".join(proc.stdout.split())
    assert "soft-deleted" not in said and "for good" in said, said

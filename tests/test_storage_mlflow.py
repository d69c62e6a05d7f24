"""The MLflow-artifacts backend: the storage contract on a sqlite store with a local artifact
root and on a real ``mlflow server --serve-artifacts`` with a login (basic auth: the
bad-credentials case runs against it), plus a CLI run pulled back elsewhere."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from phd_flow.config import parse_config
from phd_flow.errors import StorageUnavailableError
from phd_flow.storage import make_remote
from phd_flow.storage.mlflow_artifacts import KEY_TAG, MlflowRemote
from phd_flow.testing import RemoteContract
from phd_flow.testing.contract import read_tree
from tests.conftest import cli, run_dirs, write_config
from tests.mlflow_server_fixtures import (  # noqa: F401
    MlflowServer,
    free_port,
    mlflow_server,
    mlflow_server_launched,
)

# Launch the server at the first test; it becomes ready while the local-store tests run.
pytestmark = pytest.mark.usefixtures("mlflow_server_launched")


def client(tracking_uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri)


@pytest.fixture(scope="module")
def sqlite_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """One sqlite tracking DB for the module (creating it costs seconds) and an artifact root."""
    root = tmp_path_factory.mktemp("mlflow-local")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client(uri).search_experiments(max_results=1)  # create the tables once
    yield uri, root / "artifacts"


class TestMlflowLocalContract(RemoteContract):
    """sqlite tracking store, artifacts in a local directory (LocalArtifactRepository)."""

    large_file_size = 2 << 20  # no multipart here; a copy of a few MB is enough

    @pytest.fixture
    def remote(self, sqlite_store: tuple[str, Path]) -> MlflowRemote:
        uri, artifacts = sqlite_store
        name = f"contract-{uuid.uuid4().hex[:8]}"
        client(uri).create_experiment(name, artifact_location=(artifacts / name).as_uri())
        return MlflowRemote(uri, name)

    def test_a_key_lands_in_the_run_tagged_with_it(self, remote: MlflowRemote) -> None:
        remote.write_bytes("K1/sub/a.txt", b"a")
        mlflow = client(remote.tracking_uri)
        (run,) = mlflow.search_runs([remote._experiment()], f"tags.`{KEY_TAG}` = 'K1'")
        assert [f.path for f in mlflow.list_artifacts(run.info.run_id, "sub")] == ["sub/a.txt"]
        assert remote.list_dirs("") == ["K1"]


@pytest.mark.slow
class TestMlflowServerContract(RemoteContract):
    """A real ``mlflow server --serve-artifacts`` (``mlflow-artifacts:`` proxy over HTTP) that
    asks for a login; the credentials ride in the tracking URI."""

    large_file_size = 2 << 20
    credentials_hint = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
    bad_secret = "not-the-password-9f3c"

    @pytest.fixture
    def remote(self, mlflow_server: MlflowServer) -> MlflowRemote:  # noqa: F811
        uri = mlflow_server.uri_with(mlflow_server.password)
        return MlflowRemote(uri, f"contract-{uuid.uuid4().hex[:8]}")

    @pytest.fixture
    def bad_credentials_remote(self, mlflow_server: MlflowServer) -> MlflowRemote:  # noqa: F811
        return MlflowRemote(mlflow_server.uri_with(self.bad_secret), f"contract-{uuid.uuid4().hex[:8]}")

    def test_bytes_land_in_the_servers_artifact_destination(
        self,
        remote: MlflowRemote,
        mlflow_server: MlflowServer,  # noqa: F811
    ) -> None:
        remote.write_bytes("K2/x.bin", b"\x00proxied")
        landed = list(mlflow_server.artifacts_dir.rglob("x.bin"))
        assert [p.read_bytes() for p in landed] == [b"\x00proxied"]


def test_unreachable_server_is_a_transient_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    remote = MlflowRemote(f"http://127.0.0.1:{free_port()}", "nowhere")
    with pytest.raises(StorageUnavailableError, match=r"127\.0\.0\.1"):
        list(remote.list(""))


def test_config_selects_the_backend_and_hides_passwords(tmp_path: Path) -> None:
    config = parse_config(
        '[storage]\nbackend = "mlflow"\n[mlflow]\ntracking_uri = "https://me:s3cret@mlflow.example.org"\n'
        'experiment = "exp"\n',
        tmp_path,
    )
    remote = make_remote(config)
    assert isinstance(remote, MlflowRemote)
    assert remote.describe() == "mlflow:https://mlflow.example.org#exp"
    assert "s3cret" not in repr(remote)


@pytest.mark.slow
def test_cli_run_lands_in_mlflow_and_downloads_byte_identical(
    project: Path,
    tmp_path: Path,
    mlflow_server: MlflowServer,  # noqa: F811
) -> None:
    toml = (
        'local_path = "${PROJECT_ROOT}/data_storage"\n[storage]\nbackend = "mlflow"\n'
        f'[mlflow]\ntracking_uri = "{mlflow_server.tracking_uri}"\n'
        f'experiment = "e2e-{uuid.uuid4().hex[:6]}"\n'
    )
    write_config(project, toml)
    login = mlflow_server.env  # the server asks for a login
    proc = cli(project, "run", "FitOLS", "--dataset", "data/diabetes.csv", "--target", "target", env=login)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(project / "data_storage")
    key = run_dir.name
    record = json.loads((run_dir / "run.json").read_text())
    assert record["sync"]["state"] == "synced", record["sync"]
    # The run's UI link is logged at start when the tracking store is a server (issue 6).
    run_id, experiment_id = record["mlflow"]["run_id"], record["mlflow"]["experiment_id"]
    link = f"MLflow run: {mlflow_server.tracking_uri}/#/experiments/{experiment_id}/runs/{run_id}"
    assert link in proc.stderr and link in (run_dir / "output.log").read_text()

    mlflow = client(mlflow_server.uri_with(mlflow_server.password))
    run = mlflow.get_run(run_id)
    assert run.data.tags[KEY_TAG] == key
    listed = {f.path for f in mlflow.list_artifacts(run.info.run_id)}
    assert {"run.json", "output.log", "results.pickle", "args.json"} <= listed

    second = tmp_path / "second"
    second.mkdir()
    shutil.copytree(project / "my_project", second / "my_project")
    write_config(second, toml)
    proc = cli(second, "download", key, env=login)
    assert proc.returncode == 0, proc.stderr
    assert read_tree(second / "data_storage" / key) == read_tree(run_dir)

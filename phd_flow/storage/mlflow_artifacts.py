"""The ``mlflow`` backend: each run directory lives in its MLflow run's own artifact store.

Config (``config/default.toml``)::

    [storage]
    backend = "mlflow"

    [mlflow]
    tracking_uri = "http://127.0.0.1:5000"   # a server with --serve-artifacts, sqlite, ...
    experiment = "my_project"

Whatever the tracking store uses for artifacts (a local directory, S3, the server's
``mlflow-artifacts:`` proxy) is where the files go. The first path segment of a storage key is
a run key, mapped to its MLflow run through the ``phd_flow.key`` tag in the configured
experiment: ``<key>/output.log`` is the artifact ``output.log`` of that run. A first segment
without a run (``datasets/...``) gets a run of its own, tagged the same way; files at the top
level go to one run tagged ``phd_flow.storage = root``.

Deleting works where the artifact repository can delete (local directories and the
``mlflow-artifacts:`` proxy); elsewhere it raises a clear :class:`StorageError`.
"""

from __future__ import annotations

import builtins
import contextlib
import os
import posixpath
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phd_flow.errors import (
    StorageAuthError,
    StorageError,
    StorageNotFoundError,
    StorageUnavailableError,
)
from phd_flow.storage.base import Remote, RemoteFile

if TYPE_CHECKING:
    from phd_flow.config import Config

KEY_TAG = "phd_flow.key"
ROOT_TAG = "phd_flow.storage"
_AUTH_HINT = (
    "Check MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) and [mlflow] tracking_uri."
)


class MlflowRemote(Remote):
    """Mirror run directories into the artifact stores of the MLflow runs in ``experiment``."""

    #: The artifact proxy of a one-worker ``mlflow server`` does not gain from more.
    max_workers = 4

    def __init__(self, tracking_uri: str, experiment: str) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self._client: Any = None
        self._experiment_id: str | None = None
        self._repos: dict[str, Any] = {}  # first key segment ("" = root) -> artifact repository
        self._lock = threading.RLock()

    @classmethod
    def from_config(cls, config: Config) -> MlflowRemote:
        return cls(config.tracking_uri(), config.experiment_name(_main_package()))

    def describe(self) -> str:
        return f"mlflow:{_public(self.tracking_uri)}#{self.experiment}"

    def __repr__(self) -> str:
        return f"MlflowRemote({self.describe()!r})"

    # --- operations ---------------------------------------------------------------------------

    def list(self, prefix: str = "") -> Iterator[RemoteFile]:
        prefix = prefix.strip("/")
        if not prefix:
            yield from self._files("", "")
            for run_key in self.list_dirs(""):
                yield from self._files(run_key, "")
            return
        run_key, _, path = prefix.partition("/")
        yield from self._files(run_key, path)

    def stat(self, key: str) -> RemoteFile | None:
        run_key, path = _split(key)
        parent, _, name = path.rpartition("/")
        with self._translate(key):
            repo = self._repo(run_key, create=False)
            if repo is None:
                return None
            for info in repo.list_artifacts(parent or None):
                if not info.is_dir and posixpath.basename(info.path) == name:
                    return RemoteFile(key, int(info.file_size or 0))
        return None

    def list_dirs(self, prefix: str = "") -> builtins.list[str]:
        prefix = prefix.strip("/")
        with self._translate(prefix or self.describe()):
            if not prefix:
                return sorted({str(run.data.tags[KEY_TAG]) for run in self._search(f"tags.`{KEY_TAG}` LIKE '%'")})
            run_key, _, path = prefix.partition("/")
            repo = self._repo(run_key, create=False)
            if repo is None:
                return []
            return sorted(posixpath.basename(i.path) for i in repo.list_artifacts(path or None) if i.is_dir)

    def put(self, local: Path, key: str) -> None:
        run_key, path = _split(key)
        directory, _, name = path.rpartition("/")
        with self._translate(key), _named(local, name) as source:
            self._repo(run_key, create=True).log_artifact(str(source), directory or None)

    def get(self, key: str, local: Path) -> None:
        run_key, path = _split(key)
        with self._translate(key):
            repo = self._repo(run_key, create=False)
            if repo is None:
                raise StorageNotFoundError(f"{self.describe()}: no MLflow run is tagged {KEY_TAG}={run_key!r}.")
            # `_download_file` is the one method every artifact repository implements (it is
            # abstract in ArtifactRepository); the public `download_artifacts` adds a listing
            # request and hides a 404 inside a generic "failures occurred" error.
            repo._download_file(path, str(local))

    def delete(self, keys: builtins.list[str]) -> None:
        for key in keys:
            run_key, path = _split(key)
            with self._translate(key):
                repo = self._repo(run_key, create=False)
                if repo is None:
                    continue
                try:
                    repo.delete_artifacts(path)
                except NotImplementedError as exc:
                    raise StorageError(
                        f"The artifact store of {self.describe()} ({type(repo).__name__}) cannot "
                        f"delete {key!r}. Delete it in the store itself (or delete the run in "
                        "the MLflow UI)."
                    ) from exc

    # --- runs and artifact repositories --------------------------------------------------------

    def _files(self, run_key: str, path: str) -> Iterator[RemoteFile]:
        with self._translate(f"{run_key}/{path}".strip("/") or self.describe()):
            repo = self._repo(run_key, create=False)
            if repo is None:
                return
            pending = [path or None]
            while pending:
                for info in repo.list_artifacts(pending.pop()):
                    if info.is_dir:
                        pending.append(info.path)
                    else:
                        key = f"{run_key}/{info.path}" if run_key else info.path
                        yield RemoteFile(key, int(info.file_size or 0))

    def _repo(self, run_key: str, create: bool) -> Any:
        """The artifact repository of the run for ``run_key`` ("" = the root run), or None."""
        with self._lock:
            if run_key in self._repos:
                return self._repos[run_key]
            found = self._search(_filter(run_key), max_results=2)
            if len(found) > 1:  # one of them was planted (anyone can tag a run): use neither
                ids = " and ".join(sorted(r.info.run_id for r in found))
                raise StorageError(
                    f"{self.describe()}: more than one MLflow run is tagged {KEY_TAG}={run_key!r} "
                    f"(runs {ids}), so which holds {run_key or 'the root'}'s files is ambiguous and "
                    "neither is used. Delete the run that does not belong (`mlflow runs delete`)."
                )
            if found:
                run = found[0]
            elif create:
                run = self._create_run(run_key)
            else:
                return None
            from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

            repo = get_artifact_repository(run.info.artifact_uri, tracking_uri=self.tracking_uri)
            self._repos[run_key] = repo
            return repo

    def _create_run(self, run_key: str) -> Any:
        tags = {KEY_TAG: run_key} if run_key else {ROOT_TAG: "root"}
        name = run_key or "phd_flow-storage-root"
        return self._mlflow_client().create_run(self._experiment(), run_name=name, tags=tags)

    def _search(self, filter_string: str, max_results: int | None = None) -> builtins.list[Any]:
        client, runs, token = self._mlflow_client(), [], None
        while True:
            page = client.search_runs(
                [self._experiment()],
                filter_string=filter_string,
                max_results=max_results or 1000,
                page_token=token,
            )
            runs.extend(page)
            token = page.token
            if max_results or not token:
                return runs

    def _mlflow_client(self) -> Any:
        with self._lock:
            if self._client is None:
                from phd_flow.tracking import import_mlflow, store_lock

                import_mlflow()
                from mlflow.tracking import MlflowClient

                with store_lock(self.tracking_uri):
                    client = MlflowClient(self.tracking_uri)
                    client.search_experiments(max_results=1)  # creates/migrates a sqlite store
                self._client = client
            return self._client

    def _experiment(self) -> str:
        with self._lock:
            if self._experiment_id is None:
                client = self._mlflow_client()
                found = client.get_experiment_by_name(self.experiment)
                if found is None:
                    self._experiment_id = str(client.create_experiment(self.experiment))
                else:
                    if found.lifecycle_stage == "deleted":
                        client.restore_experiment(found.experiment_id)
                    self._experiment_id = str(found.experiment_id)
            return self._experiment_id

    @contextlib.contextmanager
    def _translate(self, where: str) -> Iterator[None]:
        """Turn MLflow / HTTP errors into phd_flow ones."""
        try:
            yield
        except StorageError:
            raise
        except Exception as exc:
            translated = _translated(exc, f"{self.describe()}: {where}")
            if translated is None:
                raise
            raise translated from exc


def _translated(exc: Exception, where: str) -> StorageError | None:
    import requests
    from mlflow.exceptions import MlflowException

    status = None
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        status = exc.response.status_code
    elif isinstance(exc, MlflowException):
        status = int(exc.get_http_status_code())  # type: ignore[no-untyped-call]
    elif isinstance(exc, (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)):
        return StorageUnavailableError(f"{where}: the MLflow server cannot be reached ({exc}).")
    elif isinstance(exc, FileNotFoundError):
        return StorageNotFoundError(f"{where} does not exist.")
    elif not isinstance(exc, (requests.RequestException, OSError)):
        return None
    if status == 404:
        return StorageNotFoundError(f"{where} does not exist.")
    if status in (401, 403):
        return StorageAuthError(f"{where}: MLflow refused access (HTTP {status}). {_AUTH_HINT}")
    if status is None or status >= 500 or status == 429:
        return StorageUnavailableError(f"{where}: MLflow failed ({type(exc).__name__}: {exc}).")
    return StorageError(f"{where}: MLflow refused the request ({type(exc).__name__}: {exc}).")


def _split(key: str) -> tuple[str, str]:
    """``"<run key>/a/b"`` -> ``("<run key>", "a/b")``; a top-level file -> ``("", name)``."""
    run_key, _, path = key.strip("/").partition("/")
    return (run_key, path) if path else ("", run_key)


def _filter(run_key: str) -> str:
    if not run_key:
        return f"tags.`{ROOT_TAG}` = 'root'"
    escaped = run_key.replace("\\", "\\\\").replace("'", "\\'")
    return f"tags.`{KEY_TAG}` = '{escaped}'"


@contextlib.contextmanager
def _named(local: Path, name: str) -> Iterator[Path]:
    """``local`` under the file name ``name`` (MLflow names an artifact after its source file)."""
    if local.name == name:
        yield local
        return
    with tempfile.TemporaryDirectory(prefix="phd_flow-") as tmp:
        target = Path(tmp) / name
        try:
            os.link(local, target)
        except OSError:
            shutil.copyfile(local, target)
        yield target


def _public(uri: str) -> str:
    """The tracking URI without user:password@ (never shown)."""
    scheme, sep, rest = uri.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"


def _main_package() -> str | None:
    """The package run with ``python -m package`` (the default experiment name), if any."""
    import sys

    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = getattr(spec, "name", "") or ""
    top = name.split(".", 1)[0]
    return top or None

"""mlflowhelper's API for plain MLflow scripts (no Node): managed artifacts with stage loading
and skipping, :func:`log_vars` and :class:`MlflowDict`.

>>> import mlflow, phd_flow                                              # doctest: +SKIP
>>> with mlflow.start_run():
...     phd_flow.set_load(run_id="e1363f760b1e4ab3a9e93f856f2e9341", stages=["load_data"])
...     with phd_flow.managed_artifact_dir("data", stage="load_data") as artifact_dir:
...         if artifact_dir.loaded:
...             train = pd.read_csv(artifact_dir.get_path("train.csv"))

Artifacts are written to a fresh temporary folder (parallel scripts never overwrite each
other), logged to the active MLflow run under ``<stage>/`` when the block ends, and the folder
is removed. A stage's checksums are logged as ``phd_flow-stages/<stage>.json``; loading verifies
against them. mlflow is imported on first use.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from phd_flow.errors import PhdFlowError, StageError
from phd_flow.stages.manager import ArtifactPath
from phd_flow.stages.sources import MLFLOW_CHECKSUMS, digest, hash_tree, mlflow_checksums, verify

__all__ = [
    "MlflowDict",
    "log_vars",
    "managed_artifact",
    "managed_artifact_dir",
    "set_load",
    "set_skip_log",
]


@dataclass
class _RunSettings:
    """Stage rules and logged checksums of one MLflow run."""

    load: dict[str, str] = field(default_factory=dict)  # stage -> source MLflow run id
    skip_log: set[str] = field(default_factory=set)
    files: dict[str, dict[str, str]] = field(default_factory=dict)  # stage -> {file: sha256}


# Keyed by MLflow run id; None holds rules set before a run started (taken by the next run).
_SETTINGS: dict[str | None, _RunSettings] = {}


def _mlflow() -> Any:
    from phd_flow.tracking import import_mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm on stderr
    return import_mlflow()


def _active_run_id() -> str | None:
    run = _mlflow().active_run()
    return str(run.info.run_id) if run is not None else None


def _settings(create_for_run: bool = True) -> _RunSettings:
    run_id = _active_run_id()
    if run_id is None:
        if create_for_run:
            raise PhdFlowError(
                "Managed artifacts need an active MLflow run: use them inside `with mlflow.start_run():`."
            )
        return _SETTINGS.setdefault(None, _RunSettings())
    if run_id not in _SETTINGS:
        pending = _SETTINGS.pop(None, None)
        _SETTINGS[run_id] = pending if pending is not None else _RunSettings()
    return _SETTINGS[run_id]


def set_load(run_id: str, stages: Sequence[str]) -> None:
    """Load ``stages`` from MLflow run ``run_id`` (any experiment) instead of computing them.

    Applies to the active run, or to the next run started when none is active.
    """
    settings = _settings(create_for_run=False)
    for stage in stages:
        settings.load[stage] = run_id


def set_skip_log(stages: Sequence[str]) -> None:
    """Do not log ``stages``' managed artifacts to MLflow (they are still usable in the block)."""
    _settings(create_for_run=False).skip_log.update(stages)


class MlflowManagedArtifact(ArtifactPath):
    """A file or folder logged to the active MLflow run when its ``with`` block ends."""

    def __init__(self, name: str, stage: str | None, is_dir: bool, delete: bool = True) -> None:
        if not name or name.startswith("/") or ".." in name.split("/"):
            raise PhdFlowError(f"Managed artifact name {name!r} must be a relative path without '..'.")
        self.name, self.stage, self.is_dir, self.delete = name, stage, is_dir, delete
        self.loaded = False
        self.loaded_from: str | None = None
        self._tmp: Path | None = None
        self._settings = _RunSettings()

    @property
    def path(self) -> Path:
        """Where the artifact lives during the block (a private temporary folder)."""
        if self._tmp is None:
            raise PhdFlowError("A managed artifact has a path inside its `with` block only.")
        return self._tmp / self.name

    def __enter__(self) -> MlflowManagedArtifact:
        self._settings = _settings()
        self._tmp = Path(tempfile.mkdtemp(prefix="phd_flow-artifact-"))
        (self.path if self.is_dir else self.path.parent).mkdir(parents=True, exist_ok=True)
        source = self._settings.load.get(self.stage) if self.stage else None
        if source:
            try:
                self._load(source)
            except BaseException:
                shutil.rmtree(self._tmp, ignore_errors=True)
                raise
        return self

    def _load(self, run_id: str) -> None:
        assert self.stage is not None
        mlflow = _mlflow()
        uri = mlflow.get_tracking_uri()
        staging = Path(tempfile.mkdtemp(prefix="phd_flow-load-"))
        try:
            try:
                got = mlflow.artifacts.download_artifacts(
                    run_id=run_id,
                    artifact_path=f"{self.stage}/{self.name}",
                    dst_path=str(staging / "download"),
                    tracking_uri=uri,
                )
            except Exception as exc:
                raise StageError(
                    f"set_load(run_id={run_id!r}, stages=[{self.stage!r}]): MLflow run {run_id} "
                    f"has no artifact {self.stage}/{self.name} ({type(exc).__name__}: {exc})."
                ) from None
            checked = staging / "checked" / self.name  # laid out as the checksums name files
            checked.parent.mkdir(parents=True)
            Path(got).replace(checked)
            expected = mlflow_checksums(uri, run_id, self.stage)
            mine = None
            if expected is not None:
                mine = {k: v for k, v in expected.items() if k == self.name or k.startswith(f"{self.name}/")}
            verify(staging / "checked", mine, self.stage, run_id, f"MLflow at {uri}")
            shutil.rmtree(self.path, ignore_errors=True)
            checked.replace(self.path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.loaded, self.loaded_from = True, run_id

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is None:
                self._log()
        finally:
            if self.delete and self._tmp is not None:
                shutil.rmtree(self._tmp, ignore_errors=True)

    def _log(self) -> None:
        mlflow = _mlflow()
        skip = self.stage is not None and self.stage in self._settings.skip_log
        if not skip and self.path.exists():
            if self.is_dir:
                mlflow.log_artifacts(str(self.path), artifact_path="/".join(filter(None, [self.stage, self.name])))
            else:
                mlflow.log_artifact(str(self.path), artifact_path=self.stage)
        if self.stage is None:
            return
        files = self._settings.files.setdefault(self.stage, {})
        if self.is_dir:
            files.update({f"{self.name}/{rel}": sha for rel, sha in hash_tree(self.path).items()})
        elif self.path.is_file():
            files.update({self.name: hash_tree(self.path.parent)[self.path.name]})
        tags = {
            f"phd_flow.stage.{self.stage}.logged": str(not skip).lower(),
            f"phd_flow.stage.{self.stage}.sha256": digest(files),
        }
        if self.loaded_from:
            tags[f"phd_flow.stage.{self.stage}.loaded_from"] = self.loaded_from
        mlflow.set_tags(tags)
        if not skip:
            with tempfile.TemporaryDirectory(prefix="phd_flow-") as tmp:
                checksums = Path(tmp) / f"{self.stage}.json"
                checksums.write_text(json.dumps(files, indent=1, sort_keys=True))
                mlflow.log_artifact(str(checksums), artifact_path=MLFLOW_CHECKSUMS)


def managed_artifact(name: str, stage: str | None = None, delete: bool = True) -> MlflowManagedArtifact:
    """A file logged to the active MLflow run at the end of the ``with`` block.

    With ``stage`` and :func:`set_load`, the file comes from the earlier run (``.loaded``) and is
    verified; with :func:`set_skip_log` it is not logged. ``delete=False`` keeps the temp copy.
    """
    return MlflowManagedArtifact(name, stage, is_dir=False, delete=delete)


def managed_artifact_dir(name: str, stage: str | None = None, delete: bool = True) -> MlflowManagedArtifact:
    """A folder logged to the active MLflow run at the end of the ``with`` block
    (``.get_path("plot1.png")``); see :func:`managed_artifact`."""
    return MlflowManagedArtifact(name, stage, is_dir=True, delete=delete)


def log_vars(exclude: Sequence[str] = ()) -> dict[str, Any]:
    """Log the calling function's parameters (and its ``**kwargs``) as MLflow params.

    >>> def main(param1, param2, param3="defaultvalue", verbose=0, **kwargs):  # doctest: +SKIP
    ...     with mlflow.start_run():
    ...         phd_flow.log_vars(exclude=["verbose"])
    >>> main("a", "b", something_else=6)   # logs param1, param2, param3, something_else

    Returns the dict that was logged.
    """
    frame = inspect.currentframe()
    caller = frame.f_back if frame is not None else None
    if caller is None:
        raise PhdFlowError("log_vars() must be called from inside a function.")
    try:
        info = inspect.getargvalues(caller)
        values = {name: info.locals[name] for name in info.args if name in info.locals}
        if info.varargs and info.locals.get(info.varargs):
            values[info.varargs] = list(info.locals[info.varargs])
        if info.keywords:
            values.update(info.locals.get(info.keywords) or {})
    finally:
        del frame, caller
    values = {k: v for k, v in values.items() if k not in set(exclude)}
    mlflow = _mlflow()
    if mlflow.active_run() is None:
        raise PhdFlowError("log_vars() logs to the active MLflow run: call it inside `with mlflow.start_run():`.")
    mlflow.log_params(values)
    return values


class MlflowDict(MutableMapping[str, Any]):
    """A dict whose items persist in MLflow and come back in a new process.

    Each dict is one MLflow run (experiment ``phd_flow-dicts``, tag ``phd_flow.dict = name``);
    each item is a tag holding the JSON of key and value, so values must be JSON-able (tuples
    come back as lists) and under ~8,000 characters.

    >>> d = MlflowDict()          # doctest: +SKIP
    >>> d["a"] = 5
    >>> MlflowDict()["a"]         # in another process, too
    5
    """

    EXPERIMENT = "phd_flow-dicts"
    _PREFIX = "phd_flow.item."
    _MAX = 8000

    def __init__(self, name: str = "default", tracking_uri: str | None = None, client: Any = None) -> None:
        mlflow = _mlflow()
        from mlflow.tracking import MlflowClient

        self.name = name
        self._client = client or MlflowClient(tracking_uri or mlflow.get_tracking_uri())
        self._run_id = self._find_or_create()

    def _find_or_create(self) -> str:
        client = self._client
        experiment = client.get_experiment_by_name(self.EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.EXPERIMENT)
        found = client.search_runs(
            [experiment_id], filter_string=f"tags.`phd_flow.dict` = '{self.name}'", max_results=1
        )
        if found:
            return str(found[0].info.run_id)
        run = client.create_run(experiment_id, run_name=self.name, tags={"phd_flow.dict": self.name})
        client.set_terminated(run.info.run_id, "FINISHED")
        return str(run.info.run_id)

    def _tag(self, key: str) -> str:
        if not isinstance(key, str):
            raise TypeError(f"MlflowDict keys are strings, not {type(key).__name__}.")
        return self._PREFIX + hashlib.sha256(key.encode()).hexdigest()[:32]

    def _items(self) -> dict[str, Any]:
        tags = self._client.get_run(self._run_id).data.tags
        items = (json.loads(v) for k, v in tags.items() if k.startswith(self._PREFIX))
        return {item["k"]: item["v"] for item in items}

    def __getitem__(self, key: str) -> Any:
        raw = self._client.get_run(self._run_id).data.tags.get(self._tag(key))
        if raw is None:
            raise KeyError(key)
        return json.loads(raw)["v"]

    def __setitem__(self, key: str, value: Any) -> None:
        blob = json.dumps({"k": key, "v": value})
        if len(blob) > self._MAX:
            raise ValueError(f"MlflowDict[{key!r}] is {len(blob)} characters as JSON; MLflow tags hold {self._MAX}.")
        self._client.set_tag(self._run_id, self._tag(key), blob)

    def __delitem__(self, key: str) -> None:
        if key not in self:
            raise KeyError(key)
        self._client.delete_tag(self._run_id, self._tag(key))

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._tag(key) in self._client.get_run(self._run_id).data.tags

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    def __repr__(self) -> str:
        return f"MlflowDict({self.name!r}, {self._items()!r})"

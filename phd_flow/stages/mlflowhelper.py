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
    "StrPath",
    "adopt_run",
    "log_vars",
    "managed_artifact",
    "managed_artifact_dir",
    "set_load",
    "set_skip_log",
    "start_run",
]


ALL = "all"  # mlflowhelper's "every stage"
ADOPTED = "_adopted"  # phd_flow-stages/_adopted.json: the checksums adopt_run() records


@dataclass
class _RunSettings:
    """Stage rules and logged checksums of one MLflow run."""

    load: dict[str, str] = field(default_factory=dict)  # stage -> source MLflow run id
    skip_log: set[str] = field(default_factory=set)  # stages, or {"all"}
    files: dict[str, dict[str, str]] = field(default_factory=dict)  # stage -> {file: sha256}
    tmp_dir: str | None = None  # start_run(tmp_dir=...): where managed artifacts are written

    def source(self, stage: str | None) -> str | None:
        """The run to load ``stage`` from, if any."""
        if stage is None:
            return None
        return self.load.get(stage) or self.load.get(ALL)

    def skips(self, stage: str | None) -> bool:
        return stage is not None and (stage in self.skip_log or ALL in self.skip_log)

    def inherited(self) -> _RunSettings:
        """A nested run's settings: the parent's rules (mlflowhelper has one set per process)."""
        return _RunSettings(dict(self.load), set(self.skip_log), tmp_dir=self.tmp_dir)


# Keyed by MLflow run id; None holds rules set before a run started (taken by the next run).
_SETTINGS: dict[str | None, _RunSettings] = {}


def _mlflow() -> Any:
    from phd_flow.tracking import import_mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no tqdm on stderr
    return import_mlflow()


def _active_run() -> Any:
    return _mlflow().active_run()


def _settings(create_for_run: bool = True) -> _RunSettings:
    run = _active_run()
    if run is None:
        if create_for_run:
            raise PhdFlowError(
                "Managed artifacts need an active MLflow run: use them inside `with mlflow.start_run():`."
            )
        return _SETTINGS.setdefault(None, _RunSettings())
    run_id = str(run.info.run_id)
    if run_id not in _SETTINGS:
        pending = _SETTINGS.pop(None, None)
        parent = _SETTINGS.get(run.data.tags.get("mlflow.parentRunId") or "")
        _SETTINGS[run_id] = pending or (parent.inherited() if parent is not None else _RunSettings())
    return _SETTINGS[run_id]


def _stage_list(stages: str | Sequence[str] | None) -> list[str]:
    """mlflowhelper's ``stages``: "all", one stage name, or a list of them."""
    if stages is None:
        return [ALL]
    return [stages] if isinstance(stages, str) else list(stages)


def set_load(run_id: str, stages: str | Sequence[str] = ALL) -> None:
    """Load ``stages`` ("all", one stage, or a list) from MLflow run ``run_id`` (any experiment)
    instead of computing them.

    Applies to the active run and the runs nested in it, or to the next run started when none is
    active. The run may have been logged by phd_flow (``<stage>/<name>``, verified by sha256) or by
    mlflowhelper itself (``<name>`` at the artifact root) once :func:`adopt_run` recorded its
    checksums; either way the files are verified by sha256 before use.
    """
    settings = _settings(create_for_run=False)
    for stage in _stage_list(stages):
        settings.load[stage] = run_id


def set_skip_log(stages: str | Sequence[str] = ALL) -> None:
    """Do not log ``stages``' ("all", one stage, or a list) managed artifacts to MLflow (they are
    still usable in the block)."""
    _settings(create_for_run=False).skip_log.update(_stage_list(stages))


def adopt_run(run_id: str) -> dict[str, str]:
    """Record the sha256 of every artifact of MLflow run ``run_id`` (one that mlflowhelper
    logged: it recorded none), so that :func:`set_load` can load from it, verified from then on.

    Call it once per old run, having decided that its artifacts are what you expect: it trusts
    them as they are now (phd_flow never loads unverified files). The checksums are logged to
    that run as ``phd_flow-stages/_adopted.json`` and the run gets the tag ``phd_flow.adopted``.
    Returns ``{artifact path: sha256}``.
    """
    from datetime import datetime, timezone

    mlflow = _mlflow()
    from mlflow.tracking import MlflowClient

    uri = mlflow.get_tracking_uri()
    client = MlflowClient(uri)
    with tempfile.TemporaryDirectory(prefix="phd_flow-adopt-") as tmp:
        root = mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(Path(tmp) / "run"), tracking_uri=uri)
        files = {k: v for k, v in hash_tree(Path(root)).items() if not k.startswith(f"{MLFLOW_CHECKSUMS}/")}
        checksums = Path(tmp) / f"{ADOPTED}.json"
        checksums.write_text(json.dumps(files, indent=1, sort_keys=True))
        client.log_artifact(run_id, str(checksums), artifact_path=MLFLOW_CHECKSUMS)
    client.set_tag(run_id, "phd_flow.adopted", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    return files


def start_run(
    run_id: str | None = None,
    experiment_id: str | None = None,
    run_name: str | None = None,
    nested: bool = False,
    tmp_dir: str | None = None,
    delete_tmp_dir: bool = True,
    **kwargs: Any,
) -> Any:
    """``mlflow.start_run`` (same arguments and return value), as mlflowhelper's ``start_run``.

    ``tmp_dir``: where managed artifacts are written (default: a fresh temporary folder each);
    ``delete_tmp_dir`` is accepted for mlflowhelper's sake (artifacts are deleted per block, see
    ``delete=``). A nested run takes over its parent's :func:`set_load` / :func:`set_skip_log`.
    """
    mlflow = _mlflow()
    active = mlflow.start_run(run_id=run_id, experiment_id=experiment_id, run_name=run_name, nested=nested, **kwargs)
    settings = _settings()
    if tmp_dir is not None:
        settings.tmp_dir = str(tmp_dir)
    return active


class StrPath(str):
    """A path that is a ``str`` (mlflowhelper returned strings: ``path + ".bak"`` works) and
    also answers pathlib's attributes (``.name``, ``.parent``, ``.exists()``, ``/``...)."""

    def __fspath__(self) -> str:
        return str(self)

    @property
    def path(self) -> Path:
        """The same path as a :class:`pathlib.Path`."""
        return Path(self)

    def __truediv__(self, other: str | os.PathLike[str]) -> StrPath:
        return StrPath(os.path.join(self, os.fspath(other)))

    def __getattr__(self, name: str) -> Any:
        return getattr(Path(self), name)


class MlflowManagedArtifact(ArtifactPath):
    """A file or folder logged to the active MLflow run when its ``with`` block ends.

    It is logged at ``[<stage>/]<name>`` (a file with ``artifact_path``: at
    ``[<stage>/]<artifact_path>/<file name>``, as mlflowhelper does).
    """

    def __init__(
        self,
        name: str,
        stage: str | None,
        is_dir: bool,
        delete: bool | None = True,
        artifact_path: str | None = None,
        load: bool | str | None = None,
        skip_log: bool | None = None,
    ) -> None:
        name = name.rstrip("/")
        for part in (name, artifact_path or ""):
            if part.startswith("/") or ".." in part.split("/"):
                raise PhdFlowError(f"Managed artifact name {part!r} must be a relative path without '..'.")
        if not name:
            raise PhdFlowError("A managed artifact needs a name.")
        self.name, self.stage, self.is_dir = name, stage, is_dir
        self.delete = True if delete is None else delete
        self.artifact_path = artifact_path.strip("/") if artifact_path else None
        self._load_override, self._skip_override = load, skip_log
        self.loaded = False
        self.loaded_from: str | None = None
        self._tmp: Path | None = None
        self._settings = _RunSettings()

    @property
    def rel(self) -> str:
        """Where the artifact is logged, relative to its stage folder (or the run's artifact root)."""
        if self.artifact_path and not self.is_dir:
            return f"{self.artifact_path}/{self.name.rsplit('/', 1)[-1]}"
        return self.name

    @property
    def remote(self) -> str:
        """Where the artifact is logged in the MLflow run."""
        return "/".join(filter(None, [self.stage, self.rel]))

    @property
    def path(self) -> Path:
        """Where the artifact lives during the block (a private temporary folder)."""
        if self._tmp is None:
            raise PhdFlowError("A managed artifact has a path inside its `with` block only.")
        return self._tmp / self.name

    def get_path(self, name: str | None = None) -> StrPath:  # type: ignore[override]
        """The artifact's path as a ``str`` (mlflowhelper's type; pathlib's attributes work too);
        for a folder, ``get_path("epoch_1/loss.txt")`` is a file inside it, its folder created."""
        if name is None:
            return StrPath(self.path)
        if not self.is_dir:
            raise PhdFlowError(f"{self.path.name} is a single file; get_path() takes no name.")
        path = self.path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return StrPath(path)

    @property
    def skip_log(self) -> bool:
        """True when this artifact is not logged (``skip_log=`` or :func:`set_skip_log`)."""
        if self._skip_override is not None:
            return self._skip_override
        return self._settings.skips(self.stage)

    def _source(self) -> str | None:
        if self._load_override is False:
            return None
        if isinstance(self._load_override, str):
            return self._load_override
        return self._settings.source(self.stage)

    def __enter__(self) -> MlflowManagedArtifact:
        self._settings = _settings()
        base = self._settings.tmp_dir
        if base is not None:
            Path(base).mkdir(parents=True, exist_ok=True)
        self._tmp = Path(tempfile.mkdtemp(prefix="phd_flow-artifact-", dir=base))
        (self.path if self.is_dir else self.path.parent).mkdir(parents=True, exist_ok=True)
        source = self._source()
        if source:
            try:
                self._load(source)
            except BaseException:
                shutil.rmtree(self._tmp, ignore_errors=True)
                raise
        return self

    def _load(self, run_id: str) -> None:
        mlflow = _mlflow()
        uri = mlflow.get_tracking_uri()
        where = f"MLflow at {uri}"
        expected = mlflow_checksums(uri, run_id, self.stage) if self.stage else None
        # (artifact path in the run, its name in the checksums, the checksums)
        if expected is not None:  # logged by phd_flow: <stage>/<rel>, checksums per stage
            plan = [(self.remote, self.rel, expected)]
        else:  # logged by mlflowhelper: at the artifact root, checksums from adopt_run()
            adopted = mlflow_checksums(uri, run_id, ADOPTED)
            if adopted is None:
                raise StageError(
                    f"set_load(run_id={run_id!r}, stages=[{self.stage!r}]): MLflow run {run_id} "
                    f"records no checksums for stage {self.stage!r} (a run logged by mlflowhelper?), "
                    "so its files cannot be verified: nothing of it was used. If you trust that "
                    "run's artifacts as they are now, adopt it once: "
                    f"`phd_flow.mlflowhelper.adopt_run({run_id!r})`; or drop the rule to compute the stage."
                )
            plan = [(path, path, adopted) for path in dict.fromkeys([self.remote, *self._legacy()])]
        staging = Path(tempfile.mkdtemp(prefix="phd_flow-load-"))
        try:
            got, errors, name, mine = None, [], "", {}
            for remote, name, sums in plan:
                mine = {k: v for k, v in sums.items() if k == name or k.startswith(f"{name}/")}
                if not mine:
                    errors.append(f"{remote} (not in its checksums)")
                    continue
                try:
                    got = mlflow.artifacts.download_artifacts(
                        run_id=run_id, artifact_path=remote, dst_path=str(staging / "download"), tracking_uri=uri
                    )
                    break
                except Exception as exc:
                    errors.append(f"{remote} ({type(exc).__name__}: {exc})")
            if got is None:
                raise StageError(
                    f"set_load(run_id={run_id!r}, stages=[{self.stage!r}]): MLflow run {run_id} has no "
                    f"artifact {' or '.join(p for p, _, _ in plan)}: {'; '.join(errors)}."
                )
            checked = staging / "checked" / name  # laid out as the checksums name files
            checked.parent.mkdir(parents=True)
            Path(got).replace(checked)
            verify(staging / "checked", mine, self.stage or self.name, run_id, where)
            if self.path.is_dir():
                shutil.rmtree(self.path)
            else:
                self.path.unlink(missing_ok=True)
            checked.replace(self.path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self.loaded, self.loaded_from = True, run_id

    def _legacy(self) -> list[str]:
        """Where mlflowhelper itself logged this artifact: at the artifact root (a file under
        its ``artifact_path``, or its base name)."""
        if self.is_dir:
            return [self.name]
        base = self.name.rsplit("/", 1)[-1]
        return [f"{self.artifact_path}/{base}" if self.artifact_path else base, self.name]

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
        skip = self.skip_log
        if not skip and self.path.exists():
            folder, _, _ = self.remote.rpartition("/")
            if self.path.is_dir():
                mlflow.log_artifacts(str(self.path), artifact_path=self.remote)
            else:
                mlflow.log_artifact(str(self.path), artifact_path=folder or None)
        if self.stage is None:
            return
        files = self._settings.files.setdefault(self.stage, {})
        if self.path.is_dir():
            files.update({f"{self.rel}/{rel}": sha for rel, sha in hash_tree(self.path).items()})
        elif self.path.is_file():
            files.update({self.rel: hash_tree(self.path.parent)[self.path.name]})
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


def managed_artifact(
    file_path: str,
    artifact_path: str | None = None,
    stage: str | None = None,
    load: bool | str | None = None,
    skip_log: bool | None = None,
    delete: bool | None = None,
) -> MlflowManagedArtifact:
    """A file logged to the active MLflow run at the end of the ``with`` block (mlflowhelper's
    signature).

    With ``stage`` and :func:`set_load`, the file comes from the earlier run (``.loaded``) and is
    verified; with :func:`set_skip_log` it is not logged. ``artifact_path``: the folder it is
    logged in; ``load``: False never loads, a run id loads from that run; ``skip_log``:
    True/False overrides :func:`set_skip_log`; ``delete=False`` keeps the temp copy.
    """
    return MlflowManagedArtifact(file_path, stage, False, delete, artifact_path, load, skip_log)


def managed_artifact_dir(
    dir_path: str,
    stage: str | None = None,
    load: bool | str | None = None,
    skip_log: bool | None = None,
    delete: bool | None = None,
) -> MlflowManagedArtifact:
    """A folder logged to the active MLflow run at the end of the ``with`` block
    (``.get_path("plot1.png")``); see :func:`managed_artifact`."""
    return MlflowManagedArtifact(dir_path, stage, True, delete, None, load, skip_log)


def log_vars(
    include: Sequence[str] | None = None,
    exclude: Sequence[str] | None = None,
    include_args: bool = True,
    include_varargs: bool = True,
    include_kwargs: bool = True,
    include_locals: bool = False,
    varargs_prefix: str = "vararg_",
    verbose: int = 0,
) -> dict[str, Any]:
    """Log the calling function's parameters (and its ``**kwargs``) as MLflow params
    (mlflowhelper's signature: ``*args`` become ``vararg_0``, ``vararg_1``...).

    >>> def main(param1, param2, param3="defaultvalue", verbose=0, **kwargs):  # doctest: +SKIP
    ...     with mlflow.start_run():
    ...         phd_flow.log_vars(exclude=["verbose"])
    >>> main("a", "b", something_else=6)   # logs param1, param2, param3, something_else

    ``include`` or ``exclude`` (not both) pick names; ``include_locals`` adds the other local
    variables. Returns the dict that was logged.
    """
    if include is not None and exclude is not None:
        raise PhdFlowError("log_vars(): give `include` or `exclude`, not both.")
    frame = inspect.currentframe()
    caller = frame.f_back if frame is not None else None
    if caller is None:
        raise PhdFlowError("log_vars() must be called from inside a function.")
    try:
        info = inspect.getargvalues(caller)
        values: dict[str, Any] = {}
        if include_args:
            values.update({name: info.locals[name] for name in info.args if name in info.locals})
        if include_kwargs and info.keywords:
            values.update(info.locals.get(info.keywords) or {})
        if include_varargs and info.varargs:
            for i, value in enumerate(info.locals.get(info.varargs) or ()):
                values[f"{varargs_prefix}{i}"] = value
        if include_locals:
            special = {*info.args, info.varargs, info.keywords}
            values.update({k: v for k, v in info.locals.items() if k not in special and k not in values})
    finally:
        del frame, caller
    if include is not None:
        values = {k: v for k, v in values.items() if k in set(include)}
    values = {k: v for k, v in values.items() if k not in set(exclude or ())}
    if verbose:
        print("mlflowhelper: Logging variables:")
        for k, v in values.items():
            print(f"  * {k}={v}")
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

    def __init__(
        self,
        name: str = "default",
        tracking_uri: str | None = None,
        client: Any = None,
        *,
        experiment: str | None = None,
        local_value_cache: bool = False,
        read_only: bool = False,
    ) -> None:
        mlflow = _mlflow()
        from mlflow.tracking import MlflowClient

        self.name = name
        self.experiment = experiment or self.EXPERIMENT
        self.read_only = read_only
        self._cache: dict[str, Any] | None = {} if local_value_cache else None
        self._client = client or MlflowClient(tracking_uri or mlflow.get_tracking_uri())
        self._run_id = self._find_or_create()

    def _find_or_create(self) -> str:
        client = self._client
        experiment = client.get_experiment_by_name(self.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(self.experiment)
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
        if self._cache is not None and key in self._cache:
            return json.loads(self._cache[key])
        raw = self._client.get_run(self._run_id).data.tags.get(self._tag(key))
        if raw is None:
            raise KeyError(key)
        if self._cache is not None:
            self._cache[key] = json.dumps(json.loads(raw)["v"])
        return json.loads(raw)["v"]

    def _writable(self) -> None:
        if self.read_only:
            raise TypeError(f"MlflowDict {self.name!r} was opened with read_only=True.")

    def __setitem__(self, key: str, value: Any) -> None:
        self._writable()
        blob = json.dumps({"k": key, "v": value})
        if len(blob) > self._MAX:
            raise ValueError(f"MlflowDict[{key!r}] is {len(blob)} characters as JSON; MLflow tags hold {self._MAX}.")
        self._client.set_tag(self._run_id, self._tag(key), blob)
        if self._cache is not None:
            self._cache[key] = json.dumps(value)

    def __delitem__(self, key: str) -> None:
        self._writable()
        if key not in self:
            raise KeyError(key)
        self._client.delete_tag(self._run_id, self._tag(key))
        if self._cache is not None:
            self._cache.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self._tag(key) in self._client.get_run(self._run_id).data.tags

    def __iter__(self) -> Iterator[str]:
        return iter(self._items())

    def __len__(self) -> int:
        return len(self._items())

    def __repr__(self) -> str:
        return f"MlflowDict({self.name!r}, {self._items()!r})"

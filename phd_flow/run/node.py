"""``Node[Args, Result]``: the unit of work phd_flow runs, logs, tracks and syncs.

>>> @dataclasses.dataclass
... class FitArgs(Args):
...     dataset: str  # path to a csv file
>>> class Fit(Node[FitArgs, float]):
...     def _run(self) -> float:
...         return 0.5
>>> Fit(FitArgs(dataset="d.csv")).run()   # doctest: +SKIP
0.5
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import threading
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, ClassVar, Generic, TypeVar

from phd_flow import keys
from phd_flow.config import Config, load_config
from phd_flow.errors import ArgsError, NodeDefinitionError, PhdFlowError, RunKilledError
from phd_flow.log import logger
from phd_flow.run.record import RunRecord

if typing.TYPE_CHECKING:
    from loguru import Logger

    from phd_flow.stages.manager import ManagedArtifact, Stage, StageManager
    from phd_flow.storage import Storage
    from phd_flow.tracking import MetricLog, MlflowRun

__all__ = ["Args", "Node", "RunOptions"]


@dataclass
class Args:
    """Base class for a node's arguments. Subclass it as a ``@dataclasses.dataclass``.

    Each field becomes a CLI option (``--field``); a comment after the field, or a docstring
    below it, is its ``--help`` text; a field without a default is required.
    """


ArgsT = TypeVar("ArgsT", bound=Args)
ResultT = TypeVar("ResultT")
ArgsU = TypeVar("ArgsU", bound=Args)
ResultU = TypeVar("ResultU")


@dataclass
class RunOptions:
    """Per-run options that are not the node's Args (set by CLI flags or by Python)."""

    key: str | None = None  # use this key instead of a new one (resume / requeue)
    load: dict[str, str] = field(default_factory=dict)  # stage -> run key to load it from
    skip_log: list[str] = field(default_factory=list)  # stages kept local only
    cache: bool | None = None  # None: per-stage config; True/False: force for every stage
    tags: dict[str, str] = field(default_factory=dict)  # extra MLflow tags (e.g. the sweep)
    rerun: list[str] = field(default_factory=list)  # node names that require() must not reuse
    parent: Node[Any, Any] | None = None  # set by Node.require for child runs
    sweep: str | None = None  # the sweep this run is a point of (recorded in run.json)


class Node(Generic[ArgsT, ResultT]):
    """A typed unit of research work. Subclass ``Node[YourArgs, YourResult]``, implement
    :meth:`_run`, and run it with ``python -m your_package run YourNode --field value`` or
    ``YourNode(YourArgs(...)).run()``.

    Inside ``_run``: ``self.args`` (the Args instance), ``self.key`` (the run key, path-like),
    ``self.output_dir`` (this run's directory), ``self.storage`` (local files + remote sync),
    ``self.logger`` (loguru, bound to this run), ``self.log_metric(...)`` and friends.
    """

    args_class: ClassVar[type[Args]]
    result_class: ClassVar[Any] = Any
    #: The top-level package the node lives in (its PROJECT_ROOT holds config/default.toml).
    package: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        top = cls.__module__.split(".", 1)[0]
        cls.package = None if top == "__main__" else top
        for base in getattr(cls, "__orig_bases__", ()):
            origin = typing.get_origin(base)
            if isinstance(origin, type) and issubclass(origin, Node):
                params = typing.get_args(base)
                if params and not isinstance(params[0], TypeVar):
                    _check_args_class(cls, params[0])
                    cls.args_class = params[0]
                    cls.result_class = params[1] if len(params) > 1 else Any

    # --- construction -----------------------------------------------------------------------

    def __init__(
        self,
        args: ArgsT | Mapping[str, Any] | Sequence[str] | None = None,
        *,
        config: Config | str | os.PathLike[str] | None = None,
        options: RunOptions | None = None,
    ) -> None:
        """Build a node from an Args instance, a dict of field values, or an argv list.

        ``config`` is a :class:`Config`, a path to a TOML file, or None for the project's
        ``config/default.toml`` (or $PHD_FLOW_CONFIG, or the embedded defaults).
        """
        self.args: ArgsT = self.make_args(args)
        self.options = options or RunOptions()
        self._config = config if isinstance(config, Config) else None
        self._config_path = None if isinstance(config, Config) else config
        self._key: keys.RunKey | None = None
        self._storage: Storage | None = None
        self._record: RunRecord | None = None
        self._mlflow: MlflowRun | None = None
        self._metrics: MetricLog | None = None
        self._kill_pending: int | None = None
        self._in_user_code = False
        #: True when this run continues an earlier attempt with the same key (a SLURM requeue
        #: after a time limit or preemption, ``sweep --resume``, ``run --key``): see checkpoint_dir.
        self.resumed = False
        self._stages: StageManager | None = None

    @classmethod
    def args_type(cls) -> type[ArgsT]:
        """The Args dataclass of this node (from ``Node[Args, Result]``)."""
        found = cls.__dict__.get("args_class") or getattr(cls, "args_class", None)
        if found is None:
            raise NodeDefinitionError(
                f"{cls.__qualname__} does not say which Args it takes. Declare it as "
                f"`class {cls.__name__}(Node[{cls.__name__}Args, {cls.__name__}Result])`."
            )
        return typing.cast("type[ArgsT]", found)

    @classmethod
    def make_args(cls, args: ArgsT | Mapping[str, Any] | Sequence[str] | None) -> ArgsT:
        """Turn an Args instance, a dict, or an argv list into this node's Args."""
        args_cls = cls.args_type()
        if isinstance(args, args_cls):
            return args
        if args is None:
            args = {}
        if isinstance(args, Mapping):
            return typing.cast(ArgsT, _from_mapping(args_cls, dict(args), cls.__name__))
        if isinstance(args, Sequence) and not isinstance(args, (str, bytes)):
            return cls.parse_argv(list(args))
        raise ArgsError(
            f"{cls.__name__} takes a {args_cls.__name__}, a dict or an argv list, not {type(args).__name__}."
        )

    @classmethod
    def parse_argv(cls, argv: list[str], prog: str | None = None) -> ArgsT:
        """Parse command-line arguments into this node's Args (exits 2 on bad input)."""
        parser = cls.argument_parser(prog)
        return typing.cast(ArgsT, parser.parse_args(argv).args)

    @classmethod
    def argument_parser(cls, prog: str | None = None) -> Any:
        """The simple-parsing parser for this node's Args."""
        import simple_parsing

        parser = simple_parsing.ArgumentParser(
            prog=prog or cls.__name__,
            description=cls.description(),
            add_config_path_arg=False,
        )
        parser.add_arguments(cls.args_type(), dest="args")
        return parser

    @classmethod
    def description(cls) -> str:
        """The node's docstring (its first line is what ``nodes`` shows)."""
        doc = cls.__doc__ if "__doc__" in cls.__dict__ else None
        return (doc or "").strip()

    # --- what _run sees ---------------------------------------------------------------------

    @property
    def config(self) -> Config:
        """The project config (loaded on first access)."""
        if self._config is None:
            self._config = load_config(project_root(type(self).package), self._config_path)
        return self._config

    @property
    def key(self) -> keys.RunKey:
        """This run's unique key; ``"datasets" / self.key / "x"`` gives a storage key."""
        if self._key is None:
            raise PhdFlowError("self.key exists once run() has started.")
        return self._key

    @property
    def run_path(self) -> str:
        """This run's directory relative to ``local_path``: the key, or
        ``<parent key>/<key>`` for a node run by :meth:`require`."""
        parent = self.options.parent
        return f"{parent.run_path}/{self.key}" if parent is not None else str(self.key)

    @property
    def output_dir(self) -> Path:
        """This run's directory: ``<local_path>/<key>`` (nested under the parent's for children)."""
        return self.config.local_path / self.run_path

    @property
    def checkpoint_dir(self) -> Path:
        """``<run dir>/checkpoint/``: save state there while running; when ``self.resumed`` is
        True (requeued or resumed under the same key), load it back and continue. Created on
        first access; synced with the run like any other file."""
        path = self.output_dir / "checkpoint"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def require(
        self,
        node: type[Node[ArgsU, ResultU]],
        args: ArgsU | Mapping[str, Any] | Sequence[str] | None = None,
        *,
        rerun: bool = False,
    ) -> ResultU:
        """Run another node as part of this one and return its Result (typed).

        The child runs in ``<this run dir>/<child key>/`` as a nested MLflow run, unless a
        completed run of the same node with the same args and source code exists: then its
        result is reused (the log says which run and why). ``rerun=True`` (or ``--rerun Node``
        on the command line) forces a new run. A failing child fails this run too.
        """
        from phd_flow.run.pipeline import require

        return typing.cast(ResultU, require(self, node, args, rerun))

    @property
    def storage(self) -> Storage:
        """Local files under ``local_path`` plus the configured remote (S3, B2, MLflow...)."""
        if self._storage is None:
            from phd_flow.storage import make_storage

            self._storage = make_storage(self.config)
            # A storage outage must not kill the experiment: failed uploads are retried at
            # the end of the run and by `sync` (see lifecycle._sync).
            self._storage.defer_failed_uploads = True
        return self._storage

    @property
    def logger(self) -> Logger:
        """loguru's logger bound to this run (``key`` and ``node`` in every record's extra)."""
        return logger.bind(key=str(self._key), node=type(self).__name__)

    @property
    def record(self) -> RunRecord:
        """This run's run.json."""
        if self._record is None:
            raise PhdFlowError("The run record exists once run() has started.")
        return self._record

    def log_metric(self, name: str, value: float, step: int | None = None, timestamp: int | None = None) -> None:
        """Record a metric: appended to metrics.jsonl, sent to MLflow in batches (µs per call)."""
        if self._metrics is None:
            raise PhdFlowError("log_metric works inside _run().")
        self._metrics.log(name, value, step, timestamp)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record several metrics at the same step."""
        for name, value in metrics.items():
            self.log_metric(name, value, step)

    def set_tag(self, key: str, value: Any) -> None:
        """Set an MLflow tag on this run (kept in run.json too)."""
        self.set_tags({key: value})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set several MLflow tags (kept in run.json's ``tags`` too)."""
        clean = {k: str(v) for k, v in tags.items()}
        self.record.update_section("tags", **clean)
        if self._mlflow is not None and self._mlflow.error is None:
            self._mlflow.set_tags(clean)

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> Path:
        """Copy a file or directory into this run's directory (and so into sync and MLflow)."""
        import shutil

        source = Path(path)
        target_dir = self.output_dir / keys.normalize(artifact_path) if artifact_path else self.output_dir
        target_dir.mkdir(parents=True, exist_ok=True)
        target = target_dir / source.name
        if source.is_dir():
            shutil.copytree(source, target, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)
        return target

    # --- stages -----------------------------------------------------------------------------

    def stage(self, name: str, depends_on: Sequence[str] | None = None) -> Stage:
        """A folder ``<run dir>/<name>/`` that can be loaded from an earlier run (README "Stages").

        ``with self.stage("load_data", depends_on=["dataset"]) as st:`` gives ``st.path`` and
        ``st.loaded``; ``depends_on`` (Args fields and earlier stages; default: all Args)
        makes up the fingerprint used by ``cache = true``. Raises :class:`StageError` when a
        loaded stage fails verification (nothing of it is used).
        """
        return self._stage_manager().stage(name, depends_on)

    def managed_artifact(self, name: str, stage: str | None = None) -> ManagedArtifact:
        """One file of this run (in ``stage``'s folder when given): ``.get_path()``, ``.loaded``."""
        return self._stage_manager().artifact(name, stage, is_dir=False)

    def managed_artifact_dir(self, name: str, stage: str | None = None) -> ManagedArtifact:
        """A folder of this run (in ``stage``'s folder when given): ``.get_path("f.png")``, ``.loaded``."""
        return self._stage_manager().artifact(name, stage, is_dir=True)

    def _stage_manager(self) -> StageManager:
        if self._stages is None or self._record is None:
            raise PhdFlowError("Stages and managed artifacts work inside _run().")
        return self._stages

    # --- running ----------------------------------------------------------------------------

    def _run(self) -> ResultT:
        """Your node's work. Return the Result; it is pickled to ``<key>/results.pickle``."""
        raise NodeDefinitionError(f"{type(self).__name__} must implement _run(self).")

    def run(self) -> ResultT:
        """Run the node: new key and directory, logs, MLflow run, ``_run()``, pickled result,
        sync to storage. Returns the Result.

        Raises :class:`RunFailedError` (from the original exception) when ``_run`` fails, and
        ``KeyboardInterrupt`` / :class:`RunKilledError` when the run was interrupted; in every
        case run.json, the logs and MLflow record the final status first.
        """
        if self._key is not None:
            raise PhdFlowError("A Node instance runs once; create a new one to run again.")
        from phd_flow.run import lifecycle

        return typing.cast(ResultT, lifecycle.execute(self))

    def _install_signal_handlers(self) -> dict[int, Any]:
        if threading.current_thread() is not threading.main_thread():
            return {}
        saved: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGUSR2) if hasattr(signal, "SIGUSR2") else (signal.SIGTERM,):
            if sig == getattr(signal, "SIGUSR2", None) and "SLURM_JOB_ID" in os.environ:
                continue  # submitit owns USR2 (checkpoint + requeue) inside SLURM jobs
            saved[sig] = signal.signal(sig, self._on_signal)
        return saved

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._kill_pending = signum
        if self._in_user_code:
            self._in_user_code = False
            raise RunKilledError(signal.Signals(signum).name)
        logger.warning(f"Received {signal.Signals(signum).name}; finishing the run's bookkeeping first.")


def _check_args_class(node: type, args_cls: Any) -> None:
    if isinstance(args_cls, TypeVar):
        return
    if not (isinstance(args_cls, type) and dataclasses.is_dataclass(args_cls)):
        raise NodeDefinitionError(
            f"{node.__qualname__}: the first parameter of Node[...] must be a dataclass "
            f"(subclass phd_flow.node.Args with @dataclasses.dataclass), got {args_cls!r}."
        )


def _from_mapping(args_cls: type[Any], values: dict[str, Any], node: str) -> Any:
    names = {f.name: f for f in dataclasses.fields(args_cls)}
    unknown = [k for k in values if k not in names]
    if unknown:
        from phd_flow.errors import closest

        raise ArgsError(
            f"{node}: unknown argument {unknown[0]!r} for {args_cls.__name__}."
            f"{closest(unknown[0], names)} Fields: {', '.join(names)}."
        )
    hints = typing.get_type_hints(args_cls)
    converted = {}
    for name, value in values.items():
        hint = hints.get(name)
        if isinstance(value, Mapping) and isinstance(hint, type) and dataclasses.is_dataclass(hint):
            value = _from_mapping(hint, dict(value), node)
        converted[name] = value
    try:
        return args_cls(**converted)
    except TypeError as exc:
        raise ArgsError(f"{node}: {exc}.") from None


def args_to_dict(args: Any) -> dict[str, Any]:
    """An Args instance as plain JSON-able data (nested dataclasses become dicts)."""
    return typing.cast(dict[str, Any], json.loads(json.dumps(dataclasses.asdict(args), default=_jsonable)))


def _jsonable(value: Any) -> Any:
    import enum

    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)


def project_root(package: str | None) -> Path:
    """PROJECT_ROOT: the directory holding ``package`` (the cwd when there is none)."""
    module = sys.modules.get(package or "")
    if module is None and package:
        import importlib

        module = importlib.import_module(package)
    file = getattr(module, "__file__", None)
    if not file:
        return Path.cwd()
    path = Path(file).resolve()
    # a package: .../root/pkg/__init__.py -> root; a single module: .../root/mod.py -> root
    return path.parent.parent if path.name == "__init__.py" else path.parent

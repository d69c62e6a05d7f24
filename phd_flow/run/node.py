"""``Node[Args, Result]``: the unit of work phd_flow runs, logs, tracks and syncs.

A Node holds its Args, its run options and its :class:`~phd_flow.project.Project`; while it
runs, everything about the run (key, directory, record, metrics, MLflow, stages, signals) lives
in one :class:`~phd_flow.run.active.ActiveRun`, and the Node's public properties delegate to it.

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

import os
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from phd_flow import keys
from phd_flow.config import Config
from phd_flow.errors import ArgsError, NodeDefinitionError, PhdFlowError
from phd_flow.log import logger
from phd_flow.project import Project
from phd_flow.run.args import (
    Args,
    args_file_argv,
    check_args_class,
    from_mapping,
    load_args_file,
    option_strings,
    same_option,
)
from phd_flow.run.options import RunOptions
from phd_flow.run.record import CHECKPOINT_DIR

if typing.TYPE_CHECKING:
    from loguru import Logger

    from phd_flow.run.active import ActiveRun
    from phd_flow.run.record import RunRecord
    from phd_flow.stages.manager import ManagedArtifact, Stage
    from phd_flow.storage.facade import Storage

__all__ = ["Args", "Node", "RunOptions"]

ArgsT = TypeVar("ArgsT", bound=Args)
ResultT = TypeVar("ResultT")
ArgsU = TypeVar("ArgsU", bound=Args)
ResultU = TypeVar("ResultU")

ARGS_FILE_FLAG = "--args-file"
ARGS_FILE_DEST = "phd_flow_args_file"


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
                    check_args_class(cls, params[0])
                    cls.args_class = params[0]
                    cls.result_class = params[1] if len(params) > 1 else Any

    # --- construction -----------------------------------------------------------------------

    def __init__(
        self,
        args: ArgsT | Mapping[str, Any] | Sequence[str] | None = None,
        *,
        config: Config | Project | str | os.PathLike[str] | None = None,
        options: RunOptions | None = None,
    ) -> None:
        """Build a node from an Args instance, a dict of field values, or an argv list.

        ``config`` is a :class:`Config`, a path to a TOML file, a :class:`Project`, or None for
        the project's ``config/default.toml`` (or $PHD_FLOW_CONFIG, or the embedded defaults).
        """
        self.args: ArgsT = self.make_args(args)
        self.options = options or RunOptions()
        self.project = Project.of(config, type(self).package)
        self._active: ActiveRun | None = None

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
            return typing.cast(ArgsT, from_mapping(args_cls, dict(args), cls.__name__))
        if isinstance(args, Sequence) and not isinstance(args, (str, bytes)):
            return cls.parse_argv(list(args))
        raise ArgsError(
            f"{cls.__name__} takes a {args_cls.__name__}, a dict or an argv list, not {type(args).__name__}."
        )

    @classmethod
    def parse_argv(cls, argv: list[str], prog: str | None = None, *, args_file: str | None = None) -> ArgsT:
        """Parse command-line arguments into this node's Args (exits 2 on bad input).

        ``--args-file FILE`` in ``argv`` (or ``args_file``) reads the args from a .json, .toml or
        .yaml file first; options in ``argv`` override the file's values.
        """
        parser = cls.argument_parser(prog)
        return typing.cast(ArgsT, cls.parse_with(parser, argv, args_file).args)

    @classmethod
    def parse_with(cls, parser: Any, argv: Sequence[str], args_file: str | None = None) -> Any:
        """Parse ``argv`` with ``parser`` (from :meth:`argument_parser`, maybe with more options),
        after the values of the args file (``--args-file`` in ``argv`` wins over ``args_file``)."""
        import argparse

        argv = list(argv)
        if any(a.dest == ARGS_FILE_DEST for a in parser._actions):
            pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
            pre.add_argument(ARGS_FILE_FLAG, dest="file", action="append", default=[])
            known, _ = pre.parse_known_args(argv)
            args_file = known.file[-1] if known.file else args_file
        if args_file:
            values = load_args_file(args_file)
            option_strings(parser)
            argv = args_file_argv(parser, cls.args_type(), values, f"--args-file {args_file}") + argv
        return parser.parse_args(argv)

    @classmethod
    def argument_parser(cls, prog: str | None = None) -> Any:
        """The simple-parsing parser for this node's Args (plus ``-h``/``--help`` and
        ``--args-file`` where no field of the node has those names)."""
        import simple_parsing

        parser = simple_parsing.ArgumentParser(
            prog=prog or cls.__name__,
            description=cls.description(),
            add_config_path_arg=False,
            add_help=False,
        )
        parser.add_arguments(cls.args_type(), dest="args")
        taken = option_strings(parser)
        help_flags = [flag for flag in ("-h", "--help") if flag not in taken]
        if help_flags:
            parser.add_argument(*help_flags, action="help", help="show this help message and exit")
        if not same_option(ARGS_FILE_FLAG, taken):
            parser.add_argument(
                ARGS_FILE_FLAG,
                dest=ARGS_FILE_DEST,
                metavar="FILE",
                help="read the node's arguments from FILE (.json, .toml, .yaml); options given here override it",
            )
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
        return self.project.config

    @property
    def active(self) -> ActiveRun:
        """The run in progress (key, directory, record, metrics, MLflow, stages)."""
        if self._active is None:
            raise PhdFlowError("The run exists once run() has started.")
        return self._active

    @property
    def started(self) -> bool:
        """True once :meth:`run` has created the run (its key and directory exist)."""
        return self._active is not None

    @property
    def key(self) -> keys.RunKey:
        """This run's unique key; ``"datasets" / self.key / "x"`` gives a storage key."""
        if self._active is None:
            raise PhdFlowError("self.key exists once run() has started.")
        return self._active.key

    @property
    def resumed(self) -> bool:
        """True when this run continues an earlier attempt with the same key (a SLURM requeue
        after a time limit or preemption, ``sweep --resume``, ``run --key``): see checkpoint_dir."""
        return self._active is not None and self._active.resumed

    @property
    def run_path(self) -> str:
        """This run's directory relative to ``local_path``: the key, or
        ``<parent key>/<key>`` for a node run by :meth:`require`."""
        return self.active.run_path

    @property
    def output_dir(self) -> Path:
        """This run's directory: ``<local_path>/<key>`` (nested under the parent's for children)."""
        return self.active.run_dir

    @property
    def checkpoint_dir(self) -> Path:
        """``<run dir>/checkpoint/``: save state there while running; when ``self.resumed`` is
        True (requeued or resumed under the same key), load it back and continue. Created on
        first access; synced with the run like any other file."""
        path = self.output_dir / CHECKPOINT_DIR
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def kill_signal(self) -> int | None:
        """The signal that interrupted this run (SIGINT, SIGTERM...), or None."""
        return self._active.kill_signal if self._active is not None else None

    def save_checkpoint(self) -> None:
        """Called on SLURM's time-limit/preemption signal, just before the job is requeued
        under the same key. Override it to write state into :attr:`checkpoint_dir`."""

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

        return typing.cast(ResultU, require(self.active, node, args, rerun))

    @property
    def storage(self) -> Storage:
        """Local files under ``local_path`` plus the configured remote (S3, B2, MLflow...)."""
        return self.project.storage

    @property
    def logger(self) -> Logger:
        """loguru's logger bound to this run (``key`` and ``node`` in every record's extra)."""
        key = self._active.key if self._active is not None else None
        return logger.bind(key=str(key), node=type(self).__name__)

    @property
    def record(self) -> RunRecord:
        """This run's run.json."""
        if self._active is None or self._active.record is None:
            raise PhdFlowError("The run record exists once run() has started.")
        return self._active.record

    def log_metric(self, name: str, value: float, step: int | None = None, timestamp: int | None = None) -> None:
        """Record a metric: appended to metrics.jsonl, sent to MLflow in batches (µs per call)."""
        if self._active is None or self._active.metrics is None:
            raise PhdFlowError("log_metric works inside _run().")
        self._active.metrics.log(name, value, step, timestamp)

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Record several metrics at the same step."""
        for name, value in metrics.items():
            self.log_metric(name, value, step)

    def set_tag(self, key: str, value: Any) -> None:
        """Set an MLflow tag on this run (kept in run.json too)."""
        self.set_tags({key: value})

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set several MLflow tags (kept in run.json's ``tags`` too)."""
        self.active.set_tags(tags)

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
        """A folder ``<run dir>/<name>/`` that can be loaded from an earlier run (docs/stages.md).

        ``with self.stage("load_data", depends_on=["dataset"]) as st:`` gives ``st.path`` and
        ``st.loaded``; ``depends_on`` (Args fields and earlier stages; default: all Args)
        makes up the fingerprint used by ``cache = true``. Raises :class:`StageError` when a
        loaded stage fails verification (nothing of it is used).
        """
        return self.active.stage_manager().stage(name, depends_on)

    def managed_artifact(self, name: str, stage: str | None = None) -> ManagedArtifact:
        """One file of this run (in ``stage``'s folder when given): ``.get_path()``, ``.loaded``."""
        return self.active.stage_manager().artifact(name, stage, is_dir=False)

    def managed_artifact_dir(self, name: str, stage: str | None = None) -> ManagedArtifact:
        """A folder of this run (in ``stage``'s folder when given): ``.get_path("f.png")``, ``.loaded``."""
        return self.active.stage_manager().artifact(name, stage, is_dir=True)

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
        if self._active is not None:
            raise PhdFlowError("A Node instance runs once; create a new one to run again.")
        from phd_flow.run import lifecycle
        from phd_flow.run.active import ActiveRun

        self._active = ActiveRun.create(self)  # stage rules checked, key chosen; nothing written yet
        return typing.cast(ResultT, lifecycle.execute(self._active))

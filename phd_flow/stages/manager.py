"""Stages: folders of a run that can be loaded from an earlier run, kept local, or reused by
fingerprint.

>>> with self.stage("load_data", depends_on=["dataset", "seed"]) as st:   # doctest: +SKIP
...     if st.loaded:
...         train = pd.read_csv(st.path / "train.csv")
...     else:
...         train = expensive_preprocessing()
...         train.to_csv(st.path / "train.csv")

Rules come from ``[stages.NAME]`` in the config and from the run options (``--load``,
``--skip-log``, ``--cache`` / ``--no-cache``, which win). They are checked by :func:`prepare`
before the run directory exists; a rule that points at nothing is a :class:`StageError` naming
the rule. Each stage's provenance (loaded, loaded_from, per-file sha256, fingerprint) goes to
run.json's ``stages`` section when it opens and closes, and to MLflow tags
``phd_flow.stage.<name>.loaded_from`` / ``.logged``.
"""

from __future__ import annotations

import abc
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from phd_flow import reuse
from phd_flow.errors import PhdFlowError, StageError
from phd_flow.log import logger
from phd_flow.run import signing
from phd_flow.run.args import args_to_dict
from phd_flow.run.record import RESERVED_NAMES, utcnow
from phd_flow.stages import sources as stage_sources
from phd_flow.stages.sources import Source

if typing.TYPE_CHECKING:
    from phd_flow.config import Config
    from phd_flow.run.node import Node

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass
class Rule:
    """The effective rule for one stage: config ``[stages.NAME]`` merged with run options."""

    stage: str
    load_from: str | None = None
    skip_log: bool = False
    cache: bool = False
    origins: list[str] = field(default_factory=list)  # where each setting came from (messages)
    load_origin: str = ""


def merge_rules(config: Config, options: Any) -> dict[str, Rule]:
    """Config rules overlaid with ``--load`` / ``--skip-log`` / ``--cache`` / ``--no-cache``."""
    rules: dict[str, Rule] = {}
    for name, configured in config.stages.items():
        where = config.where(f"stages.{name}")
        load_where = config.where(f"stages.{name}.load_from")
        rules[name] = Rule(
            name,
            configured.load_from,
            configured.skip_log,
            configured.cache,
            origins=[f"[stages.{name}] ({where})"],
            load_origin=f"{load_where} [stages.{name}] load_from = {configured.load_from!r}",
        )
    for name, value in options.load.items():
        rule = rules.setdefault(name, Rule(name))
        rule.load_from, rule.load_origin = value, f"--load {name}={value}"
        rule.origins.append(f"--load {name}={value}")
    for name in options.skip_log:
        rule = rules.setdefault(name, Rule(name))
        rule.skip_log = True
        rule.origins.append(f"--skip-log {name}")
    return rules


def _check_name(name: str) -> None:
    if not _NAME.match(name) or name in RESERVED_NAMES:
        raise StageError(
            f"Stage name {name!r} is not allowed: use letters, digits, '_', '-' and '.' "
            "(not first), "
            f"and none of {', '.join(sorted(RESERVED_NAMES))}."
        )


def _check_declared(node_cls: type, rules: dict[str, Rule]) -> None:
    """A rule for a stage no code of the node's package opens (by a literal name) is a typo:
    :class:`StageError` with "did you mean", before anything runs."""
    from phd_flow.errors import closest
    from phd_flow.stages.declared import declared_stages

    declared = declared_stages(node_cls.__module__)
    if declared is None:  # names computed at run time: unused rules are warned about at the end
        return
    for stage, rule in rules.items():
        if stage in declared or not (rule.load_from or rule.skip_log or rule.cache):
            continue
        package = node_cls.__module__.split(".", 1)[0]
        raise StageError(
            f"{', '.join(rule.origins)}: no code of {package} opens a stage {stage!r}."
            f"{closest(stage, declared)} The stages its nodes open: {', '.join(sorted(declared)) or 'none'}. "
            "Fix the stage name or remove the rule."
        )


def prepare(node: Node[Any, Any]) -> StageManager:
    """Check every stage rule before the run starts and resolve what to load.

    Raises :class:`StageError` naming the rule (config file:line or ``--load``) and the run
    when a rule points to a run that does not exist, did not complete, or lacks the stage.
    """
    config, name = node.config, type(node).__name__
    rules = merge_rules(config, node.options)
    sources: dict[str, Source | None] = {}
    for stage in rules:
        _check_name(stage)
    if node.options.parent is None:  # a pipeline's first run checks for the whole pipeline
        _check_declared(type(node), rules)
    for stage, rule in rules.items():
        if rule.load_from and rule.load_from != stage_sources.LATEST:  # latest: when opened
            sources[stage] = stage_sources.resolve(node.project, name, stage, rule.load_from, rule.load_origin)
    return StageManager(node, rules, sources)


# --- stages in a run ----------------------------------------------------------------------------


class Stage:
    """A folder of this run, ``<run dir>/<name>/``. Use it as a context manager; see the module
    docstring. ``path``, ``loaded`` (files came from an earlier run), ``loaded_from`` (that
    run's key), ``cached`` (reused by fingerprint) and ``fingerprint`` are set on entry."""

    def __init__(self, manager: StageManager, name: str, depends_on: list[str] | None) -> None:
        self.name = name
        self.path = manager.run_dir / name
        self.depends_on = depends_on
        self.loaded = False
        self.cached = False
        self.loaded_from: str | None = None
        self.fingerprint: str | None = None
        self.inputs: dict[str, Any] = {}
        self.source_inputs: dict[str, Any] | None = None  # a loaded stage's inputs in its source
        self.kept = False  # completed by an earlier attempt of this run (same key), verified, kept
        self.source_status: str | None = None  # "failed"/"killed" when loaded from such a run
        self.sha256: str | None = None
        self.completed = False
        self._manager = manager
        self._depth = 0
        self._opened = False

    @property
    def skip_log(self) -> bool:
        """True when the stage stays local: not synced, not logged to MLflow."""
        rule = self._manager.rules.get(self.name)
        return rule.skip_log if rule else False

    def __enter__(self) -> Stage:
        if self._depth == 0 and not self._opened:
            self._opened = True
            try:
                self._manager.open(self)
            except BaseException as exc:  # a failed load is recorded, and nothing of it is used
                self._manager.close(self, exc)
                raise
        self._depth += 1
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._manager.close(self, exc)

    def __repr__(self) -> str:
        return f"Stage({self.name!r}, path={str(self.path)!r}, loaded={self.loaded})"


class ArtifactPath(abc.ABC):
    """``get_path()`` of a managed artifact (a Node's, or a plain MLflow script's)."""

    is_dir: bool

    @property
    @abc.abstractmethod
    def path(self) -> Path:
        """The artifact's file or folder."""

    def get_path(self, name: str | None = None) -> Path:
        """The artifact's path; for a folder, ``get_path("plot1.png")`` is a file inside it."""
        if name is None:
            return self.path
        if not self.is_dir:
            raise PhdFlowError(f"{self.path.name} is a single file; get_path() takes no name.")
        return self.path / name


class ManagedArtifact(ArtifactPath):
    """One file or folder of this run (mlflowhelper's managed artifacts), optionally inside a
    stage so it can be loaded from an earlier run. ``get_path()`` is where to write or read."""

    def __init__(self, run_dir: Path, name: str, stage: Stage | None, is_dir: bool) -> None:
        self._path = (stage.path if stage is not None else run_dir) / name
        self.stage = stage
        self.is_dir = is_dir

    @property
    def path(self) -> Path:
        """The file or folder, in this run's directory."""
        return self._path

    @property
    def loaded(self) -> bool:
        """True when the artifact came from an earlier run (its stage was loaded)."""
        return self.stage is not None and self.stage.loaded and self.path.exists()

    def __enter__(self) -> ManagedArtifact:
        if self.stage is not None:
            self.stage.__enter__()
        (self.path if self.is_dir else self.path.parent).mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.stage is not None:
            self.stage.__exit__(exc_type, exc, tb)


class StageManager:
    """The stages of one run: applies rules on open, records provenance on close."""

    def __init__(self, node: Node[Any, Any], rules: dict[str, Rule], sources: dict[str, Source | None]) -> None:
        self.node = node
        self.rules = rules
        self.sources = sources
        self.stages: dict[str, Stage] = {}
        #: Stages opened by the runs this one required (reused ones: as they recorded them).
        self.opened_by_children: set[str] = set()
        #: run.json ``stages`` of an earlier attempt under this key (requeue, resume, --key).
        self.earlier: dict[str, Any] = {}

    @property
    def run_dir(self) -> Path:
        return self.node.output_dir

    def stage(self, name: str, depends_on: Sequence[str] | None = None) -> Stage:
        """The stage ``name`` of this run (the same object when opened again)."""
        _check_name(name)
        if name not in self.stages:
            self.stages[name] = Stage(self, name, list(depends_on) if depends_on is not None else None)
        return self.stages[name]

    def artifact(self, name: str, stage: str | None, is_dir: bool) -> ManagedArtifact:
        """A managed file or folder, inside ``stage`` when given."""
        from phd_flow.keys import normalize

        normalize(name)
        return ManagedArtifact(self.run_dir, name, self.stage(stage) if stage else None, is_dir)

    # --- opening ------------------------------------------------------------------------------

    def remember_earlier(self, run_dir: Path) -> None:
        """Before a resumed attempt's record replaces the earlier one: keep its stages."""
        from phd_flow.errors import CorruptRunError
        from phd_flow.run.record import RunRecord

        try:
            stages = RunRecord.load(run_dir).data.get("stages") or {}
        except (CorruptRunError, OSError):
            stages = {}
        self.earlier = {k: v for k, v in stages.items() if stage_sources.is_complete(v)}

    def open(self, stage: Stage) -> None:
        stage.path.mkdir(parents=True, exist_ok=True)
        stage.inputs = self._inputs(stage, reuse.user_frame())
        stage.fingerprint = reuse.fingerprint(stage.name, stage.inputs)
        if self._keep(stage):
            self._record(stage, status="open")
            return
        self._record(stage, status="open")  # skip_log is in run.json before any sync
        stage_sources.unshare(stage.path)  # an earlier attempt's files linked with another run
        rule = self.rules.get(stage.name)
        forced = self.node.options.cache  # --cache / --no-cache win over [stages.NAME] cache
        if rule is not None and rule.load_from:
            self._load(stage, rule)
        elif forced or (forced is None and rule is not None and rule.cache):
            self._reuse(stage)
        elif forced is False:
            logger.info(f"Stage {stage.name!r}: recomputed because --no-cache was given.")

    def _keep(self, stage: Stage) -> bool:
        """Keep a stage an earlier attempt of this run completed, with the same inputs and every
        file as it recorded: no recompute on a re-run key, resumed sweep point or requeue."""
        import json

        info = self.earlier.get(stage.name)
        if info is None or self.node.options.cache is False:
            return False

        def same(a: Any, b: Any) -> bool:
            return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)

        if not same(info.get("inputs"), stage.inputs):
            logger.info(f"Stage {stage.name!r}: the earlier attempt's copy had other inputs; not kept.")
            return False
        if stage_sources.hash_tree(stage.path) != info.get("files"):
            logger.info(f"Stage {stage.name!r}: the earlier attempt's files changed since; not kept.")
            return False
        stage.loaded, stage.kept = True, True
        stage.loaded_from, stage.cached = info.get("loaded_from"), bool(info.get("cached"))
        stage.fingerprint = info.get("fingerprint") or stage.fingerprint
        theirs = info.get("source_inputs")
        stage.source_inputs = dict(theirs) if isinstance(theirs, dict) else None
        logger.info(f"Stage {stage.name!r}: kept from the earlier attempt (files verified).")
        return True

    def _inputs(self, stage: Stage, frame: FrameType | None) -> dict[str, Any]:
        """Its ``depends_on`` values, earlier stages' fingerprints, and the code the stage runs
        (its ``with`` block in ``frame`` and what that uses: :func:`reuse.code_of_stage`)."""
        from phd_flow.tracking import flatten

        node_cls = type(self.node)
        args = args_to_dict(self.node.args)
        flat = flatten(args)
        names = stage.depends_on if stage.depends_on is not None else sorted(args)
        values: dict[str, Any] = {}
        stages: dict[str, str | None] = {}
        for dep in names:
            if dep in args or dep in flat:
                values[dep] = args[dep] if dep in args else flat[dep]
            elif dep in self.stages and dep != stage.name and self.stages[dep]._opened:
                other = self.stages[dep]
                stages[dep] = other.fingerprint
            else:
                others = ", ".join(n for n in self.stages if n != stage.name) or "none"
                raise StageError(
                    f"{node_cls.__name__}.stage({stage.name!r}, depends_on=...): {dep!r} is "
                    f"neither a field of {node_cls.args_type().__name__} ({', '.join(args)}) nor "
                    f"a stage opened earlier in this run ({others})."
                )
        # a stage naming its depends_on counts earlier stages through them, not through their code
        code = reuse.code_of_stage(node_cls, stage.name, frame, others_left_out=stage.depends_on is not None)
        return reuse.inputs_of(node_cls, values, stages, code)

    def _load(self, stage: Stage, rule: Rule) -> None:
        name = type(self.node).__name__
        if rule.load_from == stage_sources.LATEST:
            # only a run whose stage had this run's inputs (depends_on values, code, stages)
            source = stage_sources.latest(self.node.project, name, stage.name, stage.fingerprint)
        else:
            source = self.sources.get(stage.name)
        if source is None:
            logger.info(
                f"Stage {stage.name!r}: no completed {name} run has it yet with the same inputs "
                f"({reuse.describe_inputs(stage.inputs)}) ({rule.load_origin}); computing it."
            )
            return
        wanted = stage.fingerprint
        self._fetch(stage, source)
        logger.info(f"Stage {stage.name!r}: loaded from {source.key} ({rule.load_origin}).")
        theirs = source.info.get("fingerprint")
        if stage.source_inputs is not None and theirs and theirs != wanted:
            logger.warning(
                f"Stage {stage.name!r}: {source.key} made it with other inputs than this run's: "
                f"{reuse.explain_changes(stage.source_inputs, stage.inputs)}. Its files are used "
                "as they are (run.json records both inputs)."
            )

    def _fetch(self, stage: Stage, source: Source) -> None:
        files = stage_sources.fetch(self.node.project, source, stage.name, stage.path)
        stage.loaded, stage.loaded_from = True, source.key
        # A loaded stage carries its source's fingerprint: that is what its content came from.
        stage.fingerprint = source.info.get("fingerprint") or stage_sources.digest(files)
        theirs = source.info.get("inputs")
        stage.source_inputs = dict(theirs) if isinstance(theirs, dict) else None
        if source.status != "completed":
            stage.source_status = source.status
            logger.info(
                f"Stage {stage.name!r}: {source.key} is a {source.status} run; its stage completed and "
                "its files verified, so it is used (run.json: source_status)."
            )

    def _reuse(self, stage: Stage) -> None:
        config = self.node.config
        entries = reuse.ReuseIndex(config.local_path, reuse.STAGES, stage.name).entries()
        for entry in reversed(entries):
            if entry.get("fingerprint") != stage.fingerprint:
                continue
            try:
                source = stage_sources.phd_flow_source(
                    self.node.project,
                    str(entry["path"]),
                    stage.name,
                    f"the stage cache of {stage.name!r}",
                )
                self._fetch(stage, source)
            except PhdFlowError as exc:
                logger.warning(f"Stage {stage.name!r}: cannot reuse {entry.get('key')} ({exc}).")
                continue
            stage.cached = True
            logger.info(
                f"Stage {stage.name!r}: reused from {source.key} because the fingerprint matched "
                f"({reuse.describe_inputs(stage.inputs)})."
            )
            return
        logger.info(f"Stage {stage.name!r}: recomputed because {self._why_new(stage, entries)}.")

    def _why_new(self, stage: Stage, entries: list[dict[str, Any]]) -> str:
        name = type(self.node).__name__
        same_node = [e for e in entries if e.get("node") == name] or entries
        if not same_node:
            return f"no completed run has stage {stage.name!r} yet"
        last = reuse.closest(same_node, stage.inputs) or same_node[-1]  # the closest earlier run
        changes = reuse.explain_changes(last.get("inputs", {}), stage.inputs)
        return f"{changes} (compared with {last.get('key')})"

    # --- closing ------------------------------------------------------------------------------

    def close(self, stage: Stage, error: BaseException | None) -> None:
        if error is not None:
            self._record(stage, status="failed")
            return
        files = stage_sources.hash_tree(stage.path)
        if stage.loaded_from and not stage.kept:  # identical files: one copy on disk
            stage_sources.store_once(self.node.config, stage.name, stage.loaded_from, stage.path, files)
        stage.sha256 = stage_sources.digest(files)
        stage.completed = True
        config, key = self.node.config, str(self.node.key)
        secret = signing.signing_key(config)
        mac = signing.stage_mac(secret, key, stage.name, stage.sha256) if secret is not None else None
        signing.remember_stage(config.local_path, key, stage.name, stage.sha256)
        self._record(stage, status="completed", files=files, mac=mac)
        if not stage.loaded:  # indexed now, not at the end: a failed run's completed stages are cached too
            try:
                self._index(stage)
            except OSError as exc:
                logger.warning(f"Stage {stage.name!r}: the stage cache index could not be written ({exc}).")
        tags = {f"phd_flow.stage.{stage.name}.logged": str(not stage.skip_log).lower()}
        if stage.loaded_from:
            tags[f"phd_flow.stage.{stage.name}.loaded_from"] = stage.loaded_from
        try:
            self.node.set_tags(tags)
        except Exception as exc:  # MLflow trouble never fails the run; run.json has the tags
            logger.warning(f"Could not tag stage {stage.name!r} in MLflow ({type(exc).__name__}: {exc}).")

    def _record(self, stage: Stage, status: str, files: dict[str, str] | None = None, mac: str | None = None) -> None:
        info = {
            "status": status,
            "loaded": stage.loaded,
            "loaded_from": stage.loaded_from,
            "cached": stage.cached,
            "skip_log": stage.skip_log,
            "fingerprint": stage.fingerprint,
            "inputs": stage.inputs,
            "sha256": stage.sha256,
            "files": files or {},
        }
        if stage.loaded:  # this run's inputs above; those the source made the stage with here
            info["source_inputs"] = stage.source_inputs
        if stage.source_status:
            info["source_status"] = stage.source_status  # loaded from a failed or killed run
        if stage.kept:
            info["kept"] = True  # made by an earlier attempt of this run, verified
        if mac is not None:
            info["hmac"] = mac  # over run key + stage + digest(files), with the lab's signing key
        self.node.record.update_section("stages", **{stage.name: info})

    def finish(self) -> None:
        """At the end of a completed run: warn about unused rules (stages are indexed on close)."""
        parent = self.node.options.parent
        if parent is not None:  # the pipeline's first run warns, once, for the whole pipeline
            parent.active.stages.opened_by_children.update(set(self.stages) | self.opened_by_children)
            return
        opened_anywhere = set(self.stages) | self.opened_by_children
        unused = [
            rule
            for name, rule in self.rules.items()
            if name not in opened_anywhere and (rule.load_from or rule.skip_log or rule.cache)
        ]
        if unused:
            opened = ", ".join([*self.stages, *sorted(self.opened_by_children - set(self.stages))]) or "none"
            who = "it never opened these stages; it opened"
            if self.opened_by_children:
                who = "no run of the pipeline opened these stages; they opened"
            listed = "; ".join(", ".join(rule.origins) for rule in unused)
            logger.warning(
                f"Stage rules not used by {type(self.node).__name__} ({who}: {opened}): {listed}. "
                "Check the stage names."
            )

    def _index(self, stage: Stage) -> None:
        """Add a computed stage to the stage cache (a loaded one is indexed under its maker)."""
        entry = {
            "key": str(self.node.key),
            "path": self.node.run_path,
            "node": type(self.node).__name__,
            "fingerprint": stage.fingerprint,
            "inputs": stage.inputs,
            "sha256": stage.sha256,
            "ended_at": utcnow(),
        }
        reuse.ReuseIndex(self.node.config.local_path, reuse.STAGES, stage.name).append(entry)

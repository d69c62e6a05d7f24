"""Sweeps: a grid of points of one node, each point a normal run with a key assigned up front.

The sweep itself is a record, ``<local_path>/Sweep_<time>_<suffix>/run.json`` with
``kind = "sweep"``: the node, the grid, the base arguments, the executor and, per point, its run
key, its grid values, the argv it runs with and its last known status. Point statuses are read
back from each point's own run.json (the source of truth), so ``show`` and ``--resume`` see what
really happened, on this machine or on a cluster.
"""

from __future__ import annotations

import argparse
import itertools
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from phd_flow import keys
from phd_flow._io import atomic_write_json
from phd_flow.errors import ArgsError, CorruptRunError, InvalidKeyError, RunNotFoundError, closest
from phd_flow.run.record import COMPLETED, FAILED, KILLED, RUN_FILE, RUNNING, RunRecord, utcnow

if typing.TYPE_CHECKING:
    from phd_flow.config import Config
    from phd_flow.project import Project
    from phd_flow.run.node import Node

SWEEP_KIND = "sweep"
SWEEP_PREFIX = "Sweep"
#: Point states that exist only in the sweep record (the point has no run.json yet, or lost it).
PENDING, SUBMITTED, STALE, LOST = "pending", "submitted", "stale", "lost"
#: A point whose attempt was killed by SLURM's time limit or a preemption and whose task is back
#: in the queue (shown by ``sweep --status``; never stored).
REQUEUED = "requeued"
FINISHED = (COMPLETED, FAILED, KILLED, LOST)


@dataclass(frozen=True)
class GridAxis:
    """One ``--grid FIELD=V1,V2``: the field's CLI option and the raw and parsed values."""

    name: str  # the field as the user wrote it (``seed``, ``optim.lr`` or ``lr``)
    option: str  # the node parser's option string (``--seed``)
    raw: tuple[str, ...]  # the values as given, passed on the command line of each point
    values: tuple[Any, ...]  # the values parsed with the field's type (for the record)


# --- grid parsing -------------------------------------------------------------------------------


def parse_grid(node_cls: type[Node[Any, Any]], base_argv: Sequence[str], grid: Sequence[str]) -> list[GridAxis]:
    """Parse ``--grid`` items against the node's argument parser.

    Every value goes through the parser's own type and choices for that field, and every point
    (base arguments + one value per axis) is parsed in full, so a bad value, an unknown field or a
    missing required argument raises :class:`ArgsError` before anything runs.
    """
    if not grid:
        raise ArgsError("sweep needs at least one --grid FIELD=V1,V2,... (e.g. --grid seed=1,2,3).")
    actions = _field_actions(node_cls)
    axes: list[GridAxis] = []
    for item in grid:
        name, sep, text = item.partition("=")
        name = name.strip().removeprefix("--")
        if not sep or not name or not text.strip():
            raise ArgsError(f"--grid {item!r}: write it as FIELD=V1,V2,... (e.g. --grid seed=1,2,3).")
        if any(axis.name == name for axis in axes):
            raise ArgsError(f"--grid {name} is given twice: list all its values in one --grid {name}=...")
        action = _find_action(node_cls, actions, name)
        raw = tuple(v.strip() for v in text.split(","))
        values = tuple(_convert(node_cls, name, action, v) for v in raw)
        axes.append(GridAxis(name, action.option_strings[0], raw, values))
    for argv in (point_argv(base_argv, axes, combo) for combo in _combos(axes)):
        parse_point(node_cls, argv)
    return axes


def _field_actions(node_cls: type[Node[Any, Any]]) -> dict[str, argparse.Action]:
    """The parser's actions by dotted field path (``seed``, ``optim.lr``)."""
    parser = node_cls.argument_parser()
    preprocess = getattr(parser, "_preprocessing", None)  # simple-parsing adds actions lazily
    if callable(preprocess):
        preprocess()
    return {a.dest.removeprefix("args."): a for a in parser._actions if a.dest.startswith("args.")}


def field_action(node_cls: type[Node[Any, Any]], name: str, option: str = "--grid") -> argparse.Action:
    """The node parser's action of field ``name``; :class:`ArgsError` with the closest name."""
    return _find_action(node_cls, _field_actions(node_cls), name, option)


def convert_value(
    node_cls: type[Node[Any, Any]], name: str, action: argparse.Action, text: str, option: str = "--grid"
) -> Any:
    """``text`` parsed with the field's type and checked against its choices."""
    return _convert(node_cls, name, action, text, option)


def _find_action(
    node_cls: type[Node[Any, Any]], actions: dict[str, argparse.Action], name: str, option: str = "--grid"
) -> argparse.Action:
    if name in actions:
        return actions[name]
    by_option = [a for a in actions.values() if f"--{name}" in a.option_strings]
    if len(by_option) == 1:
        return by_option[0]
    known = sorted(actions)
    raise ArgsError(
        f"{option} {name}: {node_cls.__name__} has no argument {name!r}.{closest(name, known)} "
        f"Its arguments: {', '.join(known)}."
    )


def _convert(
    node_cls: type[Node[Any, Any]], name: str, action: argparse.Action, text: str, option: str = "--grid"
) -> Any:
    convert = action.type if callable(action.type) else str
    many = action.nargs in ("*", "+") or (isinstance(action.nargs, int) and action.nargs > 1)
    items = text.split() if many else [text]
    try:
        values = [convert(item) for item in items]
    except (TypeError, ValueError, argparse.ArgumentTypeError):
        kind = getattr(convert, "__name__", "value")
        kind = "bool (true/false/yes/no/1/0)" if kind == "str2bool" else kind
        raise ArgsError(
            f"{option} {name}: {text!r} is not a valid {kind} for {node_cls.__name__}'s argument {name!r}."
        ) from None
    if action.choices is not None:
        bad = [v for v in values if v not in action.choices]
        if bad:
            accepted = ", ".join(str(c) for c in action.choices)
            raise ArgsError(
                f"{option} {name}: {bad[0]!r} is not accepted for {node_cls.__name__}'s "
                f"argument {name!r}.{closest(str(bad[0]), [str(c) for c in action.choices])} "
                f"Accepted values: {accepted}."
            )
    return values if many else values[0]


def _combos(axes: Sequence[GridAxis]) -> Iterator[tuple[int, ...]]:
    return itertools.product(*(range(len(axis.raw)) for axis in axes))


def point_argv(base_argv: Sequence[str], axes: Sequence[GridAxis], combo: Sequence[int]) -> list[str]:
    """The node's argv for one point: the base arguments, then one ``--field value`` per axis
    (argparse keeps the last value, so a grid field given in the base arguments is overridden)."""
    argv = list(base_argv)
    for axis, index in zip(axes, combo, strict=True):
        argv.append(axis.option)
        argv.extend(axis.raw[index].split() if _is_list(axis) else [axis.raw[index]])
    return argv


def _is_list(axis: GridAxis) -> bool:
    return bool(axis.values) and isinstance(axis.values[0], list)


def parse_point(node_cls: type[Node[Any, Any]], argv: Sequence[str]) -> Any:
    """Parse a point's argv into the node's Args; argparse errors become :class:`ArgsError`."""
    parser = node_cls.argument_parser(prog=node_cls.__name__)

    def fail(message: str) -> typing.NoReturn:
        raise ArgsError(f"{node_cls.__name__} {' '.join(argv)}: {message}.")

    parser.error = fail
    return node_cls.parse_with(parser, list(argv)).args  # with the values of --args-file


# --- the record ---------------------------------------------------------------------------------


class Sweep:
    """A sweep record (``<local_path>/<sweep key>/run.json``). ``data`` is the JSON content."""

    def __init__(self, run_dir: Path, data: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.data = data

    @classmethod
    def create(
        cls,
        config: Config,
        node_cls: type[Node[Any, Any]],
        base_argv: Sequence[str],
        axes: Sequence[GridAxis],
        executor: dict[str, Any],
        config_path: str | None = None,
    ) -> Sweep:
        """A new sweep with one pre-assigned run key per point (status ``pending``)."""
        key = keys.new_key(SWEEP_PREFIX)
        now = datetime.now(timezone.utc)
        points = []
        for combo in _combos(axes):
            points.append(
                {
                    "key": str(keys.new_key(node_cls.__name__, now)),
                    "params": {axis.name: axis.values[i] for axis, i in zip(axes, combo, strict=True)},
                    "argv": point_argv(base_argv, axes, combo),
                    "status": PENDING,
                }
            )
        data = {
            "kind": SWEEP_KIND,
            "key": str(key),
            "node": node_cls.__name__,
            "node_class": f"{node_cls.__module__}.{node_cls.__qualname__}",
            "package": node_cls.package,
            "status": PENDING,
            "created_at": utcnow(),
            "updated_at": utcnow(),
            "grid": {axis.name: list(axis.raw) for axis in axes},
            "base_args": list(base_argv),
            "config_path": config_path,
            "executor": executor,
            "slurm_job_ids": [],
            "points": points,
        }
        sweep = cls(config.local_path / key, data)
        sweep.save()
        return sweep

    @classmethod
    def load(cls, project: Project, key_or_prefix: str) -> Sweep:
        """The sweep with this key (or unique prefix); :class:`RunNotFoundError` otherwise."""
        from phd_flow.runs.listing import resolve_key

        key = resolve_key(project, key_or_prefix)
        data = RunRecord.load(project.config.local_path / key).data  # the key is checked there
        if data.get("kind") != SWEEP_KIND:
            raise RunNotFoundError(f"{key} is a run, not a sweep: `sweep --resume` takes a Sweep_... key.")
        # A sweep record may come from the bucket: it is data. Its points must be run keys,
        # the config is this project's, and the node class must live in this project's package.
        where = f"Sweep {key} ({project.config.local_path / key / RUN_FILE})"
        points = data.get("points")
        if not isinstance(points, list) or not all(_valid_point(p) for p in points):
            raise CorruptRunError(
                f"{where} has a point that is not a run key with an argument list; it is refused. "
                "Delete it, or download the sweep again from a trusted copy."
            )
        node_class = data.get("node_class")
        package = project.package
        if not isinstance(node_class, str) or (package and not node_class.startswith(f"{package}.")):
            raise CorruptRunError(f"{where} runs {node_class!r}, which is not a node of package {package!r}.")
        data["key"] = key
        data["config_path"] = str(Path(project.config_path).resolve()) if project.config_path else None
        return cls(project.config.local_path / key, data)

    @property
    def key(self) -> str:
        return str(self.data["key"])

    @property
    def points(self) -> list[dict[str, Any]]:
        return typing.cast(list[dict[str, Any]], self.data["points"])

    def save(self) -> None:
        """Write run.json atomically."""
        self.data["updated_at"] = utcnow()
        atomic_write_json(self.run_dir / RUN_FILE, self.data)

    def set_status(self, keys_: Sequence[str], status: str, **fields: Any) -> None:
        """Record a status (and e.g. ``slurm_job_id``) for some points and save."""
        wanted = set(keys_)
        for point in self.points:
            if point["key"] in wanted:
                point.update(status=status, **fields)
        self.save()

    def refresh(self, local_path: Path, stale_after: float) -> dict[str, int]:
        """Re-read every point's status from its run.json; save; return counts by status."""
        for point in self.points:
            point["status"] = point_status(local_path / point["key"], point["status"], stale_after)
        counts: dict[str, int] = {}
        for point in self.points:
            counts[point["status"]] = counts.get(point["status"], 0) + 1
        self.data["status"] = overall_status(counts, self.data["status"])
        self.save()
        return counts


def _valid_point(point: Any) -> bool:
    if not isinstance(point, dict) or not isinstance(point.get("argv"), list):
        return False
    if not all(isinstance(a, str) for a in point["argv"]) or not isinstance(point.get("params", {}), dict):
        return False
    try:
        keys.run_name(point.get("key"))
    except InvalidKeyError:
        return False
    return isinstance(point.get("status", PENDING), str)


def mlflow_close_status(statuses: set[str]) -> str | None:
    """The final status of a sweep's MLflow run from its points' statuses, or None while a point
    has not ended."""
    if not statuses <= {COMPLETED, FAILED, KILLED}:
        return None
    # as overall_status: one failed point makes the sweep failed, not killed
    return COMPLETED if statuses == {COMPLETED} else FAILED if FAILED in statuses else KILLED


def ended_status(sweep_dir: Path, stale_after: float) -> tuple[str | None, set[str]]:
    """:func:`mlflow_close_status` of the sweep record in ``sweep_dir``, every point's status
    read from its own run.json, and the MLflow experiments its points' run.json name; (None, {})
    for a record that is not a sweep of valid points."""
    try:
        data = RunRecord.load(sweep_dir).data
    except CorruptRunError:
        return None, set()
    points = data.get("points")
    if data.get("kind") != SWEEP_KIND or not isinstance(points, list) or not all(_valid_point(p) for p in points):
        return None, set()
    recorded = {point_status(sweep_dir.parent / p["key"], p.get("status", PENDING), stale_after) for p in points}
    experiments = set()
    for point in points:
        try:
            section = RunRecord.load(sweep_dir.parent / point["key"]).data.get("mlflow") or {}
        except CorruptRunError:
            continue
        if isinstance(section.get("experiment"), str):
            experiments.add(section["experiment"])
    return mlflow_close_status(recorded), experiments


def point_status(run_dir: Path, recorded: str, stale_after: float) -> str:
    """A point's status: its run.json's, ``stale`` for a running run whose heartbeat stopped,
    else what the sweep recorded (``pending``, ``submitted``, ``killed`` ...)."""
    try:
        data = RunRecord.load(run_dir).data
    except CorruptRunError:
        return recorded
    status = str(data.get("status", recorded))
    if status == RUNNING and _age(data.get("heartbeat_at")) > stale_after:
        return STALE
    return status


def _age(stamp: Any) -> float:
    try:
        then = datetime.fromisoformat(str(stamp))
    except ValueError:
        return float("inf")
    return (datetime.now(timezone.utc) - then).total_seconds()


def overall_status(counts: dict[str, int], previous: str) -> str:
    """The sweep's status from its points' counts."""
    if any(counts.get(s) for s in (PENDING, SUBMITTED, RUNNING)):
        return previous if previous in (RUNNING, SUBMITTED) else PENDING
    if counts and set(counts) == {COMPLETED}:
        return COMPLETED
    return FAILED if counts.get(FAILED) or counts.get(LOST) else KILLED


def summary(counts: dict[str, int]) -> str:
    """``3 completed, 1 failed`` in a stable order."""
    order = [COMPLETED, RUNNING, SUBMITTED, PENDING, REQUEUED, FAILED, KILLED, STALE, LOST]
    order += sorted(set(counts) - set(order))
    return ", ".join(f"{counts[s]} {s}" for s in order if counts.get(s)) or "no points"


def describe_point(point: dict[str, Any]) -> str:
    """``seed=1 alpha=0.1`` for progress lines."""
    return " ".join(f"{k}={v}" for k, v in point["params"].items())

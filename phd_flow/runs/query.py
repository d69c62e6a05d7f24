"""Past runs from Python: :func:`find_runs`, :func:`load_result`, :func:`load_args`, :func:`load_metrics`.

>>> import phd_flow
>>> runs = phd_flow.find_runs(node="FitOLS", status="completed", after="2d")   # doctest: +SKIP
>>> runs.to_frame()[["status", "args.seed", "metrics.mse"]]                      # doctest: +SKIP
>>> phd_flow.find_runs(where=["lr<0.1", "metrics.acc>=0.9"])                     # doctest: +SKIP
>>> phd_flow.load_result(runs[-1].key).mse                                       # doctest: +SKIP

Statuses are honest: a run recorded as ``running`` whose heartbeat is older than
``[runs] stale_after_seconds`` (or whose process on this host is gone) is ``stale``.
"""

from __future__ import annotations

import json
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phd_flow.errors import (
    ArgsError,
    CorruptRunError,
    NoResultError,
    RunNotFoundError,
    UserError,
)
from phd_flow.project import Project
from phd_flow.run.record import (
    ARGS_FILE,
    ATTEMPTS_FIELD,
    COMPLETED,
    KILLED,
    RUN_FILE,
    RUNNING,
    STALE,
    STATUS_CHOICES,
    RunRecord,
    is_live,
    is_stale,
    run_lock_held,
)
from phd_flow.run.record import parse_time as parse_time  # re-exported: cli/render.py imports it here
from phd_flow.run.result import check_authentic, load_verified, result_path
from phd_flow.runs.listing import (
    local_records,
    read_remote_record,
    remote_records,
    resolve_key,
)
from phd_flow.runs.metrics import recorded_summary
from phd_flow.runs.where import Condition, matches_all, parse_where, run_metrics
from phd_flow.sweeps.grid import SWEEP_KIND

if TYPE_CHECKING:
    import pandas

    from phd_flow.config import Config

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
TimeBound = datetime | date | timedelta | str


class Run(RunRecord):
    """A run as listed: its run.json plus where it lives and its honest status.

    ``where`` is ``"local"``, ``"remote"`` or ``"local+remote"``; ``state`` is the recorded
    status, or ``"stale"`` for a ``running`` run that stopped beating; ``has_remote``: whether a
    remote is configured now (a run made before it existed is then not synced); ``location``:
    where it lives below ``local_path`` and in storage, its key or, for a child run of a
    pipeline, ``<parent key>/<child key>``.
    """

    def __init__(
        self,
        run_dir: Path,
        data: dict[str, Any],
        where: str = "local",
        stale: bool = False,
        has_remote: bool = False,
        location: str | None = None,
    ) -> None:
        super().__init__(run_dir, data)
        self.where = where
        self.stale = stale
        self.has_remote = has_remote
        self.location = location or self.key

    @property
    def parent(self) -> str | None:
        """For a child run of a pipeline: the location of the run that required it."""
        return self.location.rpartition("/")[0] or None

    @property
    def state(self) -> str:
        return STALE if self.stale else self.status

    @property
    def node(self) -> str:
        return str(self.data.get("node") or self.key.rsplit("_", 2)[0])

    @property
    def args(self) -> dict[str, Any]:
        args = self.data.get("args")
        return args if isinstance(args, dict) else {}

    @property
    def started_at(self) -> datetime | None:
        return parse_time(self.data.get("started_at"))

    @property
    def ended_at(self) -> datetime | None:
        return parse_time(self.data.get("ended_at"))

    @property
    def duration(self) -> timedelta | None:
        """Wall time; for a live run, up to now; for a stale one, up to its last heartbeat."""
        start = self.started_at
        end = self.ended_at
        if end is None and self.status == RUNNING:
            end = parse_time(self.data.get("heartbeat_at")) if self.stale else _now()
        return end - start if start and end else None

    @property
    def synced(self) -> bool:
        """True when the run is finished and nothing of it is waiting for ``sync``."""
        from phd_flow.runs.catchup import needs_sync

        return self.status != RUNNING and not needs_sync(self, self.has_remote)

    def to_dict(self, metrics: bool = False) -> dict[str, Any]:
        """The JSON summary ``ls --json`` prints; ``metrics``: also for a run older than the
        metric summary (computed from its metrics.jsonl), else only what run.json holds."""
        return {
            "key": self.key,
            "node": self.node,
            "status": self.state,
            "started_at": self.data.get("started_at"),
            "ended_at": self.data.get("ended_at"),
            "synced": self.synced,
            "args": self.args,
            "where": self.where,
            "metrics": self.metrics if metrics else recorded_summary(self.data),
        }

    @property
    def metrics(self) -> dict[str, dict[str, Any]]:
        """``{name: {"last", "min", "max", "steps"}}`` from run.json (for a run older than the
        summary, computed from its local metrics.jsonl)."""
        return run_metrics(self)

    @property
    def is_sweep(self) -> bool:
        """True for a sweep record (``Sweep_...``: the points are the runs)."""
        return self.data.get("kind") == SWEEP_KIND

    def __repr__(self) -> str:
        return f"Run({self.key!r}, {self.state})"


class Runs(list[Run]):
    """A list of :class:`Run`; :meth:`to_frame` makes a pandas DataFrame of it."""

    #: The project the runs were listed from (for :meth:`to_frame` ``results=True``).
    project: Project | None = None

    def to_frame(self, results: bool = False, trust_remote: bool = False) -> pandas.DataFrame:
        """One row per run, indexed by key: status, times, host, sync, ``args.<name>`` and
        ``metrics.<name>`` (the last value). With ``results=True`` also ``result.<field>``: the
        scalar fields (numbers, strings, booleans) of each completed run's result when it is a
        dataclass or a dict (or ``result`` for a scalar result); this loads every result, through
        :func:`load_result`'s verification (``trust_remote`` as there)."""
        try:
            import pandas
        except ImportError:
            raise ImportError("Runs.to_frame() needs pandas: `pip install pandas`.") from None
        from phd_flow.runs.metrics import last_values
        from phd_flow.tracking import flatten

        rows = []
        for run in self:
            duration = run.duration
            rows.append(
                {
                    "key": run.key,
                    "node": run.node,
                    "status": run.state,
                    "started_at": run.started_at,
                    "ended_at": run.ended_at,
                    "duration_s": duration.total_seconds() if duration else None,
                    "host": run.data.get("host"),
                    "synced": run.synced,
                    "where": run.where,
                    **{f"args.{k}": v for k, v in flatten(run.args).items()},
                    **{f"metrics.{k}": v for k, v in last_values(run.metrics).items()},
                }
            )
            if results and run.status == COMPLETED and (run.data.get("result") or run.where == "remote"):
                # a run listed from an index has no result section: load_result reads its run.json
                try:
                    value = load_result(run.key, self.project, trust_remote=trust_remote)
                except NoResultError:
                    if run.where != "remote":
                        raise
                    continue  # its own record says it has none (the index entry was stale)
                rows[-1].update({f"result{k}": v for k, v in scalar_fields(value).items()})
        return pandas.DataFrame(rows).set_index("key") if rows else pandas.DataFrame(rows)

    @property
    def keys(self) -> list[str]:
        return [run.key for run in self]


@dataclass
class RunFilter:
    """Which runs to list: every given criterion must hold (statuses: any of them)."""

    prefix: str | None = None
    node: str | None = None
    statuses: frozenset[str] = frozenset()
    after: datetime | None = None
    before: datetime | None = None
    where: tuple[Condition, ...] = ()
    sweep: str | None = None
    #: sweep records: listed only with True (``ls --sweeps``), and then only they
    sweeps: bool = False

    def matches(self, run: Run) -> bool:
        if self.prefix and not run.key.startswith(self.prefix):
            return False
        if run.is_sweep != self.sweeps:
            return False
        if self.node and run.node != self.node:
            return False
        if self.statuses and run.state not in self.statuses:
            return False
        if self.sweep and not sweep_matches(str(run.data.get("sweep") or ""), self.sweep):
            return False
        if self.after or self.before:
            started = run.started_at
            if started is None or (self.after and started < self.after):
                return False
            if self.before and started >= self.before:
                return False
        return not self.where or matches_all(run, self.where)


def sweep_matches(sweep_key: str, given: str) -> bool:
    """``--sweep`` takes the sweep's key, a prefix of it, or its random suffix (or a prefix of
    that, or its end): ``Sweep_2026-11-30``, ``x57c``, ``x57c1k2p``."""
    if not sweep_key or not given:
        return False
    suffix = sweep_key.rsplit("_", 1)[-1]
    return sweep_key.startswith(given) or suffix.startswith(given) or sweep_key.endswith(given)


# --- the public API -----------------------------------------------------------------------------


def find_runs(
    node: str | None = None,
    status: str | Iterable[str] | None = None,
    after: TimeBound | None = None,
    before: TimeBound | None = None,
    where: str | Iterable[str] | Mapping[str, Any] | None = None,
    remote: bool = False,
    config: Config | Project | None = None,
    *,
    prefix: str | None = None,
    sweep: str | None = None,
) -> Runs:
    """The runs that match, oldest first.

    ``status``: one of ``running completed failed killed stale`` or several; ``after`` /
    ``before``: a datetime, a date, a timedelta or duration string (``"3h"``, ``"2d"``: that long
    ago) or an ISO date; ``where``: conditions as ``ls --where`` has them (``"lr<0.1"``,
    ``["metrics.acc>=0.9", "seed!=0"]``; see :mod:`phd_flow.runs.where`) or a mapping of
    equalities (``{"seed": 0, "optim.lr": 0.1}``, compared as JSON text); ``remote``: include the
    runs in storage (other machines); ``sweep``: the points of a sweep (key, prefix or suffix).
    ``config`` defaults to the project's (found from the current directory or ``$PHD_FLOW_CONFIG``).
    Sweep records themselves are not runs and are never listed.

    Raises :class:`~phd_flow.errors.ArgsError` for an unknown status, malformed time or condition.
    """
    statuses = {status} if isinstance(status, str) else set(status or ())
    unknown = statuses - set(STATUS_CHOICES)
    if unknown:
        raise ArgsError(f"Unknown status {sorted(unknown)}: use {', '.join(STATUS_CHOICES)}.")
    run_filter = RunFilter(
        prefix=prefix,
        node=node,
        statuses=frozenset(statuses),
        after=time_bound(after) if after is not None else None,
        before=time_bound(before) if before is not None else None,
        where=parse_where(where),
        sweep=sweep,
    )
    return list_runs(Project.of(config), run_filter, remote=remote)


def load_args(key: str, config: Config | Project | None = None) -> dict[str, Any]:
    """The args of run ``key`` (or a unique prefix), from args.json, local or in storage."""
    project = Project.of(config)
    run = get_run(project, key)
    raw = read_run_file(project, run, ARGS_FILE)
    if raw is not None:
        args: dict[str, Any] = json.loads(raw)
        return args
    return run.args


def load_metrics(
    key: str, names: str | Iterable[str] | None = None, config: Config | Project | None = None
) -> pandas.DataFrame:
    """Every logged point of run ``key`` (or a unique prefix) as a pandas DataFrame with columns
    ``step``, ``time`` (UTC), ``name``, ``value``, sorted by name then step (file order among
    equal steps); from its metrics.jsonl, local or in storage. ``names``: only these metrics."""
    import pandas

    from phd_flow.run.record import METRICS_FILE
    from phd_flow.runs.metrics import parse_points

    project = Project.of(config)
    run = get_run(project, key)
    raw = read_run_file(project, run, METRICS_FILE) or b""
    wanted = {names} if isinstance(names, str) else set(names) if names is not None else None
    points = [p for p in parse_points(raw) if wanted is None or p[0] in wanted]
    frame = pandas.DataFrame(
        {
            "step": pandas.Series([p[2] for p in points], dtype="int64"),
            "time": pandas.to_datetime(pandas.Series([p[3] for p in points], dtype="int64"), unit="ms", utc=True),
            "name": pandas.Series([p[0] for p in points], dtype="object"),
            "value": pandas.Series([p[1] for p in points], dtype="float64"),
        }
    )
    return frame.sort_values(["name", "step"], kind="stable").reset_index(drop=True)


def scalar_fields(result: Any) -> dict[str, Any]:
    """``{".field": value}`` for the scalar fields of a dataclass or dict result, ``{"": value}``
    for a scalar result; numpy scalars become Python ones."""
    import dataclasses

    def scalar(value: Any) -> tuple[bool, Any]:
        item = getattr(value, "item", None)
        if item is not None and getattr(value, "shape", None) == ():
            value = item()
        return (value is None or isinstance(value, (bool, int, float, str)), value)

    if dataclasses.is_dataclass(result) and not isinstance(result, type):
        pairs = [(f.name, getattr(result, f.name)) for f in dataclasses.fields(result)]
    elif isinstance(result, dict):
        pairs = [(str(k), v) for k, v in result.items()]
    else:
        ok, value = scalar(result)
        return {"": value} if ok else {}
    found = {}
    for name, value in pairs:
        ok, value = scalar(value)
        if ok:
            found[f".{name}"] = value
    return found


def load_result(key: str, config: Config | Project | None = None, trust_remote: bool = False) -> Any:
    """The unpickled result of run ``key`` (or a unique prefix), downloaded when not local.

    Unpickling runs code, so the result must be authentic first: made on this machine, else
    signed with the configured signing key (``$PHD_FLOW_SIGNING_KEY`` or ``[security]
    signing_key``), else, when no key is configured, ``trust_remote=True`` says you trust everyone
    who can write to the storage. Its sha256 is checked against run.json in every case. Raises
    :class:`~phd_flow.errors.NoResultError` for a run that did not complete,
    :class:`~phd_flow.errors.UntrustedResultError` for a result not known to be authentic, and
    :class:`~phd_flow.errors.CorruptRunError` when run.json records no sha256 or the bytes do not
    match it.
    """
    project = Project.of(config)
    run = get_run(project, key)
    info = run.data.get("result") or {}
    if run.status != COMPLETED or not info:
        error = f" ({run.data['error']})" if run.data.get("error") else ""
        raise NoResultError(f"Run {run.key} is {run.state}{error}, so it has no result to load.")
    local = run.where != "remote"
    check_authentic(project.config, info, run.key, trust_remote, local)  # before downloading anything
    path = result_path(run.run_dir, info)
    if not path.exists():
        project.storage.download(f"{run.location}/{path.name}")
    return load_verified(project.config, run.run_dir, info, run.key, trust_remote, local)


# --- building blocks (also used by the CLI) -----------------------------------------------------


def list_runs(
    project: Project | Config,
    run_filter: RunFilter | None = None,
    remote: bool = False,
    refresh: bool = False,
    warn: Callable[[str], None] | None = None,
) -> Runs:
    """Local runs (plus, with ``remote``, those in storage) that match ``run_filter``.

    A corrupt run.json is reported through ``warn`` (default: a log warning) and skipped.
    """
    project = Project.of(project)
    config = project.config
    run_filter = run_filter or RunFilter()
    report = warn or _log_warning
    stale_after, host, now = config.runs.stale_after_seconds, socket.gethostname(), _now()
    has_remote = config.storage.has_remote
    found: dict[str, Run] = {}
    for item in local_records(config.local_path):
        if isinstance(item, CorruptRunError):
            report(str(item))
            continue
        stale = local_stale(item.run_dir, item.data, stale_after, now, host)
        found[item.key] = Run(item.run_dir, item.data, "local", stale, has_remote)
    if remote:
        for item in remote_records(config, project.require_remote(), refresh=refresh):
            if isinstance(item, CorruptRunError):
                report(str(item))
            elif item.key in found:
                found[item.key].where = "local+remote"
            else:
                stale = is_stale(item.data, stale_after, now, host)
                found[item.key] = Run(item.run_dir, item.data, "remote", stale, has_remote)
    runs = [run for run in found.values() if run_filter.matches(run)]
    runs.sort(key=lambda r: (str(r.data.get("started_at") or r.data.get("created_at") or ""), r.key))
    listed = Runs(runs)
    listed.project = project
    return listed


def get_run(project: Project, key: str) -> Run:
    """The run with this key or unique prefix: local, else from the remote's run.json. A child
    run of a pipeline is found by its key (or a prefix, or ``<parent>/<child>``) too."""
    config = project.config
    full = resolve_key(project, key, remote=True)
    host, now = socket.gethostname(), _now()
    stale_after = config.runs.stale_after_seconds
    if (config.local_path / full / RUN_FILE).exists():
        record = RunRecord.load(config.local_path / full)
        where = "local"
        stale = local_stale(record.run_dir, record.data, stale_after, now, host)
    else:
        remote_record = read_remote_record(config, project.require_remote(), full)
        if remote_record is None:
            raise RunNotFoundError(f"{full} has no {RUN_FILE} in the remote storage: not a run.")
        record, where = remote_record, "remote"
        stale = is_stale(record.data, stale_after, now, host)
    return Run(record.run_dir, record.data, where, stale, config.storage.has_remote, full)


def refuse_child_runs(runs: Iterable[Run]) -> None:
    """``rm <child key>`` is refused (ArgsError, nothing deleted), naming the pipeline run: its
    run.json lists the child and its result was computed from the child's."""
    for run in runs:
        if run.parent is not None:
            top = run.location.split("/", 1)[0]
            raise ArgsError(
                f"{run.key} is a child run of {run.parent}, inside pipeline run {top}, which lists it and "
                f"whose result was made from it: deleting it alone would leave {top} pointing at a missing "
                f"run. Delete the pipeline run (`rm {top}` deletes its child runs too), or recompute the "
                f"child with `run ... --rerun {run.node}`. Nothing was deleted."
            )


def read_run_file(project: Project, run: Run, name: str) -> bytes | None:
    """A small file of the run (``metrics.jsonl``, ``args.json`` ...), local or from storage."""
    path = run.run_dir / name
    if path.is_file():
        return path.read_bytes()
    if run.where == "local":
        return None
    return project.require_remote().read_bytes(f"{run.location}/{name}")


def local_stale(run_dir: Path, data: Mapping[str, Any], stale_after: float, now: datetime, host: str) -> bool:
    """:func:`is_stale` for a run in ``local_path``, where the run lock settles it: a run whose
    process holds the lock is live, and one of this host whose lock nobody holds is gone."""
    if data.get("status") != RUNNING:
        return False
    return (
        not is_live(run_dir, data, stale_after)
        if run_lock_held(run_dir) is not None
        else is_stale(data, stale_after, now, host)
    )


def mark_killed(project: Project, run: Run) -> str:
    """Record a stale run as ``killed`` (ended at its last heartbeat) in run.json and MLflow.

    Returns a one-line account. MLflow is imported only here; if it cannot be reached, the
    MLflow record is left for ``sync`` to catch up.
    """
    if run.where == "remote":
        return f"{run.key}: only in storage; mark it on the machine that has it (or download it)."
    from phd_flow.runs.catchup import downloaded

    mark = downloaded(project.config, run)
    if mark is not None:  # its record came from the bucket: data, not a to-do
        return (
            f"{run.key}: downloaded from the remote, so not marked (its status is the remote copy's; "
            f"mark it on the machine that made it, or delete {mark} if it is your own run)."
        )
    ended = run.data.get("heartbeat_at") or run.data.get("started_at")
    try:
        run.update(status=KILLED, ended_at=ended, error=f"lost: no heartbeat since {ended} (marked killed)")
        if run.data.get("sync", {}).get("state") == "synced":
            run.update_section("sync", state="pending")
    except OSError as exc:  # a full disk: say so in one line, no traceback
        raise UserError(
            f"{run.key}: not marked killed: writing its run.json failed ({exc.strerror or exc}). Free "
            f"space in local_path ({project.config.where('local_path')}) and run `ls --stale --fix` again."
        ) from None
    run.stale = False
    run_id = run.data.get("mlflow", {}).get("run_id")
    state = run.data.get("mlflow", {}).get("state")
    resumed = len(run.data.get(ATTEMPTS_FIELD) or []) > 1  # its MLflow run may need rebuilding
    if (not run_id and state == "pending") or (resumed and state not in ("synced", "disabled")):
        from phd_flow.runs.catchup import sync_mlflow

        if sync_mlflow(project.config, run):
            return f"{run.key}: marked killed in run.json and in MLflow."
        return f"{run.key}: marked killed in run.json; MLflow not reachable, `sync` will."
    if not run_id:
        return f"{run.key}: marked killed in run.json."
    try:
        terminated = _terminate_mlflow_run(project, str(run_id), run.key, ended)
    except Exception as exc:  # MLflow unreachable: `sync` sets the status later
        run.update_section("mlflow", state="not_synced")
        return f"{run.key}: marked killed in run.json; MLflow not reachable ({exc}), `sync` will."
    if not terminated:
        return f"{run.key}: marked killed in run.json; MLflow run {run_id} is tagged with another run, left alone."
    run.update_section("mlflow", state="synced", status_sent=KILLED)
    return f"{run.key}: marked killed in run.json and in MLflow (run {run_id})."


def _terminate_mlflow_run(project: Project, run_id: str, key: str, ended: str | None) -> bool:
    """Set MLflow run ``run_id`` KILLED, only if its ``phd_flow.key`` tag is ``key`` (a record
    from elsewhere may name another run's MLflow id)."""
    client = project.mlflow_client()
    if client.get_run(run_id).data.tags.get("phd_flow.key") != key:
        return False
    end = parse_time(ended)
    end_ms = int(end.timestamp() * 1000) if end else None
    client.set_terminated(run_id, "KILLED", end_time=end_ms)
    return True


def dependents(project: Project, keys: Iterable[str]) -> list[tuple[str, str, str]]:
    """``(run, stage, source)`` for every local run whose stage was loaded from one of ``keys``
    (or a run inside one of them), the runs in ``keys`` themselves left out. A run that reused
    one of them (or a child run inside one) through ``require()`` is listed with stage ``""``."""
    targets = set(keys)

    def hit(source: str) -> bool:
        return bool(source) and (source.split("/", 1)[0] in targets or source.rsplit("/", 1)[-1] in targets)

    found = []
    for item in local_records(project.config.local_path):
        if isinstance(item, CorruptRunError) or item.key in targets:
            continue
        for stage, info in (item.data.get("stages") or {}).items():
            source = str(info.get("loaded_from") or "") if isinstance(info, dict) else ""
            if hit(source):
                found.append((item.key, str(stage), source))
        for child in item.data.get("children") or []:
            path = str(child.get("path") or "") if isinstance(child, dict) else ""
            if child.get("reused") and hit(path):
                found.append((item.key, "", path))
    return found


# --- parsing ------------------------------------------------------------------------------------


def parse_duration(text: str) -> timedelta:
    """``"90s"``, ``"30m"``, ``"3h"``, ``"2d"``, ``"1w"`` -> timedelta; ArgsError otherwise."""
    match = _DURATION.match(text)
    if not match:
        raise ArgsError(
            f"{text!r} is not a duration: write a number and a unit, s (seconds), m (minutes), "
            "h (hours), d (days) or w (weeks), e.g. 30m, 3h, 2d, 1w."
        )
    try:
        return timedelta(seconds=float(match.group(1)) * _UNITS[match.group(2)])
    except OverflowError:
        raise ArgsError(f"{text!r} reaches back before the year 1: give a shorter duration.") from None


def time_bound(value: TimeBound) -> datetime:
    """A point in time from a datetime, date, timedelta (that long ago), duration or ISO string.

    Naive datetimes and dates are local time.
    """
    if isinstance(value, timedelta):
        return _ago(value)
    if isinstance(value, str):
        if _DURATION.match(value):
            return _ago(parse_duration(value))
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            raise ArgsError(
                f"{value!r} is neither a duration (3h, 2d, 1w) nor an ISO date (2026-11-23 or 2026-11-23T14:00)."
            ) from None
    if not isinstance(value, datetime):
        value = datetime(value.year, value.month, value.day)
    return value if value.tzinfo else value.astimezone()


def _ago(duration: timedelta) -> datetime:
    try:
        return _now() - duration
    except OverflowError:  # before the year 1
        raise ArgsError(f"{duration} ago is before the year 1: give a shorter duration.") from None


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _log_warning(message: str) -> None:
    from phd_flow.log import logger

    logger.warning(message)

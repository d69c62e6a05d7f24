"""The MLflow feeder: MLflow runs fed from run directories, off the run's critical path.

A run neither imports mlflow (≈2 s) nor opens the tracking store (≈1 s) before ``_run``: it
records ``mlflow.state = "pending"`` in run.json, drops a marker named after its run path in the
store's queue (``<local_path>/.phd_flow/mlflow-feed/<store hash>/``) and makes sure a feeder
runs. The feeder is one detached process per queue (``python -m phd_flow.feeder QUEUE``),
elected by an flock on the queue's ``feeder.lock``: it creates each queued run's MLflow run
(start time from run.json), sends params, tags and metrics.jsonl as it grows, and once the run
has ended its artifacts, status and end time; then it removes the marker, and exits when the
queue has stayed empty for :data:`IDLE_SECONDS`. Fifty parallel runs make one sqlite writer.

Feeding is idempotent, so a feeder killed midway loses and duplicates nothing: run.json records
the MLflow run id as soon as it exists (a feeder killed before that finds the run again by its
``phd_flow.key`` tag), and ``metrics_sent`` counts the metrics.jsonl lines MLflow has after
every batch. One feed at a time per run (an flock on ``<run dir>/.phd_flow-feed.lock``), be it
the feeder, a run waiting for MLflow (``--wait-mlflow``, ``[mlflow] wait``) or ``sync``.

A resumed run shows one point per (metric, step) in MLflow, the newest attempt's: points of a
step an earlier attempt logged are held back, and at the attempt's end the MLflow run is
replaced by a rebuilt one (:func:`replace_run`, crash-safe through :func:`settle_replacement`).
"""

from __future__ import annotations

import atexit
import bisect
import contextlib
import errno
import fcntl
import getpass
import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn, Protocol

from phd_flow._io import PRIVATE_PREFIX, atomic_write_json
from phd_flow.errors import InvalidKeyError
from phd_flow.keys import safe_join
from phd_flow.log import logger, redact_url
from phd_flow.run.record import (
    ARGS_FILE,
    ATTEMPTS_FIELD,
    CHECKPOINT_DIR,
    FINISHED,
    METRICS_FILE,
    OUTPUT_JSONL,
    OUTPUT_LOG,
    REPRO_FILE,
    RESULT_FILE,
    RUN_FILE,
    RUNNING,
    RunRecord,
    is_live,
)
from phd_flow.tracking import (
    ATTEMPTS_TAG,
    BUILDING_TAG,
    KEY_TAG,
    LINES_TAG,
    REPLACED_BY_TAG,
    REPLACES_TAG,
    Attempts,
    newest_wins,
)

FEED_DIR = Path(".phd_flow") / "mlflow-feed"
FEEDER_LOCK = "feeder.lock"
FEEDER_LOG = "feeder.log"
FEED_LOCK = f"{PRIVATE_PREFIX}feed.lock"  # in a run dir: one feed of that run at a time
URI_ENV = "PHD_FLOW_FEED_URI"  # the tracking URI, handed to the feeder (never on its command line)
WAIT_ENV = "PHD_FLOW_WAIT_MLFLOW"  # "true": every run waits for MLflow, as [mlflow] wait = true
IDLE_SECONDS = 3.0
POLL_SECONDS = 0.25
STALE_AFTER = 180.0
#: Files of the record that MLflow shows as artifacts (besides the run's own ``log_artifact`` files).
RECORD_ARTIFACTS = (OUTPUT_LOG, ARGS_FILE, RUN_FILE, REPRO_FILE)
#: phd_flow's own files of a run directory that are not MLflow artifacts.
NOT_ARTIFACTS = frozenset({RESULT_FILE, METRICS_FILE, OUTPUT_JSONL, CHECKPOINT_DIR})

PENDING = "pending"
#: In a sweep's directory once its MLflow run has its final status.
SWEEP_CLOSED = ".phd_flow-mlflow-closed"
#: In a sweep's directory: its MLflow run is to be closed by the feeder (``{"status", "experiment"}``).
SWEEP_CLOSE = ".phd_flow-mlflow-close"
SYNCED = "synced"
NOT_SYNCED = "not_synced"


def wait_requested(configured: bool, option: bool | None) -> bool:
    """Whether a run waits for MLflow: ``--wait-mlflow`` / ``--no-wait-mlflow``, else
    ``$PHD_FLOW_WAIT_MLFLOW``, else ``[mlflow] wait``."""
    if option is not None:
        return option
    env = os.environ.get(WAIT_ENV, "").strip().lower()
    if env:
        return env in ("1", "true", "yes", "on")
    return configured


# --- the queue ----------------------------------------------------------------------------------


def queue_dir(local_path: Path, tracking_uri: str) -> Path:
    """The feed queue of runs in ``local_path`` for the store at ``tracking_uri``."""
    digest = hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]
    return local_path / FEED_DIR / digest


def _marker(queue: Path, run_path: str) -> Path:
    """The queue's marker of a run: its run path quoted, reversibly (a key may hold '+')."""
    return queue / urllib.parse.quote(run_path, safe="")


def enqueue(queue: Path, run_path: str, tracking_uri: str, telemetry: bool) -> None:
    """Queue a run for the feeder and make sure one runs."""
    queue.mkdir(parents=True, exist_ok=True)
    _marker(queue, run_path).touch()
    ensure_feeder(queue, tracking_uri, telemetry)


def ensure_feeder(queue: Path, tracking_uri: str, telemetry: bool) -> None:
    """Start a feeder on ``queue`` unless one holds its lock (a feeder that is leaving rescans
    the queue after releasing the lock, so a marker written before this check is never missed).

    This process takes the lock and hands it to the feeder it starts (the locked descriptor is
    inherited, ``--lock-fd``): while that feeder starts up, the queue already counts as fed, so
    runs queuing themselves meanwhile start no second feeder."""
    lock = _Flock(queue / FEEDER_LOCK)
    if not lock.acquire():
        return
    here = str(Path(__file__).resolve().parent.parent)  # this phd_flow, wherever sys.path found it
    path = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, URI_ENV: tracking_uri, "PYTHONPATH": path}
    try:
        fd = lock.fd
        argv = [sys.executable, "-m", "phd_flow.feeder", str(queue), "--lock-fd", str(fd)]
        _SPAWNED[queue] = spawn([*argv, *(["--telemetry"] if telemetry else [])], env, queue / FEEDER_LOG, fd)
    finally:
        lock.release()  # our descriptor only: the feeder's copy keeps the lock


class Spawned(Protocol):
    """A started feeder process, as :func:`wait_for` watches it."""

    def poll(self) -> int | None: ...


def _spawn_process(argv: list[str], env: dict[str, str], log: Path, lock_fd: int) -> Spawned:
    """Start the feeder ``argv`` detached, its output appended to ``log``, ``lock_fd`` inherited."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            start_new_session=True,  # Ctrl-C in the terminal does not reach it
            close_fds=True,
            pass_fds=(lock_fd,),
        )


#: How :func:`ensure_feeder` starts a feeder (the tests' fork server forks it from a process
#: that has mlflow imported instead, see tests/cli_server.py).
spawn: Callable[[list[str], dict[str, str], Path, int], Spawned] = _spawn_process

#: The feeder this process started last, per queue (a waiting run waits for it while it starts).
_SPAWNED: dict[Path, Spawned] = {}


def wait_for(queue: Path, run_dir: Path, run_path: str, tracking_uri: str, telemetry: bool) -> None:
    """Return once MLflow has the whole run (``--wait-mlflow``): the feeder finished it, or,
    when no feeder holds the queue (nor is starting), this process feeds it itself."""
    marker = _marker(queue, run_path)
    while marker.exists():
        spawned = _SPAWNED.get(queue)
        if spawned is not None and spawned.poll() is None and not _Flock(queue / FEEDER_LOCK).is_held():
            time.sleep(0.05)  # our feeder is still starting: it takes the lock in a moment
            continue
        with _Flock(queue / FEEDER_LOCK).held() as free:
            if free:
                _feed_until_done(run_dir, tracking_uri, telemetry)
                marker.unlink(missing_ok=True)
                return
        time.sleep(0.05)


def _feed_until_done(run_dir: Path, tracking_uri: str, telemetry: bool) -> None:
    from phd_flow.tracking import allow_telemetry

    allow_telemetry(telemetry)
    feeding: dict[Path, Feeding] = {}
    while feed_run(run_dir, tracking_uri, feeding) == LATER:
        for ancestor in _pending_ancestors(run_dir):  # no feeder runs: their MLflow runs come first
            feed_run(ancestor, tracking_uri, feeding)
        time.sleep(0.05)


def _pending_ancestors(run_dir: Path) -> list[Path]:
    """The parents of a child run whose MLflow run does not exist yet, outermost first."""
    found = []
    while (run_dir.parent / RUN_FILE).exists():
        run_dir = run_dir.parent
        section = RunRecord.load(run_dir).data.get("mlflow") or {}
        if section.get("state") == PENDING and not section.get("run_id"):
            found.append(run_dir)
    return found[::-1]


def catch_up(record: RunRecord, tracking_uri: str, experiment: str) -> dict[str, Any]:
    """Bring a finished (or dead) run's MLflow view up to date (``sync``): wait while another
    process feeds it, then feed the rest; returns run.json's new ``mlflow`` section."""
    section = record.data.get("mlflow") or {}
    if section.get("experiment") != experiment or section.get("state") != PENDING:
        record.update_section("mlflow", experiment=experiment, state=PENDING)
    feeding: dict[Path, Feeding] = {}
    while feed_run(record.run_dir, tracking_uri, feeding) == LATER:
        time.sleep(0.05)
    data = RunRecord.load(record.run_dir).data
    section = dict(data.get("mlflow") or {})
    if data.get("status") == RUNNING:
        section["state"] = "open"  # a dead run: `ls --stale --fix` sets its end
    return section


def close_directly(run_dir: Path, data: dict[str, Any], tracking_uri: str, status: str) -> None:
    """Tell MLflow a run's final status when its run.json cannot be written (a full disk)."""
    lock = _Flock(run_dir / FEED_LOCK)
    while not lock.acquire():
        time.sleep(0.05)
    try:
        run = _mlflow_run(run_dir, data, tracking_uri, None, activate=False)
        run.terminate(status, int(time.time() * 1000))
    finally:
        lock.release()


def open_live(run_dir: Path, tracking_uri: str) -> Any:
    """Open a queued run's MLflow run in this process as the active fluent run (mlflow was
    imported inside ``_run``: plain ``mlflow.*`` calls must land in the run). The feeder keeps
    feeding it; one process creates it (the run's feed lock)."""

    lock = _Flock(run_dir / FEED_LOCK)
    while not lock.acquire():
        time.sleep(0.02)
    try:
        record = RunRecord.load(run_dir)
        data = record.data
        run = _mlflow_run(run_dir, data, tracking_uri, _parent_id(run_dir, data), activate=False)
        settle_replacement(record, run)
        record.update_section("mlflow", run_id=run.run_id, experiment_id=run.experiment_id)
        run.activate()
        return run
    finally:
        lock.release()


def _mlflow_run(run_dir: Path, data: dict[str, Any], tracking_uri: str, parent_id: str | None, activate: bool) -> Any:
    """The run's MLflow run, created (real start time, tags, params) or found again."""
    from phd_flow.tracking import MlflowRun, param_values

    section = data.get("mlflow") or {}
    experiment = str(section.get("experiment") or "phd_flow")
    run = MlflowRun(tracking_uri, experiment, artifact_location(run_dir, data, tracking_uri))
    run.open(
        run_name(data),
        mlflow_tags(data),
        param_values(data.get("args") or {}),
        parent_id,
        section.get("run_id"),
        activate=activate,
        start_time=epoch_ms(data.get("started_at")),
    )
    return run


#: Sweep key -> its MLflow run id and its points' keys, per process (a sweep's points find their
#: parent once).
_SWEEP_RUNS: dict[tuple[str, str], tuple[str, frozenset[str]]] = {}


def sweep_run_id(local_path: Path, sweep: object, tracking_uri: str, experiment: object, point: str) -> str | None:
    """The MLflow run of sweep ``sweep`` (created on first use, found again by its
    ``phd_flow.key`` tag): the parent its point ``point`` is nested under. None when ``sweep``
    is not a sweep record in ``local_path`` listing ``point`` (a record naming a sweep is data:
    only the sweep's own points are nested in its MLflow run)."""
    from phd_flow.keys import is_run_key
    from phd_flow.sweeps.grid import SWEEP_KIND
    from phd_flow.tracking import MlflowRun

    if not isinstance(sweep, str) or not is_run_key(sweep):
        return None
    cached = _SWEEP_RUNS.get((tracking_uri, sweep))
    if cached:
        return cached[0] if point in cached[1] else None
    try:
        data = RunRecord.load(local_path / sweep).data  # the key is checked against its location
    except Exception:  # no record here (another machine's sweep), or a torn one: not nested
        return None
    points = data.get("points")
    listed = points if isinstance(points, list) else []
    keys = frozenset(str(p.get("key")) for p in listed if isinstance(p, dict))
    if data.get("kind") != SWEEP_KIND or point not in keys:
        return None
    grid: Any = data.get("grid")
    grid = grid if isinstance(grid, dict) else {}
    params = {f"grid.{name}": ",".join(map(str, values))[:500] for name, values in grid.items()}
    tags = {
        "phd_flow.key": sweep,
        "phd_flow.kind": SWEEP_KIND,
        "phd_flow.node": str(data.get("node")),
        "mlflow.user": str(data.get("user") or _user()),
    }
    run = MlflowRun(tracking_uri, str(experiment or "phd_flow"))
    run.open(run_name(data), tags, params, activate=False, start_time=epoch_ms(data.get("created_at")))
    assert run.run_id is not None
    _SWEEP_RUNS[(tracking_uri, sweep)] = (run.run_id, keys)
    return run.run_id


def close_sweep_run(local_path: Path, sweep: str, tracking_uri: str, experiment: str, status: str) -> bool:
    """Give a sweep's MLflow run its final status once every point ended (the sweep's end, or
    ``sweep --status``/``sync`` later); a no-op when it has none. True when MLflow has it."""
    from phd_flow.tracking import MlflowRun

    closed = local_path / sweep / SWEEP_CLOSED
    if closed.exists():
        return True
    run = MlflowRun(tracking_uri, experiment)
    run.open(sweep, {"phd_flow.key": sweep}, {}, activate=False)  # found by its tag
    run.terminate(status, int(time.time() * 1000))
    closed.write_text(status + "\n")
    return True


def request_sweep_close(
    local_path: Path, sweep: str, tracking_uri: str, experiment: str, status: str, telemetry: bool
) -> None:
    """Have the store's feeder close the sweep's MLflow run, and wait until it has: the feeder
    has mlflow imported already, so the sweep process does not pay ~2 s to import it. (With no
    feeder running, this process does it, as :func:`wait_for` does.)"""
    if (local_path / sweep / SWEEP_CLOSED).exists():
        return
    atomic_write_json(local_path / sweep / SWEEP_CLOSE, {"status": status, "experiment": experiment}, durable=False)
    queue = queue_dir(local_path, tracking_uri)
    enqueue(queue, sweep, tracking_uri, telemetry)
    wait_for(queue, local_path / sweep, sweep, tracking_uri, telemetry)


def _close_requested(run_dir: Path, tracking_uri: str) -> None:
    """Close the sweep's MLflow run as :func:`request_sweep_close` asked, with the status its
    points' own run.json give, in the experiment they name (a request is a file anyone who can
    write the sweep directory may plant: one of another shape, status or experiment is dropped
    with a warning; the sweep's next `--status` or `sync` closes it)."""
    from phd_flow.sweeps.grid import ended_status

    request = run_dir / SWEEP_CLOSE
    try:
        asked = json.loads(request.read_bytes())
    except (FileNotFoundError, ValueError):
        return
    if isinstance(asked, dict) and asked.get("status") in FINISHED and isinstance(asked.get("experiment"), str):
        status, experiments = ended_status(run_dir, STALE_AFTER)
        if status == asked["status"] and asked["experiment"] in experiments:
            close_sweep_run(run_dir.parent, run_dir.name, tracking_uri, asked["experiment"], asked["status"])
        else:
            said = f"asked to close as {asked['status']!r} in {asked['experiment']!r}, its points say {status!r}"
            logger.warning(f"{run_dir.name}: {said}: its MLflow run is not closed.")
    request.unlink(missing_ok=True)


def _parent_id(run_dir: Path, data: dict[str, Any]) -> str | None:
    if not data.get("parent"):
        return None
    return (RunRecord.load(run_dir.parent).data.get("mlflow") or {}).get("run_id")


class MlflowImportHook:
    """A one-shot import hook: when ``mlflow`` is first imported (inside ``_run``), call
    ``on_import`` right after the module is executed."""

    def __init__(self, on_import: Any) -> None:
        self.on_import = on_import

    def install(self) -> None:
        sys.meta_path.insert(0, self)  # type: ignore[arg-type]

    def remove(self) -> None:
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)  # type: ignore[arg-type]

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname != "mlflow":
            return None
        self.remove()
        import importlib.util

        spec = importlib.util.find_spec("mlflow")
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        execute = loader.exec_module

        def exec_module(module: Any) -> None:
            execute(module)
            sys.modules["mlflow"] = module  # the fluent API below imports it again
            try:
                self.on_import()
            except Exception as exc:  # MLflow unreachable: the feeder and `sync` still feed it
                logger.warning(f"Opening the MLflow run for plain mlflow calls failed ({type(exc).__name__}: {exc}).")

        loader.exec_module = exec_module
        return spec


# --- feeding one run ----------------------------------------------------------------------------

DONE, LATER, DROPPED = "done", "later", "dropped"


@dataclass
class Feeding:
    """A run this process feeds: its MLflow run, and how far metrics.jsonl has been sent."""

    run: Any  # tracking.MlflowRun
    lines: int  # metrics.jsonl lines MLflow has
    offset: int  # byte offset of the first line not sent
    tags: dict[str, str] = field(default_factory=dict)
    attempts: Attempts | None = None  # metrics.jsonl by attempt (run.json's attempts)


def feed_run(run_dir: Path, tracking_uri: str, feeding: dict[Path, Feeding]) -> str:
    """Feed MLflow what it lacks of one run: DONE (MLflow has all of it, or it gave up: run.json
    says ``not_synced``), LATER (still running, or another process feeds it now), DROPPED (its
    process died while running: fed so far; ``sync`` or ``ls --stale --fix`` finishes it)."""
    lock = _Flock(run_dir / FEED_LOCK)
    with lock.held() as mine:
        if not mine:
            return LATER
        try:
            return _feed_locked(run_dir, tracking_uri, feeding)
        except FileNotFoundError as exc:  # the run was deleted (`rm`) meanwhile
            if run_dir.exists():
                raise
            logger.info(f"{run_dir.name} was deleted ({exc})")
            feeding.pop(run_dir, None)
            return DONE


def _feed_locked(run_dir: Path, tracking_uri: str, feeding: dict[Path, Feeding]) -> str:
    from phd_flow.sweeps.grid import SWEEP_KIND

    record = RunRecord.load(run_dir)
    data = record.data
    if data.get("kind") == SWEEP_KIND:  # a sweep is no run of its own: only its closing is queued
        _close_requested(run_dir, tracking_uri)
        return DONE
    section = data.get("mlflow") or {}
    if section.get("state") in (SYNCED, "disabled"):
        feeding.pop(run_dir, None)
        return DONE
    final = data.get("status") != RUNNING
    state = feeding.get(run_dir)
    if state is None:
        opened = _open(run_dir, record, tracking_uri)
        if opened is None:
            return LATER  # its parent's MLflow run does not exist yet
        state = feeding[run_dir] = opened
    tags = mlflow_tags(data)
    changed = {k: v for k, v in tags.items() if state.tags.get(k) != v}
    if changed:
        state.run.set_tags(changed)
        state.tags = tags
    starts = attempt_starts(data)
    if state.attempts is None or state.attempts.starts != sorted({0, *starts}):
        state.attempts = Attempts(run_dir / METRICS_FILE, starts)
    _send_metrics(run_dir, record, state)
    if not final:
        if is_live(run_dir, data, STALE_AFTER):
            return LATER
        if RunRecord.load(run_dir).status != RUNNING:
            return LATER  # it has just ended: the next round sends its end
        replace_if_overridden(run_dir, record, state.run, state.lines, state.attempts)  # the attempt died
        feeding.pop(run_dir, None)
        return DROPPED
    replace_if_overridden(run_dir, record, state.run, state.lines, state.attempts)
    _log_artifacts(state.run, run_dir, data)
    status = str(data.get("status"))
    state.run.terminate(status, epoch_ms(data.get("ended_at")))
    record.update_section("mlflow", state=SYNCED, metrics_sent=state.lines, status_sent=status, error=None)
    feeding.pop(run_dir, None)
    return DONE


def _open(run_dir: Path, record: RunRecord, tracking_uri: str) -> Feeding | None:
    """Create (or find again) the run's MLflow run and record its id at once."""

    data = record.data
    section = data.get("mlflow") or {}
    parent_id = None
    if data.get("parent"):
        parent = RunRecord.load(run_dir.parent).data.get("mlflow") or {}
        parent_id = parent.get("run_id")
        if not parent_id and parent.get("state") == PENDING:
            return None
    elif data.get("sweep"):
        parent_id = sweep_run_id(run_dir.parent, data.get("sweep"), tracking_uri, section.get("experiment"), record.key)
    experiment = str(section.get("experiment") or "phd_flow")
    recorded = section.get("run_id")
    run = _mlflow_run(run_dir, data, tracking_uri, parent_id, activate=False)
    recorded = settle_replacement(record, run) or recorded
    section = record.data.get("mlflow") or {}
    fresh = {} if run.run_id == recorded else {"metrics_sent": 0, "replaced_at": 0}  # a new MLflow run
    record.update_section(
        "mlflow",
        run_id=run.run_id,
        experiment_id=run.experiment_id,
        experiment=experiment,
        tracking_uri=redact_url(tracking_uri),
        **fresh,
    )
    sent = int(section.get("metrics_sent") or 0) if not fresh else 0
    return Feeding(run, sent, offset_of_line(run_dir / METRICS_FILE, sent), mlflow_tags(data))


def _send_metrics(run_dir: Path, record: RunRecord, state: Feeding) -> None:
    """Send the complete metrics.jsonl lines MLflow lacks, recording the count after each batch."""
    from phd_flow.tracking import BATCH, parse_metric

    path = run_dir / METRICS_FILE
    if not path.exists():
        return
    with open(path, "rb") as handle:
        handle.seek(state.offset)
        while True:
            lines = handle.readlines(BATCH * 80)
            complete = lines if not lines or lines[-1].endswith(b"\n") else lines[:-1]
            if not complete:
                return
            for start in range(0, len(complete), BATCH):
                chunk = complete[start : start + BATCH]
                points = []
                for number, line in enumerate(chunk, state.lines):
                    with contextlib.suppress(ValueError, KeyError):  # a torn line of a killed attempt
                        point = parse_metric(line)
                        if state.attempts is None or not state.attempts.overrides(number, point):
                            points.append(point)  # else: held back until the attempt ends
                if points:
                    state.run.log_points(points)
                state.lines += len(chunk)
                state.offset += sum(len(line) for line in chunk)
                record.update_section("mlflow", metrics_sent=state.lines)
            if len(complete) < len(lines):
                return


def offset_of_line(path: Path, lines: int) -> int:
    """The byte offset where line ``lines`` (0-based) of ``path`` starts."""
    if lines <= 0 or not path.exists():
        return 0
    offset = 0
    with open(path, "rb") as handle:
        for number, line in enumerate(handle):
            if number >= lines or not line.endswith(b"\n"):
                break
            offset += len(line)
    return offset


# --- a resumed run's MLflow run, rebuilt newest attempt first ------------------------------------


def attempt_starts(data: dict[str, Any]) -> list[int]:
    """The metrics.jsonl line each attempt of a run began at (run.json's ``attempts``)."""
    attempts = data.get(ATTEMPTS_FIELD)
    if not isinstance(attempts, list):
        return [0]
    return [int(a.get("metrics_from") or 0) for a in attempts if isinstance(a, dict)] or [0]


def replace_if_overridden(run_dir: Path, record: RunRecord, run: Any, lines: int, attempts: Attempts) -> bool:
    """At the end of an attempt: when one of the first ``lines`` metrics.jsonl lines logged a
    (metric, step) an earlier attempt logged (MLflow holds the stale value, or the point was held
    back), rebuild the MLflow run (:func:`replace_run`). True when it did."""
    start = int((record.data.get("mlflow") or {}).get("replaced_at") or 0)
    if not attempts.any_override(start, lines):
        return False
    replace_run(run_dir, record, run, lines, attempts)
    return True


def replace_run(run_dir: Path, record: RunRecord, run: Any, lines: int, attempts: Attempts) -> None:
    """Replace the MLflow run of a resumed run by one showing the newest attempt of every
    (metric, step): MLflow cannot delete metric points.

    The new run gets the old one's name, start time, params, tags (its parent too), status and
    artifacts; the newest-wins points of the first ``lines`` lines of metrics.jsonl, and of the
    metrics logged straight to MLflow (by timestamp: the attempt running then). It claims the
    ``phd_flow.key`` tag only once whole; then the old run is tagged ``phd_flow.replaced_by`` and
    soft-deleted (restorable). run.json names the new run before it is filled
    (``mlflow.replacement``), so a process killed midway is finished or undone by the next
    feed (:func:`settle_replacement`); ``run.run_id`` becomes the new run's id.
    """
    from mlflow.entities import Metric, Param

    client, key, old_id = run.client, record.key, str(run.run_id)
    old = client.get_run(old_id)
    experiment_id = old.info.experiment_id
    for partial in client.search_runs([experiment_id], filter_string=f"tags.`{BUILDING_TAG}` = '{key}'"):
        if KEY_TAG not in partial.data.tags:  # left half-built by a killed process
            client.delete_run(partial.info.run_id)
    kept = {k: v for k, v in old.data.tags.items() if k not in (KEY_TAG, REPLACED_BY_TAG, LINES_TAG, "mlflow.runName")}
    tags = {**kept, BUILDING_TAG: key, REPLACES_TAG: old_id, ATTEMPTS_TAG: str(len(attempts.starts))}
    made = client.create_run(experiment_id, start_time=old.info.start_time, run_name=old.info.run_name, tags=tags)
    new_id = str(made.info.run_id)
    record.update_section("mlflow", replacement=new_id)
    params = [Param(k, v) for k, v in old.data.params.items()]
    for i in range(0, len(params), 100):
        client.log_batch(new_id, params=params[i : i + 100])
    points = attempts.newest_wins(lines)
    from_file = {p[0] for p in points}
    started = sorted(epoch_ms(a.get("started_at")) or 0 for a in record.data.get(ATTEMPTS_FIELD) or [{}])
    for name in sorted(set(old.data.metrics) - from_file):  # logged straight to MLflow (mlflow.log_metric)
        history = client.get_metric_history(old_id, name)
        points += newest_wins(
            [(bisect.bisect_right(started, m.timestamp) - 1, (m.key, m.value, m.timestamp, m.step)) for m in history]
        )
    for i in range(0, len(points), 1000):
        client.log_batch(new_id, metrics=[Metric(n, v, t, s) for n, v, t, s in points[i : i + 1000]])
    _copy_artifacts(client, old_id, new_id)
    if old.info.status in ("FINISHED", "FAILED", "KILLED"):
        client.set_terminated(new_id, old.info.status, end_time=old.info.end_time)
    client.set_tag(new_id, LINES_TAG, str(lines))
    client.set_tag(new_id, KEY_TAG, key)  # whole: it is the key's MLflow run from now on
    client.delete_tag(new_id, BUILDING_TAG)
    _finish_replacement(client, old_id, new_id, key)
    record.update_section("mlflow", run_id=new_id, metrics_sent=lines, replaced_at=lines, replacement=None)
    run.run_id = new_id
    logger.info(f"{key}: MLflow run {old_id} replaced by {new_id} (one point per step, newest attempt first).")


def settle_replacement(record: RunRecord, run: Any) -> str | None:
    """Finish a replacement a killed process left whole but with the old MLflow run still live,
    or delete the new run it left half-built; returns the MLflow run id run.json names now (None:
    nothing to settle). ``run`` is the key's opened MLflow run."""
    from mlflow.exceptions import MlflowException

    section = record.data.get("mlflow") or {}
    new_id, old_id = section.get("replacement"), section.get("run_id")
    if not new_id:
        return None
    try:
        new = run.client.get_run(new_id)
    except MlflowException:
        new = None
    tags = new.data.tags if new is not None else {}
    active = new is not None and new.info.lifecycle_stage == "active"
    if active and tags.get(KEY_TAG) == record.key and tags.get(REPLACES_TAG) == old_id:
        _finish_replacement(run.client, str(old_id), new_id, record.key)
        lines = int(tags.get(LINES_TAG) or 0)
        record.update_section("mlflow", run_id=new_id, metrics_sent=lines, replaced_at=lines, replacement=None)
        run.run_id = new_id
        return str(new_id)
    if active and KEY_TAG not in tags and tags.get(BUILDING_TAG) == record.key:
        run.client.delete_run(new_id)  # only the half-built run of this key: run.json may come from a bucket
    record.update_section("mlflow", replacement=None)
    return str(old_id) if old_id else None


def _finish_replacement(client: Any, old_id: str, new_id: str, key: str) -> None:
    """Tag the replaced MLflow run, nest its children under the new one, soft-delete it; only
    when it is the run of ``key`` (its ``phd_flow.key`` tag): run.json names it, and run.json may
    come from elsewhere."""
    from mlflow.exceptions import MlflowException

    try:
        old = client.get_run(old_id)
    except MlflowException:
        return  # gone: nothing to retire
    if old.info.lifecycle_stage == "deleted" or old.data.tags.get(KEY_TAG) != key:
        return
    client.set_tag(old_id, REPLACED_BY_TAG, new_id)
    children = client.search_runs([old.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{old_id}'")
    for child in children:
        client.set_tag(child.info.run_id, "mlflow.parentRunId", new_id)
    client.delete_run(old_id)


def _copy_artifacts(client: Any, old_id: str, new_id: str) -> None:
    """The old MLflow run's artifacts into the new one (the run's own files are logged again after)."""
    import tempfile

    entries = client.list_artifacts(old_id)
    if not entries:
        return
    with tempfile.TemporaryDirectory(prefix="phd_flow-replace-") as tmp:
        for entry in entries:
            local = client.download_artifacts(old_id, entry.path, tmp)
            if entry.is_dir:
                client.log_artifacts(new_id, local, entry.path)
            else:
                client.log_artifact(new_id, local)


def _log_artifacts(run: Any, run_dir: Path, data: dict[str, Any]) -> None:
    """The record files and the run's own files (``log_artifact``) as MLflow artifacts; stages,
    checkpoints, child runs, the result and phd_flow's private files stay out."""
    stages = set((data.get("stages") or {}).keys())
    for entry in sorted(run_dir.iterdir()):
        name = entry.name
        if name.startswith((".", PRIVATE_PREFIX)) or name in NOT_ARTIFACTS or name in stages:
            continue
        if entry.is_dir():
            if (entry / RUN_FILE).exists() or entry.is_symlink():
                continue  # a child run, fed on its own
            run.client.log_artifacts(run.run_id, str(entry), name)
        elif entry.is_file() and not entry.is_symlink():
            run.client.log_artifact(run.run_id, str(entry))


#: MLflow tags a run.json's ``tags`` section never sets (it may come from elsewhere).
_NOT_FROM_RECORD = frozenset(
    {REPLACES_TAG, REPLACED_BY_TAG, BUILDING_TAG, LINES_TAG, ATTEMPTS_TAG, "phd_flow.parent_key"}
)


def mlflow_tags(data: dict[str, Any]) -> dict[str, str]:
    """The MLflow tags of a run, from its run.json."""
    # a record's own tags never set the tags phd_flow's replacement bookkeeping trusts
    tags = {k: str(v) for k, v in (data.get("tags") or {}).items() if k not in _NOT_FROM_RECORD}
    node_class = str(data.get("node_class") or "")
    tags.update(
        {
            KEY_TAG: str(data.get("key")),  # after the record's tags: no tag names another run
            "phd_flow.node": str(data.get("node")),
            "host": str(data.get("host")),
            "mlflow.user": str(data.get("user") or _user()),
            "mlflow.source.type": "LOCAL",
        }
    )
    if node_class:
        tags["mlflow.source.name"] = node_class.rpartition(".")[0] or node_class
    commit = (data.get("git") or {}).get("commit")
    if commit:
        tags["mlflow.source.git.commit"] = str(commit)
    attempts = data.get(ATTEMPTS_FIELD)
    if isinstance(attempts, list) and len(attempts) > 1:
        tags[ATTEMPTS_TAG] = str(len(attempts))
    if data.get("parent"):
        tags["phd_flow.parent_key"] = str(data["parent"]).rsplit("/", 1)[-1]
    for name, value in (data.get("slurm") or {}).items():
        tags[f"slurm.{name}"] = str(value)
    return {k: redact_url(v) for k, v in tags.items()}


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return "unknown"


def run_name(data: dict[str, Any]) -> str:
    """A short MLflow run name that keeps what tells runs apart: ``FitOLS_2026-11-30T09-15_x7k2m9qa``
    for ``FitOLS_2026-11-30T09-15-23.123456Z_x7k2m9qa``; other keys stay whole."""
    key, node = str(data.get("key")), str(data.get("node"))
    head, sep, suffix = key.rpartition("_")
    if sep and head.startswith(f"{node}_") and len(suffix) == 8:
        stamp = head[len(node) + 1 :]
        return f"{node}_{stamp[:16]}_{suffix}"
    return key


def artifact_location(run_dir: Path, data: dict[str, Any], tracking_uri: str) -> str | None:
    """For the embedded default store (``<local_path>/mlflow.db``), experiments keep their
    artifacts in ``<local_path>/mlartifacts`` (MLflow's default is ``./mlruns`` of the cwd)."""
    local_path = run_dir
    for _ in str(data.get("path") or data.get("key") or "").split("/"):
        local_path = local_path.parent
    if tracking_uri == f"sqlite:///{local_path / 'mlflow.db'}":
        return (local_path / "mlartifacts").as_uri()
    return None


def epoch_ms(stamp: Any) -> int | None:
    """An ISO 8601 time of run.json in milliseconds since the epoch (MLflow's times), or None."""
    if not stamp:
        return None
    try:
        return int(datetime.fromisoformat(str(stamp)).timestamp() * 1000)
    except ValueError:
        return None


# --- the feeder process -------------------------------------------------------------------------


class _Flock:
    """A non-blocking ``flock`` on a file (dropped by the kernel when its process dies)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise
        self._fd = fd
        return True

    @property
    def fd(self) -> int:
        """The locked descriptor (after a successful :meth:`acquire`)."""
        assert self._fd is not None
        return self._fd

    def adopt(self, fd: int) -> bool:
        """Take over a descriptor locked by the process that started this one (``--lock-fd``);
        False when ``fd`` is not an open descriptor of this lock's file or another process holds
        the lock (the descriptor then holds none: this is no second feeder)."""
        try:
            if not os.path.samestat(os.fstat(fd), os.stat(self.path)):
                return False
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a no-op on the handed, locked descriptor
        except OSError:
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def is_held(self) -> bool:
        """True when another process holds the lock now."""
        with self.held() as mine:
            return not mine

    @contextlib.contextmanager
    def held(self) -> Iterator[bool]:
        """``with lock.held() as mine:``: True when this process got the lock (released after)."""
        mine = self.acquire()
        try:
            yield mine
        finally:
            self.release()


def _markers(queue: Path) -> list[Path]:
    return sorted(p for p in queue.iterdir() if p.name not in (FEEDER_LOCK, FEEDER_LOG))


def serve(queue: Path, tracking_uri: str, lock_fd: int | None = None) -> None:
    """Feed every queued run until the queue stays empty for :data:`IDLE_SECONDS` (``lock_fd``:
    the queue's lock, taken by the process that started this feeder)."""
    lock = _Flock(queue / FEEDER_LOCK)
    feeding: dict[Path, Feeding] = {}
    failures: dict[Path, int] = {}
    local_path = queue.parent.parent.parent
    held = (lock_fd is not None and lock.adopt(lock_fd)) or lock.acquire()
    if held:
        _warm(tracking_uri)
    while held:
        (queue / FEEDER_LOCK).write_text(f"pid {os.getpid()}\n")  # who feeds (for people and tests)
        idle_since = time.monotonic()
        while True:
            markers = _markers(queue)
            for marker in markers:
                try:  # a run path below local_path (a shared local_path: anyone may write the queue)
                    run_dir = safe_join(local_path, urllib.parse.unquote(marker.name))
                except InvalidKeyError as exc:
                    logger.warning(f"{marker.name}: not a run in {local_path} ({exc}): dropped.")
                    marker.unlink(missing_ok=True)
                    continue
                try:
                    result = feed_run(run_dir, tracking_uri, feeding)
                    failures.pop(run_dir, None)  # "in a row": a live run outlives separate blips
                except Exception as exc:  # MLflow refused: retried, then left to `sync`
                    result = _failed(run_dir, marker, failures, feeding, exc)
                    if result != LATER:  # the marker is gone already (a run may have queued itself anew)
                        logger.info(f"{marker.name}: {result}")
                    continue
                if result != LATER:
                    logger.info(f"{marker.name}: {result}")
                    marker.unlink(missing_ok=True)
            if markers:
                idle_since = time.monotonic()
            elif time.monotonic() - idle_since > IDLE_SECONDS:
                break
            time.sleep(POLL_SECONDS)
        lock.release()
        if not _markers(queue):  # a run that queued itself while we were leaving is fed
            return
        held = lock.acquire()


def _warm(tracking_uri: str) -> None:
    """Import mlflow and open the store before the first run needs them: a feeder started ahead
    of its runs (a sweep starts one as it starts its points) has them ready when they end."""
    from phd_flow.tracking import import_mlflow, store_lock

    try:
        import_mlflow()
        from mlflow.tracking import MlflowClient

        with store_lock(tracking_uri):
            MlflowClient(tracking_uri).search_experiments(max_results=1)
    except Exception as exc:  # the store is down or refuses: each run's feed retries and reports
        logger.warning(f"MLflow at {redact_url(tracking_uri)} could not be opened yet ({type(exc).__name__}: {exc}).")


def _failed(
    run_dir: Path, marker: Path, failures: dict[Path, int], feeding: dict[Path, Feeding], exc: Exception
) -> str:
    """Three failures in a row for a run, or one for a run that has ended when MLflow's server
    cannot be reached: ``not_synced`` in run.json, ``sync`` redoes it.

    An unreachable server has had MLflow's own HTTP retries already (phd_flow sets 2, with
    MLflow's backoff: ~4.5 s a request against a closed port, ~94 s when a firewall drops the
    packets and each connect waits its 30 s). For an ended run, two more rounds only kept a run
    that waits for MLflow (``[mlflow] wait``, SLURM jobs and sweeps) waiting: ~19 s against a
    closed port, now ~9. A live run keeps its three tries, so a server restart during a run does
    not end its feed (and one left anyway queues itself again when it ends, :func:`requeue_left`:
    ``not_synced`` and the marker's removal happen under the run's feed lock, which that takes
    too, so a new marker is never removed here, and a waiting run that sees the marker gone reads
    ``not_synced``). Other errors (a locked sqlite store, a refused request) get three.
    """
    failures[run_dir] = failures.get(run_dir, 0) + 1
    logger.warning(f"Feeding MLflow for {run_dir.name} failed ({type(exc).__name__}: {exc}).")
    feeding.pop(run_dir, None)  # reopened from run.json next time
    if failures[run_dir] < 3 and not (unreachable(exc) and _ended(run_dir)):
        return LATER
    failures.pop(run_dir)
    with _feed_lock_held(run_dir):
        with contextlib.suppress(Exception):
            RunRecord.load(run_dir).update_section(
                "mlflow", state=NOT_SYNCED, error=redact_url(f"{type(exc).__name__}: {exc}")
            )
        marker.unlink(missing_ok=True)
    return DONE


@contextlib.contextmanager
def _feed_lock_held(run_dir: Path) -> Iterator[None]:
    """The run's feed lock, waited for (none when the run directory is gone: ``rm``)."""
    try:
        lock = _Flock(run_dir / FEED_LOCK)
        while not lock.acquire():
            time.sleep(0.02)
    except OSError:
        yield
        return
    try:
        yield
    finally:
        lock.release()


def requeue_left(run_dir: Path, queue: Path, run_path: str, tracking_uri: str, telemetry: bool) -> str | None:
    """Queue an ended run again if the feeder gave it up while it ran (three failed tries in a
    row): ``pending`` again, its marker back, a feeder running. Returns the recorded error when
    it did, else None. Under the run's feed lock, as the feeder gives a run up."""
    with _feed_lock_held(run_dir):
        record = RunRecord.load(run_dir)
        section = record.data.get("mlflow") or {}
        if section.get("state") != NOT_SYNCED:
            return None
        record.update_section("mlflow", state=PENDING)
        enqueue(queue, run_path, tracking_uri, telemetry)
        return str(section.get("error"))


def _ended(run_dir: Path) -> bool:
    """Whether run.json says the run is over (False when it cannot be read)."""
    try:
        return RunRecord.load(run_dir).status != RUNNING
    except Exception:
        return False


def unreachable(exc: BaseException) -> bool:
    """Whether ``exc`` (MLflow's own exception, raised while handling requests' error) is requests'
    ``ConnectionError``, which MLflow's session raises once its retries are spent on a server that
    could not be connected to (refused, no route, name not resolved, connect timeout), that
    reset or never answered the connection (read timeouts are retried, then end as one), or
    that failed TLS or a proxy. A 5xx answer retried to the end (``RetryError``) is not one."""
    requests = sys.modules.get("requests")
    if requests is None:  # no HTTP store was used in this process
        return False
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, requests.exceptions.ConnectionError):
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    queue = Path(args[0])
    tracking_uri = os.environ.get(URI_ENV)
    if not tracking_uri or not queue.is_dir():
        return 2
    from phd_flow.log import configure_cli_stderr
    from phd_flow.tracking import allow_telemetry

    configure_cli_stderr()
    allow_telemetry("--telemetry" in args)
    logger.info(f"Feeder pid {os.getpid()} on {queue}")
    given = args[args.index("--lock-fd") + 1] if "--lock-fd" in args[:-1] else ""
    lock_fd = int(given) if given.isdigit() else None  # else the lock is taken here
    try:
        serve(queue, tracking_uri, lock_fd)
    except FileNotFoundError:  # local_path was deleted under us
        return 0
    return 0


def _exit(code: int) -> NoReturn:
    """Leave without the interpreter's teardown of mlflow's and sqlalchemy's modules (≈0.7 s of
    CPU per feeder, measured): the feeder runs no user code, and everything it wrote is closed."""
    atexit._run_exitfuncs()
    logger.complete()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit(main())

"""MLflow tracking, fed from the run directory.

Every metric is first appended to the run's ``metrics.jsonl`` (the offline record) and queued;
a background thread sends the queue to MLflow with ``MlflowClient.log_batch`` (up to 1,000
metrics a call), in order. A call to :meth:`Tracker.log_metric` costs the training loop
microseconds, not the 5-10 ms of ``mlflow.log_metric`` on sqlite.

If MLflow cannot be opened or stops answering, the run goes on: metrics stay in metrics.jsonl,
run.json says how many reached MLflow, and ``sync`` replays the rest later.

mlflow is imported only here, and only by whoever feeds MLflow: the feeder process
(:mod:`phd_flow.feeder`), ``sync``, or a run that opens MLflow itself (``[mlflow] autolog``, or
a node module that imports mlflow: plain ``mlflow.*`` calls in ``_run`` land in the run's MLflow
run).
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from phd_flow.log import logger, redact_url, repoint_mlflow_loggers
from phd_flow.run.record import METRICS_FILE

MAX_PARAM_LENGTH = 6000
Point = tuple[str, float, int, int]  # a metric point: name, value, timestamp (ms), step
BATCH = 1000
STATUS = {"completed": "FINISHED", "failed": "FAILED", "killed": "KILLED", "running": "RUNNING"}


#: ``[mlflow] telemetry`` of the project in use (see :func:`allow_telemetry`).
_TELEMETRY = {"allowed": False, "env_set": False}
TELEMETRY_ENV = "MLFLOW_DISABLE_TELEMETRY"


def allow_telemetry(allowed: bool) -> None:
    """``[mlflow] telemetry``: whether MLflow's usage telemetry may run in this process."""
    _TELEMETRY["allowed"] = allowed
    if allowed and _TELEMETRY["env_set"]:  # undo phd_flow's own default, never the user's
        os.environ.pop(TELEMETRY_ENV, None)
        _TELEMETRY["env_set"] = False


def import_mlflow() -> Any:
    """Import mlflow (≈2 s) with its stdout noise, logger takeover and telemetry undone.

    ``import mlflow`` creates a telemetry client whose threads fetch a config and send events
    over HTTP; one deadlocked against ``mlflow.autolog``'s import hook on the import lock. Unless the user opted
    in (``[mlflow] telemetry = true``, or ``MLFLOW_DISABLE_TELEMETRY`` set), it is switched off
    before the first import, and dropped if someone imported mlflow before phd_flow did.
    """
    prepare_mlflow_env()
    imported_before = "mlflow" in sys.modules
    import mlflow

    if imported_before and not _TELEMETRY["allowed"]:
        _drop_telemetry_client()
    repoint_mlflow_loggers()
    return mlflow


def prepare_mlflow_env() -> None:
    """The environment mlflow must see when it is imported (by phd_flow or by the user's code):
    telemetry off unless allowed, no URL printing, fail-fast HTTP."""
    if not _TELEMETRY["allowed"] and TELEMETRY_ENV not in os.environ:
        os.environ[TELEMETRY_ENV] = "true"
        _TELEMETRY["env_set"] = True
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # MLflow's HTTP default (7 retries, exponential backoff) stalls an offline node for minutes;
    # phd_flow keeps everything locally and `sync` catches up, so fail fast instead.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


def _drop_telemetry_client() -> None:
    """Drop the telemetry client an earlier ``import mlflow`` started (best effort)."""
    try:
        from mlflow.telemetry.client import get_telemetry_client, set_telemetry_client
        from mlflow.telemetry.utils import is_telemetry_disabled

        if get_telemetry_client() is not None and is_telemetry_disabled():
            set_telemetry_client()  # type: ignore[no-untyped-call]  # disabled: sets the client to None
    except Exception:  # an mlflow without telemetry, or with another layout
        return


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"optim": {"lr": 0.1}}`` -> ``{"optim.lr": 0.1}``."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def param_values(args: Mapping[str, Any]) -> dict[str, str]:
    """Args as MLflow params: flattened, stringified, truncated to 6,000 chars with a warning."""
    params = {}
    for name, value in flatten(args).items():
        text = value if isinstance(value, str) else json.dumps(value, default=str)
        if len(text) > MAX_PARAM_LENGTH:
            logger.warning(
                f"Param {name!r} is {len(text)} characters; MLflow keeps at most {MAX_PARAM_LENGTH}, "
                "so it is truncated there. The full value is in args.json."
            )
            text = text[: MAX_PARAM_LENGTH - 3] + "..."
        params[name] = text
    return params


@contextlib.contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """Serialise creating/upgrading a sqlite MLflow DB across processes.

    Two processes migrating a fresh sqlite DB at once break alembic; once the DB is ready (a
    marker records its inode) the lock is skipped.
    """
    db = sqlite_path(tracking_uri)
    if db is None:
        yield
        return
    marker = db.with_name(db.name + ".phd_flow-ready")
    if _marker_valid(marker, db):
        yield
        return
    from filelock import FileLock

    db.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(db) + ".lock", timeout=600):
        yield
        if db.exists():
            marker.write_text(str(db.stat().st_ino))


def _marker_valid(marker: Path, db: Path) -> bool:
    try:
        return db.exists() and marker.read_text().strip() == str(db.stat().st_ino)
    except OSError:
        return False


def sqlite_path(tracking_uri: str) -> Path | None:
    """The DB file of a ``sqlite:///`` URI, else None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return Path(tracking_uri[len("sqlite:///") :].split("?", 1)[0])


#: MLflow 3's UI opens in its GenAI view unless the page's URL (or the user's toggle, kept in the
#: browser) asks for the model-training one; an experiment tag does not change it.
CLASSIC_VIEW = "?workflowType=machine_learning"


def ui_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The run's page in the MLflow UI (model-training view) when the tracking store is a server."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{redact_url(tracking_uri).rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}{CLASSIC_VIEW}"


class MetricLog:
    """The run's metrics: queued by the training loop, written to metrics.jsonl by one thread,
    and fed to MLflow in batches from that file by another.

    :meth:`log` only appends a tuple to a deque (well under a microsecond of work), so the
    training loop never waits for JSON, disk or SQL. The writer empties the deque to disk every
    ``interval`` seconds, so memory stays flat however slow MLflow is; the sender tails the file
    (the offline record is the source, as for `sync`), at most :data:`BATCH` points at a time.
    :meth:`close` drains everything to disk, then to the sender.
    """

    def __init__(self, run_dir: Path, interval: float = 0.2) -> None:
        self.path = run_dir / METRICS_FILE
        self.queue: collections.deque[tuple[str, float, int, int]] = collections.deque()
        self._interval = interval
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        if self._file.tell() and not _ends_with_newline(self.path):
            self._file.write("\n")  # a killed attempt's torn last line stays a line of its own
        self._send_from = self._file.tell()  # byte offset of the first point not yet sent
        self._send_line = 0  # its line number (counted from ``start``'s ``from_line``)
        self._sender: Callable[[list[Point], int], None] | None = None
        self._hold_back: Callable[[int, Point], bool] | None = None
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def log(self, name: str, value: float, step: int | None = None, timestamp: int | None = None) -> None:
        """Queue one point (MLflow's conventions: step 0 and "now" in ms by default)."""
        self.queue.append((name, float(value), timestamp or int(time.time() * 1000), step or 0))

    def start(
        self,
        sender: Callable[[list[Point], int], None] | None,
        from_byte: int = -1,
        from_line: int = 0,
        hold_back: Callable[[int, Point], bool] | None = None,
    ) -> None:
        """Start the writer thread and, with a ``sender`` (MLflow), the thread feeding it from
        byte ``from_byte`` (line ``from_line``) of metrics.jsonl (an earlier attempt's unsent
        lines; default: new ones). The sender gets a batch of points and the number of lines
        they came from; a point ``hold_back(line, point)`` is true for is left out (a step an
        earlier attempt logged: :class:`Attempts`)."""
        self._sender, self._hold_back = sender, hold_back
        if from_byte >= 0:
            self._send_from, self._send_line = from_byte, from_line
        loops = [("phd_flow-metrics", self._drain)] + ([("phd_flow-metrics-send", self._send)] if sender else [])
        for name, step in loops:
            thread = threading.Thread(target=self._loop, args=(step,), name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def close(self) -> None:
        """Stop the threads, then drain what is queued to disk and what is on disk to the sender."""
        self._stop.set()
        for thread in self._threads:
            thread.join()
        self._drain()
        self._file.close()
        if self._sender is not None:
            self._send()

    def _loop(self, step: Callable[[], None]) -> None:
        while not self._stop.wait(self._interval):
            try:
                step()
            except OSError:  # a full disk: the unwritten points stay buffered; close() reports it
                continue

    def _drain(self) -> None:
        queue = self.queue
        while queue:
            batch = [queue.popleft() for _ in range(min(BATCH, len(queue)))]
            self._file.write("".join(_metric_line(item) for item in batch))
            self._file.flush()

    def _send(self) -> None:
        assert self._sender is not None
        with open(self.path, "rb") as handle:
            handle.seek(self._send_from)
            while True:
                lines = handle.readlines(BATCH * 64)
                complete = lines if not lines or lines[-1].endswith(b"\n") else lines[:-1]
                if not complete:
                    return
                points: list[Point] = []
                counted = 0  # lines the points come from
                for number, line in enumerate(complete, self._send_line):
                    counted += 1
                    with contextlib.suppress(ValueError, KeyError):  # a torn line of a killed attempt
                        point = parse_metric(line)
                        if self._hold_back is None or not self._hold_back(number, point):
                            points.append(point)
                    if len(points) == BATCH:
                        self._sender(points, counted)
                        points, counted = [], 0
                if counted:
                    self._sender(points, counted)
                self._send_from += sum(len(line) for line in complete)
                self._send_line += len(complete)
                if len(complete) < len(lines):
                    return  # a line still being written: the next round sends it


def _metric_line(item: tuple[str, float, int, int]) -> str:
    name, value, timestamp, step = item
    number = value if math.isfinite(value) else str(value)
    return json.dumps({"name": name, "value": number, "step": step, "timestamp": timestamp}) + "\n"


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"


def parse_metric(line: bytes | str) -> tuple[str, float, int, int]:
    rec = json.loads(line)
    return rec["name"], float(rec["value"]), int(rec["timestamp"]), int(rec["step"])


#: Tags of an MLflow run that replaced an earlier one for a resumed run (see :mod:`phd_flow.feeder`).
KEY_TAG = "phd_flow.key"
ATTEMPTS_TAG = "phd_flow.attempts"  # attempts of the run so far (when more than one)
REPLACES_TAG = "phd_flow.replaces"  # on the new MLflow run: the run id it replaced
REPLACED_BY_TAG = "phd_flow.replaced_by"  # on the deleted MLflow run: the run id that replaced it
BUILDING_TAG = "phd_flow.replacing"  # the key of a new MLflow run being filled (no KEY_TAG yet)
LINES_TAG = "phd_flow.metrics_lines"  # metrics.jsonl lines the new MLflow run was built from


def count_lines(path: Path) -> int:
    """The lines of ``path`` (0 when missing), a torn last line counted: the next writer ends it."""
    if not path.exists():
        return 0
    count, last = 0, b"\n"
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            count += chunk.count(b"\n")
            last = chunk[-1:]
    return count + (last != b"\n")


class Attempts:
    """metrics.jsonl split by the attempts of the run that wrote it (``starts``: the line each
    attempt began at, from run.json's ``attempts``), for the newest-attempt-wins MLflow view:
    for each (metric, step) the points of the newest attempt that logged it.

    A point *overrides* when an earlier attempt logged its (metric, step): MLflow then holds a
    stale value, and the run's MLflow run is rebuilt once the attempt ends.
    """

    def __init__(self, path: Path, starts: list[int]) -> None:
        self.path = path
        self.starts = sorted(set([0, *starts]))
        self._first: dict[tuple[str, int], int] | None = None  # (metric, step) -> first attempt

    @property
    def resumed(self) -> bool:
        return len(self.starts) > 1

    def attempt_of(self, line: int) -> int:
        """The attempt (0-based) that wrote line ``line`` (0-based)."""
        return bisect.bisect_right(self.starts, line) - 1

    def overrides(self, line: int, point: Point) -> bool:
        """True when the attempt of ``line`` logs a (metric, step) an earlier attempt logged."""
        if not self.resumed or line < self.starts[1]:
            return False
        if self._first is None:
            self._first = {}
            for number, item in self._points(self.starts[-1]):
                self._first.setdefault((item[0], item[3]), self.attempt_of(number))
        attempt = self.attempt_of(line)
        return self._first.get((point[0], point[3]), attempt) < attempt

    def any_override(self, first: int, last: int) -> bool:
        """True when a line in ``[first, last)`` overrides an earlier attempt's point."""
        if not self.resumed or last <= self.starts[1]:
            return False
        return any(self.overrides(n, p) for n, p in self._points(last) if n >= first)

    def newest_wins(self, lines: int) -> list[Point]:
        """The points of the first ``lines`` lines MLflow shows: per (metric, step), the newest
        attempt's (all of them, when that attempt logged the step more than once)."""
        return newest_wins([(self.attempt_of(n), p) for n, p in self._points(lines)])

    def _points(self, lines: int) -> Iterator[tuple[int, Point]]:
        if not self.path.exists():
            return
        with open(self.path, "rb") as handle:
            for number, line in enumerate(handle):
                if number >= lines:
                    return
                with contextlib.suppress(ValueError, KeyError):  # a torn line of a killed attempt
                    yield number, parse_metric(line)


def newest_wins(points: list[tuple[int, Point]]) -> list[Point]:
    """``(attempt, point)`` pairs -> the points of the newest attempt of each (metric, step)."""
    newest: dict[tuple[str, int], int] = {}
    for attempt, (name, _, _, step) in points:
        newest[name, step] = max(attempt, newest.get((name, step), attempt))
    return [p for attempt, p in points if newest[p[0], p[3]] == attempt]


class MlflowRun:
    """One MLflow run mirrored from a phd_flow run: params, tags, batched metrics, status."""

    def __init__(self, tracking_uri: str, experiment: str, artifact_location: str | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.artifact_location = artifact_location  # for an experiment this run creates
        self.mlflow: Any = None
        self.client: Any = None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.sent = 0
        self.error: str | None = None
        self._fluent = False
        self._previous_uri: str | None = None

    # --- opening ----------------------------------------------------------------------------

    def open(
        self,
        run_name: str,
        tags: dict[str, str],
        params: dict[str, str],
        parent_run_id: str | None = None,
        existing_run_id: str | None = None,
        activate: bool = True,
        start_time: int | None = None,
    ) -> None:
        """Create (or reopen) the MLflow run; ``activate`` makes it the active fluent run so
        that plain ``mlflow.*`` calls in user code land in it."""
        self.mlflow = import_mlflow()
        from mlflow.tracking import MlflowClient

        tags = {k: redact_url(str(v)) for k, v in tags.items()}  # no password in a URL reaches MLflow

        with store_lock(self.tracking_uri):
            self.client = MlflowClient(self.tracking_uri)
            self.experiment_id = self._experiment_id()
        key = tags.get("phd_flow.key")
        self.run_id = self._own_run(existing_run_id, key) or self._find_by_key(key)
        if self.run_id is None:
            parent_key = tags.get("phd_flow.parent_key")
            if parent_run_id and parent_key and self._own_run(parent_run_id, parent_key) is None:
                parent_run_id = None  # the parent's record names another key's MLflow run
            if parent_run_id:
                tags = {**tags, "mlflow.parentRunId": parent_run_id}
            run = self.client.create_run(self.experiment_id, start_time=start_time, run_name=run_name, tags=tags)
            self.run_id = run.info.run_id
            self.log_params(params, existing={})  # a run just created has none
        else:
            self.set_tags(tags)
            self.log_params(params)
        if activate:
            self.activate()

    def activate(self) -> None:
        """Make the run the active fluent run: plain ``mlflow.*`` calls in user code land in it."""
        mlflow = self.mlflow
        # set_tracking_uri also exports $MLFLOW_TRACKING_URI; close() puts both back.
        self._previous_uri = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.start_run(run_id=self.run_id, nested=mlflow.active_run() is not None)
        self._fluent = True

    def _own_run(self, run_id: str | None, key: str | None) -> str | None:
        """``run_id`` when that MLflow run is tagged ``phd_flow.key`` = ``key``; else None (a
        record names the run id, and a record may come from a bucket: never act on another run)."""
        if not run_id:
            return None
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.get_run(run_id)
            tagged, deleted = found.data.tags.get(KEY_TAG), found.info.lifecycle_stage == "deleted"
        except MlflowException:
            tagged, deleted = None, False
        if key and tagged == key and not deleted:
            return run_id
        if deleted:  # replaced (a resumed run), or deleted by hand: the key's live run, else a new one
            logger.info(f"MLflow run {run_id} of {key} is deleted: it is left alone.")
        else:
            logger.warning(f"MLflow run {run_id} is not tagged phd_flow.key={key!r}: it is left alone.")
        return None

    def _find_by_key(self, key: str | None) -> str | None:
        """The MLflow run already tagged with this phd_flow key (a `sync` after a crash)."""
        if not key:
            return None
        found = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`phd_flow.key` = '{key}'", max_results=1
        )
        return str(found[0].info.run_id) if found else None

    def _experiment_id(self) -> str:
        found = self.client.get_experiment_by_name(self.experiment)
        if found is not None:
            if found.lifecycle_stage == "deleted":
                self.client.restore_experiment(found.experiment_id)
            return str(found.experiment_id)
        # MLflow 3 opens an experiment without this tag in its GenAI view; runs are model training
        kind = {"mlflow.experimentKind": "custom_model_development"}
        return str(self.client.create_experiment(self.experiment, self.artifact_location, kind))

    def log_params(self, params: dict[str, str], existing: dict[str, str] | None = None) -> None:
        """Log params, skipping ones already logged with the same value; warn on a change
        (``existing``: the run's params when the caller knows them)."""
        from mlflow.entities import Param

        if existing is None:
            existing = self.client.get_run(self.run_id).data.params
        todo = []
        for name, value in params.items():
            if name not in existing:
                todo.append(Param(name, value))
            elif existing[name] != value:
                logger.warning(
                    f"MLflow param {name!r} is already {existing[name]!r} in run {self.run_id}; "
                    f"MLflow refuses to change it to {value!r}. The value in args.json is the one used."
                )
        for i in range(0, len(todo), 100):
            self.client.log_batch(self.run_id, params=todo[i : i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, redact_url(str(v))) for k, v in tags.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, tags=items[i : i + 100])

    # --- metrics ----------------------------------------------------------------------------

    def log_points(self, batch: list[tuple[str, float, int, int]]) -> None:
        """Log one batch (<= 1,000 points); MLflow's errors propagate."""
        from mlflow.entities import Metric

        self.client.log_batch(self.run_id, metrics=[Metric(n, v, t, s) for n, v, t, s in batch])

    def terminate(self, status: str, end_time: int | None) -> None:
        """Set the final status (a phd_flow status) and the run's real end time."""
        self.client.set_terminated(self.run_id, STATUS.get(status, "FAILED"), end_time=end_time)

    def send_metrics(self, batch: list[Point], lines: int) -> None:
        """Log one batch (<= 1,000 points, from ``lines`` lines of metrics.jsonl) with log_batch.
        After the first failure nothing more is sent, so ``sent`` is exactly the number of
        metrics.jsonl lines MLflow has."""
        if self.error is not None:
            return
        from mlflow.entities import Metric

        try:
            if batch:
                self.client.log_batch(self.run_id, metrics=[Metric(n, v, t, s) for n, v, t, s in batch])
        except Exception as exc:  # any MLflow failure: keep the rest for `sync`
            self.error = f"{type(exc).__name__}: {exc}"
            logger.warning(
                f"MLflow stopped accepting metrics ({self.error}); they stay in metrics.jsonl "
                "and `sync` sends the rest later."
            )
            return
        self.sent += lines

    # --- closing ----------------------------------------------------------------------------

    def close(self, status: str) -> None:
        """Set the final status and deactivate the fluent run."""
        mlflow_status = STATUS.get(status, "FAILED")
        try:
            if self._fluent:
                active = self.mlflow.active_run()
                while active is not None and active.info.run_id != self.run_id:
                    self.mlflow.end_run()  # a run the user started and forgot to end
                    active = self.mlflow.active_run()
                self.mlflow.end_run(status=mlflow_status)
            else:
                self.client.set_terminated(self.run_id, mlflow_status)
        finally:
            if self._fluent:
                self._fluent = False
                self.mlflow.set_tracking_uri(self._previous_uri)  # None unsets it again

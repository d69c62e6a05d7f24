"""The run directory's layout (file names, statuses) and its record, ``run.json``: the one parser,
changed only by a locked read-modify-write of the fields a writer owns, kept alive by a
heartbeat; the run lock that says a run is live."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.metadata
import json
import os
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from phd_flow._io import PRIVATE_PREFIX, atomic_write_json
from phd_flow.errors import CorruptRunError, UserError

# --- the layout of <local_path>/<key>/ -----------------------------------------------------------
RUN_FILE = "run.json"  # the record: status, times, host, args, stages, sync and MLflow state
ARGS_FILE = "args.json"  # the Args as JSON
RESULT_FILE = "results.pickle"  # the returned Result
OUTPUT_LOG = "output.log"  # text log
OUTPUT_JSONL = "output.jsonl"  # the same records as JSON lines
METRICS_FILE = "metrics.jsonl"  # every logged metric; MLflow is fed from it
REPRO_FILE = "reproducible.json"  # git, packages, platform
CHECKPOINT_DIR = "checkpoint"  # state a requeued run resumes from
#: run.json's list of the run's attempts (a requeued or resumed run has several), oldest first:
#: ``started_at``, ``metrics_from`` (the metrics.jsonl line it began at), and for an ended one
#: its ``status`` and ``ended_at``.
ATTEMPTS_FIELD = "attempts"
#: Held (flock) by every writer of run.json for one read-modify-write; never synced.
RECORD_LOCK = f"{PRIVATE_PREFIX}run.json.lock"
#: Held (flock) by the process running the run, for the whole run; says "pid host"; never synced.
RUN_LOCK = f"{PRIVATE_PREFIX}run.lock"
#: Names a stage may not take: the run directory's own files.
RESERVED_NAMES = frozenset({RUN_FILE, ARGS_FILE, RESULT_FILE, OUTPUT_LOG, OUTPUT_JSONL, METRICS_FILE, REPRO_FILE})

# --- statuses ------------------------------------------------------------------------------------
RUNNING, COMPLETED, FAILED, KILLED = "running", "completed", "failed", "killed"
FINISHED = (COMPLETED, FAILED, KILLED)
#: A ``running`` run whose heartbeat stopped (listing only; never written to run.json).
STALE = "stale"
STATUS_CHOICES = (RUNNING, COMPLETED, FAILED, KILLED, STALE)


def utcnow() -> str:
    """The current UTC time as ISO 8601 with microseconds."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def parse_time(text: Any) -> datetime | None:
    """An ISO timestamp from run.json as an aware datetime (UTC when it has no zone)."""
    if not isinstance(text, str) or not text:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def slurm_ids() -> dict[str, str]:
    """SLURM job ids of this process, when it runs in a SLURM job."""
    names = {
        "job_id": "SLURM_JOB_ID",
        "array_job_id": "SLURM_ARRAY_JOB_ID",
        "array_task_id": "SLURM_ARRAY_TASK_ID",
        "restart_count": "SLURM_RESTART_COUNT",
        "node": "SLURMD_NODENAME",
    }
    return {k: os.environ[v] for k, v in names.items() if os.environ.get(v)}


def check_key(data: dict[str, Any], expected: str, where: str) -> None:
    """Raise :class:`CorruptRunError` when a record's ``key`` is not ``expected`` (its location)."""
    key = data.get("key")
    if key is not None and key != expected:
        raise CorruptRunError(
            f"{where} says it is run {key!r} but it was found as run {expected!r}: a record must "
            f"name the run it belongs to, so {expected} is refused (it was copied or renamed by "
            "hand, or planted). Delete it, or put it back where it belongs."
        )


#: The sections of run.json that are objects whenever present.
_SECTIONS = ("sync", "mlflow", "stages", "result", "tags")


def schema_problem(data: Any) -> str:
    """Why ``data`` is not a run record's shape ("" when it is): an object with a ``status``,
    a string ``key`` (when set) and objects for its sections. Every reader relies on it."""
    if not isinstance(data, dict) or "status" not in data:
        return "no status"
    if data.get("key") is not None and not isinstance(data["key"], str):
        return "its key is not a string"
    bad = [name for name in _SECTIONS if name in data and not isinstance(data[name], dict)]
    if bad:
        return f"{bad[0]!r} is not an object"
    mlflow = data.get("mlflow") or {}
    ids = [name for name in ("run_id", "replacement") if mlflow.get(name) is not None]
    bad = [name for name in ids if not isinstance(mlflow[name], str)]
    if bad:  # MLflow run ids: the feeder looks them up and checks their tags
        return f"'mlflow.{bad[0]}' is not a string"
    return _attempts_problem(data.get(ATTEMPTS_FIELD))


def _attempts_problem(attempts: Any) -> str:
    """Why run.json's ``attempts`` is not a list of objects each starting at a metrics.jsonl
    line (a count), or ""."""
    if attempts is None:
        return ""
    if not isinstance(attempts, list) or not all(isinstance(a, dict) for a in attempts):
        return f"{ATTEMPTS_FIELD!r} is not a list of objects"
    starts = [a.get("metrics_from") for a in attempts]
    if any(s is not None and (type(s) is not int or s < 0) for s in starts):
        return f"'{ATTEMPTS_FIELD}[].metrics_from' is not a line count"
    return ""


class RunRecord:
    """The ``run.json`` of one run. Mutate ``data`` through :meth:`update`, which saves.

    Every save is a read-modify-write under a lock file next to run.json: run.json is read
    again and only the fields this object changed (top-level fields, and the fields of a nested
    section such as ``sync`` or ``mlflow``) are written over it. So the run (status, result,
    heartbeat, stages, children) and ``sync`` (its ``sync``/``mlflow`` catch-up) never write
    back each other's stale copies. A save never creates the run directory.
    """

    def __init__(self, run_dir: Path, data: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.data = data
        self._lock = threading.Lock()
        #: run.json as this object last read or wrote it: taken at the first change (listing
        #: thousands of runs copies nothing).
        self._base: dict[str, Any] | None = None

    @classmethod
    def create(cls, run_dir: Path, **fields: Any) -> RunRecord:
        """Start a record with status ``running`` and this process's host, pid and SLURM ids."""
        now = utcnow()
        data: dict[str, Any] = {
            "key": None,
            "node": None,
            "status": RUNNING,
            "started_at": now,
            "ended_at": None,
            "heartbeat_at": now,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "slurm": slurm_ids(),
            "phd_flow_version": importlib.metadata.version("phd_flow"),
            "sync": {"state": "pending"},
            "mlflow": {},
            "stages": {},
        }
        data.update(fields)
        record = cls(run_dir, data)
        with record._lock, record._file_lock():
            record._write(_copy(data))  # a new attempt's record replaces the old one whole
        return record

    @classmethod
    def load(cls, run_dir: Path) -> RunRecord:
        """Read ``run_dir/run.json``; raises :class:`CorruptRunError` naming the file."""
        path = run_dir / RUN_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise CorruptRunError(f"{path} does not exist: {run_dir.name} is not a run.") from None
        except OSError as exc:
            raise CorruptRunError(f"{path} is unreadable ({exc.strerror or exc}).") from None
        return cls.from_bytes(run_dir, raw, str(path))

    @classmethod
    def from_bytes(cls, run_dir: Path, raw: bytes, where: str) -> RunRecord:
        """Parse run.json's bytes (local or from a remote); :class:`CorruptRunError` names ``where``.

        A record is data, not an instruction: its ``key`` must be the name of the directory it
        was found in (``run_dir.name``; a child run lives at ``<parent>/<child key>``), else it is
        refused, so no command acts on the run a record merely claims to be.
        """
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError, OverflowError) as exc:
            raise CorruptRunError(f"{where} is unreadable or not valid JSON ({type(exc).__name__}).") from None
        problem = schema_problem(data)
        if problem:
            raise CorruptRunError(f"{where} is not a phd_flow run record ({problem}).")
        check_key(data, run_dir.name, where)
        return cls(run_dir, data)

    @property
    def key(self) -> str:
        return str(self.data.get("key") or self.run_dir.name)

    @property
    def status(self) -> str:
        return str(self.data.get("status"))

    def update(self, **fields: Any) -> None:
        """Set top-level fields and save them (with any other change made to ``data``)."""
        with self._lock:
            self._snapshot()
            self.data.update(fields)
            self._save_locked()

    def update_section(self, section: str, **fields: Any) -> None:
        """Update fields of one nested section (``sync``, ``mlflow``, ``stages``...) and save."""
        with self._lock:
            self._snapshot()
            current = self.data.get(section)
            self.data[section] = {**(current if isinstance(current, dict) else {}), **fields}
            self._save_locked()

    def save(self) -> None:
        """Save the changes made to ``data`` since it was last saved (a record that was never
        saved, such as a loaded one, is written whole)."""
        with self._lock:
            self._save_locked()

    def _snapshot(self) -> None:
        if self._base is None:
            self._base = _copy(self.data)

    def _save_locked(self) -> None:
        # ``data`` is only ever assigned key by key here (never cleared): code of the run that
        # reads or appends to it meanwhile (``children``) sees no gap, and what it adds after
        # the snapshot differs from ``_base``, so the next save writes it.
        with self._file_lock():
            try:
                disk: Any = json.loads((self.run_dir / RUN_FILE).read_bytes())
            except FileNotFoundError:
                disk = None
            except ValueError:
                disk = None  # unreadable: this object's copy is the best there is
            base = self._base
            if not isinstance(disk, dict) or base is None:
                self._write(_copy(self.data))
                return
            # fields another writer changed since this object last saw run.json: taken over
            theirs = [k for k in set(disk) | set(base) if disk.get(k, _MISSING) != base.get(k, _MISSING)]
            _merge_changes(disk, base, self.data)
            self._write(disk)
            for name in theirs:
                if name in disk:
                    self.data[name] = _copy(disk[name])
                else:
                    self.data.pop(name, None)

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        # O_CREAT without parents: a deleted run directory raises FileNotFoundError
        fd = os.open(self.run_dir / RECORD_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write(self, data: dict[str, Any]) -> None:
        """Write ``data`` (a copy this object no longer changes) as run.json; it becomes ``_base``.

        Durable (fsync) when the status changes (the first record, the final status): those
        must outlive a crashed machine. Other updates (heartbeat, sections) are atomic only, so
        a power cut can at worst leave the previous version of the same status.
        """
        durable = self._base is None or data.get("status") != self._base.get("status")
        atomic_write_json(self.run_dir / RUN_FILE, data, make_parents=False, durable=durable)
        self._base = data


_MISSING = object()


def _copy(value: Any) -> Any:
    """A copy as run.json holds it (JSON in C: no other thread's change lands halfway)."""
    return json.loads(json.dumps(value, default=str))


def _merge_changes(target: dict[str, Any], base: Mapping[str, Any], changed: Mapping[str, Any]) -> None:
    """Apply to ``target`` what differs between ``base`` and ``changed``: top-level fields, and
    one level down for sections that are dicts on all three sides."""
    for name in set(base) | set(changed):
        if name not in changed:
            target.pop(name, None)
            continue
        new, old, there = changed[name], base.get(name), target.get(name)
        if name in base and new == old:
            continue
        if isinstance(new, dict) and isinstance(old, dict) and isinstance(there, dict):
            for field in set(old) | set(new):
                if field not in new:
                    there.pop(field, None)
                elif field not in old or new[field] != old[field]:
                    there[field] = _copy(new[field])
        else:
            target[name] = _copy(new)


class Heartbeat:
    """A daemon thread that refreshes ``heartbeat_at`` in run.json every ``interval`` seconds.

    A run whose heartbeat is older than ``[runs] stale_after_seconds`` was lost (SIGKILL, OOM,
    machine gone) and is listed as ``stale``.
    """

    def __init__(self, record: RunRecord, interval: float) -> None:
        self.record = record
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="phd_flow-heartbeat", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            if not self.record.run_dir.is_dir():
                return  # the run directory was deleted: never recreate it
            try:
                self.record.update(heartbeat_at=utcnow())
            except OSError:
                continue  # a full disk must not kill the run; the next beat tries again


# --- the run lock: is a run live? ----------------------------------------------------------------


class RunLock:
    """An exclusive ``flock`` on ``<run dir>/.phd_flow-run.lock``, held by the process running the
    run for the whole run: a second process on the same key is refused, and ``rm``, ``sync`` and
    ``ls`` can tell a live run from a dead one (the kernel drops the lock when the process dies,
    however it dies)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self._fd: int | None = None

    def acquire(self, key: str, wait: float = 1.0) -> None:
        """Take the lock or raise :class:`UserError` naming the pid and host that hold it.

        Waits up to ``wait`` seconds: a probe (:func:`run_lock_held`) holds it for a moment.
        """
        fd = os.open(self.run_dir / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    os.close(fd)
                    holder = lock_holder(self.run_dir) or _recorded_process(self.run_dir)
                    raise UserError(
                        f"Run {key} is already running ({holder}): a key is written by one "
                        "process at a time. Wait for it to end, or run without --key for a new run."
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def lock_holder(run_dir: Path) -> str:
    """What the run lock says about its holder ("pid N on HOST"), or ""."""
    try:
        return (run_dir / RUN_LOCK).read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def _recorded_process(run_dir: Path) -> str:
    try:
        data = json.loads((run_dir / RUN_FILE).read_bytes())
        return f"pid {data['pid']} on {data['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def run_lock_held(run_dir: Path) -> bool | None:
    """True when a process holds the run lock of ``run_dir``, False when nobody does, None when
    the run has no lock file (a run made before the lock existed, or one in storage only)."""
    try:
        fd = os.open(run_dir / RUN_LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def is_stale(data: Mapping[str, Any], stale_after: float, now: datetime, host: str) -> bool:
    """True for a ``running`` record whose heartbeat is older than ``stale_after`` seconds, or
    whose process is gone (same host, pid not alive)."""
    if data.get("status") != RUNNING:
        return False
    pid = data.get("pid")
    if data.get("host") == host and isinstance(pid, int) and not pid_alive(pid):
        return True
    beat = parse_time(data.get("heartbeat_at") or data.get("started_at"))
    return beat is None or (now - beat).total_seconds() > stale_after


def is_live(run_dir: Path, data: Mapping[str, Any], stale_after: float) -> bool:
    """True while a process is running this run: it holds the run lock, or (no lock file, or a
    run of another host, whose lock this machine may not see) the record is ``running`` and
    not stale."""
    held = run_lock_held(run_dir)
    if held:
        return True
    if data.get("status") != RUNNING:
        return False
    host = socket.gethostname()
    if held is False and data.get("host") == host:
        return False  # the lock file exists and its process is gone
    return not is_stale(data, stale_after, datetime.now(timezone.utc), host)


def describe_process(data: Mapping[str, Any], run_dir: Path) -> str:
    """ "pid N on HOST" of the process running a run."""
    holder = lock_holder(run_dir) if run_lock_held(run_dir) else ""
    return holder or f"pid {data.get('pid', '?')} on {data.get('host', '?')}"


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True

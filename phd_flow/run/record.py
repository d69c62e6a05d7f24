"""The run directory's layout (file names, statuses) and its record, ``run.json``: the one parser,
written atomically at every state change, kept alive by a heartbeat."""

from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from phd_flow._io import atomic_write_json
from phd_flow.errors import CorruptRunError

# --- the layout of <local_path>/<key>/ -----------------------------------------------------------
RUN_FILE = "run.json"  # the record: status, times, host, args, stages, sync and MLflow state
ARGS_FILE = "args.json"  # the Args as JSON
RESULT_FILE = "results.pickle"  # the returned Result
OUTPUT_LOG = "output.log"  # text log
OUTPUT_JSONL = "output.jsonl"  # the same records as JSON lines
METRICS_FILE = "metrics.jsonl"  # every logged metric; MLflow is fed from it
REPRO_FILE = "reproducible.json"  # git, packages, platform
CHECKPOINT_DIR = "checkpoint"  # state a requeued run resumes from
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


class RunRecord:
    """The ``run.json`` of one run. Mutate ``data`` through :meth:`update`, which saves."""

    def __init__(self, run_dir: Path, data: dict[str, Any]) -> None:
        self.run_dir = run_dir
        self.data = data
        self._lock = threading.Lock()

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
        record.save()
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
        except ValueError as exc:
            raise CorruptRunError(f"{where} is unreadable or not valid JSON ({exc}).") from None
        if not isinstance(data, dict) or "status" not in data:
            raise CorruptRunError(f"{where} is not a phd_flow run record.")
        check_key(data, run_dir.name, where)
        return cls(run_dir, data)

    @property
    def key(self) -> str:
        return str(self.data.get("key") or self.run_dir.name)

    @property
    def status(self) -> str:
        return str(self.data.get("status"))

    def update(self, **fields: Any) -> None:
        """Set top-level fields and save atomically."""
        with self._lock:
            self.data.update(fields)
            self._save_locked()

    def update_section(self, section: str, **fields: Any) -> None:
        """Update one nested section (``sync``, ``mlflow``, ``stages``...) and save."""
        with self._lock:
            self.data.setdefault(section, {}).update(fields)
            self._save_locked()

    def save(self) -> None:
        with self._lock:
            self._save_locked()

    def _save_locked(self) -> None:
        atomic_write_json(self.run_dir / RUN_FILE, self.data)


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
            try:
                self.record.update(heartbeat_at=utcnow())
            except OSError:
                continue  # a full disk must not kill the run; the next beat tries again

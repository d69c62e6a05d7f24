"""Push one run to the remote and record the outcome in its run.json: the one "upload this run,
mark it synced", used by the end of every run and by ``sync``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from phd_flow.errors import UserError
from phd_flow.log import logger, redact_url
from phd_flow.run.record import RunRecord, utcnow

if TYPE_CHECKING:
    from phd_flow.storage.facade import Storage


def local_only_stages(record: RunRecord) -> list[str]:
    """The run's ``skip_log`` stages: left out of every upload."""
    stages = record.data.get("stages") or {}
    return [name for name, info in stages.items() if isinstance(info, dict) and info.get("skip_log")]


def push_run(storage: Storage, record: RunRecord, run_path: str, pending: list[str]) -> bool:
    """Upload ``run_path`` (minus its local-only stages) and ``pending`` keys that earlier uploads
    could not send; True when everything arrived. Never raises: the run's files stay safe in
    ``local_path`` and the record says ``not_synced`` with the error, for ``sync`` to retry."""
    try:
        remote = storage.remote
    except UserError as exc:
        logger.error(f"Storage is not usable, so run {record.key} was not synced: {exc}")
        record.update_section("sync", state="not_synced", error=redact_url(str(exc)), at=utcnow(), pending=pending)
        return False
    if remote is None:
        record.update_section("sync", state="local", at=utcnow())
        return True
    deferring, storage.defer_failed_uploads = storage.defer_failed_uploads, False  # failures must raise here
    try:
        for key in pending:
            if storage.path(key).exists():
                storage.upload(key)
        report = storage.upload(run_path, exclude=local_only_stages(record))
        logger.info(f"Synced {record.key} to {remote.describe()}: {report}")
        where = redact_url(remote.describe())
        record.update_section("sync", state="synced", error=None, at=utcnow(), remote=where, pending=[])
        storage.upload(run_path, exclude=local_only_stages(record))  # sends run.json, the logs and the manifest
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        logger.error(
            f"Run {record.key} was not synced to {remote.describe()} ({message}). Its files are "
            f"safe in {record.run_dir}; run `sync {record.key}` once the storage is reachable."
        )
        record.update_section("sync", state="not_synced", error=redact_url(message), at=utcnow(), pending=pending)
        return False
    finally:
        storage.defer_failed_uploads = deferring
    return True

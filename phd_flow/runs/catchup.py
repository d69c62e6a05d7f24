"""Catching runs up: push their files to the remote and their record to MLflow (``sync``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from phd_flow.errors import PhdFlowError
from phd_flow.log import logger
from phd_flow.run.record import RUNNING, RunRecord, utcnow
from phd_flow.runs.listing import local_records, resolve_key

if TYPE_CHECKING:
    from phd_flow.config import Config


def needs_sync(record: RunRecord) -> bool:
    """True when the run's files or MLflow record are behind its run directory."""
    if record.status == RUNNING:
        return False
    files = record.data.get("sync", {}).get("state")
    tracked = record.data.get("mlflow", {}).get("state")
    return files not in ("synced", "local") or tracked not in ("synced", "disabled", None)


def sync_runs(config: Config, keys: list[str]) -> dict[str, bool]:
    """Sync the given runs (or every run that needs it). Returns key -> fully synced."""
    if keys:
        records = [RunRecord.load(config.local_path / resolve_key(config, k)) for k in keys]
    else:
        records = [r for r in local_records(config.local_path) if isinstance(r, RunRecord) and needs_sync(r)]
    return {record.key: sync_one(config, record) for record in records}


def sync_one(config: Config, record: RunRecord) -> bool:
    """Catch one run up with MLflow and the remote; True when both succeeded."""
    ok = _sync_mlflow(config, record)
    return _sync_files(config, record) and ok


def _sync_mlflow(config: Config, record: RunRecord) -> bool:
    section = record.data.get("mlflow", {})
    if not config.mlflow.enabled or section.get("state") in ("synced", "disabled"):
        return True
    from phd_flow.tracking import catch_up

    uri = config.tracking_uri()  # today's config: the recorded URI may be the one that failed
    experiment = section.get("experiment") or config.experiment_name(record.data.get("package"))
    try:
        record.update(mlflow=catch_up(record.run_dir, record.data, uri, experiment))
    except Exception as exc:
        logger.error(f"{record.key}: MLflow at {uri} is still not reachable ({type(exc).__name__}: {exc}).")
        return False
    logger.info(f"{record.key}: MLflow run {record.data['mlflow']['run_id']} is up to date.")
    return True


def _sync_files(config: Config, record: RunRecord) -> bool:
    from phd_flow.storage import make_storage

    storage = make_storage(config)
    try:
        remote = storage.remote
        if remote is None:
            record.update_section("sync", state="local", at=utcnow())
            return True
        for key in record.data.get("sync", {}).get("pending", []):  # uploads that failed in the run
            if storage.path(key).exists():
                storage.upload(key)
        report = storage.upload(record.key)
        record.update_section("sync", state="synced", error=None, at=utcnow(), remote=remote.describe(), pending=[])
        storage.upload(record.key)
    except PhdFlowError as exc:
        record.update_section("sync", state="not_synced", error=str(exc), at=utcnow())
        logger.error(f"{record.key}: not synced: {exc}")
        return False
    logger.info(f"{record.key}: synced to {remote.describe()}: {report}")
    return True

"""Catching runs up: push their files to the remote and their record to MLflow (``sync``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from phd_flow.log import logger
from phd_flow.run.push import push_run
from phd_flow.run.record import RUNNING, RunRecord
from phd_flow.runs.listing import local_records, resolve_key

if TYPE_CHECKING:
    from phd_flow.config import Config
    from phd_flow.project import Project


def needs_sync(record: RunRecord) -> bool:
    """True when the run's files or MLflow record are behind its run directory."""
    if record.status == RUNNING:
        return False
    files = record.data.get("sync", {}).get("state")
    tracked = record.data.get("mlflow", {}).get("state")
    return files not in ("synced", "local") or tracked not in ("synced", "disabled", None)


def sync_runs(project: Project, keys: list[str]) -> dict[str, bool]:
    """Sync the given runs (or every run that needs it). Returns key -> fully synced."""
    local_path = project.config.local_path
    if keys:
        records = [RunRecord.load(local_path / resolve_key(project, k)) for k in keys]
    else:
        records = [r for r in local_records(local_path) if isinstance(r, RunRecord) and needs_sync(r)]
    return {record.key: sync_one(project, record) for record in records}


def sync_one(project: Project, record: RunRecord) -> bool:
    """Catch one run up with MLflow and the remote; True when both succeeded."""
    ok = _sync_mlflow(project.config, record)
    pending = list(record.data.get("sync", {}).get("pending") or [])  # uploads that failed in the run
    return push_run(project.storage, record, record.key, pending) and ok


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

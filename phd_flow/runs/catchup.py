"""Catching runs up: push their files to the remote and their record to MLflow (``sync``)."""

from __future__ import annotations

import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

from phd_flow.errors import InvalidKeyError
from phd_flow.keys import normalize
from phd_flow.log import logger
from phd_flow.run.push import push_run
from phd_flow.run.record import FINISHED, RUNNING, RunRecord, describe_process, is_live, is_stale
from phd_flow.runs.listing import local_records, resolve_key
from phd_flow.runs.metrics import SUMMARY_FIELD, summary_of_dir
from phd_flow.storage.facade import DOWNLOADED
from phd_flow.sweeps.grid import SWEEP_KIND

if TYPE_CHECKING:
    from phd_flow.config import Config
    from phd_flow.project import Project


def needs_sync(record: RunRecord, has_remote: bool = False) -> bool:
    """True when the run's files or MLflow record are behind its run directory.

    A run recorded ``local`` (made while no remote was configured) is behind once one is.
    """
    if record.status == RUNNING:
        return False
    return files_behind(record, has_remote) or mlflow_behind(record)


def files_behind(record: RunRecord, has_remote: bool) -> bool:
    """True when the remote lacks (part of) the run's files."""
    files = record.data.get("sync", {}).get("state")
    return files != "synced" and (has_remote or files != "local")


def mlflow_behind(record: RunRecord) -> bool:
    """True when MLflow lacks (part of) the run's record."""
    return record.data.get("mlflow", {}).get("state") not in ("synced", "disabled", None)


def sync_runs(project: Project, keys: list[str]) -> dict[str, bool]:
    """Sync the given runs (or every run that needs it). Returns key -> fully synced.

    A live run (its process holds the run lock, or it beats) is skipped with a message: its own
    end syncs it. Without keys, every finished run the remote or MLflow lacks is synced, and so
    is every stale run (its process is gone: treated as killed for the sync, its status is left
    to ``ls --stale --fix``).
    """
    config = project.config
    local_path, stale_after = config.local_path, config.runs.stale_after_seconds
    results: dict[str, bool] = {}
    if keys:
        records = [RunRecord.load(local_path / resolve_key(project, k)) for k in keys]
    else:
        has_remote, host, now = config.storage.has_remote, socket.gethostname(), datetime.now(timezone.utc)

        def wanted(record: RunRecord) -> bool:
            if needs_sync(record, has_remote):
                return True
            # a stale run (its process is gone) is synced as a killed one would be
            return is_stale(record.data, stale_after, now, host) and not is_live(
                record.run_dir, record.data, stale_after
            )

        records = []
        for item in local_records(local_path):
            if isinstance(item, RunRecord):
                records += [item] if wanted(item) else []
            else:  # never "Everything is synced." past a run it could not read
                logger.warning(f"{item} Not synced: fix or delete that run.json.")
                results[item.run_name or str(item)] = False
    for record in records:
        if is_live(record.run_dir, record.data, stale_after):
            logger.warning(
                f"{record.key} is still running ({describe_process(record.data, record.run_dir)}): "
                "skipped; its end syncs it (or `sync` it once it is over)."
            )
            continue
        results[record.key] = sync_one(project, record)
    return results


def sync_one(project: Project, record: RunRecord) -> bool:
    """Catch one run up with MLflow and the remote; True when both succeeded."""
    mark = downloaded(project.config, record)
    if mark is not None:  # its record came from the bucket: data, not a to-do
        logger.warning(
            f"{record.key} was downloaded from the remote: `sync` neither pushes it back nor "
            f"records it in MLflow (delete {mark} if it is your own run)."
        )
        return True
    if record.status in FINISHED and SUMMARY_FIELD not in record.data and record.data.get("kind") != "sweep":
        # a run made before run.json had the summary: `sync` writes it (`ls` computes it meanwhile)
        record.update(**{SUMMARY_FIELD: summary_of_dir(record.run_dir)})
    ok = sync_mlflow(project.config, record)
    pending = _own_pending(record)  # uploads that failed in the run
    run_path = record.run_dir.relative_to(project.config.local_path).as_posix()  # <parent>/<child> for a child
    return push_run(project.storage, record, run_path, pending) and ok


def downloaded(config: Config, record: RunRecord) -> Path | None:
    """The mark saying the run's top folder in local_path came from the remote (``download``),
    or None: such a run is data, its run.json's sync and MLflow sections are not instructions."""
    try:
        top = record.run_dir.relative_to(config.local_path).parts[0]
    except (ValueError, IndexError):
        return None
    mark = config.local_path / DOWNLOADED / top
    return mark if mark.exists() else None


def _own_pending(record: RunRecord) -> list[str]:
    """The record's failed uploads that belong to the run: its directory, or a folder named
    after its key (``datasets/<key>``); other names are dropped with a warning."""
    section = record.data.get("sync")
    pending = section.get("pending") if isinstance(section, dict) else None
    kept = []
    for name in pending if isinstance(pending, list) else []:
        try:
            ok = isinstance(name, str) and record.key in normalize(name).split("/")
        except InvalidKeyError:
            ok = False
        if ok:
            kept.append(name)
        else:
            logger.warning(f"{record.key}: run.json lists {name!r} to upload, outside the run: not uploaded.")
    return kept


def sync_mlflow(config: Config, record: RunRecord) -> bool:
    """Bring a run's MLflow view up to date from its run directory; True when MLflow has it."""
    section = record.data.get("mlflow", {})
    if not config.mlflow.enabled or section.get("state") in ("synced", "disabled"):
        return True
    mark = downloaded(config, record)
    if mark is not None:  # every caller: a run from the bucket never enters this machine's MLflow
        logger.warning(
            f"{record.key} was downloaded from the remote: it is not recorded in MLflow "
            f"(delete {mark} if it is your own run)."
        )
        return True
    if record.data.get("kind") == SWEEP_KIND:  # not a run: its points are; it is their parent
        return _close_sweep(config, record)
    from phd_flow.feeder import catch_up
    from phd_flow.tracking import allow_telemetry

    allow_telemetry(config.mlflow.telemetry)
    uri = config.tracking_uri()  # today's config: the recorded URI may be the one that failed
    experiment = section.get("experiment") or config.experiment_name(record.data.get("package"))
    try:
        record.update_section("mlflow", **catch_up(record, uri, experiment))
    except Exception as exc:
        logger.error(f"{record.key}: MLflow at {uri} is still not reachable ({type(exc).__name__}: {exc}).")
        return False
    logger.info(f"{record.key}: MLflow run {record.data['mlflow']['run_id']} is up to date.")
    return True


def _close_sweep(config: Config, record: RunRecord) -> bool:
    """``sync`` of a sweep record: once every point ended, its MLflow run (their parent) gets
    the final status; a sweep never becomes an MLflow run of its own here."""
    from phd_flow.sweeps.executors import close_mlflow_sweep
    from phd_flow.sweeps.grid import Sweep, point_status

    sweep = Sweep(record.run_dir, dict(record.data))
    for point in sweep.points:
        point["status"] = point_status(
            config.local_path / point["key"], point["status"], config.runs.stale_after_seconds
        )
    close_mlflow_sweep(config, sweep)
    return True

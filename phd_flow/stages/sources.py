"""Where a stage comes from: a rule's ``load_from`` resolved to a source run, and the source's
stage folder fetched into the new run, verified against the checksums the source recorded.

A source is a phd_flow run (found by key, key prefix, ``latest``, or an MLflow run id whose
``phd_flow.key`` tag names it) or a plain MLflow run (its artifacts under ``<stage>/``, as
:mod:`phd_flow.compat` logs them). Files are taken from the source's local run directory when
it is on this machine, else from the remote storage, else from MLflow's artifact store.

A local source's files are reflinked (copy-on-write) where the filesystem can, else copied, so
the loading run's code may write them freely; when the stage closes, each file that still has
the source's bytes becomes a read-only hardlink of the source's copy (:func:`store_once`: a
later write fails instead of changing the source run). From the remote, files the source
stores by reference are fetched from the run that holds them. Every file is verified.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phd_flow._io import sha256_file
from phd_flow.errors import CorruptRunError, InvalidKeyError, PhdFlowError, RunNotFoundError, StageError, closest
from phd_flow.keys import RunKey, remote_relpath, safe_join
from phd_flow.log import logger
from phd_flow.run import signing
from phd_flow.run.record import COMPLETED, FAILED, KILLED, RUN_FILE, RunRecord, parse_time

if TYPE_CHECKING:
    from phd_flow.config import Config
    from phd_flow.project import Project

LATEST = "latest"
#: Checksums of a plain MLflow run's stage, logged by phd_flow.compat next to the artifacts.
MLFLOW_CHECKSUMS = "phd_flow-stages"
_MLFLOW_RUN_ID = re.compile(r"^[0-9a-f]{32}$")
_REMOTE_LATEST_LIMIT = 50  # run.json files read from the remote when looking for "latest"
#: How far in the future a run's start may lie (clocks of lab machines differ) for ``latest``.
CLOCK_SKEW = timedelta(minutes=5)


@dataclass
class Source:
    """A run a stage can be loaded from."""

    key: str  # the phd_flow key, or the MLflow run id of a plain MLflow run
    path: str | None  # its run directory relative to local_path; None for a plain MLflow run
    info: dict[str, Any] = field(default_factory=dict)  # the source's run.json stages[<name>]
    status: str = COMPLETED  # the source run's status: a failed run's completed stage is usable

    @property
    def files(self) -> dict[str, str] | None:
        """``{relative path: sha256}`` of the stage's files, as the source recorded them."""
        files = self.info.get("files")
        return dict(files) if isinstance(files, dict) else None


def is_complete(info: Any) -> bool:
    """True for a run.json ``stages`` entry of a stage that closed without error."""
    return isinstance(info, dict) and info.get("status") == "completed"


def digest(files: dict[str, str]) -> str:
    """One sha256 over a stage's ``{relative path: sha256}`` map."""
    return hashlib.sha256(json.dumps(sorted(files.items())).encode()).hexdigest()


def hash_tree(root: Path) -> dict[str, str]:
    """``{relative posix path: sha256}`` of every regular file below ``root``."""
    if not root.is_dir():
        return {}
    return {
        path.relative_to(root).as_posix(): sha256_file(path)
        for path in sorted(root.rglob("*"))
        if path.is_file() and not path.is_symlink()
    }


# --- resolving a rule ---------------------------------------------------------------------------


def resolve(project: Project, node: str, stage: str, value: str, origin: str) -> Source | None:
    """The source a rule points to; None only for ``latest`` when no run has the stage yet.

    Raises :class:`StageError` naming ``origin`` (the rule) when the run does not exist, did not
    complete, or lacks the stage.
    """
    config, storage = project.config, project.storage
    if value == LATEST:
        return latest(project, node, stage)
    try:
        from phd_flow.runs.listing import resolve_key

        key = resolve_key(project, value, remote=storage.remote is not None)
    except (RunNotFoundError, InvalidKeyError) as exc:
        if not (_MLFLOW_RUN_ID.match(value) and config.mlflow.enabled):
            raise StageError(f"{origin}: {exc} Fix the rule or remove it.") from None
        return _mlflow_source(project, value, stage, origin)
    return phd_flow_source(project, key, stage, origin)


def read_record(project: Project, path: str) -> dict[str, Any] | None:
    """A run's run.json: the local copy, else the remote's, else None. A record whose ``key``
    is not its location is refused (:class:`CorruptRunError`)."""
    config, storage = project.config, project.storage
    remote_relpath(path)
    local = config.local_path / path / RUN_FILE
    try:
        raw: bytes | None = local.read_bytes()
    except FileNotFoundError:
        remote = storage.remote
        raw = remote.read_small(f"{path}/{RUN_FILE}") if remote is not None else None
    if raw is None:
        return None
    return RunRecord.from_bytes(config.local_path / path, raw, f"the run.json of run {path}").data


def phd_flow_source(project: Project, key: str, stage: str, origin: str) -> Source:
    """Check that run ``key`` completed and has ``stage``; raises :class:`StageError`."""
    config = project.config
    data = read_record(project, key)
    if data is None:
        raise StageError(f"{origin}: run {key} has no run.json in {config.local_path} or the remote storage.")
    path = key  # where the run was found: never the record's own "path" field
    stages = data.get("stages") or {}
    info = stages.get(stage)
    status = data.get("status")
    # a failed or killed run's stage counts when the stage itself completed (and verifies below)
    if status != COMPLETED and not (status in (FAILED, KILLED) and is_complete(info)):
        raise StageError(
            f"{origin}: run {key} is {status}, not completed, so its stage {stage!r} "
            "cannot be trusted. Point the rule at a completed run (`ls` lists them)."
        )
    if not isinstance(info, dict) or not is_complete(info):
        having = sorted(name for name, value in stages.items() if is_complete(value))
        raise StageError(
            f"{origin}: run {key} ({data.get('node')}) has no completed stage {stage!r}."
            f"{closest(stage, having)} Its stages: {', '.join(having) or 'none'}."
        )
    if info.get("skip_log") and not (config.local_path / path / stage).is_dir():
        raise StageError(
            f"{origin}: stage {stage!r} of run {key} was kept local (skip_log) on host "
            f"{data.get('host')} and is not in {config.local_path}. Load it on that machine, or "
            "from a run whose stage was synced."
        )
    files = info.get("files")
    if not isinstance(files, dict):
        raise StageError(
            f"{origin}: stage {stage!r} of run {key} records no file checksums in its {RUN_FILE}, "
            "so its files cannot be verified: nothing of it is used. Load it from another run, "
            "or drop the rule to compute it."
        )
    authenticate(project.config, key, stage, info, origin)
    return Source(key=key, path=path, info=dict(info), status=str(status))


def authenticate(config: Config, key: str, stage: str, info: dict[str, Any], origin: str) -> None:
    """With a signing key configured, check that ``stage`` of run ``key`` was made on this machine
    or carries a valid signature over its file list; raises :class:`StageError` otherwise.

    Without a key, a stage is verified by its checksums only (they catch accidents, not forgery).
    """
    secret = signing.signing_key(config)
    if secret is None:
        return
    files = {str(k): str(v) for k, v in (info.get("files") or {}).items()}
    stage_digest = digest(files)
    if signing.stage_made_here(config.local_path, key, stage, stage_digest):
        return
    if signing.valid(signing.stage_mac(secret, key, stage, stage_digest), info.get("hmac")):
        return
    state = "has a signature that does not match" if info.get("hmac") else "is not signed"
    raise StageError(
        f"{origin}: stage {stage!r} of run {key} was not made on this machine and its file list "
        f"{state} the signing key configured here ({signing.key_source(config)}): nothing of it is "
        f"used. The machine that made the run must use the same key (set {signing.ENV_KEY} to the "
        "lab's secret on both machines); or drop the rule to compute the stage."
    )


def latest(project: Project, node: str, stage: str, fingerprint: str | None = None) -> Source | None:
    """The newest completed run of ``node`` with ``stage`` (local runs, then newer remote ones).

    With ``fingerprint`` (this run's fingerprint of the stage: its ``depends_on`` values, code
    and earlier stages), only a run whose recorded stage has that fingerprint counts: a run made
    with other inputs is never loaded silently.

    Only runs with a verified record (its key is where it was found) count, and never one that
    started (key time or ``started_at``) more than :data:`CLOCK_SKEW` in the future; skipped
    runs are named in a warning.
    """
    config, storage = project.config, project.storage
    from phd_flow.runs.listing import local_records, remote_run_names

    origin = f"[stages.{stage}] load_from = 'latest'"
    best: dict[str, Any] | None = None
    for record in local_records(config.local_path):
        if isinstance(record, CorruptRunError):
            logger.warning(f"{origin} skips a run: {record}")
            continue
        data = record.data
        if (
            data.get("node") == node
            and data.get("status") == COMPLETED
            and is_complete((data.get("stages") or {}).get(stage))
            and _matches((data.get("stages") or {}).get(stage), fingerprint)
            and (best is None or str(data.get("key")) > str(best.get("key")))
            and not _from_the_future(record.key, data, origin)
        ):
            best = data
    remote = storage.remote
    if remote is not None:
        floor = str(best["key"]) if best is not None else ""
        names = remote_run_names(remote)[0]
        newer = sorted((d for d in names if d.startswith(f"{node}_") and d > floor), reverse=True)
        newer = [d for d in newer if not _from_the_future(d, {}, origin)]
        for key in newer[:_REMOTE_LATEST_LIMIT]:
            try:  # one bad record never breaks the run: it is skipped with a warning
                found = read_record(project, key)
                if found is not None and found.get("key") != key:
                    raise CorruptRunError("its run.json does not name the run (no 'key').")
                stages = (found or {}).get("stages") or {}
                if (
                    found
                    and found.get("status") == COMPLETED
                    and is_complete(stages.get(stage))
                    and _matches(stages.get(stage), fingerprint)
                    and not _from_the_future(key, found, origin)
                ):
                    # unverifiable (no file list) or, with a signing key, unsigned: the next older
                    return phd_flow_source(project, key, stage, origin)
            except (PhdFlowError, OSError, ValueError, TypeError, AttributeError) as exc:
                logger.warning(f"{origin} skips run {key}: {exc}")
    if best is None:
        return None
    try:
        return phd_flow_source(project, str(best.get("key") or ""), stage, origin)
    except (StageError, CorruptRunError) as exc:
        logger.warning(f"{exc} Computing the stage instead.")
        return None


def _matches(info: Any, fingerprint: str | None) -> bool:
    """True when no fingerprint is wanted, or the recorded stage ``info`` has it."""
    return fingerprint is None or (isinstance(info, dict) and info.get("fingerprint") == fingerprint)


def _from_the_future(key: str, data: dict[str, Any], origin: str) -> bool:
    """True (and a warning naming the run) when the run's key time or ``started_at`` is more than
    :data:`CLOCK_SKEW` after now: no genuine run started there, so ``latest`` never picks it."""
    limit = datetime.now(timezone.utc) + CLOCK_SKEW
    times = [RunKey(key).created, parse_time(data.get("started_at"))]
    if any(t is not None and t > limit for t in times):
        logger.warning(f"{origin} skips run {key}: it claims to start in the future (clock skew allowed: 5 min).")
        return True
    return False


def _mlflow_source(project: Project, run_id: str, stage: str, origin: str) -> Source:
    config = project.config
    client = project.mlflow_client()
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise StageError(
            f"{origin}: {run_id!r} is neither a run key in {config.local_path} nor an MLflow "
            f"run id in {config.tracking_uri()}. Fix the rule or remove it."
        ) from None
    key = run.data.tags.get("phd_flow.key")
    if key:
        return phd_flow_source(project, key, stage, f"{origin} (MLflow run {run_id})")
    if run.info.status != "FINISHED":
        raise StageError(f"{origin}: MLflow run {run_id} is {run.info.status}, not FINISHED.")
    if not client.list_artifacts(run_id, stage):
        raise StageError(f"{origin}: MLflow run {run_id} has no artifacts under {stage}/.")
    files = mlflow_checksums(config.tracking_uri(), run_id, stage)
    if files is None:
        raise StageError(
            f"{origin}: MLflow run {run_id} logged no checksums for {stage}/ "
            f"({MLFLOW_CHECKSUMS}/{stage}.json), so its files cannot be verified: nothing of it is "
            "used. Log the stage with phd_flow's managed_artifact, or drop the rule to compute it."
        )
    return Source(key=run_id, path=None, info={"files": files})


def mlflow_checksums(tracking_uri: str, run_id: str, stage: str) -> dict[str, str] | None:
    """The ``{file: sha256}`` map phd_flow.compat logged for ``stage`` of an MLflow run."""
    from phd_flow.tracking import import_mlflow

    mlflow = import_mlflow()

    with tempfile.TemporaryDirectory(prefix="phd_flow-") as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id,
                artifact_path=f"{MLFLOW_CHECKSUMS}/{stage}.json",
                dst_path=tmp,
                tracking_uri=tracking_uri,
            )
            files = json.loads(Path(path).read_text())
        except Exception:  # not logged by phd_flow.compat: nothing to verify against
            return None
    return {str(k): str(v) for k, v in files.items()} if isinstance(files, dict) else None


# --- fetching -----------------------------------------------------------------------------------


def fetch(project: Project, source: Source, stage: str, dest: Path) -> dict[str, str]:
    """Copy ``source``'s stage folder into ``dest``, verified; returns ``{file: sha256}``.

    Files land in a hidden folder first and move into ``dest`` only when every checksum
    matches, so on :class:`StageError` nothing of the source is used.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{stage}.", suffix=".phd_flow-part", dir=dest.parent))
    try:
        where = _download(project, source, stage, staging)
        files = verify(staging, source.files, stage, source.key, where)
        dest.mkdir(parents=True, exist_ok=True)
        for rel in files:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).replace(target)
        return files
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _download(project: Project, source: Source, stage: str, staging: Path) -> str:
    config, storage = project.config, project.storage
    if source.path is None:
        _download_mlflow(project, source, stage, staging)
        return f"MLflow run {source.key}"
    remote_relpath(f"{source.path}/{stage}")  # a key checked by resolve_key; checked again here
    local = config.local_path / source.path / stage
    if local.is_dir() and not local.is_symlink():
        _link_tree(local, staging)
        return str(local)
    remote = storage.remote
    if remote is None:
        raise StageError(f"Stage {stage!r} of run {source.key} is not in {local} and no remote storage is configured.")
    from phd_flow.storage import engine

    prefix = f"{source.path}/{stage}"
    storage.pull_tree(prefix, staging)  # with the files it stores by reference to another run
    (staging / engine.MANIFEST).unlink(missing_ok=True)
    return f"{remote.describe()}/{prefix}"


def _link_tree(source: Path, target: Path) -> None:
    """Every regular file below ``source`` at the same place below ``target``: a reflink where
    the filesystem can, else a copy (writable: the stage is open). Symlinks are never followed
    nor taken: only the files ``verify`` checks move into the run."""
    from phd_flow.storage.facade import dedup_mode, link_or_copy

    mode = dedup_mode()
    for path in sorted(source.rglob("*")):
        if path.is_symlink() or not path.is_file():
            continue
        dest = target / path.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        link_or_copy(path, dest, mode, hardlink=False)


def store_once(config: Config, stage: str, source_key: str, folder: Path, files: dict[str, str]) -> int:
    """When a loaded stage has closed: each of its files (``{path: sha256}`` as just hashed) that
    still has the bytes of the source run's local copy becomes a read-only hardlink of it
    (:func:`~phd_flow.storage.facade.hardlink_read_only`); returns how many. Files the run
    changed, a source not on this machine, and places where links are not safe keep their copy."""
    from phd_flow.storage.facade import dedup_mode, hardlink_read_only

    mode = dedup_mode()
    try:
        base = safe_join(config.local_path, f"{source_key}/{stage}")
    except InvalidKeyError:  # an MLflow run id: no local copy to share
        return 0
    linked = 0
    for rel, digest in sorted(files.items()):
        own, theirs = folder / rel, base / rel
        try:
            if theirs.is_symlink() or not theirs.is_file() or os.path.samefile(own, theirs):
                continue
            if own.stat().st_size != theirs.stat().st_size or sha256_file(theirs) != digest:
                continue
        except OSError:
            continue
        link = own.with_name(f".phd_flow-{own.name}.link")
        link.unlink(missing_ok=True)
        if not hardlink_read_only(theirs, link, mode):
            return linked  # not safe here (root, no hardlinks, another filesystem): copies stay
        link.replace(own)
        linked += 1
    return linked


def unshare(folder: Path) -> None:
    """Give this run private, writable copies of the files in ``folder`` that are hardlinked
    with another run's (a stage about to be computed again in place: writing them must neither
    fail nor reach the other run)."""
    for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
        if path.is_symlink() or not path.is_file() or path.stat().st_nlink < 2:
            continue
        private = path.with_name(f".phd_flow-{path.name}.unshare")
        shutil.copyfile(path, private)
        private.replace(path)


def _download_mlflow(project: Project, source: Source, stage: str, staging: Path) -> None:
    config = project.config
    project.mlflow_client()  # imports mlflow the way phd_flow does (telemetry off)
    import mlflow

    with tempfile.TemporaryDirectory(prefix="phd_flow-") as tmp:
        got = mlflow.artifacts.download_artifacts(
            run_id=source.key, artifact_path=stage, dst_path=tmp, tracking_uri=config.tracking_uri()
        )
        shutil.copytree(got, staging, dirs_exist_ok=True)


def verify(root: Path, expected: dict[str, str] | None, stage: str, key: str, where: str) -> dict[str, str]:
    """Hash ``root`` and compare with ``expected``; raises :class:`StageError` on any difference."""
    if expected is None:
        raise StageError(
            f"Stage {stage!r} from run {key} ({where}) records no checksums, so its files cannot be "
            "verified: nothing of it was used. Load the stage from another run, or drop the rule "
            "to compute it."
        )
    actual = hash_tree(root)
    missing = sorted(set(expected) - set(actual))
    wrong = sorted(rel for rel in expected if rel in actual and actual[rel] != expected[rel])
    extra = sorted(set(actual) - set(expected))
    if missing or wrong or extra:
        problems = [f"{rel} does not match its recorded sha256" for rel in wrong]
        problems += [f"{rel} is missing" for rel in missing] + [f"{rel} was not recorded" for rel in extra]
        raise StageError(
            f"Stage {stage!r} from run {key} ({where}) failed verification: "
            f"{'; '.join(problems[:5])}. "
            "Nothing of it was used. The source copy is damaged: load the stage from another run, "
            "or drop the rule to compute it."
        )
    return actual

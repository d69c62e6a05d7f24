"""Push one run to the remote and record the outcome in its run.json: the one "upload this run,
mark it synced", used by the end of every run and by ``sync``.

A stage loaded from another run is not uploaded again: each of its files whose bytes the remote
already holds for the source run (same sha256) is left out of the upload and stored by
reference (:data:`phd_flow.storage.facade.REFS`), and run.json records where
(``stages.<name>.stored_in``: ``{file: run}``). Downloads resolve and verify those files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from phd_flow._io import sha256_file
from phd_flow.errors import InvalidKeyError, UserError
from phd_flow.keys import remote_relpath
from phd_flow.log import logger, redact_url
from phd_flow.run.record import COMPLETED, RunRecord, utcnow

if TYPE_CHECKING:
    from phd_flow.storage.facade import Ref, Storage


def local_only_stages(record: RunRecord) -> list[str]:
    """The run's ``skip_log`` stages: left out of every upload."""
    stages = record.data.get("stages") or {}
    return [name for name, info in stages.items() if isinstance(info, dict) and info.get("skip_log")]


def stored_elsewhere(storage: Storage, record: RunRecord, run_path: str) -> dict[str, Ref]:
    """``{path in the run: Ref}`` of the files of the run's loaded stages whose bytes the remote
    already holds for the run they came from (same size and sha256 as the local file), and
    records ``stages.<name>.stored_in`` (``{file: run holding its bytes}``) in run.json."""
    from phd_flow.storage.facade import dedup_mode

    if dedup_mode() == "off":
        return {}
    refs: dict[str, Ref] = {}
    for name, info in dict(record.data.get("stages") or {}).items():
        if not _loaded_and_logged(info):
            continue
        source, files = str(info["loaded_from"]), info["files"]
        try:
            # only a completed run's copy is written once: a failed or killed source may be
            # requeued under its key, overwriting the bytes a reference would point to
            completed = _completed(storage, remote_relpath(source))
            held = storage.stored_files(f"{remote_relpath(source)}/{name}") if completed else {}
        except (InvalidKeyError, UserError):  # an MLflow run id, or a damaged remote record
            continue
        where: dict[str, str] = {}
        for rel, digest in sorted(files.items()):
            ref, local = held.get(rel), record.run_dir / name / rel
            if ref is None or ref.sha256 != digest or not local.is_file() or local.stat().st_size != ref.size:
                continue
            if sha256_file(local) != digest:  # changed since the stage closed: its own bytes go up
                continue
            refs[f"{name}/{rel}"] = ref
            tail = f"/{name}/{rel}"
            where[rel] = ref.key[: -len(tail)] if ref.key.endswith(tail) else ref.key
        if info.get("stored_in") != (where or None):
            updated = {k: v for k, v in info.items() if k != "stored_in"}
            record.update_section("stages", **{name: {**updated, **({"stored_in": where} if where else {})}})
    return refs


def _completed(storage: Storage, source: str) -> bool:
    """True when run ``source`` is completed in the remote and, if it is here, locally."""
    from phd_flow.run.record import RUN_FILE

    remote, local = storage.remote, storage.path(f"{source}/{RUN_FILE}")
    copies = [remote.read_small(f"{source}/{RUN_FILE}") if remote is not None else None]
    copies += [local.read_bytes()] if local.is_file() else []
    where = f"the run.json of run {source}"
    return all(c is not None and RunRecord.from_bytes(local.parent, c, where).status == COMPLETED for c in copies)


def kept_out_inside(record: RunRecord) -> list[str]:
    """What the runs inside this one (a pipeline's child runs, pushed on their own) keep out of
    every upload, as paths in this run: their local-only stages and the files their push stored
    by reference (``stored_in``), so the parent's push does not send them after all."""
    from phd_flow.errors import CorruptRunError
    from phd_flow.run.record import RUN_FILE

    out: list[str] = []
    for found in sorted(record.run_dir.rglob(RUN_FILE)):
        if found.parent == record.run_dir:
            continue
        try:
            child = RunRecord.load(found.parent)
        except (CorruptRunError, OSError):
            continue
        rel = found.parent.relative_to(record.run_dir).as_posix()
        out += [f"{rel}/{name}" for name in local_only_stages(child)]
        for name, info in (child.data.get("stages") or {}).items():
            stored = info.get("stored_in") if isinstance(info, dict) else None
            out += [f"{rel}/{name}/{path}" for path in stored or {}] if isinstance(stored, dict) else []
    return out


def _loaded_and_logged(info: Any) -> bool:
    return (
        isinstance(info, dict)
        and bool(info.get("loaded_from"))
        and info.get("status") == COMPLETED
        and not info.get("skip_log")
        and isinstance(info.get("files"), dict)
    )


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
        refs = stored_elsewhere(storage, record, run_path)
        if refs:  # written first: it only points at bytes the remote already holds
            from phd_flow.storage.facade import REFS, dump_refs

            remote.write_bytes(f"{run_path}/{REFS}", dump_refs(refs))
        exclude = local_only_stages(record) + sorted(refs) + kept_out_inside(record)
        report = storage.upload(run_path, exclude=exclude)
        stored_once = f"; {len(refs)} loaded stage file(s) stored once, in their source run" if refs else ""
        logger.info(f"Synced {record.key} to {remote.describe()}: {report}{stored_once}")
        where = redact_url(remote.describe())
        record.update_section("sync", state="synced", error=None, at=utcnow(), remote=where, pending=[])
        storage.upload(run_path, exclude=exclude)  # sends run.json, the logs and the manifest
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
    if "/" not in run_path and record.data.get("key") == run_path:  # a child run is not listed
        from phd_flow.runs.index import index_pushed

        index_pushed(remote, [record.data])  # the final run.json is up: `ls --remote` need not GET it
    return True

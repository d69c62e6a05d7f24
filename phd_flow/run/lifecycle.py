"""The lifecycle of one node run, from a new directory to the final sync, driving its ActiveRun.

Order matters for "nothing is lost": the run directory, args.json and run.json exist before any
user code runs; the final status is written to run.json before MLflow and the remote are
touched; a failing MLflow or remote never changes the run's own status.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

from phd_flow import keys, reuse
from phd_flow._io import atomic_write_json
from phd_flow.errors import CorruptRunError, RunFailedError, RunKilledError, UserError
from phd_flow.feeder import attempt_starts, offset_of_line
from phd_flow.log import RunLogging, logger, redact_url
from phd_flow.run import repro
from phd_flow.run.active import ActiveRun
from phd_flow.run.args import args_to_dict
from phd_flow.run.pipeline import node_fingerprint, remember
from phd_flow.run.push import push_run
from phd_flow.run.record import (
    ARGS_FILE,
    ATTEMPTS_FIELD,
    COMPLETED,
    FAILED,
    KILLED,
    METRICS_FILE,
    OUTPUT_JSONL,
    OUTPUT_LOG,
    REPRO_FILE,
    RUN_FILE,
    Heartbeat,
    RunLock,
    RunRecord,
    utcnow,
)
from phd_flow.run.result import save_result
from phd_flow.runs.metrics import SUMMARY_FIELD, summary_of_dir
from phd_flow.tracking import ui_url


def execute(run: ActiveRun) -> Any:
    """Run ``run.node`` end to end; see :meth:`phd_flow.run.node.Node.run`."""
    config = run.project.config
    run_dir = _make_run_dir(config.local_path, run.run_path, config.where("local_path"))
    lock = RunLock(run_dir)
    try:
        lock.acquire(str(run.key), wait=_lock_wait())  # a second process on this key is refused here
    except OSError as exc:  # a full disk before the run: nothing ran, nothing to record
        with contextlib.suppress(OSError):
            for leftover in run_dir.glob(".phd_flow-*.lock"):
                leftover.unlink()
            run_dir.rmdir()  # only if empty: never a run dir with files, e.g. a resumed one
        raise UserError(
            f"Cannot lock {run_dir}: {exc.strerror or exc}. Nothing ran. Check that local_path "
            f"({config.where('local_path')}) points to a writable directory with free space."
        ) from None
    try:
        _refuse_completed(run_dir, str(run.key))
        return _execute_locked(run, run_dir)
    finally:
        lock.release()


#: How long a requeued SLURM attempt waits for the run lock: the attempt SLURM stopped may still
#: be writing its "killed" record and pushing when the requeued job starts on the same node.
REQUEUE_LOCK_WAIT = 120.0


def _lock_wait() -> float:
    restarts = os.environ.get("SLURM_RESTART_COUNT", "0")
    return REQUEUE_LOCK_WAIT if restarts.isdigit() and int(restarts) > 0 else 1.0


def _refuse_completed(run_dir: Path, key: str) -> None:
    """A key is written once: an attempt with the key of a completed run is refused (a killed,
    failed or requeued attempt may be resumed under its key)."""
    try:
        status = RunRecord.load(run_dir).status if (run_dir / RUN_FILE).exists() else None
    except CorruptRunError:
        return  # a torn record of an earlier attempt: that attempt did not complete
    if status == COMPLETED:
        raise UserError(
            f"Run {key} already completed: a key is written once, so --key {key} cannot run "
            "again. Run without --key for a new run (or `rm` that run first)."
        )


def _execute_locked(run: ActiveRun, run_dir: Path) -> Any:
    config = run.project.config
    node = run.node
    args = args_to_dict(node.args)
    parent = run.parent
    target = run_dir / ARGS_FILE
    earlier_mlflow: dict[str, Any] = {}
    attempts = [{"started_at": utcnow(), "metrics_from": 0}]
    if run.resumed:  # an earlier attempt's completed stages are kept when still valid
        run.stages.remember_earlier(run_dir)
        earlier_mlflow = _earlier_mlflow(run_dir)
        attempts = _attempts(run_dir)
    try:
        atomic_write_json(target, args, durable=False)  # the record's first (durable) write follows
        target = run_dir / RUN_FILE
        run.record = RunRecord.create(
            run_dir,
            key=str(run.key),
            node=run.node_name,
            node_class=f"{type(node).__module__}.{type(node).__qualname__}",
            package=type(node).package,
            args=args,
            parent=parent.run_path if parent is not None else None,
            path=run.run_path,
            tags=dict(node.options.tags),
            sweep=node.options.sweep,
            resumed=run.resumed,
            mlflow=earlier_mlflow,
            **{ATTEMPTS_FIELD: attempts},
        )
    except OSError as exc:  # a full disk before the run: nothing ran, nothing to record
        with contextlib.suppress(OSError):
            run_dir.rmdir()  # only if empty: never a run dir with files, e.g. a resumed one
        raise UserError(
            f"Cannot write {target}: {exc.strerror or exc}. Nothing ran. Check that local_path "
            f"({config.where('local_path')}) points to a writable directory with free space."
        ) from None
    saved_signals = run.install_signal_handlers()
    heartbeat = Heartbeat(run.record, config.runs.heartbeat_seconds)
    storage = run.project.storage
    deferring = storage.defer_failed_uploads
    # A storage outage must not kill the experiment: failed uploads inside the run are retried
    # at its end and by `sync`.
    storage.defer_failed_uploads = True
    try:
        with RunLogging(run_dir / OUTPUT_LOG, run_dir / OUTPUT_JSONL) as logging, reuse.pinned():
            heartbeat.start()
            try:
                return _run_logged(run, run.record, args, logging)
            except OSError as exc:  # writing the record failed (a full disk): the run did not complete
                raise _failed_to_record(run, run.record, exc) from None
    finally:
        storage.defer_failed_uploads = deferring
        heartbeat.stop()
        if run.mlflow_hook is not None:  # _run raised past the lifecycle: never leave the hook
            run.mlflow_hook.remove()
        run.restore_signal_handlers(saved_signals)


def _earlier_mlflow(run_dir: Path) -> dict[str, Any]:
    """What MLflow has of an earlier attempt (its run id, how many metric lines it got): a resumed
    run goes on from there, so no point is sent twice."""
    try:
        section = RunRecord.load(run_dir).data.get("mlflow") or {}
    except CorruptRunError:
        return {}
    kept = ("run_id", "experiment_id", "experiment", "tracking_uri", "metrics_sent", "replaced_at", "replacement")
    return {k: section[k] for k in kept if k in section}


def _attempts(run_dir: Path) -> list[dict[str, Any]]:
    """run.json's attempts for a new attempt of a run: the earlier ones (their end recorded) and
    this one, beginning at the current end of metrics.jsonl (MLflow shows the newest attempt of
    each metric step: :func:`phd_flow.feeder.replace_run`)."""
    from phd_flow.tracking import count_lines

    try:
        earlier = RunRecord.load(run_dir).data
    except CorruptRunError:
        earlier = {}
    attempts = [a for a in earlier.get(ATTEMPTS_FIELD) or [] if isinstance(a, dict)]
    if not attempts:  # a record from before attempts were recorded: one earlier attempt
        attempts = [{"started_at": earlier.get("started_at"), "metrics_from": 0}]
    attempts[-1].update(status=earlier.get("status"), ended_at=earlier.get("ended_at"))
    attempts.append({"started_at": utcnow(), "metrics_from": count_lines(run_dir / METRICS_FILE)})
    return attempts


def _make_run_dir(local_path: Path, key: str, where: str) -> Path:
    run_dir = local_path / keys.normalize(key)
    try:
        run_dir.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        if not (run_dir / RUN_FILE).exists():
            raise
    except OSError as exc:
        raise UserError(
            f"Cannot create the run directory {run_dir}: {exc.strerror or exc}. Check that "
            f"local_path ({where}) points to a writable directory with free space."
        ) from None
    return run_dir


def _run_logged(run: ActiveRun, record: RunRecord, args: dict[str, Any], logging: RunLogging) -> Any:
    config = run.project.config
    name = run.node_name
    logger.info(f"Run node {name} {run.key} in {run.run_dir}")
    secrets = repro.secret_values(config)
    git = repro.git_info(config.project_root, secrets)
    record.update(fingerprint=node_fingerprint(type(run.node), args))
    atomic_write_json(run.run_dir / REPRO_FILE, repro.snapshot(config.project_root, git, secrets), durable=False)
    record.update(git={k: git.get(k) for k in ("commit", "branch", "dirty")} if git else {})
    from phd_flow.tracking import Attempts, MetricLog

    metrics = run.metrics = MetricLog(run.run_dir)
    _open_mlflow(run, record, args, git.get("commit"))
    if run.mlflow is not None:  # MLflow opened in this process: its sender thread feeds it
        sent = run.mlflow.sent
        attempts = Attempts(metrics.path, attempt_starts(record.data))
        hold_back = attempts.overrides if attempts.resumed else None  # sent when the MLflow run is rebuilt
        metrics.start(run.mlflow.send_metrics, offset_of_line(metrics.path, sent), sent, hold_back)
    else:
        metrics.start(None)
    status, error, result = run.call_user_code()
    metrics.close()
    _end_fluent(run, status)
    if status == COMPLETED:
        status, error = save_result(record, result, name, config)
    if status == COMPLETED:
        try:
            remember(run)
            run.stages.finish()  # warn about unused stage rules
        except OSError as exc:  # the result is whole: the run completed, only reuse misses it
            logger.warning(f"{name} {run.key}: the reuse index could not be written ({exc}); it will not be reused.")
    if logging.write_error is not None:
        logger.warning(f"{OUTPUT_LOG} of {run.key} is incomplete: writing it failed ({logging.write_error}).")
    status = _finish(run, record, status, error)
    if status == FAILED:
        raise RunFailedError(f"{name} {run.key} failed: {_describe(error)}. See {run.run_dir / OUTPUT_LOG}.") from (
            error if isinstance(error, BaseException) else None
        )
    if status == KILLED:
        signum = run.kill_signal
        if signum is not None and signum != signal.SIGINT:
            raise RunKilledError(signal.Signals(signum).name)
        raise KeyboardInterrupt
    return result


def _finish(run: ActiveRun, record: RunRecord, status: str, error: Any) -> str:
    """Record the final status everywhere (a signal during saving turns completed into killed)."""
    if run.kill_signal is not None and status == COMPLETED:
        status = KILLED
    fields: dict[str, Any] = {"status": status, "ended_at": utcnow()}
    fields[SUMMARY_FIELD] = summary_of_dir(run.run_dir)  # metric columns of `ls` without reading metrics.jsonl
    if error is not None:
        fields["error"] = _describe(error)
    record.update(**fields)  # an OSError here: the caller fails the run (_failed_to_record)
    logger.info(f"Run {run.key} {status}.")
    _close_mlflow(run, record, status)
    run.link_logged = True  # the link watcher stops with the run
    storage = run.project.storage
    try:
        push_run(storage, record, run.run_path, list(storage.deferred))
    except OSError as exc:  # the status is written; the sync state could not be: `sync` redoes it
        logger.warning(f"Recording the sync of {run.key} failed ({exc}); `sync {run.key}` redoes it.")
    return status


def _failed_to_record(run: ActiveRun, record: RunRecord, exc: OSError) -> RunFailedError:
    """A write of the run's record failed before its final status was written (a full disk).

    The run did not complete: run.json says ``failed`` if it can still be written, MLflow says
    FAILED either way, and the error is one paragraph naming ``local_path`` and the OS error.
    """
    where = run.project.config.where("local_path")
    cause = f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    if run.metrics is not None:
        with contextlib.suppress(OSError, ValueError):  # closed already, or the disk still full
            run.metrics.close()
    _end_fluent(run, FAILED)
    try:
        record.update(status=FAILED, ended_at=utcnow(), error=f"OSError: {cause}")
        recorded, written = "run.json says failed", True
    except OSError:
        recorded = "run.json could not be updated either (it still says running; `ls --stale --fix` marks it)"
        written = False
    state = "; MLflow says FAILED" if _close_mlflow(run, record, FAILED, written) else ""
    return RunFailedError(
        f"{run.node_name} {run.key} failed: writing its record in {run.run_dir} failed ({cause}). "
        f"Free space in local_path ({where}) and run it again; {recorded}{state}."
    )


def _describe(error: Any) -> str:
    """The error as run.json and the final message show it (no password of a URL in it)."""
    return redact_url(f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error))


# --- MLflow -------------------------------------------------------------------------------------


def _open_mlflow(run: ActiveRun, record: RunRecord, args: dict[str, Any], commit: str | None) -> None:
    """Queue the run for the MLflow feeder (mlflow is not imported), or open its MLflow run in
    this process when the node needs a live one (:func:`_needs_live_mlflow`)."""
    config = run.project.config
    if not config.mlflow.enabled:
        record.update_section("mlflow", state="disabled")
        return
    from phd_flow import feeder

    uri, experiment = config.tracking_uri(), config.experiment_name(type(run.node).package)
    if _needs_live_mlflow(run):
        _open_live(run, record, args, commit, uri, experiment)
        return
    from phd_flow.tracking import allow_telemetry, prepare_mlflow_env

    allow_telemetry(config.mlflow.telemetry)
    prepare_mlflow_env()  # for an `import mlflow` inside _run
    record.update_section("mlflow", state=feeder.PENDING, experiment=experiment, tracking_uri=redact_url(uri))
    queue = feeder.queue_dir(config.local_path, uri)
    try:
        feeder.enqueue(queue, run.run_path, uri, config.mlflow.telemetry)
    except OSError as exc:  # a full disk: the run goes on; `sync` feeds MLflow later
        logger.warning(f"Queueing {run.key} for MLflow failed ({exc}); `sync {run.key}` records it in MLflow later.")
        return
    run.feed_queue = queue
    if ui_url(uri, "0", "0"):  # a server: its link is logged once the feeder has made the run
        threading.Thread(target=_log_link_when_fed, args=(run, uri), name="phd_flow-mlflow-link", daemon=True).start()
    hook = run.mlflow_hook = feeder.MlflowImportHook(lambda: _open_on_import(run, uri))
    hook.install()


def _log_link_when_fed(run: ActiveRun, uri: str) -> None:
    """Log the run's MLflow UI link as soon as the feeder has created its MLflow run."""
    for _ in range(1200):  # 10 minutes at most
        if run.link_logged:
            return
        try:
            section = RunRecord.load(run.run_dir).data.get("mlflow") or {}
        except (OSError, CorruptRunError):
            section = {}
        if section.get("run_id"):
            _log_link(run, uri, section)
            return
        time.sleep(0.5)


def _log_link(run: ActiveRun, uri: str, section: dict[str, Any]) -> None:
    url = ui_url(uri, str(section.get("experiment_id")), str(section.get("run_id")))
    if url and not run.link_logged:
        run.link_logged = True
        logger.info(f"MLflow run: {url}")


def _open_on_import(run: ActiveRun, uri: str) -> None:
    """mlflow was imported inside ``_run``: open the run's MLflow run here as the active one."""
    from phd_flow.feeder import open_live
    from phd_flow.tracking import allow_telemetry

    allow_telemetry(run.project.config.mlflow.telemetry)
    run.fluent = open_live(run.run_dir, uri)


def _needs_live_mlflow(run: ActiveRun) -> bool:
    """True when the run's MLflow run must exist in this process before ``_run``:
    ``[mlflow] autolog``, a node module (or anything before it) that imported mlflow, so plain
    ``mlflow.*`` calls land in the run, or a parent run that has one."""
    import sys

    if run.parent is not None:
        return run.parent.mlflow is not None
    return run.project.config.mlflow.autolog or "mlflow" in sys.modules


def _open_live(
    run: ActiveRun, record: RunRecord, args: dict[str, Any], commit: str | None, uri: str, experiment: str
) -> None:
    config = run.project.config
    from phd_flow.feeder import artifact_location, epoch_ms, mlflow_tags, run_name, settle_replacement
    from phd_flow.tracking import MlflowRun, allow_telemetry, param_values, ui_url

    allow_telemetry(config.mlflow.telemetry)
    data = record.data
    tags = mlflow_tags({**data, "git": {"commit": commit} if commit else {}, "tags": dict(run.node.options.tags)})
    parent = run.parent
    mlflow_run = MlflowRun(uri, experiment, artifact_location(run.run_dir, data, uri))
    earlier = data.get("mlflow") or {}
    try:
        parent_id = parent.mlflow.run_id if parent is not None and parent.mlflow else None
        if parent is None and data.get("sweep"):  # a sweep point: nested under the sweep's run
            from phd_flow.feeder import sweep_run_id

            parent_id = sweep_run_id(config.local_path, data.get("sweep"), uri, experiment, record.key)
        started = epoch_ms(data.get("started_at"))  # the run's real start, not MLflow's "now"
        run_id = earlier.get("run_id")
        mlflow_run.open(run_name(data), tags, param_values(args), parent_id, run_id, activate=False, start_time=started)
        settle_replacement(record, mlflow_run)  # a replacement a killed process left halfway
        earlier = record.data.get("mlflow") or {}
        mlflow_run.activate()
    except Exception as exc:  # MLflow down/locked: the run goes on, `sync` catches up later
        logger.warning(
            f"MLflow at {uri} could not be opened ({type(exc).__name__}: {exc}). The run goes on "
            f"locally; `sync {run.key}` records it in MLflow later."
        )
        record.update_section("mlflow", state="not_synced", tracking_uri=redact_url(uri), experiment=experiment)
        return
    if mlflow_run.run_id == earlier.get("run_id"):
        mlflow_run.sent = int(earlier.get("metrics_sent") or 0)  # an earlier attempt's points are not sent again
    run.mlflow = mlflow_run
    record.update_section(
        "mlflow",
        state="open",
        run_id=mlflow_run.run_id,
        experiment_id=mlflow_run.experiment_id,
        experiment=experiment,
        tracking_uri=redact_url(uri),
        metrics_sent=mlflow_run.sent,
    )
    url = ui_url(uri, str(mlflow_run.experiment_id), str(mlflow_run.run_id))
    if url:
        logger.info(f"MLflow run: {url}")
    if config.mlflow.autolog:
        _autolog(mlflow_run.mlflow)


#: The libraries whose import ``mlflow.autolog`` hooks, and the flavour module each hook imports
#: (mlflow.tracking.fluent.autolog's LIBRARY_TO_AUTOLOG_MODULE, the classic ML part).
AUTOLOG_FLAVOURS = {
    "sklearn": "mlflow.sklearn",
    "xgboost": "mlflow.xgboost",
    "lightgbm": "mlflow.lightgbm",
    "statsmodels": "mlflow.statsmodels",
    "tensorflow": "mlflow.tensorflow",
    "keras": "mlflow.keras",
    "pytorch_lightning": "mlflow.pytorch",
    "lightning": "mlflow.pytorch",
    "transformers": "mlflow.transformers",
    "setfit": "mlflow.transformers",
}


def _autolog(mlflow: Any) -> None:
    """``mlflow.autolog()``, with the flavour modules of already imported libraries imported first.

    For a library that is already imported, ``mlflow.autolog`` runs its hook at once, inside
    ``register_post_import_hook`` and holding that function's lock, and the hook imports the
    flavour module (``mlflow.sklearn``, hundreds of modules). Any other thread importing a module
    meanwhile passes through MLflow's import finder, which waits for that lock while holding its
    own module's import lock: a deadlock if the flavour import needs that module (seen with
    MLflow's telemetry thread in ``requests``). Imported here first, outside the lock, the hook
    finds the flavour in ``sys.modules`` and imports nothing new. Libraries imported later fire
    their hook after their import, with the lock released.
    """
    import importlib
    import sys

    for library, flavour in AUTOLOG_FLAVOURS.items():
        if library in sys.modules and flavour not in sys.modules:
            try:
                importlib.import_module(flavour)
            except Exception as exc:  # mlflow's own hook reports it (silently: silent=True)
                logger.debug(f"autolog: importing {flavour} failed ({type(exc).__name__}: {exc})")
    mlflow.autolog(silent=True)


def _close_mlflow(run: ActiveRun, record: RunRecord, status: str, recorded: bool = True) -> bool:
    """Close the run's MLflow run with ``status``; True when MLflow got it. A queued run: the
    feeder finishes it in the background, or now when the run waits for MLflow."""
    mlflow_run = run.mlflow
    if mlflow_run is None:
        return _close_queued(run, record, status, recorded)
    try:
        mlflow_run.close(status)
        ok = mlflow_run.error is None
        if ok and record.data.get("resumed"):  # a step an earlier attempt logged: one point per step
            _replace_overridden(run, record, mlflow_run)
    except Exception as exc:
        logger.warning(f"Closing the MLflow run failed ({type(exc).__name__}: {exc}); `sync` retries.")
        ok = False
    try:
        record.update_section(
            "mlflow",
            state="synced" if ok else "not_synced",
            metrics_sent=mlflow_run.sent,
            status_sent=status if ok else None,
        )
    except OSError as exc:
        logger.warning(f"Recording the MLflow state of {run.key} failed ({exc}); `sync {run.key}` redoes it.")
    return ok


def _replace_overridden(run: ActiveRun, record: RunRecord, mlflow_run: Any) -> None:
    """A resumed run's live MLflow run, rebuilt newest attempt first when this attempt logged a
    step an earlier one logged (:func:`phd_flow.feeder.replace_run`)."""
    from phd_flow.feeder import replace_if_overridden
    from phd_flow.tracking import Attempts, count_lines

    path = run.run_dir / METRICS_FILE
    lines = count_lines(path)
    if replace_if_overridden(run.run_dir, record, mlflow_run, lines, Attempts(path, attempt_starts(record.data))):
        mlflow_run.sent = lines


def _end_fluent(run: ActiveRun, status: str) -> None:
    """Remove the import hook; end the fluent MLflow run that mlflow's import inside ``_run``
    opened (the feeder then sets the real end time from run.json)."""
    if run.mlflow_hook is not None:
        run.mlflow_hook.remove()
        run.mlflow_hook = None
    fluent, run.fluent = run.fluent, None
    if fluent is not None:
        try:
            fluent.close(status)
        except Exception as exc:
            logger.warning(f"Ending the MLflow run failed ({type(exc).__name__}: {exc}); the feeder finishes it.")


def _close_queued(run: ActiveRun, record: RunRecord, status: str, recorded: bool) -> bool:
    from phd_flow import feeder

    queue = run.feed_queue
    config = run.project.config
    uri = config.tracking_uri()
    if not recorded and (record.data.get("mlflow") or {}).get("state") == feeder.PENDING:
        try:  # run.json could not say it (a full disk): tell MLflow now
            feeder.close_directly(run.run_dir, record.data, uri, status)
            return True
        except Exception as exc:
            logger.warning(f"MLflow at {redact_url(uri)} could not be told ({type(exc).__name__}: {exc}).")
            return False
    if queue is None:
        return False
    try:
        # the MLflow-artifacts storage uploads into the run's MLflow run right after: it must exist
        storage_in_mlflow = config.storage.backend == "mlflow"
        # the feeder gave the live run up (three failed tries in a row): once more, now that it
        # has ended; `sync` is still there if MLflow is not back. A killed job has no time to wait.
        if status != KILLED:
            error = feeder.requeue_left(run.run_dir, queue, run.run_path, uri, config.mlflow.telemetry)
            if error is not None:
                logger.warning(f"Feeding MLflow failed during the run ({error}); the feeder tries {run.key} again now.")
        if not storage_in_mlflow and not feeder.wait_requested(config.mlflow.wait, run.node.options.wait_mlflow):
            feeder.ensure_feeder(queue, uri, config.mlflow.telemetry)  # still there (it may have died)
            return False
        try:
            feeder.wait_for(queue, run.run_dir, run.run_path, uri, config.mlflow.telemetry)
        except KeyboardInterrupt:  # Ctrl-C while waiting: the run is whole, the feeder goes on
            logger.warning(f"Not waiting for MLflow any longer: it gets {run.key} in the background.")
            feeder.ensure_feeder(queue, uri, config.mlflow.telemetry)
            return False
    except Exception as exc:  # MLflow refused: the run is whole; `sync` catches up
        with contextlib.suppress(OSError):
            record.update_section("mlflow", state=feeder.NOT_SYNCED, error=redact_url(f"{type(exc).__name__}: {exc}"))
    section = RunRecord.load(run.run_dir).data.get("mlflow") or {}
    if section.get("run_id"):
        _log_link(run, uri, section)
    if section.get("state") == feeder.NOT_SYNCED:
        logger.warning(
            f"MLflow at {redact_url(uri)} could not be opened ({section.get('error')}). The run is complete "
            f"locally; `sync {run.key}` records it in MLflow later."
        )
    return section.get("state") == feeder.SYNCED

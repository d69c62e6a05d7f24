"""The lifecycle of one node run, from a new key to the final sync.

Order matters for "nothing is lost": the run directory, args.json and run.json exist before any
user code runs; the final status is written to run.json before MLflow and the remote are
touched; a failing MLflow or remote never changes the run's own status.
"""

from __future__ import annotations

import pickle
import signal
import typing
from pathlib import Path
from typing import Any

from phd_flow import keys
from phd_flow._io import atomic_write_bytes, atomic_write_json, sha256_file
from phd_flow.errors import PhdFlowError, RunFailedError, RunKilledError, UserError
from phd_flow.log import RunLogging, logger
from phd_flow.run import repro
from phd_flow.run.record import COMPLETED, FAILED, KILLED, Heartbeat, RunRecord, utcnow

if typing.TYPE_CHECKING:
    from phd_flow.run.node import Node

RESULT_FILE = "results.pickle"
ARGS_FILE = "args.json"


def execute(node: Node[Any, Any]) -> Any:
    """Run ``node`` end to end; see :meth:`phd_flow.node.Node.run`."""
    from phd_flow.run.node import args_to_dict

    config = node.config
    name = type(node).__name__
    from phd_flow.stages.manager import prepare

    node._stages = prepare(node)  # stage rules are checked before anything is created
    key = keys.RunKey(node.options.key) if node.options.key else keys.new_key(name)
    node._key = key
    node.resumed = (config.local_path / node.run_path / "run.json").exists()  # requeue, --resume
    run_dir = _make_run_dir(config.local_path, node.run_path, config.where("local_path"))
    args = args_to_dict(node.args)
    atomic_write_json(run_dir / ARGS_FILE, args)
    parent = node.options.parent
    record = node._record = RunRecord.create(
        run_dir,
        key=str(key),
        node=name,
        node_class=f"{type(node).__module__}.{type(node).__qualname__}",
        package=type(node).package,
        args=args,
        parent=parent.run_path if parent is not None else None,
        path=node.run_path,
        tags=dict(node.options.tags),
        sweep=node.options.sweep,
        resumed=node.resumed,
    )
    saved_signals = node._install_signal_handlers()
    heartbeat = Heartbeat(record, config.runs.heartbeat_seconds)
    try:
        with RunLogging(run_dir):
            heartbeat.start()
            return _run_logged(node, run_dir, record, args)
    finally:
        heartbeat.stop()
        for sig, handler in saved_signals.items():
            signal.signal(sig, handler)


def _make_run_dir(local_path: Path, key: str, where: str) -> Path:
    run_dir = local_path / keys.normalize(key)
    try:
        run_dir.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        if not (run_dir / "run.json").exists():
            raise
    except OSError as exc:
        raise UserError(
            f"Cannot create the run directory {run_dir}: {exc.strerror or exc}. Check that "
            f"local_path ({where}) points to a writable directory with free space."
        ) from None
    return run_dir


def _run_logged(node: Node[Any, Any], run_dir: Path, record: RunRecord, args: dict[str, Any]) -> Any:
    config = node.config
    name = type(node).__name__
    logger.info(f"Run node {name} {node.key} in {run_dir}")
    git = repro.git_info(config.project_root)
    from phd_flow.run.pipeline import fingerprint

    record.update(fingerprint=fingerprint(type(node), args))
    atomic_write_json(run_dir / "reproducible.json", repro.snapshot(config.project_root, git))
    record.update(git={k: git.get(k) for k in ("commit", "branch", "dirty")} if git else {})
    from phd_flow.tracking import MetricLog

    node._metrics = MetricLog(run_dir)
    _open_mlflow(node, record, args, git.get("commit"))
    node._metrics.start(node._mlflow.send_metrics if node._mlflow is not None else None)
    status, error, result = _call_user_code(node)
    node._metrics.close()
    if status == COMPLETED:
        status, error = _save_result(run_dir, record, result, name)
    if status == COMPLETED:
        from phd_flow.run.pipeline import remember

        remember(node)
        if node._stages is not None:
            node._stages.finish()  # index the computed stages, warn about unused stage rules
    status = _finish(node, record, status, error)
    if status == FAILED:
        raise RunFailedError(f"{name} {node.key} failed: {_describe(error)}. See {run_dir / 'output.log'}.") from (
            error if isinstance(error, BaseException) else None
        )
    if status == KILLED:
        signum = node._kill_pending
        if signum is not None and signum != signal.SIGINT:
            raise RunKilledError(signal.Signals(signum).name)
        raise KeyboardInterrupt
    return result


def _call_user_code(node: Node[Any, Any]) -> tuple[str, Any, Any]:
    node._in_user_code = True
    try:
        if node._kill_pending is not None:
            raise RunKilledError(signal.Signals(node._kill_pending).name)
        result = node._run()
    except (KeyboardInterrupt, RunKilledError) as exc:
        reason = "SIGINT (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else str(exc)
        if isinstance(exc, KeyboardInterrupt):
            node._kill_pending = signal.SIGINT
        logger.error(f"Run {node.key} was killed by {reason}.")
        return KILLED, reason, None
    except Exception as exc:
        logger.opt(exception=exc).error(f"Run {node.key} failed: {type(exc).__name__}: {exc}")
        return FAILED, exc, None
    finally:
        node._in_user_code = False
    if node._kill_pending is not None:
        return KILLED, signal.Signals(node._kill_pending).name, result
    return COMPLETED, None, result


def _save_result(run_dir: Path, record: RunRecord, result: Any, name: str) -> tuple[str, Any]:
    try:
        data = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:
        logger.error(
            f"The result of {name} ({type(result).__name__}) cannot be pickled: "
            f"{type(exc).__name__}: {exc}. Return plain data (dataclasses, dicts, arrays)."
        )
        return FAILED, PhdFlowError(f"result cannot be pickled ({type(exc).__name__}: {exc})")
    atomic_write_bytes(run_dir / RESULT_FILE, data)
    digest = sha256_file(run_dir / RESULT_FILE)
    record.update(result={"file": RESULT_FILE, "sha256": digest, "type": type(result).__name__})
    return COMPLETED, None


def _finish(node: Node[Any, Any], record: RunRecord, status: str, error: Any) -> str:
    """Record the final status everywhere (a signal during saving turns completed into killed)."""
    if node._kill_pending is not None and status == COMPLETED:
        status = KILLED
    fields: dict[str, Any] = {"status": status, "ended_at": utcnow()}
    if error is not None:
        fields["error"] = _describe(error)
    record.update(**fields)
    logger.info(f"Run {node.key} {status}.")
    _close_mlflow(node, record, status)
    _sync(node, record)
    return status


def _describe(error: Any) -> str:
    return f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)


# --- MLflow -------------------------------------------------------------------------------------


def _open_mlflow(node: Node[Any, Any], record: RunRecord, args: dict[str, Any], commit: str | None) -> None:
    config = node.config
    if not config.mlflow.enabled:
        record.update_section("mlflow", state="disabled")
        return
    from phd_flow.tracking import MlflowRun, param_values

    uri, experiment = config.tracking_uri(), config.experiment_name(type(node).package)
    tags = {
        "phd_flow.key": str(node.key),
        "phd_flow.node": type(node).__name__,
        "host": record.data["host"],
        **({"mlflow.source.git.commit": commit} if commit else {}),
        **node.options.tags,
    }
    parent = node.options.parent
    if parent is not None:
        tags["phd_flow.parent_key"] = str(parent.key)
    mlflow_run = MlflowRun(uri, experiment)
    try:
        parent_id = parent._mlflow.run_id if parent is not None and parent._mlflow else None
        existing = record.data.get("mlflow", {}).get("run_id")
        mlflow_run.open(str(node.key), tags, param_values(args), parent_id, existing)
    except Exception as exc:  # MLflow down/locked: the run goes on, `sync` catches up later
        logger.warning(
            f"MLflow at {uri} could not be opened ({type(exc).__name__}: {exc}). The run goes on "
            f"locally; `sync {node.key}` records it in MLflow later."
        )
        record.update_section("mlflow", state="not_synced", tracking_uri=uri, experiment=experiment)
        return
    node._mlflow = mlflow_run
    record.update_section(
        "mlflow",
        state="open",
        run_id=mlflow_run.run_id,
        experiment_id=mlflow_run.experiment_id,
        experiment=experiment,
        tracking_uri=uri,
    )
    from phd_flow.tracking import ui_url

    url = ui_url(uri, str(mlflow_run.experiment_id), str(mlflow_run.run_id))
    if url:
        logger.info(f"MLflow run: {url}")
    if config.mlflow.autolog:
        mlflow_run.mlflow.autolog(silent=True)


def _close_mlflow(node: Node[Any, Any], record: RunRecord, status: str) -> None:
    mlflow_run = node._mlflow
    if mlflow_run is None:
        return
    try:
        mlflow_run.close(status)
        ok = mlflow_run.error is None
    except Exception as exc:
        logger.warning(f"Closing the MLflow run failed ({type(exc).__name__}: {exc}); `sync` retries.")
        ok = False
    record.update_section(
        "mlflow",
        state="synced" if ok else "not_synced",
        metrics_sent=mlflow_run.sent,
        status_sent=status if ok else None,
    )


# --- storage ------------------------------------------------------------------------------------


def _sync(node: Node[Any, Any], record: RunRecord) -> None:
    storage = node.storage
    storage.defer_failed_uploads = False
    pending = list(storage.deferred)  # keys the node uploaded while the storage was failing
    try:
        remote = storage.remote
    except UserError as exc:
        logger.error(f"Storage is not usable, so run {node.key} was not synced: {exc}")
        record.update_section("sync", state="not_synced", error=str(exc), at=utcnow(), pending=pending)
        return
    if remote is None:
        record.update_section("sync", state="local", at=utcnow())
        return
    try:
        for key in pending:
            storage.upload(key)
        report = storage.upload(node.run_path)
        logger.info(f"Synced {node.key} to {remote.describe()}: {report}")
        record.update_section("sync", state="synced", error=None, at=utcnow(), remote=remote.describe(), pending=[])
        storage.upload(node.run_path)  # sends only run.json, the log files and the manifest
    except Exception as exc:
        message = f"{type(exc).__name__}: {exc}"
        logger.error(
            f"Run {node.key} was not synced to {remote.describe()} ({message}). Its files are "
            f"safe in {node.output_dir}; run `sync {node.key}` once the storage is reachable."
        )
        record.update_section("sync", state="not_synced", error=message, at=utcnow(), pending=pending)

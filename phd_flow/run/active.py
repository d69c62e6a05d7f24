"""The active run: everything one node run owns while it runs, in one object.

Key, run directory, record (run.json), metric log, MLflow view, stages, the project (config and
storage), kill state and signal handling live here; :class:`~phd_flow.run.node.Node` holds a
reference and its public properties delegate to it. Only the lifecycle drives it.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

from phd_flow import keys
from phd_flow.errors import PhdFlowError, RunKilledError
from phd_flow.log import logger
from phd_flow.run.record import COMPLETED, FAILED, KILLED, RUN_FILE

if TYPE_CHECKING:
    from phd_flow.feeder import MlflowImportHook
    from phd_flow.project import Project
    from phd_flow.run.node import Node
    from phd_flow.run.record import RunRecord
    from phd_flow.stages.manager import StageManager
    from phd_flow.tracking import MetricLog, MlflowRun


class ActiveRun:
    """One node run in progress. Built by :meth:`create` (nothing is written yet); the lifecycle
    then creates the directory and record, opens the metric log and MLflow, and finishes it."""

    def __init__(self, node: Node[Any, Any], key: keys.RunKey, parent: ActiveRun | None, stages: StageManager):
        self.node = node
        self.project: Project = node.project
        self.key = key
        self.parent = parent
        self.run_path: str = f"{parent.run_path}/{key}" if parent is not None else str(key)
        self.run_dir: Path = self.project.config.local_path / self.run_path
        #: True when this run continues an earlier attempt with the same key (requeue, resume).
        self.resumed = (self.run_dir / RUN_FILE).exists()
        self.stages = stages
        self.record: RunRecord | None = None
        self.metrics: MetricLog | None = None
        self.mlflow: MlflowRun | None = None  # set when MLflow is opened in this process
        #: The MLflow feed queue this run is in (None: MLflow is off, or opened in this process).
        self.feed_queue: Path | None = None
        #: Opens the MLflow run in this process if ``_run`` imports mlflow (a queued run), and
        #: the MLflow run it opened.
        self.mlflow_hook: MlflowImportHook | None = None
        self.fluent: MlflowRun | None = None
        self.link_logged = False  # the MLflow UI link (a tracking server) was logged
        #: The signal that interrupted the run (SIGINT for Ctrl-C), or None.
        self.kill_signal: int | None = None
        self._in_user_code = False

    @classmethod
    def create(cls, node: Node[Any, Any]) -> ActiveRun:
        """Check the stage rules (a bad rule fails before anything exists) and choose the key."""
        from phd_flow.stages.manager import prepare

        stages = prepare(node)
        name = type(node).__name__
        key = keys.check_run_key(str(node.options.key)) if node.options.key else keys.new_key(name)
        parent = node.options.parent
        return cls(node, key, parent.active if parent is not None else None, stages)

    @property
    def node_name(self) -> str:
        return type(self.node).__name__

    def stage_manager(self) -> StageManager:
        """The stages of this run; usable inside ``_run`` only."""
        if self.record is None or self.metrics is None:
            raise PhdFlowError("Stages and managed artifacts work inside _run().")
        return self.stages

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set MLflow tags, kept in run.json's ``tags`` too."""
        clean = {k: str(v) for k, v in tags.items()}
        if self.record is None:
            raise PhdFlowError("Tags can be set once run() has started.")
        self.record.update_section("tags", **clean)
        if self.mlflow is not None and self.mlflow.error is None:
            self.mlflow.set_tags(clean)

    # --- the user's code and signals ----------------------------------------------------------

    def call_user_code(self) -> tuple[str, Any, Any]:
        """Run ``_run``; returns (status, error, result) and never raises for the user's errors."""
        self._in_user_code = True
        try:
            if self.kill_signal is not None:
                raise RunKilledError(signal.Signals(self.kill_signal).name)
            result = self.node._run()
        except (KeyboardInterrupt, RunKilledError) as exc:
            reason = "SIGINT (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else str(exc)
            if isinstance(exc, KeyboardInterrupt):
                self.kill_signal = signal.SIGINT
            logger.error(f"Run {self.key} was killed by {reason}.")
            return KILLED, reason, None
        except Exception as exc:
            logger.opt(exception=exc).error(f"Run {self.key} failed: {type(exc).__name__}: {exc}")
            return FAILED, exc, None
        finally:
            self._in_user_code = False
        if self.kill_signal is not None:
            return KILLED, signal.Signals(self.kill_signal).name, result
        return COMPLETED, None, result

    def install_signal_handlers(self) -> dict[int, Any]:
        """SIGTERM (and SIGUSR2 outside SLURM) interrupt ``_run``; returns the handlers to restore."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        saved: dict[int, Any] = {}
        for sig in (signal.SIGTERM, signal.SIGUSR2) if hasattr(signal, "SIGUSR2") else (signal.SIGTERM,):
            if sig == getattr(signal, "SIGUSR2", None) and "SLURM_JOB_ID" in os.environ:
                continue  # submitit owns USR2 (checkpoint + requeue) inside SLURM jobs
            saved[sig] = signal.signal(sig, self._on_signal)
        return saved

    @staticmethod
    def restore_signal_handlers(saved: dict[int, Any]) -> None:
        for sig, handler in saved.items():
            signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.kill_signal = signum
        if self._in_user_code:
            self._in_user_code = False
            raise RunKilledError(signal.Signals(signum).name)
        logger.warning(f"Received {signal.Signals(signum).name}; finishing the run's bookkeeping first.")

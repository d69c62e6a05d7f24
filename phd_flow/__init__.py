"""phd_flow: typed pipeline nodes for research code.

Subclass ``Node[Args, Result]``, run it with ``python -m my_project run MyNode --arg value``, and
get a run directory with logs, args, reproducibility info and the pickled result, an MLflow
run, and a copy in your storage (shared directory, S3, Backblaze B2 or MLflow artifacts).
"""

from __future__ import annotations

import importlib.metadata

from phd_flow import node
from phd_flow.cli import run_main
from phd_flow.config import Config, load_config
from phd_flow.errors import (
    ConfigError,
    NodeNotFoundError,
    PhdFlowError,
    RunFailedError,
    StageError,
    StorageError,
    UserError,
)
from phd_flow.keys import RunKey
from phd_flow.log import logger
from phd_flow.run.node import Args, Node, RunOptions
from phd_flow.runs.query import Run, Runs, find_runs, load_args, load_metrics, load_result
from phd_flow.stages.mlflowhelper import (
    MlflowDict,
    log_vars,
    managed_artifact,
    managed_artifact_dir,
    set_load,
    set_skip_log,
)
from phd_flow.storage import Storage
from phd_flow.sweeps.optuna import optimize

__version__ = importlib.metadata.version("phd_flow")

__all__ = [
    "Args",
    "Config",
    "ConfigError",
    "MlflowDict",
    "Node",
    "NodeNotFoundError",
    "PhdFlowError",
    "Run",
    "RunFailedError",
    "RunKey",
    "RunOptions",
    "Runs",
    "StageError",
    "Storage",
    "StorageError",
    "UserError",
    "__version__",
    "find_runs",
    "load_args",
    "load_config",
    "load_metrics",
    "load_result",
    "log_vars",
    "logger",
    "managed_artifact",
    "managed_artifact_dir",
    "node",
    "optimize",
    "run_main",
    "set_load",
    "set_skip_log",
]

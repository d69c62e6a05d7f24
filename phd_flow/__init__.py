"""phd_flow: typed pipeline nodes for research code.

Subclass ``Node[Args, Result]``, run it with ``python -m my_project run MyNode --arg value``, and
get a run directory with logs, args, reproducibility info and the pickled result, an MLflow
run, and a copy in your storage (shared directory, S3, Backblaze B2 or MLflow artifacts).
"""

from __future__ import annotations

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
from phd_flow.node import Args, Node, RunOptions
from phd_flow.storage import Storage

__version__ = "0.2.0"

__all__ = [
    "Args",
    "Config",
    "ConfigError",
    "Node",
    "NodeNotFoundError",
    "PhdFlowError",
    "RunFailedError",
    "RunKey",
    "RunOptions",
    "StageError",
    "Storage",
    "StorageError",
    "UserError",
    "__version__",
    "load_config",
    "logger",
    "node",
    "run_main",
]

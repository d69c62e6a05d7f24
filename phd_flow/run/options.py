"""Run options: what a run needs besides the node's Args (CLI flags ``--key``, ``--load`` ...)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from phd_flow.run.node import Node


@dataclass
class RunOptions:
    """Per-run options that are not the node's Args (set by CLI flags or by Python)."""

    key: str | None = None  # use this key instead of a new one (resume / requeue)
    load: dict[str, str] = field(default_factory=dict)  # stage -> run key to load it from
    skip_log: list[str] = field(default_factory=list)  # stages kept local only
    cache: bool | None = None  # None: per-stage config; True/False: force for every stage
    tags: dict[str, str] = field(default_factory=dict)  # extra MLflow tags (e.g. the sweep)
    rerun: list[str] = field(default_factory=list)  # node names that require() must not reuse
    parent: Node[Any, Any] | None = None  # set by Node.require for child runs
    sweep: str | None = None  # the sweep this run is a point of (recorded in run.json)
    wait_mlflow: bool | None = None  # return once MLflow has the run (None: [mlflow] wait)

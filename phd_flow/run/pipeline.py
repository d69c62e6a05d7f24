"""Nodes composed into pipelines: ``self.require(Train, TrainArgs(...))``.

A required node runs as a child of the current run, in ``<parent run dir>/<child key>/``, as an
MLflow run nested under the parent's. If a completed run of the same node with the same args
and the same code exists, its result is reused instead, and the log says which run and why;
otherwise the log says what changed since the newest run of that node. Fingerprints, the
explanation and the index are :mod:`phd_flow.reuse`'s, shared with the stage cache.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from phd_flow import reuse
from phd_flow.errors import CorruptRunError, UntrustedResultError
from phd_flow.log import logger
from phd_flow.run.args import args_to_dict
from phd_flow.run.options import RunOptions
from phd_flow.run.record import COMPLETED, RESULT_FILE, RunRecord
from phd_flow.run.result import load_verified

if TYPE_CHECKING:
    from phd_flow.run.active import ActiveRun
    from phd_flow.run.node import Node


def node_fingerprint(node_cls: type, args: dict[str, Any]) -> dict[str, Any]:
    """What identifies a run for reuse: its fingerprint and inputs (args and code)."""
    inputs = reuse.inputs_of(node_cls, args)
    subject = f"node:{node_cls.__module__}.{node_cls.__qualname__}"
    return {"fingerprint": reuse.fingerprint(subject, inputs), "inputs": inputs}


def remember(run: ActiveRun) -> None:
    """Add a completed run to its node's reuse index."""
    assert run.record is not None
    data = run.record.data
    entry = {**data.get("fingerprint", {}), "key": str(run.key), "path": run.run_path, "ended_at": data.get("ended_at")}
    reuse.ReuseIndex(run.project.config.local_path, reuse.NODES, run.node_name).append(entry)


def find_reusable(local_path: Path, node_name: str, wanted: dict[str, Any]) -> tuple[Path | None, str]:
    """The newest completed run with this fingerprint, and a one-line reason either way."""
    entries = reuse.ReuseIndex(local_path, reuse.NODES, node_name).entries()
    for entry in reversed(entries):
        if entry.get("fingerprint") != wanted["fingerprint"]:
            continue
        run_dir = local_path / entry["path"]
        try:
            record = RunRecord.load(run_dir)
        except CorruptRunError:
            continue
        if record.status == COMPLETED and (run_dir / RESULT_FILE).exists():
            return run_dir, f"a completed run with the same args and code exists ({entry['path']})"
    if not entries:
        return None, f"no earlier completed {node_name} run"
    last = reuse.closest(entries, wanted["inputs"]) or entries[-1]  # the closest, not the newest
    return None, f"changed since {last.get('path')}: {reuse.explain_changes(last.get('inputs', {}), wanted['inputs'])}"


def require(parent: ActiveRun, node_cls: type[Node[Any, Any]], args: Any, rerun: bool) -> Any:
    """Run (or reuse) ``node_cls`` as a child of ``parent``; see :meth:`Node.require`."""
    assert parent.record is not None
    child_args = node_cls.make_args(args)
    wanted = node_fingerprint(node_cls, args_to_dict(child_args))
    name = node_cls.__name__
    options = parent.node.options
    local_path = parent.project.config.local_path
    if rerun or name in options.rerun:
        logger.info(f"Running {name}: --rerun {name} was given.")
    else:
        found, reason = find_reusable(local_path, name, wanted)
        if found is not None:
            record = RunRecord.load(found)
            try:
                result = load_verified(parent.project.config, found, record.data.get("result") or {}, record.key)
            except UntrustedResultError as exc:  # not made here, not signed: computed anew instead
                reason = f"{found.name} cannot be reused ({exc})"
            else:
                logger.info(f"Reusing {name} {found.name}: {reason}.")
                parent.stages.opened_by_children.update(record.data.get("stages") or {})
                parent.record.data.setdefault("children", []).append(
                    {"node": name, "path": os.path.relpath(found, local_path), "reused": True}
                )
                parent.record.save()
                return result
        logger.info(f"Running {name}: {reason}.")
    child_options = RunOptions(parent=parent.node, rerun=list(options.rerun), tags=dict(options.tags))
    child = node_cls(child_args, config=parent.project, options=child_options)
    parent.record.data.setdefault("children", []).append({"node": name, "path": None, "reused": False})
    try:
        return child.run()
    finally:
        entry = parent.record.data["children"][-1]
        entry["path"] = child.run_path if child.started else None
        entry["status"] = child.record.status if child.started and child.active.record else None
        parent.record.save()

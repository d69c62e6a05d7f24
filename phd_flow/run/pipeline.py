"""Nodes composed into pipelines: ``self.require(Train, TrainArgs(...))``.

A required node runs as a child of the current run, in ``<parent run dir>/<child key>/``, as an
MLflow run nested under the parent's. If a completed run of the same node with the same args
and the same source code exists, its result is reused instead, and the log says which run and
why; otherwise the log says what changed since the newest run of that node.

Reuse is found through a small append-only index, ``<local_path>/.phd_flow/nodes/<Node>.jsonl``,
one line per completed run: no scan over thousands of run directories.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import sys
import typing
from pathlib import Path
from typing import Any

from phd_flow._io import read_jsonl, sha256_file
from phd_flow.errors import CorruptRunError
from phd_flow.log import logger
from phd_flow.run.record import COMPLETED, RunRecord

if typing.TYPE_CHECKING:
    from phd_flow.run.node import Node

INDEX_DIR = ".phd_flow/nodes"


def code_hash(node_cls: type) -> str:
    """sha256 of the source of the module that defines ``node_cls`` (empty if unavailable)."""
    module = sys.modules.get(node_cls.__module__)
    try:
        source = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        source = ""
    return hashlib.sha256(source.encode()).hexdigest()


def fingerprint(node_cls: type, args: dict[str, Any]) -> dict[str, str]:
    """What identifies a run for reuse: its node, args and code."""
    args_json = json.dumps(args, sort_keys=True, default=str)
    parts = {
        "node": f"{node_cls.__module__}.{node_cls.__qualname__}",
        "args": hashlib.sha256(args_json.encode()).hexdigest(),
        "code": code_hash(node_cls),
    }
    parts["fingerprint"] = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return parts


def _index_path(local_path: Path, node_name: str) -> Path:
    return local_path / INDEX_DIR / f"{node_name}.jsonl"


def remember(node: Node[Any, Any]) -> None:
    """Add a completed run to its node's reuse index."""
    record = node.record.data
    line = {
        **record.get("fingerprint", {}),
        "path": node.run_path,
        "args": record.get("args", {}),
        "ended_at": record.get("ended_at"),
    }
    path = _index_path(node.config.local_path, type(node).__name__)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as handle:  # one short O_APPEND write: atomic
        handle.write(json.dumps(line, default=str) + "\n")


def _index(local_path: Path, node_name: str) -> list[dict[str, Any]]:
    return read_jsonl(_index_path(local_path, node_name))


def find_reusable(local_path: Path, node_name: str, wanted: dict[str, str]) -> tuple[Path | None, str]:
    """The newest completed run with this fingerprint, and a one-line reason either way."""
    entries = _index(local_path, node_name)
    for entry in reversed(entries):
        if entry.get("fingerprint") != wanted["fingerprint"]:
            continue
        run_dir = local_path / entry["path"]
        try:
            record = RunRecord.load(run_dir)
        except CorruptRunError:
            continue
        if record.status == COMPLETED and (run_dir / "results.pickle").exists():
            return run_dir, f"a completed run with the same args and code exists ({entry['path']})"
    if not entries:
        return None, f"no earlier completed {node_name} run"
    last = entries[-1]
    changed = []
    if last.get("args") != wanted.get("_args"):
        before: dict[str, Any] = last.get("args") or {}
        after: dict[str, Any] = wanted.get("_args") or {}  # type: ignore[assignment]
        keys = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        changed.append("args " + ", ".join(f"{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in keys))
    if last.get("code") != wanted.get("code"):
        changed.append(f"the code of {wanted['node'].rsplit('.', 1)[0]}")
    what = "; ".join(changed) or "fingerprint"
    return None, f"changed since {last.get('path')}: {what}"


def load_verified_result(run_dir: Path) -> Any:
    """Unpickle a run's result after checking the sha256 recorded in its run.json."""
    import pickle

    record = RunRecord.load(run_dir)
    expected = (record.data.get("result") or {}).get("sha256")
    path = run_dir / "results.pickle"
    if expected and sha256_file(path) != expected:
        raise CorruptRunError(f"{path} does not match the sha256 recorded in its run.json; not loading it.")
    with open(path, "rb") as handle:
        return pickle.load(handle)


def require(parent: Node[Any, Any], node_cls: type[Node[Any, Any]], args: Any, rerun: bool) -> Any:
    """Run (or reuse) ``node_cls`` as a child of ``parent``; see :meth:`Node.require`."""
    from phd_flow.run.node import RunOptions, args_to_dict

    child_args = node_cls.make_args(args)
    wanted = fingerprint(node_cls, args_to_dict(child_args))
    name = node_cls.__name__
    forced = rerun or name in parent.options.rerun
    if not forced:
        found, reason = find_reusable(parent.config.local_path, name, {**wanted, "_args": args_to_dict(child_args)})  # type: ignore[dict-item]
        if found is not None:
            logger.info(f"Reusing {name} {found.name}: {reason}.")
            parent.record.data.setdefault("children", []).append(
                {"node": name, "path": os.path.relpath(found, parent.config.local_path), "reused": True}
            )
            parent.record.save()
            return load_verified_result(found)
        logger.info(f"Running {name}: {reason}.")
    else:
        logger.info(f"Running {name}: --rerun {name} was given.")
    options = RunOptions(parent=parent, rerun=list(parent.options.rerun), tags=dict(parent.options.tags))
    child = node_cls(child_args, config=parent.config, options=options)
    child._storage = parent._storage
    parent.record.data.setdefault("children", []).append({"node": name, "path": None, "reused": False})
    try:
        return child.run()
    finally:
        parent.record.data["children"][-1]["path"] = child.run_path if child._key else None
        parent.record.data["children"][-1]["status"] = child.record.status if child._record else None
        parent.record.save()

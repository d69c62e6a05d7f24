"""Reuse: the one fingerprint of "what went into this", the one explanation of what changed, and
the append-only indexes that find earlier work by fingerprint, for ``require()`` and stages.

Inputs are ``{"args": {...}, "code": {"module": ..., "sha256": ...}, "stages": {name: fp}}``; the
fingerprint is a sha256 over them plus what they are the inputs of (a node or a stage). Each
index is ``<local_path>/.phd_flow/<kind>/<name>.jsonl``, one line per completed piece of work:
lookups read one small file, never every run directory.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import sys
from pathlib import Path
from typing import Any

from phd_flow._io import read_jsonl

NODES, STAGES = "nodes", "stages"  # the two kinds of index


def code_hash(node_cls: type) -> str:
    """sha256 of the source of the module that defines ``node_cls`` (empty if unavailable)."""
    module = sys.modules.get(node_cls.__module__)
    try:
        source = inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        source = ""
    return hashlib.sha256(source.encode()).hexdigest()


def inputs_of(node_cls: type, args: dict[str, Any], stages: dict[str, str | None] | None = None) -> dict[str, Any]:
    """The inputs of a node run or a stage: arg values, the node's code, earlier stages."""
    code = {"module": node_cls.__module__, "sha256": code_hash(node_cls)}
    return {"args": args, "code": code, "stages": dict(stages or {})}


def fingerprint(subject: str, inputs: dict[str, Any]) -> str:
    """sha256 over ``subject`` (a stage name, or ``node:<dotted class>``) and its inputs."""
    blob = json.dumps({"stage": subject, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def explain_changes(before: dict[str, Any], after: dict[str, Any]) -> str:
    """What differs between two inputs, e.g. ``seed changed 1 → 2, code of my_project.fit changed``."""
    changes: list[str] = []
    old_args, new_args = before.get("args", {}), after.get("args", {})
    if set(old_args) != set(new_args):
        changes.append(f"depends_on changed {sorted(old_args)} → {sorted(new_args)}")
    for name in sorted(set(old_args) & set(new_args)):
        if old_args[name] != new_args[name]:
            changes.append(f"{name} changed {old_args[name]!r} → {new_args[name]!r}")
    old_code, new_code = before.get("code", {}), after.get("code", {})
    if old_code != new_code:
        changes.append(f"code of {new_code.get('module')} changed")
    old_stages, new_stages = before.get("stages", {}), after.get("stages", {})
    for name in sorted(set(old_stages) | set(new_stages)):
        if old_stages.get(name) != new_stages.get(name):
            changes.append(f"stage {name} changed")
    return ", ".join(changes) or "the fingerprint changed"


def describe_inputs(inputs: dict[str, Any]) -> str:
    """``dataset='d.csv', seed=1, same code of my_project.fit`` for a reuse log line."""
    parts = [f"{k}={v!r}" for k, v in sorted(inputs.get("args", {}).items())]
    parts += [f"stage {k} unchanged" for k in sorted(inputs.get("stages", {}))]
    parts.append(f"same code of {inputs.get('code', {}).get('module')}")
    return ", ".join(parts)


class ReuseIndex:
    """The append-only index of one node (``kind="nodes"``) or one stage (``kind="stages"``)."""

    def __init__(self, local_path: Path, kind: str, name: str) -> None:
        self.path = local_path / ".phd_flow" / kind / f"{name}.jsonl"

    def entries(self) -> list[dict[str, Any]]:
        """Every entry, oldest first (a torn last line is skipped)."""
        return read_jsonl(self.path)

    def append(self, entry: dict[str, Any]) -> None:
        """Add one entry: a single short O_APPEND write, atomic among parallel runs."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry, default=str) + "\n")

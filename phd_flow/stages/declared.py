"""The stage names a node's code declares, found before it runs, so a rule naming a stage no
code opens (``[stages.laod_data]``, ``--skip-log laod_data``) fails at once with "did you mean".

Stage names are only known for sure when a stage is opened. Before the run, the source is read
(an AST scan, nothing is executed): every ``.stage("name")`` and ``managed_artifact(...,
stage="name")`` / ``managed_artifact_dir(...)`` literal in the modules of the node's package (which
holds the node's module and, normally, the nodes it requires). When a name is not a literal
anywhere there, the names are unknown (None) and unused rules are only warned about at the end.
"""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path

from phd_flow.reuse import stage_call_name


def declared_stages(module_name: str) -> frozenset[str] | None:
    """The stage names declared in ``module_name``'s package; None when some are dynamic or the
    source cannot be read."""
    module = sys.modules.get(module_name)
    top = sys.modules.get(module_name.split(".", 1)[0])
    paths: list[Path] = []
    for root in getattr(top, "__path__", None) or []:
        paths += sorted(Path(root).rglob("*.py"))
    own = getattr(module, "__file__", None)
    if own and Path(own).suffix == ".py":
        paths.append(Path(own))
    if not paths:
        return None
    names: set[str] = set()
    for path in dict.fromkeys(p.resolve() for p in paths):
        found = _scan(str(path), path.stat().st_mtime_ns if path.exists() else 0)
        if found is None:
            return None
        names |= found
    return frozenset(names)


@functools.lru_cache(maxsize=512)
def _scan(path: str, mtime_ns: int) -> frozenset[str] | None:
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=path)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None
    names: set[str] = set()
    for call in ast.walk(tree):
        arg = stage_call_name(call) if isinstance(call, ast.Call) else None
        if arg is None:
            continue  # not a call that opens a stage (or another object's .stage())
        if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
            return None  # a name computed at run time: unknown until opened
        names.add(arg.value)
    return frozenset(names)

"""The stage names a node's code declares, found before it runs, so a rule naming a stage no
code opens (``[stages.laod_data]``, ``--skip-log laod_data``) fails at once with "did you mean".

Stage names are only known for sure when a stage is opened. Before the run, the source is read
(an AST scan, nothing is executed): every ``.stage("name")`` and ``managed_artifact(...,
stage="name")`` / ``managed_artifact_dir(...)`` literal in the modules of the node's package, and
in the packages of the nodes it ``require()``s (``self.require(Other, ...)`` with ``Other`` a
class of another package: its package is read too, transitively), so the check covers the whole
pipeline. When a name is not a literal anywhere there, or a required node is not named by a
class, the names are unknown (None) and unused rules are only warned about at the end.
"""

from __future__ import annotations

import ast
import functools
import sys
from pathlib import Path
from types import ModuleType

from phd_flow.reuse import stage_call_name

_DYNAMIC = "<dynamic>"  # a require() whose node is not named by a (dotted) name


def declared_stages(module_name: str) -> frozenset[str] | None:
    """The stage names declared in ``module_name``'s package and the packages of the nodes it
    requires, transitively; None when some are dynamic or the source cannot be read."""
    names: set[str] = set()
    todo, done = [module_name], set()
    while todo:
        wanted = todo.pop()
        top = wanted.split(".", 1)[0]
        if top in done:
            continue
        done.add(top)
        for path in _files(wanted):
            found = _scan(str(path), path.stat().st_mtime_ns if path.exists() else 0)
            if found is None:
                return None
            names |= found[0]
            for ref in found[1]:
                required = _resolve(_module_of(path), ref)
                if required == _DYNAMIC:
                    return None  # a node chosen at run time: its stages are unknown
                if required is not None:
                    todo.append(required)
    return frozenset(names)


def _module_of(path: Path) -> ModuleType | None:
    """The imported module whose file is ``path`` (resolved), or None. Only the modules with the
    same file name are resolved: a run calls this per require(), not per module of the process."""
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None) if isinstance(module, ModuleType) else None
        if isinstance(file, str) and file.endswith(path.name) and Path(file).resolve() == path:
            return module
    return None


def _files(module_name: str) -> list[Path]:
    """The ``*.py`` files of ``module_name``'s top-level package (and its own file)."""
    module = sys.modules.get(module_name)
    top = sys.modules.get(module_name.split(".", 1)[0])
    paths: list[Path] = []
    for root in getattr(top, "__path__", None) or []:
        paths += sorted(Path(root).rglob("*.py"))
    own = getattr(module, "__file__", None)
    if own and Path(own).suffix == ".py":
        paths.append(Path(own))
    return list(dict.fromkeys(p.resolve() for p in paths))


def _resolve(module: ModuleType | None, ref: str) -> str | None:
    """The module of the node class ``ref`` names in ``module`` (None: the file is not imported,
    so not part of this run, or it names no class; ``_DYNAMIC``: cannot be told)."""
    if module is None or ref == _DYNAMIC:
        return None if module is None else _DYNAMIC
    obj: object = module
    for part in ref.split("."):
        obj = vars(obj).get(part) if isinstance(obj, ModuleType) else getattr(obj, part, None)
        if obj is None:
            return _DYNAMIC  # a local variable: the node is chosen at run time
    return obj.__module__ if isinstance(obj, type) else None


@functools.lru_cache(maxsize=512)
def _scan(path: str, mtime_ns: int) -> tuple[frozenset[str], frozenset[str]] | None:
    """(the stage names, the names of the nodes ``require()`` calls name) in one file."""
    try:
        tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=path)
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return None
    names: set[str] = set()
    required: set[str] = set()
    for call in ast.walk(tree):
        if not isinstance(call, ast.Call):
            continue
        func, args = call.func, call.args
        requires = isinstance(func, ast.Attribute) and func.attr == "require" and args
        if requires and not isinstance(args[0], ast.Constant):  # require("pkg>=1") names no node
            required.add(_dotted(args[0]))
        arg = stage_call_name(call)
        if arg is None:
            continue  # not a call that opens a stage (or another object's .stage())
        if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
            return None  # a name computed at run time: unknown until opened
        names.add(arg.value)
    return frozenset(names), frozenset(required)


def _dotted(expr: ast.expr) -> str:
    parts: list[str] = []
    while isinstance(expr, ast.Attribute):
        parts.append(expr.attr)
        expr = expr.value
    if not isinstance(expr, ast.Name) or expr.id in ("self", "cls"):
        return _DYNAMIC
    return ".".join([expr.id, *reversed(parts)])

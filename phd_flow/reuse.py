"""Reuse: the one fingerprint of "what went into this", the one explanation of what changed, and
the append-only indexes that find earlier work by fingerprint, for ``require()`` and stages.

Inputs are ``{"args": {...}, "code": {...}, "stages": {name: fp}}``; the fingerprint is a sha256
over them plus what they are the inputs of (a node or a stage). The code part covers the code the
node really runs: ``files`` maps every module of the node's top-level package that the node's
module imports, transitively (``import`` / ``from`` statements read with :mod:`ast`; the whole
package tree when a module imports dynamically or cannot be parsed), to its sha256, and ``git``
holds the commit and the sha256 of the uncommitted diff of those files. Each index is
``<local_path>/.phd_flow/<kind>/<name>.jsonl``, one line per completed piece of work: lookups
read one small file, never every run directory.
"""

from __future__ import annotations

import ast
import contextlib
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from phd_flow._io import read_jsonl

NODES, STAGES = "nodes", "stages"  # the two kinds of index
#: Calls that import a module named at run time: their module's imports cannot be read statically.
_DYNAMIC_IMPORTS = frozenset({"import_module", "__import__", "run_module", "run_path"})
# path -> ((mtime_ns, size), sha256, imported module names, imports dynamically)
_SCANNED: dict[Path, tuple[tuple[int, int], str, frozenset[str], bool]] = {}
_NOT_GIT: set[Path] = set()  # source roots outside a git work tree (or git missing)
_DIFFS: dict[tuple[Path, str, tuple[tuple[str, str], ...]], str] = {}  # -> sha256 of the diff
# While a run goes on: what each file and git work tree looked like when the run first read them.
_PINNED: dict[Path, tuple[str, frozenset[str], bool] | None] = {}
_PINNED_GIT: dict[tuple[Path, tuple[tuple[str, str], ...]], dict[str, str] | None] = {}
_PIN_DEPTH = [0]


@contextlib.contextmanager
def pinned() -> Iterator[None]:
    """While a run goes on (its nested runs included), every file is read once: an edit made
    during the run (the run keeps the code it imported) does not change the fingerprints of its
    later stages and children, which would then claim code they did not run."""
    _PIN_DEPTH[0] += 1
    try:
        yield
    finally:
        _PIN_DEPTH[0] -= 1
        if not _PIN_DEPTH[0]:
            _PINNED.clear()
            _PINNED_GIT.clear()


def code_of(node_cls: type) -> dict[str, Any]:
    """The code part of a fingerprint: ``{"module", "files": {path: sha256}, "git"}``.

    Paths are relative to the directory holding the node's top-level package, e.g.
    ``my_project/helper.py``; ``git`` is None outside a git work tree.
    """
    module = sys.modules.get(node_cls.__module__)
    name = _module_name(module, node_cls.__module__)
    found = _source_root(module, name)
    if found is None:  # defined in a REPL or a notebook cell: nothing on disk to cover
        return {"module": node_cls.__module__, "files": {}, "git": None}
    root, top, file = found
    files = code_files(root, top, name, file)
    return {"module": node_cls.__module__, "files": files, "git": _git_state(root, files)}


def code_files(root: Path, top: str, module: str, file: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of ``module`` (in ``file``) and every module of package ``top``
    it imports, transitively; every ``*.py`` of the package when that cannot be read statically."""
    files: dict[str, str] = {}
    # importing the module runs the __init__.py of each package above it too
    todo: list[tuple[str, Path]] = [(module, file), *_module_files(root, module.rpartition(".")[0])]
    seen: set[Path] = set()
    while todo:
        name, path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        scanned = _scan(path)
        if scanned is None or scanned[2]:  # unparsable, or an import named at run time
            return _package_tree(root, top)
        files[_relative(path, root)] = scanned[0]
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for wanted in _resolve(scanned[1], package):
            if wanted.split(".")[0] != top:
                continue
            for dotted, target in _module_files(root, wanted):
                if target not in seen:
                    todo.append((dotted, target))
    return dict(sorted(files.items()))


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:  # a symlink out of the package
        return path.as_posix()


def _module_name(module: ModuleType | None, fallback: str) -> str:
    spec = getattr(module, "__spec__", None)
    return str(spec.name) if spec is not None and spec.name and spec.name != "__main__" else fallback


def _source_root(module: ModuleType | None, name: str) -> tuple[Path, str, Path] | None:
    """(directory holding the top-level package, its name, the module's file)."""
    file = getattr(module, "__file__", None)
    if not file or not str(file).endswith(".py"):
        return None
    path = Path(file).resolve()
    parts = name.split(".") if name != "__main__" else [path.stem]
    depth = len(parts) - 1 + (path.name == "__init__.py")
    root = path.parents[depth]
    return root, parts[0], path


def _scan(path: Path) -> tuple[str, frozenset[str], bool] | None:
    """(sha256, the module names its import statements name, whether it imports dynamically)."""
    if _PIN_DEPTH[0] and path in _PINNED:
        return _PINNED[path]
    scanned = _scan_now(path)
    if _PIN_DEPTH[0]:
        _PINNED[path] = scanned
    return scanned


def _scan_now(path: Path) -> tuple[str, frozenset[str], bool] | None:
    try:
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = _SCANNED.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1], cached[2], cached[3]
        data = path.read_bytes()
        tree = ast.parse(data, filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return None
    names: set[str] = set()
    dynamic = False
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "." * node.level + (node.module or "")
            names.add(base)
            names.update(f"{base}.{alias.name}" if node.module else f"{base}{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            dynamic = dynamic or called in _DYNAMIC_IMPORTS
    digest = hashlib.sha256(data).hexdigest()
    _SCANNED[path] = (stamp, digest, frozenset(names), dynamic)
    return digest, frozenset(names), dynamic


def _resolve(names: frozenset[str], package: str) -> list[str]:
    """Absolute module names for import names (relative ones resolved against ``package``)."""
    found = []
    for name in sorted(names):
        level = len(name) - len(name.lstrip("."))
        if not level:
            found.append(name)
            continue
        base = package.split(".") if package else []
        if level - 1 > len(base):
            continue
        base = base[: len(base) - (level - 1)]
        rest = name[level:]
        found.append(".".join([*base, rest] if rest else base))
    return [n for n in found if n]


def _module_files(root: Path, dotted: str) -> list[tuple[str, Path]]:
    """The files importing ``dotted`` executes: each package's ``__init__.py`` and the module."""
    parts = dotted.split(".") if dotted else []
    found: list[tuple[str, Path]] = []
    for depth in range(1, len(parts) + 1):
        base = root.joinpath(*parts[:depth])
        name = ".".join(parts[:depth])
        if (base / "__init__.py").is_file():
            found.append((name, base / "__init__.py"))
        elif base.with_suffix(".py").is_file():
            found.append((name, base.with_suffix(".py")))
            break  # a module: what follows is an attribute, not a submodule
        elif not base.is_dir():
            break  # not a module of this package (an attribute, or a missing name)
    return found


def _package_tree(root: Path, top: str) -> dict[str, str]:
    """Every ``*.py`` of package ``top`` (or the one module ``top.py``)."""
    base = root / top
    paths = sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]
    files: dict[str, str] = {}
    for path in paths:
        if "__pycache__" in path.parts or any(p.startswith(".") for p in path.relative_to(root).parts):
            continue
        scanned = _scan(path)
        if scanned is not None:
            files[path.relative_to(root).as_posix()] = scanned[0]
            continue
        try:  # does not parse: its bytes still count
            files[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError:
            continue
    return files


def _git_state(root: Path, files: dict[str, str]) -> dict[str, str] | None:
    """The commit of the git work tree at ``root`` and the sha256 of the uncommitted diff of
    ``files`` (``git diff HEAD``); None outside a work tree or without git.

    One ``git`` call per fingerprint: outside a work tree the answer is remembered, and the diff
    is remembered per commit and file contents (which determine it).
    """
    pin = (root, tuple(sorted(files.items())))
    if _PIN_DEPTH[0] and pin in _PINNED_GIT:
        return _PINNED_GIT[pin]
    state = _git_state_now(root, files)
    if _PIN_DEPTH[0]:
        _PINNED_GIT[pin] = state
    return state


def _git_state_now(root: Path, files: dict[str, str]) -> dict[str, str] | None:
    if root in _NOT_GIT:
        return None
    commit = _git(root, "rev-parse", "HEAD")
    if not commit:
        _NOT_GIT.add(root)
        return None
    seen = (root, commit, tuple(sorted(files.items())))
    if seen not in _DIFFS:
        diff = _git(root, "diff", "HEAD", "--no-ext-diff", "--no-color", "--", *sorted(files)) if files else ""
        _DIFFS[seen] = hashlib.sha256((diff or "").encode()).hexdigest()
    return {"commit": commit.strip(), "diff_sha256": _DIFFS[seen]}


def _git(cwd: Path, *args: str) -> str | None:
    if shutil.which("git") is None:
        return None
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def inputs_of(node_cls: type, args: dict[str, Any], stages: dict[str, str | None] | None = None) -> dict[str, Any]:
    """The inputs of a node run or a stage: arg values, the node's code, earlier stages."""
    return {"args": args, "code": code_of(node_cls), "stages": dict(stages or {})}


def fingerprint(subject: str, inputs: dict[str, Any]) -> str:
    """sha256 over ``subject`` (a stage name, or ``node:<dotted class>``) and its inputs."""
    blob = json.dumps({"stage": subject, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def explain_changes(before: dict[str, Any], after: dict[str, Any]) -> str:
    """What differs between two inputs, e.g. ``seed changed 1 → 2, code of my_project.fit changed``."""
    return ", ".join(changes(before, after)) or "the fingerprint changed"


def closest(entries: list[dict[str, Any]], inputs: dict[str, Any]) -> dict[str, Any] | None:
    """The index entry whose recorded ``inputs`` differ least from ``inputs`` (the newest among
    equals), so an explanation names only what really changed, not what differs from whatever
    ran last."""
    best: tuple[int, int] | None = None
    found: dict[str, Any] | None = None
    for position, entry in enumerate(entries):
        rank = (len(changes(entry.get("inputs") or {}, inputs)), -position)
        if best is None or rank < best:
            best, found = rank, entry
    return found


def changes(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Each difference between two inputs, one phrase each (see :func:`explain_changes`)."""
    changes: list[str] = []
    old_args, new_args = before.get("args", {}), after.get("args", {})
    if set(old_args) != set(new_args):
        changes.append(f"depends_on changed {sorted(old_args)} → {sorted(new_args)}")
    for name in sorted(set(old_args) & set(new_args)):
        if old_args[name] != new_args[name]:
            changes.append(f"{name} changed {old_args[name]!r} → {new_args[name]!r}")
    changes += _code_changes(before.get("code", {}), after.get("code", {}))
    old_stages, new_stages = before.get("stages", {}), after.get("stages", {})
    for name in sorted(set(old_stages) | set(new_stages)):
        if old_stages.get(name) != new_stages.get(name):
            changes.append(f"stage {name} changed")
    return changes


def _code_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``code of my_project/helper.py changed`` per changed file, then a changed git commit."""
    if old == new:
        return []
    old_files, new_files = old.get("files"), new.get("files")
    if not isinstance(old_files, dict) or not isinstance(new_files, dict):  # an older phd_flow's entry
        return [f"code of {new.get('module')} changed"]
    changed = [path for path in sorted(set(old_files) | set(new_files)) if old_files.get(path) != new_files.get(path)]
    shown = [f"code of {path} {_how(path, old_files, new_files)}" for path in changed[:5]]
    if len(changed) > 5:
        shown.append(f"code of {len(changed) - 5} more files changed")
    old_git, new_git = old.get("git") or {}, new.get("git") or {}
    if old_git.get("commit") != new_git.get("commit"):
        shown.append(f"git commit changed {str(old_git.get('commit'))[:10]} → {str(new_git.get('commit'))[:10]}")
    elif not shown and old_git != new_git:
        shown.append(f"uncommitted changes to the code of {new.get('module')} changed")
    return shown or [f"code of {new.get('module')} changed"]


def _how(path: str, old: dict[str, Any], new: dict[str, Any]) -> str:
    if path not in old:
        return "is new"
    return "is no longer used" if path not in new else "changed"


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

"""Reuse: the one fingerprint of "what went into this", the one explanation of what changed, and
the append-only indexes that find earlier work by fingerprint, for ``require()`` and stages.

Inputs are ``{"args": {...}, "code": {...}, "stages": {name: fp}}``; the fingerprint is a sha256
over them plus what they are the inputs of (a node or a stage). The code part covers the code
that really runs: ``functions`` maps each piece of the user's package a stage's ``with`` block (or
a node's class) uses, transitively, to the sha256 of its normalized AST (comments and docstrings
do not count). When that cannot be decided (dynamic calls), it falls back to the module: ``files``
maps every module of the node's top-level package that the node's module imports, transitively
(``import`` / ``from`` statements read with :mod:`ast`; the whole package tree when a module
imports dynamically or cannot be parsed), to its sha256, and ``git`` holds the commit and the
sha256 of the uncommitted diff of those files. Each index is
``<local_path>/.phd_flow/<kind>/<name>.jsonl``, one line per completed piece of work: lookups
read one small file, never every run directory.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import inspect
import json
import os
import shutil
import subprocess
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, ModuleType
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
            _PINNED_TREES.clear()
            _PINNED_STAGES.clear()


def code_of(node_cls: type, by_function: bool = True) -> dict[str, Any]:
    """The code part of a node's fingerprint: ``{"module", "functions": {name: sha256}}``, the
    node class and every function, class and value of the user's package it uses, transitively,
    on their normalized AST (see :func:`code_of_stage`); or, when that cannot be decided (or
    ``by_function`` is False), per module: ``{"module", "files": {path: sha256}, "git"}``.

    Paths are relative to the directory holding the node's top-level package, e.g.
    ``my_project/helper.py``; ``git`` is None outside a git work tree.
    """
    module = sys.modules.get(node_cls.__module__)
    name = _module_name(module, node_cls.__module__)
    found = _source_root(module, name)
    if found is None:  # defined in a REPL or a notebook cell: nothing on disk to cover
        return {"module": node_cls.__module__, "files": {}, "git": None}
    root, top, file = found
    if by_function and module is not None and node_cls.__module__ != "__main__":
        with contextlib.suppress(_Undecidable, OSError, SyntaxError, ValueError, RecursionError):
            walker = _Walker(root, top)
            walker.add(node_cls, module, node_cls.__name__)
            if walker.pieces:
                return {"module": node_cls.__module__, "functions": dict(sorted(walker.pieces.items()))}
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


# --- the code a stage or a node really runs: functions of the user's package, normalized AST ----

#: Calls whose target or effect is named at run time: what runs cannot be read statically.
_DYNAMIC_CALLS = frozenset({"eval", "exec", "__import__", "import_module"})
#: Calls that open a stage (``stage=`` for the managed artifacts).
_STAGE_CALLS = ("stage", "managed_artifact", "managed_artifact_dir")
_MAX_PIECES = 2000  # more pieces of code than this: the module fingerprint is cheaper and as good
_PRIMITIVES = (int, float, complex, str, bytes, bool, type(None))
_TREES: dict[Path, tuple[tuple[int, int], ast.Module]] = {}
_PINNED_TREES: dict[Path, ast.Module | None] = {}
_PINNED_STAGES: dict[tuple[type, str | None, tuple[str, int, int] | None, bool], tuple[str, dict[str, Any]]] = {}
_OURS = str(Path(__file__).resolve().parent) + os.sep  # phd_flow's own frames are not the user's code


class _Undecidable(Exception):
    """What runs cannot be told from the source: the module fingerprint is used instead."""


def stage_call_name(call: ast.Call) -> ast.expr | None:
    """The name argument of a call that opens a stage (``.stage("x")``,
    ``.managed_artifact(..., stage="x")``), or None for any other call."""
    if not isinstance(call.func, ast.Attribute) or call.func.attr not in _STAGE_CALLS:
        return None
    keywords = {k.arg: k.value for k in call.keywords}
    if call.func.attr == "stage":
        return call.args[0] if call.args else keywords.get("name")
    arg = call.args[1] if len(call.args) > 1 else keywords.get("stage")
    return None if isinstance(arg, ast.Constant) and arg.value is None else arg


def user_frame() -> FrameType | None:
    """The innermost frame of the caller that is not phd_flow's (nor contextlib's)."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None and (
        frame.f_code.co_filename.startswith(_OURS) or frame.f_code.co_filename == contextlib.__file__
    ):
        frame = frame.f_back
    return frame


def code_of_stage(
    node_cls: type, stage: str, frame: FrameType | None = None, others_left_out: bool = True
) -> dict[str, Any]:
    """The code part of a stage's fingerprint: ``{"module", "functions": {name: sha256}}``.

    It covers the ``with`` block that opened the stage (in ``frame``; without one, the one
    ``with`` block of the node class's methods naming ``stage`` literally), the statements of its
    function before it (other stages' blocks left out, with ``others_left_out``: a stage that
    names its ``depends_on`` counts them through it; one without counts their code too), and
    every function, class and module-level value of the user's package they use, transitively,
    each hashed on its normalized AST (comments, whitespace and docstrings do not count). When
    that cannot be decided (a dynamic call, source not found), :func:`code_of` is used.
    """
    module = sys.modules.get(node_cls.__module__)
    found = _source_root(module, _module_name(module, node_cls.__module__))
    if found is None:
        return code_of(node_cls)
    root, top, _ = found
    where = (frame.f_code.co_filename, frame.f_code.co_firstlineno, frame.f_lineno) if frame is not None else None
    # the same block again in this run (a loop, maybe with computed stage names): computed once
    memo = (node_cls, stage if where is None else None, where, others_left_out)
    if _PIN_DEPTH[0] and memo in _PINNED_STAGES:
        before, code = _PINNED_STAGES[memo]
        if before == stage:
            return code
        renamed = {k.replace(f" [stage {before}]", f" [stage {stage}]"): v for k, v in code["functions"].items()}
        return {**code, "functions": renamed} if "functions" in code else code
    try:
        walker = _Walker(root, top, others_left_out)
        if frame is not None:
            walker.stage_block(frame, stage)
        else:
            walker.stage_named(node_cls, stage)
        code = {"module": node_cls.__module__, "functions": dict(sorted(walker.pieces.items()))}
    except (_Undecidable, OSError, SyntaxError, ValueError, RecursionError):
        code = code_of(node_cls, by_function=False)
    if _PIN_DEPTH[0]:
        _PINNED_STAGES[memo] = (stage, code)
    return code


def _tree(path: Path) -> ast.Module | None:
    """The parsed file, read once while a run goes on (see :func:`pinned`)."""
    if _PIN_DEPTH[0] and path in _PINNED_TREES:
        return _PINNED_TREES[path]
    try:
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = _TREES.get(path)
        if cached is not None and cached[0] == stamp:
            tree: ast.Module | None = cached[1]
        else:
            tree = ast.parse(path.read_bytes(), filename=str(path))
            _TREES[path] = (stamp, tree)
    except (OSError, SyntaxError, ValueError):
        tree = None
    if _PIN_DEPTH[0]:
        _PINNED_TREES[path] = tree
    return tree


_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


@dataclass(frozen=True)
class _View:
    """Parsed code as hashed and read for what it uses, without copying the tree: the bodies of
    the ``hollow`` blocks, the root's statements from ``cut`` on, and docstrings are left out."""

    root: ast.AST
    hollow: frozenset[int] = frozenset()
    cut: int | None = None

    def fields(self, node: ast.AST) -> Iterator[tuple[str, Any]]:
        for name, value in ast.iter_fields(node):
            if name == "body" and isinstance(value, list):
                if id(node) in self.hollow:
                    value = []
                elif node is self.root and self.cut is not None:
                    value = value[: self.cut]
                first = value[0] if value else None
                if (
                    isinstance(node, _DOCUMENTED)
                    and isinstance(first, ast.Expr)
                    and isinstance(first.value, ast.Constant)
                ):
                    value = value[1:] if isinstance(first.value.value, str) else value
            yield name, value

    def walk(self) -> Iterator[ast.AST]:
        todo = [self.root]
        while todo:
            node = todo.pop()
            yield node
            for _, value in self.fields(node):
                if isinstance(value, ast.AST):
                    todo.append(value)
                elif isinstance(value, list):
                    todo.extend(v for v in value if isinstance(v, ast.AST))

    def digest(self) -> str:
        """sha256 of the normalized AST: no docstrings, positions, comments or formatting."""
        parts: list[str] = []

        def dump(value: Any) -> None:
            if isinstance(value, ast.AST):
                parts.append(f"{type(value).__name__}(")
                for name, inner in self.fields(value):
                    parts.append(f"{name}=")
                    dump(inner)
                    parts.append(",")
                parts.append(")")
            elif isinstance(value, list):
                parts.append("[")
                for inner in value:
                    dump(inner)
                    parts.append(",")
                parts.append("]")
            else:
                parts.append(repr(value))

        dump(self.root)
        return hashlib.sha256("".join(parts).encode()).hexdigest()


_Def = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def _find_def(tree: ast.Module, qualname: str) -> _Def | None:
    """The definition named ``qualname`` (``A.b``, ``f.<locals>.g``); the last one wins, as at run time."""
    body: list[ast.stmt] = tree.body
    found: _Def | None = None
    nested = False
    for part in qualname.split("."):
        if part == "<locals>":
            nested = True
            continue
        pool = [n for n in (ast.walk(found) if nested and found is not None else body) if isinstance(n, _Def)]
        candidates = [n for n in pool if n.name == part and n is not found]
        if not candidates:
            return None
        found, nested = candidates[-1], False
        body = found.body
    return found


def _locals_of(func: ast.AST) -> set[str]:
    """Names bound inside ``func`` (parameters, assignments, imports, loop targets)."""
    names: set[str] = set()
    for each in ast.walk(func):
        if isinstance(each, ast.arg):
            names.add(each.arg)
        elif isinstance(each, ast.Name) and isinstance(each.ctx, (ast.Store, ast.Del)):
            names.add(each.id)
        elif isinstance(each, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in each.names)
        elif isinstance(each, _Def) and each is not func:
            names.add(each.name)
    return names


class _Walker:
    """Collects the pieces of the user's package that some code uses, transitively."""

    def __init__(self, root: Path, top: str, others_left_out: bool = True) -> None:
        self.root, self.top = root, top
        self.others_left_out = others_left_out  # other stages' blocks, in a stage's function
        self.pieces: dict[str, str] = {}
        self._seen: set[object] = set()  # id() of definitions, "module.name" of values

    def _ours(self, module_name: object) -> bool:
        return isinstance(module_name, str) and module_name.split(".")[0] == self.top

    def _module_tree(self, module: ModuleType) -> ast.Module:
        file = getattr(module, "__file__", None)
        tree = _tree(Path(file).resolve()) if file and str(file).endswith(".py") else None
        if tree is None:
            raise _Undecidable(f"no source for {module.__name__}")
        return tree

    def stage_block(self, frame: FrameType, stage: str) -> None:
        """The piece of the function in ``frame`` that opened ``stage``, and what it uses."""
        code = frame.f_code
        name = frame.f_globals.get("__name__")
        module = sys.modules.get(name) if isinstance(name, str) else None
        if module is None or not self._ours(_module_name(module, str(name))) or code.co_name == "<module>":
            raise _Undecidable("the stage is not opened in a function of the package")
        if code.co_flags & (inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR):
            raise _Undecidable("the stage is opened by a context manager of the user's: its code is the caller's")
        tree = _tree(Path(code.co_filename).resolve())
        if tree is None:
            raise _Undecidable("source not found")
        func, qualname = _def_at(tree, code, frame.f_lineno)
        owner = frame.f_locals.get("self")
        self._stage(module, qualname, func, frame.f_lineno, stage, type(owner) if owner is not None else None)

    def stage_named(self, node_cls: type, stage: str) -> None:
        """:meth:`stage_block` for the one ``with`` block of ``node_cls``'s methods (the first
        class of its MRO that has one) naming ``stage`` literally: the fingerprint a run of
        ``node_cls`` computes for ``stage``, without running it."""
        for klass in node_cls.__mro__:
            module = sys.modules.get(klass.__module__)
            if module is None or not self._ours(klass.__module__):
                continue
            found = _find_def(self._module_tree(module), klass.__qualname__)
            methods = [m for m in getattr(found, "body", []) if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
            hits = [
                (method, block.lineno)
                for method in methods
                for block in ast.walk(method)
                if isinstance(block, (ast.With, ast.AsyncWith))
                and any(
                    isinstance(n, ast.Constant) and n.value == stage
                    for i in block.items
                    if isinstance(i.context_expr, ast.Call)
                    for n in [stage_call_name(i.context_expr)]
                )
            ]
            if len(hits) == 1:
                method, line = hits[0]
                self._stage(module, f"{klass.__qualname__}.{method.name}", method, line, stage, node_cls)
                return
            if hits:
                break
        raise _Undecidable(f"no single with block of {node_cls.__qualname__} opens stage {stage!r}")

    def _stage(
        self, module: ModuleType, qualname: str, func: _Function, line: int, stage: str, owner: type | None
    ) -> None:
        pruned = _stage_piece(func, line, stage, self.others_left_out)
        self.pieces[f"{_module_name(module, module.__name__)}.{qualname} [stage {stage}]"] = pruned.digest()
        self._uses(pruned, module, owner, _locals_of(func))

    def add(self, obj: Any, module: ModuleType, name: str) -> None:
        """One object a piece of code names: a function, class or value of the package."""
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        elif isinstance(obj, property):
            for part in (obj.fget, obj.fset, obj.fdel):
                if part is not None:
                    self.add(part, module, name)
            return
        elif isinstance(obj, functools.partial):
            obj = obj.func
        if callable(obj) and hasattr(obj, "__wrapped__"):  # functools.wraps, lru_cache, ...
            with contextlib.suppress(ValueError):
                obj = inspect.unwrap(obj)
        if isinstance(obj, ModuleType):
            return
        if isinstance(obj, (types.FunctionType, type)):
            if not self._ours(getattr(obj, "__module__", None)) or id(obj) in self._seen:
                return
            self._seen.add(id(obj))
            self._definition(obj)
            return
        key = f"{_module_name(module, module.__name__)}.{name}"
        if not self._ours(module.__name__) or key in self._seen:
            return
        self._seen.add(key)
        if isinstance(obj, _PRIMITIVES) or _plain(obj):
            self.pieces[key] = hashlib.sha256(repr(obj).encode()).hexdigest()
            return
        tree = self._module_tree(module)
        assigned = [s for s in tree.body if name in _assigned(s) or getattr(s, "name", None) == name]
        if assigned:
            view = _View(ast.Module(body=assigned, type_ignores=[]))
            self.pieces[key] = view.digest()
            self._uses(view, module, None, set())
        elif self._ours(type(obj).__module__):
            self.add(type(obj), module, name)

    def _definition(self, obj: Any) -> None:
        if len(self.pieces) > _MAX_PIECES:
            raise _Undecidable("too much code")
        module = sys.modules.get(obj.__module__)
        if module is None:
            raise _Undecidable(f"module {obj.__module__} is not loaded")
        qualname = obj.__qualname__
        found = _find_def(self._module_tree(module), qualname)
        if found is None:
            raise _Undecidable(f"{obj.__module__}.{qualname} not found in its source")
        self.pieces[f"{_module_name(module, module.__name__)}.{qualname}"] = _View(found).digest()
        owner: type | None = obj if isinstance(obj, type) else None
        if owner is None and "<locals>" not in qualname and "." in qualname:
            candidate: Any = module
            for part in qualname.split(".")[:-1]:
                candidate = getattr(candidate, part, None)
            owner = candidate if isinstance(candidate, type) else None
        self._uses(_View(found), module, owner, _locals_of(found) if not isinstance(found, ast.ClassDef) else set())

    def _uses(self, code: _View, module: ModuleType, owner: type | None, local: set[str]) -> None:
        """Add what ``code`` (in ``module``; ``self`` an instance of ``owner``) names."""
        namespace = vars(module)
        based: set[int] = set()  # Name nodes read as the base of an attribute chain
        for each in code.walk():
            if isinstance(each, ast.Call):
                func = each.func
                called = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
                if called in _DYNAMIC_CALLS:
                    raise _Undecidable(f"{called}() in {module.__name__}")
                if (
                    called == "getattr"
                    and len(each.args) > 1
                    and isinstance(each.args[0], ast.Name)
                    and each.args[0].id in ("self", "cls")
                    and not isinstance(each.args[1], ast.Constant)
                ):
                    raise _Undecidable(f"getattr(self, <computed name>) in {module.__name__}")
            elif isinstance(each, ast.Attribute) and isinstance(each.ctx, ast.Load):
                chain = [each.attr]
                base: ast.expr = each.value
                while isinstance(base, ast.Attribute):
                    chain.append(base.attr)
                    base = base.value
                chain.reverse()
                if isinstance(base, ast.Call) and isinstance(base.func, ast.Name) and base.func.id == "super":
                    for klass in owner.__mro__[1:] if owner is not None else ():
                        if chain[0] in vars(klass):  # super().fit(): the first class after it that has fit
                            self._member(klass, chain[0])
                            break
                    continue
                if not isinstance(base, ast.Name):
                    continue
                based.add(id(base))
                if base.id in ("self", "cls") and owner is not None:
                    self._member(owner, chain[0])
                elif base.id not in local and base.id in namespace:
                    self._chain(namespace[base.id], chain, module, base.id)
        for each in code.walk():
            if (
                isinstance(each, ast.Name)
                and isinstance(each.ctx, ast.Load)
                and id(each) not in based
                and each.id not in local
                and each.id in namespace
            ):
                self.add(namespace[each.id], module, each.id)

    def _member(self, owner: type, attr: str) -> None:
        for klass in owner.__mro__:
            if attr in vars(klass):
                if self._ours(klass.__module__):
                    found = vars(klass)[attr]
                    if isinstance(found, (types.FunctionType, staticmethod, classmethod, property)):
                        self.add(found, sys.modules[klass.__module__], attr)
                    else:  # a class attribute: the class body holds it
                        self.add(klass, sys.modules[klass.__module__], klass.__name__)
                return

    def _chain(self, obj: Any, chain: list[str], module: ModuleType, name: str) -> None:
        """``helper.clean`` / ``Model.fit`` / ``pkg.sub.VALUE``: each module or class step."""
        for attr in chain:
            if isinstance(obj, ModuleType):
                if not self._ours(obj.__name__):
                    return
                module, name = obj, attr
                if attr not in vars(obj):
                    return
                obj = vars(obj)[attr]
            elif isinstance(obj, type):
                self.add(obj, module, name)
                return
            else:
                break
        self.add(obj, module, name)


def _plain(obj: Any, depth: int = 0) -> bool:
    """A value made only of primitives, lists, tuples, sets and dicts (its repr is its content)."""
    if isinstance(obj, _PRIMITIVES):
        return True
    if depth > 5 or not isinstance(obj, (list, tuple, set, frozenset, dict)) or len(obj) > 10_000:
        return False
    items = [*obj.keys(), *obj.values()] if isinstance(obj, dict) else list(obj)
    return all(_plain(item, depth + 1) for item in items)


def _assigned(statement: ast.stmt) -> set[str]:
    targets: list[ast.expr] = []
    if isinstance(statement, ast.Assign):
        targets = statement.targets
    elif isinstance(statement, (ast.AnnAssign, ast.AugAssign)):
        targets = [statement.target]
    return {n.id for t in targets for n in ast.walk(t) if isinstance(n, ast.Name)}


_Function = ast.FunctionDef | ast.AsyncFunctionDef


def _def_at(tree: ast.Module, code: types.CodeType, line: int) -> tuple[_Function, str]:
    """The definition of the function ``code`` that holds ``line`` (by name alone when the file
    changed since it was imported), and its qualified name."""
    found: list[tuple[_Function, str]] = []

    def visit(body: list[ast.stmt], prefix: str, by_line: bool) -> None:
        for each in body:
            if isinstance(each, ast.ClassDef):
                visit(each.body, f"{prefix}{each.name}.", by_line)
            elif isinstance(each, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = each.decorator_list[0].lineno if each.decorator_list else each.lineno
                here = code.co_firstlineno in (start, each.lineno) and each.lineno <= line <= (each.end_lineno or 0)
                if each.name == code.co_name and (here or not by_line):
                    found.append((each, f"{prefix}{each.name}"))
                visit(each.body, f"{prefix}{each.name}.<locals>.", by_line)
            else:
                inner = [getattr(each, f, None) or [] for f in ("body", "orelse", "finalbody")]
                inner += [h.body for h in getattr(each, "handlers", None) or []]
                for statements in inner:
                    visit([s for s in statements if isinstance(s, ast.stmt)], prefix, by_line)

    visit(tree.body, "", True)
    if not found:  # the file changed since it was imported (lines moved): by name
        visit(tree.body, "", False)
        qualname = getattr(code, "co_qualname", None)
        found = [(f, q) for f, q in found if qualname is None or q == qualname]
    if len(found) != 1:
        raise _Undecidable(f"function {code.co_name} not found in its source")
    return found[0]


def _stage_piece(func: _Function, line: int, stage: str, others_left_out: bool = True) -> _View:
    """``func`` up to the ``with`` statement at ``line`` that opens ``stage``, with the bodies
    of the other stages' ``with`` blocks left out (``others_left_out``)."""
    blocks = [w for w in ast.walk(func) if isinstance(w, (ast.With, ast.AsyncWith))]

    def names(w: ast.With | ast.AsyncWith) -> list[ast.expr]:
        calls = [i.context_expr for i in w.items if isinstance(i.context_expr, ast.Call)]
        return [n for n in map(stage_call_name, calls) if n is not None]

    opening = [
        w for w in blocks if names(w) and w.lineno <= line <= max((i.context_expr.end_lineno or 0) for i in w.items)
    ]
    if not opening:  # the file changed since it was imported (lines moved): by the stage's name
        opening = [w for w in blocks if any(isinstance(n, ast.Constant) and n.value == stage for n in names(w))]
        opening = opening if len(opening) == 1 else []
    if not opening:
        raise _Undecidable("the stage is not opened by a with statement")
    ours = opening[-1]  # the innermost (ast.walk is breadth-first)
    parents = {id(child): node for node in ast.walk(func) for child in ast.iter_child_nodes(node)}
    inside = {id(n) for n in ast.walk(ours)}
    around: set[int] = {id(ours)}
    top: ast.AST = ours
    while id(top) in parents and parents[id(top)] is not func:
        top = parents[id(top)]
        around.add(id(top))
    # another stage's block: it counts through depends_on
    hollow = frozenset(
        id(w) for w in blocks if others_left_out and id(w) not in inside and id(w) not in around and names(w)
    )
    cut = next(i + 1 for i, statement in enumerate(func.body) if statement is top)
    return _View(func, hollow, cut)  # what runs after the stage is not its code


def inputs_of(
    node_cls: type,
    args: dict[str, Any],
    stages: dict[str, str | None] | None = None,
    code: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The inputs of a node run or a stage: arg values, the code (the node's unless given),
    earlier stages."""
    return {"args": args, "code": code if code is not None else code_of(node_cls), "stages": dict(stages or {})}


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
    """``code of my_project.helper.clean changed`` per changed function (or ``code of
    my_project/helper.py changed`` per changed file, then a changed git commit)."""
    if old == new:
        return []
    for part in ("functions", "files"):
        old_part, new_part = old.get(part), new.get(part)
        if isinstance(old_part, dict) and isinstance(new_part, dict):
            break
    else:  # one side per function, the other per file (or an older phd_flow's entry)
        return [f"code of {new.get('module')} changed"]
    changed = [k for k in sorted(set(old_part) | set(new_part)) if old_part.get(k) != new_part.get(k)]
    shown = [f"code of {k} {_how(k, old_part, new_part)}" for k in changed[:5]]
    if len(changed) > 5:
        shown.append(f"code of {len(changed) - 5} more {part} changed")
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

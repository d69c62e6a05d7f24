"""Finding the Node subclasses of a package: from their source where that decides it, else by import.

``nodes`` and ``run NODE --help`` must not pay for what the user's modules import (pandas,
sklearn, torch: seconds). So the package's source files are read with :mod:`ast`: a class is a
node when a base resolves (through the module's imports, across the package) to phd_flow's
``Node`` or to another such class, its Args come from ``Node[XArgs, Result]`` (or its parent's),
and it is listed when it has Args and a ``_run``, as :func:`find_nodes` does on the imported
classes. For ``--help`` the Args dataclass is built by executing only its own class statement
and what that needs (stdlib, phd_flow and simple-parsing imports, the module's constants and
classes, Args of other modules of the package): never the module's other imports.

When the source cannot decide (a base computed at run time, a class made in a function or with
``type()``, a base from a library that builds on phd_flow, a syntax error), that one module is
imported, as before; when the Args cannot be built from source, ``--help`` imports the node's
module. Either way the answer is what importing would give.
"""

from __future__ import annotations

import ast
import builtins
import dataclasses
import importlib
import importlib.util
import inspect
import pkgutil
import re
import sys
import typing
from functools import lru_cache
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from phd_flow.errors import NodeNotFoundError, closest
from phd_flow.run.node import Node

#: Modules whose names the Args statement may import when built from source: light, no user code.
SAFE_IMPORTS = frozenset({"phd_flow", "simple_parsing", "typing_extensions"})
#: Where the Args classes built from source live (``sys.modules`` entries named after the module).
VIEW_PREFIX = "phd_flow._source_view"


def import_package(package: str) -> ModuleType:
    """Import ``package`` and every submodule in it (except ``__main__``)."""
    module = importlib.import_module(package)
    for info in pkgutil.walk_packages(getattr(module, "__path__", []), prefix=f"{package}."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue
        importlib.import_module(info.name)
    return module


def find_nodes(package: str) -> dict[str, type[Node[Any, Any]]]:
    """Every runnable Node subclass defined in ``package``, by qualified dotted name (imports
    every module of the package; :func:`list_nodes` does not)."""
    import_package(package)
    return _runtime_nodes(package, lambda module: module == package or module.startswith(f"{package}."))


def _runtime_nodes(package: str, wanted: Any) -> dict[str, type[Node[Any, Any]]]:
    found: dict[str, type[Node[Any, Any]]] = {}
    stack: list[type[Node[Any, Any]]] = list(Node.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if not wanted(cls.__module__) or cls.__module__ not in sys.modules:
            continue  # (a class of a module dropped from sys.modules is no longer the package's)
        if getattr(cls, "args_class", None) is None or "_run" not in _defined(cls):
            continue
        found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return dict(sorted(found.items()))


def _defined(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is Node:
            break
        names.update(vars(klass))
    return names


# --- what the CLI lists and resolves ----------------------------------------------------------


class NodeView:
    """A node known from its source: its name and docstring, and (built on demand from the
    source) its Args dataclass. ``argument_parser``/``parse_with`` are Node's own, so
    ``run NODE --help`` is the help the imported class gives."""

    def __init__(self, scan: _Scan, module: str, qualname: str, args: tuple[str, str]) -> None:
        self._scan = scan
        self.__module__ = module
        self.__qualname__ = qualname
        self.__name__ = qualname.rsplit(".", 1)[-1]
        self._args_ref = args
        self._args: type[Any] | None = None

    def description(self) -> str:
        """The class docstring, as ``Node.description`` gives it."""
        raw = ast.get_docstring(self._scan.sources[self.__module__].classes[self.__qualname__], clean=False)
        if raw is not None and sys.version_info >= (3, 13):  # the compiler dedents docstrings since 3.13
            raw = inspect.cleandoc(raw)
        return (raw or "").strip()

    def args_type(self) -> type[Any]:
        """The Args dataclass built from source; :class:`Undecided` when it cannot be."""
        if self._args is None:
            self._args = self._scan.materialize(*self._args_ref)
        return self._args

    def argument_parser(self, prog: str | None = None) -> Any:
        """``Node.argument_parser`` for these Args (the same help, field texts included)."""
        return typing.cast(Any, Node.__dict__["argument_parser"]).__func__(self, prog)

    def parse_with(self, parser: Any, argv: list[str], args_file: str | None = None) -> Any:
        return typing.cast(Any, Node.__dict__["parse_with"]).__func__(self, parser, argv, args_file)

    def load(self) -> type[Node[Any, Any]]:
        """The real class: imports its module (and only that)."""
        obj: Any = importlib.import_module(self.__module__)
        for part in self.__qualname__.split("."):
            obj = getattr(obj, part, None)
        if not (isinstance(obj, type) and issubclass(obj, Node)):
            raise Undecided(f"{self.__module__}.{self.__qualname__} is not a Node once imported")
        return obj


class Undecided(Exception):
    """The source does not decide this; importing does."""


def list_nodes(package: str) -> dict[str, NodeView | type[Node[Any, Any]]]:
    """Every runnable node of ``package`` by dotted name, like :func:`find_nodes`, but read from
    the source: only the modules whose source does not decide are imported."""
    scan = _Scan(package)
    found: dict[str, NodeView | type[Node[Any, Any]]] = dict(scan.views)
    if scan.undecided:
        from phd_flow.log import logger

        for module in scan.undecided:
            logger.debug(f"Importing {module} to list its nodes: {scan.reasons.get(module, 'undecided')}")
            importlib.import_module(module)
        found.update(_runtime_nodes(package, lambda module: module in scan.undecided))
    return dict(sorted(found.items()))


def node_names(package: str) -> list[str]:
    """The class names of the package's nodes, sorted (for messages and checks)."""
    return sorted({cls.__name__ for cls in list_nodes(package).values()})


def node_view(package: str, name: str) -> NodeView | None:
    """The node ``name`` read from source with its Args built, or None (then import it)."""
    try:
        scan = _Scan(package)
        matches = [view for dotted, view in scan.views.items() if _matches(dotted, package, name)]
        if len(matches) != 1 or _maybe_in(scan.undecided, scan, name):
            return None
        matches[0].argument_parser()  # builds the Args and resolves their type hints
        return matches[0]
    except Exception:  # anything the Args' statements raise: importing the module decides
        return None


def _maybe_in(modules: list[str], scan: _Scan, name: str) -> bool:
    """Could one of these (undecided) modules define the node ``name`` (``Cls``, ``mod.Cls``)?"""
    *prefix, short = name.split(".")

    def could(module: str) -> bool:
        source = scan.sources.get(module)
        if source is None:
            return True
        if short not in source.text:
            return False
        nested = re.search(rf"\bclass\s+{re.escape(prefix[-1])}\b", source.text) if prefix else None
        return not prefix or f".{module}".endswith(f".{'.'.join(prefix)}") or nested is not None

    return any(could(module) for module in modules)


def resolve_node(package: str, name: str) -> type[Node[Any, Any]]:
    """A node by class name (``FitOLS``) or dotted path (``my_project.fit_ols.FitOLS``,
    ``fit_ols.FitOLS``). Raises :class:`NodeNotFoundError` listing the known nodes.

    The package's source says which module defines it, and only that module is imported, so
    `run` does not pay for the imports of every other node (torch, sklearn, ...).
    """
    scan = _Scan(package)
    quick = [view for dotted, view in scan.views.items() if _matches(dotted, package, name)]
    if len(quick) == 1 and not _maybe_in(scan.undecided, scan, name):
        try:
            return quick[0].load()
        except Undecided:
            pass
    nodes = list_nodes(package)
    matches = [cls for dotted, cls in nodes.items() if _matches(dotted, package, name)]
    if len(matches) == 1:
        found = matches[0]
        return found.load() if isinstance(found, NodeView) else found
    short = sorted({cls.__name__ for cls in nodes.values()})
    if len(matches) > 1:
        options = ", ".join(dotted for dotted, cls in nodes.items() if cls in matches)
        raise NodeNotFoundError(f"Node name {name!r} is ambiguous in {package}: use one of {options}.")
    listing = ", ".join(short) if short else "(none: define a subclass of phd_flow.Node)"
    raise NodeNotFoundError(
        f"No node named {name!r} in package {package}.{closest(name, short)} Known nodes: {listing}."
    )


def _matches(dotted: str, package: str, name: str) -> bool:
    return dotted == name or dotted.endswith(f".{name}") or dotted == f"{package}.{name}"


# --- reading the source -----------------------------------------------------------------------

# What a name or attribute in a module's source stands for.
_Ref = tuple[str, Any]  # ("node"|"phd"|"class"|"module"|"typevar"|"stdlib"|"external"|"unknown", detail)


@dataclasses.dataclass
class _Source:
    name: str
    path: Path
    text: str
    tree: ast.Module
    bindings: dict[str, tuple[str, Any]] = dataclasses.field(default_factory=dict)
    statements: dict[str, ast.stmt] = dataclasses.field(default_factory=dict)
    stars: list[str] = dataclasses.field(default_factory=list)
    classes: dict[str, ast.ClassDef] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _ClassInfo:
    is_node: bool
    args: tuple[str, str] | None
    has_run: bool


class _Scan:
    """One reading of a package's source: ``views`` (decided nodes), ``undecided`` modules."""

    def __init__(self, package: str) -> None:
        self.package = package
        self.sources: dict[str, _Source] = {}
        self.undecided: list[str] = []
        self.reasons: dict[str, str] = {}
        self.views: dict[str, NodeView] = {}
        self._info: dict[tuple[str, str], _ClassInfo | Undecided] = {}
        self._built: dict[tuple[str, str], Any] = {}
        for module, path in _package_files(package):
            try:
                stat = path.stat()
                self.sources[module] = _read(module, path, stat.st_mtime_ns, stat.st_size, package)
            except (OSError, SyntaxError, UnicodeDecodeError, ValueError) as exc:
                self.undecided.append(module)  # importing says what is wrong, as before
                self.reasons[module] = f"{type(exc).__name__}: {exc}"
        for module, source in self.sources.items():
            try:
                self._check_dynamic(source)
                for qualname in source.classes:
                    info = self.info(module, qualname)
                    if info.is_node and info.args is not None and info.has_run:
                        self.views[f"{module}.{qualname}"] = NodeView(self, module, qualname, info.args)
            except Undecided as exc:
                self.undecided.append(module)
                self.reasons[module] = str(exc)
                for dotted in [d for d, v in self.views.items() if v.__module__ == module]:
                    del self.views[dotted]

    # -- names ------------------------------------------------------------------------------

    def in_package(self, module: str) -> bool:
        return module == self.package or module.startswith(f"{self.package}.")

    def resolve(self, source: _Source, expr: ast.expr, depth: int = 0) -> _Ref:
        if depth > 50:
            return ("unknown", "too deep")
        if isinstance(expr, ast.Name):
            return self.resolve_name(source, expr.id, depth + 1)
        if isinstance(expr, ast.Attribute):
            base = self.resolve(source, expr.value, depth + 1)
            return self.attribute(base, expr.attr, depth + 1)
        return ("unknown", ast.unparse(expr))

    def resolve_name(self, source: _Source, name: str, depth: int) -> _Ref:
        bound = source.bindings.get(name)
        if bound is None:
            for star in source.stars:
                ref = self.attribute(("module", star), name, depth + 1)
                if ref[0] != "unknown":
                    return ref
            if source.stars or not hasattr(builtins, name):
                return ("unknown", name)
            return ("stdlib", f"builtins.{name}")
        kind, detail = bound
        if kind == "module":
            return self.module_ref(detail)
        if kind == "from":
            return self.attribute(self.module_ref(detail[0]), detail[1], depth + 1)
        if kind == "class":
            return ("class", (source.name, name))
        return (kind, detail)  # "typevar", "unknown"

    def module_ref(self, module: str) -> _Ref:
        top = module.split(".", 1)[0]
        if self.in_package(module) or top == "phd_flow":
            return ("module", module)
        return ("stdlib" if top in sys.stdlib_module_names else "external", module)

    def attribute(self, base: _Ref, attr: str, depth: int) -> _Ref:
        kind, detail = base
        if kind == "module":
            dotted = f"{detail}.{attr}"
            if self.in_package(detail):
                if dotted in self.sources or _is_package_module(dotted, self):
                    return ("module", dotted)
                source = self.sources.get(detail)
                return self.resolve_name(source, attr, depth + 1) if source else ("unknown", dotted)
            try:  # phd_flow's own modules are light to import
                obj = getattr(importlib.import_module(detail), attr)
            except (ImportError, AttributeError):
                try:
                    obj = importlib.import_module(dotted)
                except ImportError:
                    return ("unknown", dotted)
            if isinstance(obj, ModuleType):
                return ("module", obj.__name__)
            if obj is Node:
                return ("node", obj)
            return ("typevar", obj) if isinstance(obj, TypeVar) else ("phd", obj)
        if kind in ("stdlib", "external"):
            return (kind, f"{detail}.{attr}")
        if kind == "class":
            module, qualname = detail
            if f"{qualname}.{attr}" in self.sources[module].classes:
                return ("class", (module, f"{qualname}.{attr}"))
        return ("unknown", attr)

    # -- classes ----------------------------------------------------------------------------

    def info(self, module: str, qualname: str) -> _ClassInfo:
        """Whether the class is a Node, its Args and whether it (or a parent) defines _run."""
        key = (module, qualname)
        if key in self._info:
            cached = self._info[key]
            if isinstance(cached, Undecided):
                raise cached
            return cached
        self._info[key] = Undecided(f"{module}.{qualname}: circular bases")
        try:
            info = self._class_info(module, qualname)
        except Undecided as exc:
            self._info[key] = exc
            raise
        self._info[key] = info
        return info

    def _class_info(self, module: str, qualname: str) -> _ClassInfo:
        source = self.sources[module]
        cls = source.classes[qualname]
        has_run = any(
            (isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name == "_run")
            or (isinstance(stmt, (ast.Assign, ast.AnnAssign)) and "_run" in _targets(stmt))
            for stmt in cls.body
        )
        is_node, parents = False, list[_ClassInfo]()
        args: tuple[str, str] | None = None
        for base in cls.bases:
            origin = base.value if isinstance(base, ast.Subscript) else base
            ref = self.resolve(source, origin)
            if ref[0] == "node":
                is_node = True
            elif ref[0] == "class":
                parent = self.info(*ref[1])
                parents.append(parent)
                is_node = is_node or parent.is_node
            elif ref[0] == "phd" and isinstance(ref[1], type) and issubclass(ref[1], Node):
                raise Undecided(f"{module}.{qualname}: based on phd_flow's {ref[1].__qualname__}")
            elif ref[0] == "external" and ref[1].split(".", 1)[0] in _phd_flow_dependents():
                raise Undecided(f"{module}.{qualname}: based on {ref[1]}, from a library using phd_flow")
            elif ref[0] in ("unknown", "typevar"):
                raise Undecided(f"{module}.{qualname}: base {ast.unparse(base)} is decided at run time")
            if isinstance(base, ast.Subscript) and (ref[0] == "node" or (ref[0] == "class" and parents[-1].is_node)):
                params = base.slice.elts if isinstance(base.slice, ast.Tuple) else [base.slice]
                found = self.resolve(source, params[0]) if params else ("unknown", None)
                if found[0] == "class":
                    args = typing.cast("tuple[str, str]", found[1])
                elif found[0] != "typevar":
                    raise Undecided(f"{module}.{qualname}: its Args {ast.unparse(params[0])} are not in the package")
        if args is None:
            args = next((p.args for p in parents if p.is_node and p.args is not None), None)
        return _ClassInfo(is_node, args, has_run or any(p.has_run for p in parents))

    def _check_dynamic(self, source: _Source) -> None:
        """Undecided when the module may make node classes at run time (in a function, under
        an ``if``, with ``type()``)."""
        top = set(source.classes.values())
        for node in ast.walk(source.tree):
            if isinstance(node, ast.ClassDef) and node not in top and node.bases:
                for base in node.bases:
                    origin = base.value if isinstance(base, ast.Subscript) else base
                    kind, _ = self.resolve(source, origin)
                    if kind in ("node", "class", "phd", "unknown", "typevar"):
                        raise Undecided(f"{source.name}: class {node.name} is made at run time")
            elif isinstance(node, ast.Call) and (
                (isinstance(node.func, ast.Name) and node.func.id == "type" and len(node.args) == 3)
                or ast.unparse(node.func).endswith("new_class")
            ):
                raise Undecided(f"{source.name}: {ast.unparse(node.func)}() makes a class at run time")

    # -- building the Args from source ----------------------------------------------------------

    def materialize(self, module: str, qualname: str) -> type[Any]:
        """The class ``qualname`` of ``module``, made by executing its statement and only the
        statements it needs; :class:`Undecided` when it needs anything else."""
        key = (module, qualname)
        if key not in self._built:
            self._built[key] = self._build(module, qualname)
        built = self._built[key]
        if not (isinstance(built, type) and dataclasses.is_dataclass(built)):
            raise Undecided(f"{module}.{qualname} is not a dataclass")
        return built

    def _build(self, module: str, qualname: str) -> Any:
        source = self.sources[module]
        if "." in qualname or qualname not in source.statements:
            raise Undecided(f"{module}.{qualname} is not a top-level class")
        keep: set[int] = set()
        injected: dict[str, Any] = {}
        todo = [qualname]
        seen: set[str] = set()
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            stmt = source.statements.get(name)
            if stmt is None:
                if hasattr(builtins, name) and not source.stars:
                    continue
                raise Undecided(f"{module}: {name!r} is not defined in its source")
            if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                kind, detail = source.bindings[name]
                target = detail if kind == "module" else detail[0]
                if self.in_package(target):
                    if kind != "from":
                        raise Undecided(f"{module}: {name!r} is a module of the package")
                    ref = self.attribute(("module", target), detail[1], 0)
                    if ref[0] != "class":
                        raise Undecided(f"{module}: {name!r} is not a class of the package")
                    injected[name] = self.materialize_any(*ref[1])
                    continue
                if target.split(".", 1)[0] not in SAFE_IMPORTS | sys.stdlib_module_names:
                    raise Undecided(f"{module}: {name!r} comes from {target}")
            else:
                todo.extend(_free_names(stmt))
            keep.add(id(stmt))
        body = [stmt for stmt in source.tree.body if id(stmt) in keep or _is_future(stmt)]
        view = ModuleType(f"{VIEW_PREFIX}.{module}")
        view.__file__ = str(source.path)
        view.__dict__.update(injected)
        sys.modules[view.__name__] = view  # dataclasses, typing and inspect look classes up there
        try:
            code = compile(ast.Module(body=body, type_ignores=[]), str(source.path), "exec", dont_inherit=True)
            exec(code, view.__dict__)
        except Exception as exc:  # whatever the statements raise: importing decides
            raise Undecided(f"{module}.{qualname}: {type(exc).__name__}: {exc}") from None
        return view.__dict__[qualname]

    def materialize_any(self, module: str, qualname: str) -> Any:
        key = (module, qualname)
        if key not in self._built:
            self._built[key] = self._build(module, qualname)
        return self._built[key]


@lru_cache(maxsize=1024)
def _read(module: str, path: Path, mtime_ns: int, size: int, package: str) -> _Source:
    """A module's parsed and indexed source (kept while the file is unchanged)."""
    text = path.read_text(encoding="utf-8")
    source = _Source(module, path, text, ast.parse(text, str(path)))
    _index(source, package)
    return source


def _package_files(package: str) -> list[tuple[str, Path]]:
    """(module name, file) of every module ``import_package`` imports, without importing them
    (only the package itself is located, which imports its parents: none for a top package)."""
    spec = importlib.util.find_spec(package)
    if spec is None:
        return []
    files: list[tuple[str, Path]] = []
    if spec.origin and spec.origin.endswith(".py"):
        files.append((package, Path(spec.origin)))
    for root in spec.submodule_search_locations or []:
        files += _walk(Path(root), package)
    return files


def _walk(folder: Path, prefix: str) -> list[tuple[str, Path]]:
    found: list[tuple[str, Path]] = []
    try:
        entries = sorted(folder.iterdir())
    except OSError:
        return found
    for entry in entries:
        stem = entry.name[:-3] if entry.name.endswith(".py") else entry.name
        if not stem.isidentifier() or stem in ("__init__", "__main__"):
            continue
        if entry.is_file() and entry.name.endswith(".py"):
            found.append((f"{prefix}.{stem}", entry))
        elif entry.is_dir() and (entry / "__init__.py").is_file():
            found.append((f"{prefix}.{stem}", entry / "__init__.py"))
            found += _walk(entry, f"{prefix}.{stem}")
    return found


def _is_package_module(dotted: str, scan: _Scan) -> bool:
    return any(name == dotted for name in scan.sources) or dotted in scan.undecided


def _index(source: _Source, package: str) -> None:
    """Fill the module's top-level bindings and classes (nested classes by qualname)."""

    def absolute(level: int, module: str | None) -> str:
        if not level:
            return module or ""
        base = source.name.split(".")
        is_package = source.path.name == "__init__.py"
        base = base[: len(base) - level + (1 if is_package else 0)]
        return ".".join([*base, module] if module else base)

    def classes(stmt: ast.ClassDef, prefix: str) -> None:
        source.classes[prefix + stmt.name] = stmt
        for inner in stmt.body:
            if isinstance(inner, ast.ClassDef):
                classes(inner, f"{prefix}{stmt.name}.")

    def keep(name: str, stmt: ast.stmt, top: bool) -> None:
        """The statement that binds ``name`` (one under an ``if``/``try`` is not kept: which
        branch runs is decided at run time)."""
        if top:
            source.statements[name] = stmt
        else:
            source.statements.pop(name, None)

    def bind(stmts: list[ast.stmt], top: bool) -> None:
        for stmt in stmts:
            if isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    name = alias.asname or alias.name.split(".", 1)[0]
                    source.bindings[name] = ("module", alias.name if alias.asname else name)
                    keep(name, stmt, top)
            elif isinstance(stmt, ast.ImportFrom):
                module = absolute(stmt.level, stmt.module)
                for alias in stmt.names:
                    if alias.name == "*":
                        source.stars.append(module)
                        continue
                    source.bindings[alias.asname or alias.name] = ("from", (module, alias.name))
                    keep(alias.asname or alias.name, stmt, top)
            elif isinstance(stmt, ast.ClassDef):
                if top:
                    classes(stmt, "")
                    source.bindings[stmt.name] = ("class", stmt.name)
                    source.statements[stmt.name] = stmt
                else:
                    source.bindings[stmt.name] = ("unknown", stmt.name)
            elif isinstance(stmt, (ast.Assign, ast.AnnAssign, ast.AugAssign, ast.FunctionDef, ast.AsyncFunctionDef)):
                typevar = (
                    isinstance(stmt, ast.Assign)
                    and isinstance(stmt.value, ast.Call)
                    and isinstance(stmt.value.func, (ast.Name, ast.Attribute))
                    and ast.unparse(stmt.value.func).rsplit(".", 1)[-1] == "TypeVar"
                )
                for name in _targets(stmt):
                    source.bindings[name] = ("typevar", None) if typevar and top else ("unknown", name)
                    keep(name, stmt, top)
            elif isinstance(stmt, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                for block in ("body", "orelse", "finalbody"):
                    bind(getattr(stmt, block, []), False)
                for handler in getattr(stmt, "handlers", []):
                    bind(handler.body, False)

    bind(source.tree.body, True)


def _targets(stmt: ast.stmt) -> list[str]:
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [stmt.name]
    targets = stmt.targets if isinstance(stmt, ast.Assign) else [getattr(stmt, "target", None)]
    return [n.id for t in targets if t is not None for n in ast.walk(t) if isinstance(n, ast.Name)]


def _free_names(stmt: ast.stmt) -> set[str]:
    """Names a top-level statement reads (quoted annotations included), minus its own locals."""
    used: set[str] = set()
    local: set[str] = set()
    for node in ast.walk(stmt):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else local).add(node.id)
        elif isinstance(node, ast.arg):
            local.add(node.arg)
            if isinstance(node.annotation, ast.Constant) and isinstance(node.annotation.value, str):
                used |= _names_in(node.annotation.value)
        elif (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.annotation, ast.Constant)
            and isinstance(node.annotation.value, str)
        ):
            used |= _names_in(node.annotation.value)
    if isinstance(stmt, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        # a function's own locals do not come from the module; a class body's fields do not either
        inner = {n for body in stmt.body for n in _targets(body)} if isinstance(stmt, ast.ClassDef) else set()
        return used - local - inner - {stmt.name}
    return used


def _names_in(annotation: str) -> set[str]:
    try:
        tree = ast.parse(annotation, mode="eval")
    except SyntaxError:
        return set()
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}


def _is_future(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__"


@lru_cache(maxsize=1)
def _phd_flow_dependents() -> frozenset[str]:
    """Top-level import names of the installed distributions that require phd_flow: only their
    classes can be Node subclasses (read once, and only when a class has a library base)."""
    import importlib.metadata

    found: set[str] = set()
    for dist in importlib.metadata.distributions():
        name = re.sub(r"[-_.]+", "_", (dist.metadata["Name"] or "").lower())
        requires = dist.requires or []
        if name == "phd_flow" or not any(re.match(r"phd[-_.]flow\b", r, re.IGNORECASE) for r in requires):
            continue
        top = dist.read_text("top_level.txt")
        if top:
            found.update(top.split())
        else:
            found.update(str(f).split("/", 1)[0].removesuffix(".py") for f in dist.files or [])
    return frozenset(found)


__all__ = ["NodeView", "find_nodes", "import_package", "list_nodes", "node_names", "node_view", "resolve_node"]

"""Finding the Node subclasses of a package."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import re
from pathlib import Path
from types import ModuleType
from typing import Any

from phd_flow.errors import NodeNotFoundError, closest
from phd_flow.run.node import Node


def import_package(package: str) -> ModuleType:
    """Import ``package`` and every submodule in it (except ``__main__``)."""
    module = importlib.import_module(package)
    for info in pkgutil.walk_packages(getattr(module, "__path__", []), prefix=f"{package}."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue
        importlib.import_module(info.name)
    return module


def find_nodes(package: str) -> dict[str, type[Node[Any, Any]]]:
    """Every runnable Node subclass defined in ``package``, by qualified dotted name."""
    import_package(package)
    found: dict[str, type[Node[Any, Any]]] = {}
    stack: list[type[Node[Any, Any]]] = list(Node.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        module = cls.__module__
        if module != package and not module.startswith(f"{package}."):
            continue
        if getattr(cls, "args_class", None) is None or "_run" not in _defined(cls):
            continue
        found[f"{module}.{cls.__qualname__}"] = cls
    return dict(sorted(found.items()))


def _defined(cls: type) -> set[str]:
    names: set[str] = set()
    for klass in cls.__mro__:
        if klass is Node:
            break
        names.update(vars(klass))
    return names


def resolve_node(package: str, name: str) -> type[Node[Any, Any]]:
    """A node by class name (``FitOLS``) or dotted path (``my_project.fit_ols.FitOLS``,
    ``fit_ols.FitOLS``). Raises :class:`NodeNotFoundError` listing the known nodes.

    Only the module whose source defines ``class <Name>`` is imported when that is unambiguous,
    so `run` does not pay for the imports of every other node (torch, sklearn, ...).
    """
    quick = _resolve_from_source(package, name)
    if quick is not None:
        return quick
    nodes = find_nodes(package)
    matches = [cls for dotted, cls in nodes.items() if _matches(dotted, package, name)]
    if len(matches) == 1:
        return matches[0]
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


def _resolve_from_source(package: str, name: str) -> type[Node[Any, Any]] | None:
    """The node, importing only the one module whose source has ``class <Name>``; None if unsure."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    pattern = re.compile(rf"^[ \t]*class[ \t]+{re.escape(name.rsplit('.', 1)[-1])}\b", re.MULTILINE)
    modules = []
    for root in spec.submodule_search_locations:
        for path in sorted(Path(root).rglob("*.py")):
            try:
                text = path.read_text(encoding="utf-8", errors="replace")
            except OSError:
                continue
            if pattern.search(text):
                parts = path.relative_to(root).with_suffix("").parts
                parts = parts[:-1] if parts[-1] == "__init__" else parts
                modules.append(".".join((package, *parts)))
    if len(modules) != 1 or modules[0].endswith(".__main__"):
        return None
    module = importlib.import_module(modules[0])
    found = [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type)
        and issubclass(obj, Node)
        and obj.__module__ == module.__name__
        and getattr(obj, "args_class", None) is not None
        and "_run" in _defined(obj)
        and _matches(f"{module.__name__}.{obj.__qualname__}", package, name)
    ]
    return found[0] if len(found) == 1 else None

"""A node's arguments: the ``Args`` base dataclass, building Args from dicts, and Args as JSON."""

from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from phd_flow.errors import ArgsError, NodeDefinitionError, closest

__all__ = ["Args", "args_to_dict", "check_args_class", "from_mapping"]


@dataclass
class Args:
    """Base class for a node's arguments. Subclass it as a ``@dataclasses.dataclass``.

    Each field becomes a CLI option (``--field``); a comment after the field, or a docstring
    below it, is its ``--help`` text; a field without a default is required.
    """


def check_args_class(node: type, args_cls: Any) -> None:
    """Raise NodeDefinitionError unless ``args_cls`` (from ``Node[Args, ...]``) is a dataclass."""
    if isinstance(args_cls, TypeVar):
        return
    if not (isinstance(args_cls, type) and dataclasses.is_dataclass(args_cls)):
        raise NodeDefinitionError(
            f"{node.__qualname__}: the first parameter of Node[...] must be a dataclass "
            f"(subclass phd_flow.node.Args with @dataclasses.dataclass), got {args_cls!r}."
        )


def from_mapping(args_cls: type[Any], values: dict[str, Any], node: str) -> Any:
    """Build ``args_cls`` from a dict (nested dicts become nested dataclasses); ArgsError names the field."""
    names = {f.name: f for f in dataclasses.fields(args_cls)}
    unknown = [k for k in values if k not in names]
    if unknown:
        raise ArgsError(
            f"{node}: unknown argument {unknown[0]!r} for {args_cls.__name__}."
            f"{closest(unknown[0], names)} Fields: {', '.join(names)}."
        )
    hints = typing.get_type_hints(args_cls)
    converted = {}
    for name, value in values.items():
        hint = hints.get(name)
        if isinstance(value, Mapping) and isinstance(hint, type) and dataclasses.is_dataclass(hint):
            value = from_mapping(hint, dict(value), node)
        converted[name] = value
    try:
        return args_cls(**converted)
    except TypeError as exc:
        raise ArgsError(f"{node}: {exc}.") from None


def args_to_dict(args: Any) -> dict[str, Any]:
    """An Args instance as plain JSON-able data (nested dataclasses become dicts)."""
    return typing.cast(dict[str, Any], json.loads(json.dumps(dataclasses.asdict(args), default=_jsonable)))


def _jsonable(value: Any) -> Any:
    import enum

    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return str(value)

"""A node's arguments: the ``Args`` base class, building Args from dicts or files, and Args as JSON."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os
import sys
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from phd_flow.errors import ArgsError, NodeDefinitionError, closest

__all__ = [
    "Args",
    "args_file_argv",
    "args_to_dict",
    "check_args_class",
    "from_mapping",
    "load_args_file",
    "option_strings",
    "polish_help",
    "same_option",
]


class Args:
    """Base class for a node's arguments. Subclass it as a ``@dataclasses.dataclass`` (frozen
    or not: ``@dataclasses.dataclass(frozen=True)`` works too).

    Each field becomes a CLI option (``--field``); a comment after the field, or a docstring
    below it, is its ``--help`` text; a field without a default is required. ``Args`` itself is
    a plain marker class, not a dataclass, so it forces nothing (frozenness, slots) on yours.
    """

    __dataclass_fields__: ClassVar[dict[str, Any]]  # set by @dataclass on every subclass


def check_args_class(node: type, args_cls: Any) -> None:
    """Raise NodeDefinitionError unless ``args_cls`` (from ``Node[Args, ...]``) is a dataclass
    that declares all of its own fields (a subclass without ``@dataclass`` would drop them)."""
    if isinstance(args_cls, TypeVar):
        return
    fix = f"add `@dataclasses.dataclass` above `class {getattr(args_cls, '__name__', args_cls)}`"
    if not (isinstance(args_cls, type) and dataclasses.is_dataclass(args_cls)):
        raise NodeDefinitionError(
            f"{node.__qualname__}: its Args {getattr(args_cls, '__qualname__', repr(args_cls))} "
            f"must be a dataclass: {fix}."
        )
    own = [n for n in inspect.get_annotations(args_cls) if n not in args_cls.__dataclass_fields__]
    if own:
        raise NodeDefinitionError(
            f"{node.__qualname__}: its Args {args_cls.__qualname__} declares {', '.join(own)} without "
            f"being a dataclass itself: {fix}."
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


def option_strings(parser: Any) -> set[str]:
    """The option strings a simple-parsing parser gives the node's fields (``--key``, ``-a``...).

    simple-parsing adds a dataclass's options when it parses; this asks it to add them now so
    that phd_flow's own options can be left out where a field already uses the name.
    """
    prepare = getattr(parser, "_preprocessing", None)
    if prepare is not None and not getattr(parser, "_preprocessing_done", False):
        prepare()
    return {s for action in parser._actions for s in action.option_strings}


def same_option(flag: str, taken: set[str]) -> bool:
    """True when ``flag`` (``--skip-log``) names the same thing as a taken option (``--skip_log``)."""
    norm = flag.lstrip("-").replace("-", "_")
    return any(t.startswith("--") and t.lstrip("-").replace("-", "_") == norm for t in taken) or flag in taken


def load_args_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A node's args from a ``.json``, ``.toml`` or ``.yaml``/``.yml`` file (a table of fields)."""
    file = Path(path)
    if not file.is_file():
        raise ArgsError(f"--args-file {file}: no such file.")
    suffix = file.suffix.lower()
    try:
        if suffix == ".json":
            data = json.loads(file.read_text())
        elif suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:  # pragma: no cover - exercised on 3.10 only
                import tomli as tomllib
            data = tomllib.loads(file.read_text())
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ArgsError(f"--args-file {file}: reading YAML needs PyYAML: pip install pyyaml.") from None
            data = yaml.safe_load(file.read_text())
        else:
            raise ArgsError(f"--args-file {file}: use a .json, .toml or .yaml file.")
    except ArgsError:
        raise
    except Exception as exc:  # each parser has its own error class
        raise ArgsError(f"--args-file {file}: cannot be read ({type(exc).__name__}: {exc}).") from None
    if not isinstance(data, dict):
        raise ArgsError(f"--args-file {file}: holds a {type(data).__name__}; write a table of field = value.")
    return data


def args_file_argv(parser: Any, args_cls: type[Any], values: dict[str, Any], source: str) -> list[str]:
    """``values`` (from an args file) as command-line options of ``parser``, to be put in front
    of the command line's own options (so those, coming later, win)."""
    by_dest = {action.dest: action for action in parser._actions}
    argv: list[str] = []

    def walk(cls: type[Any], data: dict[str, Any], prefix: str) -> None:
        names = {f.name for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        for name, value in data.items():
            if name not in names:
                raise ArgsError(
                    f"{source}: unknown argument {prefix + name!r} for {cls.__name__}."
                    f"{closest(name, names)} Fields: {', '.join(names)}."
                )
            hint = hints.get(name)
            if isinstance(hint, type) and dataclasses.is_dataclass(hint) and isinstance(value, Mapping):
                walk(hint, dict(value), f"{prefix}{name}.")
                continue
            action = by_dest.get(f"args.{prefix}{name}")
            flag = next((s for s in action.option_strings if s.startswith("--")), None) if action else None
            if flag is None:
                raise ArgsError(f"{source}: {prefix + name!r} cannot be set from a file; give it on the command line.")
            if action is not None and action.nargs in ("*", "+") and isinstance(value, (list, tuple)):
                argv.extend([flag, *(_token(v) for v in value)])
            else:
                argv.append(f"{flag}={_token(value)}")

    walk(args_cls, values, "")
    return argv


def _token(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (str, int, float)):
        return str(value)
    return json.dumps(value)


def polish_help(parser: Any) -> None:
    """``--help`` of a node's parser as phd_flow shows it: the node's own fields first,
    ``(required)`` for a field without a default (not ``(default: None)``), and no
    ``(default: None)`` / ``(default: [])`` on options that are not the node's fields."""
    option_strings(parser)  # simple-parsing adds the node's groups when it prepares to parse
    parser.formatter_class = _help_formatter(parser.formatter_class)
    groups = parser._action_groups
    own = [g for g in groups if any(_is_field(a) for a in g._group_actions)]
    parser._action_groups = own + [g for g in groups if g not in own]


def _nothing(default: Any) -> bool:
    return default is None or (isinstance(default, list) and not default)


def _is_field(action: Any) -> bool:
    return bool(action.dest == "args" or action.dest.startswith("args."))


@functools.lru_cache(maxsize=8)
def _help_formatter(base: type[Any]) -> type[Any]:
    class HelpFormatter(base):  # type: ignore[valid-type,misc]
        def _get_help_string(self, action: Any) -> str | None:
            text = (action.help or "").replace("<__TEMP__>", "")  # simple-parsing's placeholder
            if action.required:
                return f"{text} (required)".strip()
            if not _is_field(action) and _nothing(action.default):
                return text
            help_string: str | None = super()._get_help_string(action)
            return help_string

    return HelpFormatter

"""The run filter and sort language of ``ls --where/--sort``, ``rm``, ``compare`` and
``find_runs(where=...)``: ``FIELD OP VALUE`` conditions on a run's fields.

Fields (one namespace for filtering and sorting):

* ``status``, ``node``, ``key``, ``host``, ``started``, ``ended``, ``duration`` (seconds);
* ``metrics.NAME``: the metric's last value (``metrics.NAME.min`` / ``.max`` / ``.steps`` /
  ``.last`` its summary), read from run.json's metric summary;
* ``args.NAME`` or plain ``NAME``: an arg (dotted for nested args: ``optim.lr``); a plain name
  that is also a metric of the run and not an arg means the metric.

Operators: ``=`` (or ``==``) and ``!=`` compare as text (strings as they are, other values as
their JSON: ``seed=1`` but not ``seed=1.0``); ``<``, ``<=``, ``>``, ``>=`` compare numbers
(``lr<0.1``), or strings when VALUE is not a number (``started>=2026-11-28``). A run that lacks
the field matches no condition on it. Each expression is parsed once; a malformed one raises
:class:`~phd_flow.errors.ArgsError` naming it.
"""

from __future__ import annotations

import json
import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from phd_flow.errors import ArgsError
from phd_flow.runs.metrics import as_number, recorded_summary

if TYPE_CHECKING:
    from phd_flow.runs.query import Run

_MISSING: Any = object()
_SPLIT = re.compile(r"^\s*([^<>=!\s][^<>=!]*?)\s*(<=|>=|==|!=|=|<|>)\s*([^<>=!\s].*?)?\s*$")
_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
RUN_FIELDS = ("status", "node", "key", "host", "started", "ended", "duration")
STATS = ("last", "min", "max", "steps")


def text(value: Any) -> str:
    """How ``=`` compares values: strings as they are, the rest as JSON (scalars without the
    encoder: ``ls`` calls this for every arg of every run)."""
    if isinstance(value, str):
        return value
    kind = type(value)
    if kind is int:
        return str(value)
    if kind is float and math.isfinite(value):
        return repr(value)  # what json.dumps writes for a finite float
    if kind is bool or value is None:
        return "true" if value is True else "false" if value is False else "null"
    return json.dumps(value)


@dataclass(frozen=True)
class Condition:
    """One parsed ``FIELD OP VALUE``; ``source`` is the expression as written."""

    field: str
    op: str
    value: str
    source: str

    def __post_init__(self) -> None:
        if self.op in _ORDER:
            object.__setattr__(self, "_number", as_number(self.value))

    def matches(self, run: Run) -> bool:
        found = field_value(run, self.field)
        if found is _MISSING:
            return False
        if self.op in ("=", "=="):
            return text(found) == self.value
        if self.op == "!=":
            return text(found) != self.value
        number: float | None = getattr(self, "_number", None)
        compare = _ORDER[self.op]
        if number is not None:
            mine = as_number(found)
            return mine is not None and compare(mine, number)
        return isinstance(found, str) and compare(found, self.value)


def parse_condition(expression: str) -> Condition:
    """``"lr<0.1"`` -> Condition; :class:`ArgsError` naming the expression when malformed."""
    match = _SPLIT.match(expression)
    if not match or (match.group(3) is None and match.group(2) in _ORDER):
        raise ArgsError(
            f"--where {expression!r} is not a condition: write FIELD=VALUE or FIELD OP VALUE with OP one "
            "of != < <= > >=, e.g. --where seed=1, --where 'lr<0.1', --where 'metrics.acc>=0.9', "
            "--where status=completed (quote it: < and > redirect in the shell)."
        )
    name, op, value = match.group(1), match.group(2), match.group(3) or ""  # note= : the empty string
    if name.startswith("metrics.") and op in _ORDER and as_number(value) is None:
        raise ArgsError(f"--where {expression!r}: metrics are numbers, so compare {name} with a number.")
    return Condition(name, op, value, expression)


def parse_where(where: str | Iterable[str] | Mapping[str, Any] | None) -> tuple[Condition, ...]:
    """Conditions from expressions (``"lr<0.1"`` or a list of them) or a mapping of
    ``{field: value}`` (equality, as ``field=value``)."""
    if where is None:
        return ()
    if isinstance(where, str):
        return (parse_condition(where),)
    if isinstance(where, Mapping):
        return tuple(Condition(str(name), "=", text(value), f"{name}={text(value)}") for name, value in where.items())
    return tuple(parse_condition(str(item)) for item in where)


def matches_all(run: Run, conditions: Iterable[Condition]) -> bool:
    return all(condition.matches(run) for condition in conditions)


def field_value(run: Run, name: str) -> Any:
    """The value of field ``name`` for ``run`` (see the module doc), or ``_MISSING``."""
    if name in RUN_FIELDS:
        return _run_field(run, name)
    if name.startswith("metrics."):
        return _metric(run, name[len("metrics.") :])
    args = flat_args(run)
    arg = name[len("args.") :] if name.startswith("args.") else name
    if arg in args:
        return args[arg]
    return _MISSING if name.startswith("args.") else _metric(run, name)


def is_missing(value: Any) -> bool:
    return value is _MISSING


def flat_args(run: Run) -> dict[str, Any]:
    """The run's args flattened (``optim.lr``), cached on the run."""
    cached: dict[str, Any] | None = getattr(run, "_flat_args", None)
    if cached is None:
        from phd_flow.tracking import flatten

        cached = flatten(run.args)
        run._flat_args = cached  # type: ignore[attr-defined]
    return cached


def known_fields(runs: Iterable[Run]) -> list[str]:
    """The field names the runs have (for "did you mean" hints)."""
    names: dict[str, None] = dict.fromkeys(RUN_FIELDS)
    for run in runs:
        names.update(dict.fromkeys(flat_args(run)))
        names.update(dict.fromkeys(f"metrics.{m}" for m in run_metrics(run)))
    return list(names)


def run_metrics(run: Run) -> dict[str, dict[str, Any]]:
    """The run's metric summary (from run.json, else from its local metrics.jsonl), cached."""
    cached: dict[str, dict[str, Any]] | None = getattr(run, "_metric_summary", None)
    if cached is None:
        cached = recorded_summary(run.data, run.run_dir if run.where != "remote" else None)
        run._metric_summary = cached  # type: ignore[attr-defined]
    return cached


def _metric(run: Run, name: str) -> Any:
    summary = run_metrics(run)
    stats = summary.get(name)
    if stats is None:
        base, _, stat = name.rpartition(".")
        stats = summary.get(base) if stat in STATS else None
        if stats is None:
            return _MISSING
        return stats.get(stat, _MISSING)
    return stats.get("last", _MISSING)


def _run_field(run: Run, name: str) -> Any:
    if name == "status":
        return run.state
    if name == "node":
        return run.node
    if name == "key":
        return run.key
    if name == "duration":
        duration = run.duration
        return duration.total_seconds() if duration else _MISSING
    if name in ("started", "ended"):
        value = run.data.get(f"{name}_at")
        return value if isinstance(value, str) else _MISSING
    value = run.data.get(name)
    return _MISSING if value is None else value


def sort_key(field: str) -> Callable[[Run], tuple[int, float, str]]:
    """A key for ``sorted``: numbers by value, then strings, then runs without the field."""

    def key(run: Run) -> tuple[int, float, str]:
        value = field_value(run, field)
        if value is _MISSING or value is None:
            return (2, 0.0, "")
        number = as_number(value) if not isinstance(value, str) else None
        if number is not None and number == number:  # NaN sorts with the missing
            return (0, number, "")
        return (1, 0.0, text(value)) if number is None else (2, 0.0, "")

    return key


def sort_runs(runs: list[Run], spec: str) -> list[Run]:
    """``runs`` sorted by ``spec`` (a field; ``-field`` for descending). Runs without the field
    come last either way."""
    descending = spec.startswith("-")
    field = spec[1:] if descending else spec
    if not field:
        raise ArgsError(f"--sort {spec!r}: give a field, e.g. --sort metrics.mse or --sort=-lr (descending).")
    key = sort_key(field)
    keyed = [(key(run), index, run) for index, run in enumerate(runs)]
    present = sorted((item for item in keyed if item[0][0] < 2), key=lambda item: item[0], reverse=descending)
    return [run for _, _, run in present] + [run for k, _, run in keyed if k[0] == 2]

"""A run's metrics read back: the per-metric summary kept in run.json, and the points of
metrics.jsonl as rows.

metrics.jsonl has one JSON object per logged point, ``{"name", "value", "step", "timestamp"}``
(timestamp in ms, as MLflow has it; ``value`` is a number, or the string ``"nan"``/``"inf"``
for non-finite ones). A torn last line (a crash mid-write) is skipped.

The summary, ``{name: {"last", "min", "max", "steps"}}``, is written into run.json once, when the
run ends (``run.json["metrics"]``), so listing thousands of runs with metric columns reads one
small file per run. ``last`` is the value at the highest step (the latest logged among equal
steps, as MLflow's "latest metric"); ``steps`` is how many points were logged.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from phd_flow.run.record import METRICS_FILE

#: The key in run.json that holds the summary.
SUMMARY_FIELD = "metrics"
Point = tuple[str, float, int, int]  # name, value, step, timestamp (ms)


def parse_points(raw: bytes | str) -> Iterator[Point]:
    """The points of a metrics.jsonl's content, in file order; malformed lines are skipped."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    loads = json.loads
    for line in text.splitlines():
        try:
            rec = loads(line)
            yield str(rec["name"]), float(rec["value"]), int(rec.get("step") or 0), int(rec.get("timestamp") or 0)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            continue


def summarize(points: Iterator[Point] | list[Point]) -> dict[str, dict[str, Any]]:
    """``{name: {"last", "min", "max", "steps"}}`` of the points (non-finite values are kept as
    ``last`` but ignored by ``min``/``max``; JSON-safe: non-finite numbers become strings)."""
    acc: dict[str, list[Any]] = {}  # name -> [last step, last value, min, max, count]
    for name, value, step, _ in points:
        entry = acc.get(name)
        finite = math.isfinite(value)
        if entry is None:
            acc[name] = [step, value, value if finite else None, value if finite else None, 1]
            continue
        if step >= entry[0]:
            entry[0], entry[1] = step, value
        if finite:
            entry[2] = value if entry[2] is None or value < entry[2] else entry[2]
            entry[3] = value if entry[3] is None or value > entry[3] else entry[3]
        entry[4] += 1
    return {
        name: {"last": _json_number(last), "min": low, "max": high, "steps": count}
        for name, (_, last, low, high, count) in sorted(acc.items())
    }


def summary_of_dir(run_dir: Path) -> dict[str, dict[str, Any]]:
    """The summary of ``run_dir/metrics.jsonl`` (empty when there is none)."""
    try:
        raw = (run_dir / METRICS_FILE).read_bytes()
    except OSError:
        return {}
    return summarize(parse_points(raw))


def recorded_summary(data: dict[str, Any], run_dir: Path | None = None) -> dict[str, dict[str, Any]]:
    """The summary a run.json holds; for an older run without one, computed from its local
    metrics.jsonl when ``run_dir`` is given (nothing is written)."""
    summary = data.get(SUMMARY_FIELD)
    if isinstance(summary, dict):
        return {k: v for k, v in summary.items() if isinstance(v, dict)}
    return summary_of_dir(run_dir) if run_dir is not None else {}


def last_values(summary: dict[str, dict[str, Any]]) -> dict[str, float]:
    """``{name: last value}`` of a summary, as floats."""
    found = {}
    for name, stats in summary.items():
        value = as_number(stats.get("last"))
        if value is not None:
            found[name] = value
    return found


def as_number(value: Any) -> float | None:
    """A metric or arg value as a float (``"nan"``/``"inf"`` strings too); None when it is not one."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _json_number(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


#: Metric names containing one of these are better when lower (``loss``, ``val_mse``,
#: ``error_rate``, ``fit_time``); every other metric is better when higher (``acc``, ``f1``, ``r2``).
#: ``--minimize NAME`` / ``--maximize NAME`` override the rule.
LOWER_IS_BETTER = ("loss", "err", "mse", "mae", "rmse", "nll", "perplexity", "regret", "cost", "time", "dist")


def lower_is_better(name: str, minimize: Iterable[str] = (), maximize: Iterable[str] = ()) -> bool:
    """Whether a lower value of metric ``name`` is better: ``minimize``/``maximize`` (names)
    decide first, else the :data:`LOWER_IS_BETTER` rule."""
    if name in set(maximize):
        return False
    if name in set(minimize):
        return True
    lowered = name.lower()
    return any(word in lowered for word in LOWER_IS_BETTER)


def best_index(values: Sequence[float | None], lower: bool) -> int | None:
    """The index of the best finite value (the first among ties), or None when there is none."""
    best: int | None = None
    for index, value in enumerate(values):
        if value is None or not math.isfinite(value):
            continue
        if best is None or (value < values[best] if lower else value > values[best]):  # type: ignore[operator]
            best = index
    return best

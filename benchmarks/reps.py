"""Repetitions for the benchmarks: run contenders in alternating order, report medians and spread.

    from reps import alternate, spread

    times = alternate({"ours": run_ours, "peer": run_peer}, reps=5)   # name -> [seconds, ...]
    print(spread(times["ours"]), ratio(times["peer"], times["ours"]))

Each repetition runs every contender once; odd repetitions reverse the order, so no contender
always goes first (warm caches, a neighbour's load). A contender returns None to be timed from
outside, its own measurement (seconds), or ``{label: seconds}`` for steps that must run in
sequence (recorded as ``"name, label"``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def alternate(
    contenders: dict[str, Callable[[], float | dict[str, float] | None]], reps: int
) -> dict[str, list[float]]:
    """``{name: [measurement per repetition]}``, the contenders run in alternating order."""
    results: dict[str, list[float]] = {}
    names = list(contenders)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            started = time.perf_counter()
            measured = contenders[name]()
            if isinstance(measured, dict):
                for label, seconds in measured.items():
                    results.setdefault(f"{name}, {label}", []).append(seconds)
            else:
                results.setdefault(name, []).append(time.perf_counter() - started if measured is None else measured)
    return results


def spread(values: list[float], unit: str = "s", scale: float = 1.0, digits: int = 2) -> str:
    """``median (min-max) unit``."""
    med, low, high = statistics.median(values) * scale, min(values) * scale, max(values) * scale
    return f"{med:.{digits}f} {unit} ({low:.{digits}f}-{high:.{digits}f})"


def ratio(theirs: list[float], ours: list[float]) -> str:
    """Median of theirs over median of ours (above 1: ours is faster)."""
    return f"{statistics.median(theirs) / statistics.median(ours):.1f}x"

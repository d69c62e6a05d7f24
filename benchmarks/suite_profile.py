"""Where the test suite's CPU goes: a pytest plugin that charges each test the machine's busy CPU.

    PYTHONPATH=benchmarks .venv/bin/python -m pytest -n 0 -p suite_profile -q
    python benchmarks/suite_profile.py [suite_profile.json]   # the report of the last run

Run serially (``-n 0``) on an idle machine: each test is charged the machine's busy CPU time
(``/proc/stat``) between its setup and its teardown, so the cost includes every subprocess,
server and MLflow feeder the test causes. Linux only. The results go to ``suite_profile.json``
(or ``$SUITE_PROFILE_OUT``); the report prints the total, the 20 most costly tests and the
costliest files.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time
from typing import Any

_OUT = os.environ.get("SUITE_PROFILE_OUT", "suite_profile.json")
_started: dict[str, tuple[float, float]] = {}
_costs: list[tuple[str, float, float]] = []


def _busy_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot (all cores, idle and iowait excluded)."""
    with open("/proc/stat") as stat:
        ticks = [int(field) for field in stat.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def pytest_runtest_setup(item: Any) -> None:
    _started[item.nodeid] = (_busy_seconds(), time.monotonic())


def pytest_runtest_logreport(report: Any) -> None:
    if report.when == "teardown" and report.nodeid in _started:
        busy, wall = _started.pop(report.nodeid)
        _costs.append((report.nodeid, round(_busy_seconds() - busy, 2), round(time.monotonic() - wall, 2)))


def pytest_sessionfinish(session: Any) -> None:
    with open(_OUT, "w") as out:
        json.dump(_costs, out)


def report(path: str) -> None:
    with open(path) as data:
        costs = [tuple(row) for row in json.load(data)]
    total_cpu, total_wall = sum(row[1] for row in costs), sum(row[2] for row in costs)
    print(f"{len(costs)} tests: {total_cpu:.0f} core-s of CPU in {total_wall:.0f} s of wall time")
    print(f"{'CPU s':>8} {'wall s':>8}  test")
    for nodeid, cpu, wall in sorted(costs, key=lambda row: -row[1])[:20]:
        print(f"{cpu:8.1f} {wall:8.1f}  {nodeid}")
    by_file: collections.Counter[str] = collections.Counter()
    for nodeid, cpu, _ in costs:
        by_file[nodeid.split("::")[0]] += cpu
    print("by file:", ", ".join(f"{name} {cpu:.0f}" for name, cpu in by_file.most_common(12)))


if __name__ == "__main__":
    report(sys.argv[1] if len(sys.argv) > 1 else _OUT)

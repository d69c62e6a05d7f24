"""How long until MLflow shows runs complete: 1 run, and N runs started at once.

    python benchmarks/bench_feed.py [--parallel 50] [--reps 5] [--old /path/to/older/checkout]

A node logging 100 metric points is started N times at once (``python -m bench_project run
Tiny``) on one fresh-but-migrated sqlite store. Timed from the start until the last command
returns ("returned") and until MLflow shows all N runs FINISHED with their 100 points each
("in MLflow"), polled every 0.2 s. Contenders, alternated in every repetition:

- ``background``: the default: runs return, one feeder process per store feeds MLflow;
- ``--wait-mlflow``: every run returns once MLflow has it (through the same single feeder);
- ``--old``: another phd_flow checkout (each run opens and feeds MLflow itself).

Medians and spread (min-max) are printed, with the ratio of "in MLflow" to ``--old``'s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NODE = '''
import dataclasses

from phd_flow import Node, node


@dataclasses.dataclass
class TinyArgs(node.Args):
    points: int = 100


class Tiny(Node[TinyArgs, int]):
    """Log points metric values."""

    def _run(self) -> int:
        for step in range(self.args.points):
            self.log_metric("loss", 1.0 / (step + 1), step=step)
        return self.args.points
'''

POINTS = 100


def make_project(root: Path) -> None:
    package = root / "bench_project"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""Benchmark project."""\n')
    (package / "__main__.py").write_text("import phd_flow\n\nphd_flow.run_main('bench_project')\n")
    (package / "tiny.py").write_text(NODE)
    (root / "config").mkdir()
    (root / "config" / "default.toml").write_text('local_path = "${PROJECT_ROOT}/data_storage"\n')


def complete(db: Path, n: int) -> bool:
    """All n runs FINISHED with every point (read-only SQL on MLflow's own tables)."""
    if not db.exists():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            rows = conn.execute(
                "SELECT r.run_uuid, r.status, (SELECT COUNT(*) FROM metrics m WHERE m.run_uuid = r.run_uuid) "
                "FROM runs r"
            ).fetchall()
    except sqlite3.Error:
        return False
    done = [r for r in rows if r[1] == "FINISHED" and r[2] == POINTS]
    return len(done) >= n


def one(root: Path, template: Path, n: int, pythonpath: str, extra: list[str]) -> tuple[float, float]:
    store = root / "data_storage"
    shutil.rmtree(store, ignore_errors=True)
    store.mkdir()
    shutil.copy(template, store / "mlflow.db")
    env = {k: v for k, v in os.environ.items() if k not in ("PHD_FLOW_WAIT_MLFLOW", "MLFLOW_TRACKING_URI")}
    env.update(MLFLOW_DISABLE_TELEMETRY="true", PYTHONPATH=os.pathsep.join((pythonpath, str(root))))
    cmd = [sys.executable, "-m", "bench_project", "run", "Tiny", *extra]
    begin = time.monotonic()
    procs = [
        subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(n)
    ]
    for proc in procs:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(err.decode()[-3000:])
    returned = time.monotonic() - begin
    deadline = begin + 1800
    while not complete(store / "mlflow.db", n):
        if time.monotonic() > deadline:
            raise RuntimeError("MLflow did not get every run in 30 min")
        time.sleep(0.2)
    landed = time.monotonic() - begin
    _wait_feeder_gone(store)
    return returned, landed


def _wait_feeder_gone(store: Path) -> None:
    """The feeder exits a few seconds after its queue empties; it must not run into the next case."""
    import fcntl

    for lock in (store / ".phd_flow" / "mlflow-feed").glob("*/feeder.lock"):
        with open(lock, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)  # blocks until the feeder is gone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parallel", type=int, default=50)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--old", help="another phd_flow checkout to compare with")
    options = parser.parse_args()
    here = str(Path(__file__).resolve().parent.parent)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_project(root)
        template = root / "template.db"
        code = f"from mlflow.tracking import MlflowClient; MlflowClient('sqlite:///{template}').search_experiments()"
        subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
        contenders = {"background (default)": (here, []), "--wait-mlflow": (here, ["--wait-mlflow"])}
        if options.old:
            contenders["--old checkout"] = (options.old, [])
        for n in sorted({1, options.parallel}):
            results: dict[str, list[tuple[float, float]]] = {name: [] for name in contenders}
            names = list(contenders)
            for rep in range(options.reps):
                for name in names if rep % 2 == 0 else names[::-1]:
                    path, extra = contenders[name]
                    results[name].append(one(root, template, n, path, extra))
            report(n, results, options.reps)


def report(n: int, results: dict[str, list[tuple[float, float]]], reps: int) -> None:
    print(f"\n{n} run(s) at once, {POINTS} points each; {reps} alternated repetitions, medians (min-max)")
    base = statistics.median(x for _, x in results["--old checkout"]) if "--old checkout" in results else None
    print(f"{'contender':24} {'returned s':>20} {'in MLflow s':>20} {'/ old':>7}")
    for name, values in results.items():
        cols = []
        for index in (0, 1):
            xs = [v[index] for v in values]
            cols.append(f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})")
        ratio = f"{statistics.median(x for _, x in values) / base:.2f}" if base else "-"
        print(f"{name:24} {cols[0]:>20} {cols[1]:>20} {ratio:>7}")


if __name__ == "__main__":
    main()

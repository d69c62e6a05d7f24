"""The cost of one trivial run: phd_flow's CLI against a plain-MLflow script and bare Python.

    python benchmarks/bench_run.py [--reps 5] [--old /path/to/an/older/phd_flow/checkout]

Contenders, each a fresh process, alternated in every repetition, one warm-up round first:

- ``phd_flow run Tiny``: a node returning ``a + 1`` (3 metric points), through
  ``python -m bench_project run Tiny``; the run directory is complete when it returns (record,
  logs, result, checksums), MLflow is fed in the background. Waits for the feeder between runs.
- ``phd_flow run Tiny --wait-mlflow``: the same, returning once MLflow has the whole run.
- ``--old``: the first contender with another phd_flow checkout on PYTHONPATH (before/after).
- ``plain MLflow script``: the same bookkeeping by hand: ``mlflow.start_run`` on the same kind
  of sqlite store, params, three metrics, args.json and a pickled result, ``end_run``.
- ``python -c``: the interpreter alone, the floor.

Printed: medians and spread (min-max) of the wall time per command, the time from process start
to the first line of ``_run`` (the node writes ``time.time()``), the command's CPU time (user +
system, its children included; less sensitive to other load on the machine than wall time), and
the ratio of wall times to the plain script measured in the same run.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

Timing = tuple[float, float, float]  # wall, process start -> _run, CPU

NODE = '''
import dataclasses
import os
import time

from phd_flow import Node, node


@dataclasses.dataclass
class TinyArgs(node.Args):
    a: int = 1


class Tiny(Node[TinyArgs, int]):
    """Return a + 1."""

    def _run(self) -> int:
        with open(os.environ["BENCH_RUN_STARTED"], "w") as handle:
            handle.write(repr(time.time()))
        for step in range(3):
            self.log_metric("loss", 1.0 / (step + 1), step=step)
        return self.args.a + 1
'''

MAIN = "import phd_flow\n\nphd_flow.run_main('bench_project')\n"

PLAIN = """
import json, os, pickle, sys, time
import mlflow
root = sys.argv[1]
mlflow.set_tracking_uri(f"sqlite:///{root}/plain.db")
mlflow.set_experiment("bench")
with mlflow.start_run() as run:
    with open(os.environ["BENCH_RUN_STARTED"], "w") as handle:
        handle.write(repr(time.time()))  # where the user's code starts
    out = os.path.join(root, "plain", run.info.run_id)
    os.makedirs(out)
    args = {"a": 1}
    mlflow.log_params(args)
    json.dump(args, open(os.path.join(out, "args.json"), "w"))
    for step in range(3):
        mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
    pickle.dump(args["a"] + 1, open(os.path.join(out, "result.pickle"), "wb"))
"""


def make_project(root: Path) -> None:
    package = root / "bench_project"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('"""Benchmark project."""\n')
    (package / "__main__.py").write_text(MAIN)
    (package / "tiny.py").write_text(NODE)
    (root / "config").mkdir()
    (root / "config" / "default.toml").write_text('local_path = "${PROJECT_ROOT}/data_storage"\n')
    (root / "plain.py").write_text(PLAIN)


def env_with(pythonpath: str | None, started: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PHD_FLOW_WAIT_MLFLOW", "MLFLOW_TRACKING_URI")}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["BENCH_RUN_STARTED"] = str(started)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, str(started.parent)) if p)
    return env


def feeder_idle(root: Path) -> None:
    """Wait until no run waits for the MLflow feeder (so it does not compete with the next run)."""
    deadline = time.monotonic() + 300
    queues = root / "data_storage" / ".phd_flow" / "mlflow-feed"
    while time.monotonic() < deadline:
        pending = [p for p in queues.glob("*/*") if p.name not in ("feeder.lock", "feeder.log")]
        if not pending:
            return
        time.sleep(0.05)
    raise RuntimeError("the feeder did not finish in 300 s")


def timed(cmd: list[str], root: Path, env: dict[str, str], started: Path) -> Timing:
    started.unlink(missing_ok=True)
    cpu_before = _children_cpu()
    begin = time.time()
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, check=False)
    wall = time.time() - begin
    cpu = _children_cpu() - cpu_before  # the command's own CPU time (a detached feeder is not counted)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed:\n{proc.stderr[-3000:]}")
    to_run = float(started.read_text()) - begin if started.exists() else float("nan")
    return wall, to_run, cpu


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--old", help="another phd_flow checkout to compare with (put first on PYTHONPATH)")
    options = parser.parse_args()
    here = str(Path(__file__).resolve().parent.parent)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_project(root)
        started = root / "started"
        python = sys.executable
        cli = [python, "-m", "bench_project", "run", "Tiny"]

        def case(cmd: list[str], pythonpath: str = here, feeding: bool = False) -> Callable[[], Timing]:
            def run() -> Timing:
                result = timed(cmd, root, env_with(pythonpath, started), started)
                if feeding:
                    feeder_idle(root)  # the next case does not compete with the feeder
                return result

            return run

        contenders = {
            "phd_flow run (MLflow in the background)": case(cli, feeding=True),
            "phd_flow run --wait-mlflow": case([*cli, "--wait-mlflow"]),
            "plain MLflow script": case([python, "plain.py", str(root)]),
            "python -c pass": case([python, "-c", "pass"]),
        }
        if options.old:
            contenders["phd_flow run, --old checkout"] = case(cli, options.old)
        # one warm-up round (creates and migrates both sqlite stores, fills the page cache)
        for run in contenders.values():
            run()
        results: dict[str, list[Timing]] = {name: [] for name in contenders}
        names = list(contenders)
        for rep in range(options.reps):
            order = names if rep % 2 == 0 else names[::-1]
            for name in order:
                results[name].append(contenders[name]())
        report(results, options.reps)


def report(results: dict[str, list[Timing]], reps: int) -> None:
    plain = statistics.median(v[0] for v in results["plain MLflow script"])
    print(f"{reps} alternated repetitions, medians (min-max); machine: {os.cpu_count()} CPUs, {sys.platform}")
    print(f"{'contender':42} {'wall s':>18} {'start->_run s':>18} {'CPU s':>18} {'wall / plain':>12}")
    for name, values in results.items():
        cols = []
        for index in (0, 1, 2):
            xs = [v[index] for v in values if v[index] == v[index]]
            cols.append(f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})" if xs else "-")
        ratio = statistics.median(v[0] for v in values) / plain
        print(f"{name:42} {cols[0]:>18} {cols[1]:>18} {cols[2]:>18} {ratio:>12.2f}")


if __name__ == "__main__":
    main()

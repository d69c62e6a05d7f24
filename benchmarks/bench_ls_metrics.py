"""`ls --metrics all` over many runs: the metric columns come from run.json's summary.

    python benchmarks/bench_ls_metrics.py [--n 10000] [--reps 5] [--mlflow-n N]

Makes N synthetic run directories (run.json with args and a metric summary of 3 metrics, as a
finished run writes it, plus a metrics.jsonl of 3 x 50 points) and times, alternating, each
repetition in a fresh process (medians and spread of ``--reps``):

* ``ls --metrics all --sort loss``, in-process (the CLI's ``main`` with stdout to /dev/null);
* the same through the real CLI in a subprocess (incl. Python + phd_flow start-up);
* plain ``ls`` (no metric columns), in-process: what the columns cost;
* ``ls --metrics all`` for older runs whose run.json has no summary (the fallback reads every
  metrics.jsonl): why the summary is written at the end of a run.

Goal (issue 16): ``ls`` of 10,000 runs with metric columns under 1 s. With ``--mlflow-n N`` it
also times MLflow ``search_runs`` (all pages, sqlite) over N runs logged with the same params
and metrics; creating them costs ~20 ms per run, so it is off by default and, when given, is
reported at its own count (not scaled).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

METRICS = ("acc", "loss", "val_loss")
POINTS = 50


def make_runs(local_path: Path, n: int, with_summary: bool) -> None:
    from phd_flow.run.record import RunRecord
    from phd_flow.runs.metrics import parse_points, summarize

    (local_path / "template").mkdir(parents=True)
    template = RunRecord.create(local_path / "template", node="Train").data
    shutil.rmtree(local_path / "template")
    rng = random.Random(0)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for i in range(n):
        began = start + timedelta(minutes=7 * i)
        key = f"Train_{began.strftime('%Y-%m-%dT%H-%M-%S.%fZ')}_{i:08d}"
        args = {"lr": rng.choice([0.1, 0.03, 0.01, 0.001]), "seed": i % 50, "epochs": POINTS}
        lines = []
        for step in range(POINTS):
            for name in METRICS:
                value = rng.random() if name == "acc" else 1 / (step + 1) + rng.random()
                lines.append(json.dumps({"name": name, "value": value, "step": step, "timestamp": step}))
        raw = "\n".join(lines) + "\n"
        data = {
            **template,
            "key": key,
            "status": "completed",
            "args": args,
            "started_at": began.isoformat(),
            "heartbeat_at": (began + timedelta(seconds=60)).isoformat(),
            "ended_at": (began + timedelta(seconds=60)).isoformat(),
            "sync": {"state": "synced"},
            "mlflow": {"state": "synced", "run_id": f"{i:032x}"},
        }
        if with_summary:
            data["metrics"] = summarize(parse_points(raw))
        run_dir = local_path / key
        run_dir.mkdir(parents=True)
        (run_dir / "run.json").write_text(json.dumps(data, indent=2))
        (run_dir / "metrics.jsonl").write_text(raw)


def make_project(root: Path, local_path: Path) -> None:
    package = root / "bench_project"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text("import phd_flow\nphd_flow.run_main('bench_project')\n")
    (root / "config").mkdir(exist_ok=True)
    (root / "config" / "default.toml").write_text(f'local_path = "{local_path}"\n')


IN_PROCESS = """
import os, sys, time
import phd_flow.cli as cli
start = time.perf_counter()
with open(os.devnull, "w") as sink:
    real, sys.stdout = sys.stdout, sink
    code = cli.main("bench_project", sys.argv[1:])
    sys.stdout = real
print(time.perf_counter() - start, code)
"""


def in_process(root: Path, *argv: str) -> float:
    """Seconds of the ``ls`` command itself, in a fresh interpreter (imports excluded)."""
    done = subprocess.run(
        [sys.executable, "-c", IN_PROCESS, *argv], cwd=root, capture_output=True, text=True, check=True
    )
    seconds, code = done.stdout.split()
    assert code == "0", done.stderr
    return float(seconds)


def subprocess_cli(root: Path, *argv: str) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "bench_project", *argv], cwd=root, capture_output=True, check=True)
    seconds = time.perf_counter() - start
    assert done.stdout.count(b"\n") > 1
    return seconds


def bench_mlflow(root: Path, n: int) -> float:
    """search_runs over N runs with 3 params and 3 metrics (50 points each) in sqlite."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.create_experiment("bench")
    rng = random.Random(0)
    for i in range(n):
        run = client.create_run(experiment)
        metrics = [Metric(m, rng.random(), step, step) for step in range(POINTS) for m in METRICS]
        params = [Param("lr", "0.1"), Param("seed", str(i % 50)), Param("epochs", str(POINTS))]
        client.log_batch(run.info.run_id, metrics=metrics, params=params)
        client.set_terminated(run.info.run_id)

    def search_all() -> int:
        found, token = 0, None
        while True:
            page = client.search_runs([experiment], max_results=1000, page_token=token, order_by=["metrics.loss ASC"])
            found += len(page)
            token = page.token
            if not token:
                return found

    times = []
    for _ in range(3):
        start = time.perf_counter()
        assert search_all() == n
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="runs to create")
    parser.add_argument("--reps", type=int, default=5, help="repetitions of each measurement (alternated)")
    parser.add_argument("--mlflow-n", type=int, default=0, help="also time MLflow search_runs over N runs")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_ls_metrics-") as tmp:
        root = Path(tmp)
        with_summary, without = root / "new" / "data_storage", root / "old" / "data_storage"
        began = time.perf_counter()
        make_runs(with_summary, options.n, with_summary=True)
        make_runs(without, options.n, with_summary=False)
        print(f"{options.n} runs made twice (with and without the summary) in {time.perf_counter() - began:.1f} s")
        for project, local_path in ((root / "new", with_summary), (root / "old", without)):
            make_project(project, local_path)
        cases = {
            "ls --metrics all --sort loss, in-process": lambda: in_process(
                root / "new", "ls", "--metrics", "all", "--sort", "loss"
            ),
            "ls --metrics all --sort loss, CLI subprocess": lambda: subprocess_cli(
                root / "new", "ls", "--metrics", "all", "--sort", "loss"
            ),
            "plain ls, in-process": lambda: in_process(root / "new", "ls"),
            "ls --metrics all, old runs (no summary), in-process": lambda: in_process(
                root / "old", "ls", "--metrics", "all"
            ),
        }
        times: dict[str, list[float]] = {label: [] for label in cases}
        for _ in range(options.reps):
            for label, case in cases.items():  # alternated, so load on the machine hits all alike
                times[label].append(case())
        print(f"{options.n} runs, {options.reps} alternated repetitions: median (min-max) seconds")
        for label, values in times.items():
            print(f"  {label:<52} {statistics.median(values):6.3f}  ({min(values):.3f}-{max(values):.3f})")
        ours = statistics.median(times["ls --metrics all --sort loss, in-process"])
        plain = statistics.median(times["plain ls, in-process"])
        old = statistics.median(times["ls --metrics all, old runs (no summary), in-process"])
        print(f"  metric columns cost: {ours / plain:.2f}x plain ls; the summary saves {old / ours:.1f}x")
        print(f"  goal: under 1 s for {options.n} runs -> {'met' if ours < 1 else 'NOT met'} ({ours:.3f} s)")
        if options.mlflow_n:
            seconds = bench_mlflow(root, options.mlflow_n)
            label = f"MLflow search_runs over {options.mlflow_n} runs (sqlite, all pages, median of 3)"
            print(f"  {label}: {seconds:.3f} s")
        else:
            print("  MLflow search_runs: not measured (creating 10,000 MLflow runs takes minutes; --mlflow-n N)")


if __name__ == "__main__":
    main()

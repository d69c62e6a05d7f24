"""Load: one run writing many small artifacts and logging many metrics, then syncing. Memory
must stay flat: RSS may not grow with the number of files or metric points.

    python benchmarks/bench_load.py [--sizes 10000:1000 100000:10000] [--remote local|s3] [--no-mlflow]

Each ``METRICS:FILES`` size runs in a fresh interpreter (peak RSS is per process): a node logs
METRICS points with ``self.log_metric`` (to metrics.jsonl and, unless ``--no-mlflow``, a fresh
sqlite MLflow store), writes FILES files of ~100 B into its run directory, returns, and the run's
final sync mirrors everything to the remote (a local directory, or a moto S3 server in its own
process with ``--remote s3``). The child reports RSS and peak RSS (``ru_maxrss``) at checkpoints:

* ``start``  - inside ``_run``, before any work (interpreter, phd_flow, MLflow run open),
* ``metrics`` - after the METRICS ``log_metric`` calls returned,
* ``files``   - after the FILES files were written,
* ``synced``  - after ``run()`` returned: metrics drained to MLflow, run directory synced.

The parent prints one row per size and the growth between the smallest and the largest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from phd_flow import Config, Node, node
from phd_flow.config import MlflowConfig, StorageConfig
from phd_flow.run.record import RunRecord
from phd_flow.storage.engine import JOURNAL, MANIFEST

MB = 1 << 20


def rss() -> tuple[float, float]:
    """(current RSS, peak RSS) of this process in MiB."""
    import psutil

    current = psutil.Process().memory_info().rss / MB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return current, peak


@dataclasses.dataclass
class LoadArgs(node.Args):
    metrics: int = 100_000
    files: int = 10_000


class Load(Node[LoadArgs, dict]):
    """Log ``metrics`` points and write ``files`` small artifacts; return RSS checkpoints."""

    def _run(self) -> dict[str, Any]:
        marks: dict[str, Any] = {}

        def mark(name: str, started: float) -> None:
            current, peak = rss()
            marks[name] = {"rss": current, "peak": peak, "seconds": time.perf_counter() - started}

        mark("start", time.perf_counter())
        started = time.perf_counter()
        for step in range(self.args.metrics):
            self.log_metric("loss", 1.0 / (step + 1), step=step)
            if step % 10 == 0:
                self.log_metric("lr", 0.1 * 0.999**step, step=step)
        mark("metrics", started)
        started = time.perf_counter()
        out = self.output_dir / "artifacts"
        for i in range(self.args.files):
            sub = out / f"{i // 100:04d}"
            if i % 100 == 0:
                sub.mkdir(parents=True)
            (sub / f"part-{i:06d}.txt").write_text(f"artifact {i}: " + "x" * 80 + "\n")
        mark("files", started)
        return marks


def child(metrics: int, files: int, remote: str, mlflow: bool) -> None:
    """Run one size in this process and print a JSON line with the measurements."""
    with tempfile.TemporaryDirectory(prefix="phd_flow-bench-load-") as tmp:
        root = Path(tmp)
        if remote == "s3":
            sys.path.insert(0, str(Path(__file__).parent))
            from bench_sync import CREDENTIALS, moto

            os.environ.update(CREDENTIALS)
            server: Any = moto("process")
        else:
            server = nullcontext(None)
        with server as endpoint:
            if endpoint is not None:
                import boto3

                boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench-load")
                storage = StorageConfig(backend="s3", bucket="bench-load", prefix="p", endpoint_url=endpoint)
            else:
                storage = StorageConfig(backend="local", remote=str(root / "remote"))
            config = Config(
                local_path=root / "local",
                project_root=root,
                storage=storage,
                mlflow=MlflowConfig(enabled=mlflow, tracking_uri=f"sqlite:///{root / 'mlflow.db'}"),
            )
            run = Load(LoadArgs(metrics=metrics, files=files), config=config)
            started = time.perf_counter()
            marks = run.run()
            current, peak = rss()
            marks["synced"] = {"rss": current, "peak": peak, "seconds": time.perf_counter() - started}
            record = RunRecord.load(run.output_dir)
            local_files = sum(
                1 for _, _, names in os.walk(run.output_dir) for n in names if n not in (MANIFEST, JOURNAL)
            )
            remote_files = len(run.storage.remote_ls(str(run.key)))
            metric_lines = (run.output_dir / "metrics.jsonl").read_bytes().count(b"\n")
            result = {
                "metrics": metrics,
                "files": files,
                "marks": marks,
                "sync": record.data["sync"]["state"],
                "mlflow": record.data["mlflow"]["state"],
                "metric_lines": metric_lines,
                "local_files": local_files,
                "remote_files": remote_files,
            }
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["10000:1000", "100000:10000"], help="METRICS:FILES")
    parser.add_argument("--remote", choices=["local", "s3"], default="local")
    parser.add_argument("--no-mlflow", action="store_true", help="metrics.jsonl only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        metrics, files = map(int, args.child.split(":"))
        child(metrics, files, args.remote, not args.no_mlflow)
        return

    print(f"remote={args.remote} mlflow={'off' if args.no_mlflow else 'sqlite'}; RSS / peak RSS in MiB")
    header = f"{'metrics':>8} {'files':>6} | " + " | ".join(
        f"{m:>16}" for m in ("start", "after metrics", "after files", "after sync")
    )
    print(header + f" | {'run s':>6} | sync / mlflow / remote files")
    rows = []
    for size in args.sizes:
        argv = [sys.executable, __file__, "--child", size, "--remote", args.remote]
        argv += ["--no-mlflow"] if args.no_mlflow else []
        proc = subprocess.run(argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"size {size} failed:\n{proc.stderr[-3000:]}")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        marks = row["marks"]
        cells = " | ".join(
            f"{marks[m]['rss']:7.1f} / {marks[m]['peak']:6.1f}" for m in ("start", "metrics", "files", "synced")
        )
        print(
            f"{row['metrics']:>8} {row['files']:>6} | {cells} | {marks['synced']['seconds']:6.1f} | "
            f"{row['sync']} / {row['mlflow']} / {row['remote_files']} of {row['local_files']}"
        )
        assert row["sync"] == "synced" and row["remote_files"] == row["local_files"], row
        assert row["metric_lines"] == row["metrics"] + (row["metrics"] + 9) // 10, row
    if len(rows) > 1:
        small, large = rows[0], rows[-1]
        grow = large["marks"]["synced"]["peak"] - small["marks"]["synced"]["peak"]
        work = large["marks"]["synced"]["peak"] - large["marks"]["start"]["peak"]
        print(
            f"peak RSS growth from {small['metrics']}:{small['files']} to {large['metrics']}:{large['files']}: "
            f"{grow:+.1f} MiB; within the largest run, start -> end of sync: {work:+.1f} MiB"
        )


if __name__ == "__main__":
    main()

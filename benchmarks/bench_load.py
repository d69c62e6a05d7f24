"""Load: one run writing many small artifacts and logging many metrics, then syncing. Memory
must stay flat: RSS may not grow with the number of files or metric points.

    python benchmarks/bench_load.py [--sizes 10000:1000 100000:10000] [--reps 5] [--remote local|s3] [--no-mlflow]

Each ``METRICS:FILES`` size runs in a fresh interpreter (peak RSS is per process): a node logs
METRICS points with ``self.log_metric`` (to metrics.jsonl and, unless ``--no-mlflow``, a fresh
sqlite MLflow store), writes FILES files of ~100 B into its run directory, returns, and the run's
final sync mirrors everything to the remote (a local directory, or a moto S3 server in its own
process with ``--remote s3``). The child reports RSS and peak RSS (``ru_maxrss``) at checkpoints:

* ``start``  - inside ``_run``, before any work (interpreter, phd_flow, MLflow run open),
* ``metrics`` - after the METRICS ``log_metric`` calls returned,
* ``files``   - after the FILES files were written,
* ``synced``  - after ``run()`` returned: metrics drained to MLflow, run directory synced.

Every repetition (``--reps``) runs each size once, in alternating order. The parent prints, per
size, the median and spread (min-max) of RSS / peak RSS at each checkpoint and of the run's
seconds, and the growth of the median peak from the smallest size to the largest (the peer: the
same run with 10x less work; flat memory means a ratio near 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from reps import alternate, spread

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from phd_flow import Config, Node, node
from phd_flow._io import PRIVATE_PREFIX
from phd_flow.config import MlflowConfig, StorageConfig
from phd_flow.run.record import RunRecord

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
            local_files = sum(  # phd_flow's own files (manifest, journal, locks) are never synced
                1 for _, _, names in os.walk(run.output_dir) for n in names if not n.startswith(PRIVATE_PREFIX)
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


MARKS = {"start": "start", "metrics": "after metrics", "files": "after files", "synced": "after sync"}


def one_size(size: str, args: argparse.Namespace) -> dict[str, float]:
    """Run one size in a fresh interpreter; check it synced completely; its measurements."""
    argv = [sys.executable, __file__, "--child", size, "--remote", args.remote]
    argv += ["--no-mlflow"] if args.no_mlflow else []
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"size {size} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["sync"] == "synced" and row["remote_files"] == row["local_files"], row
    assert row["metric_lines"] == row["metrics"] + (row["metrics"] + 9) // 10, row
    marks = row["marks"]
    measured = {f"rss {m}": marks[m]["rss"] for m in MARKS} | {f"peak {m}": marks[m]["peak"] for m in MARKS}
    return measured | {"run s": marks["synced"]["seconds"], "remote files": row["remote_files"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["10000:1000", "100000:10000"], help="METRICS:FILES")
    parser.add_argument("--reps", type=int, default=5, help="alternated repetitions (>= 5 for a median)")
    parser.add_argument("--remote", choices=["local", "s3"], default="local")
    parser.add_argument("--no-mlflow", action="store_true", help="metrics.jsonl only")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        metrics, files = map(int, args.child.split(":"))
        child(metrics, files, args.remote, not args.no_mlflow)
        return

    results = alternate({size: lambda size=size: one_size(size, args) for size in args.sizes}, args.reps)
    print(
        f"remote={args.remote} mlflow={'off' if args.no_mlflow else 'sqlite'}; {args.reps} alternated repetitions; "
        "RSS and peak RSS in MiB, median (min-max); every run synced completely"
    )
    for size in args.sizes:
        print(f"METRICS:FILES {size}  (run {spread(results[f'{size}, run s'])}, synced files: "
              f"{int(results[f'{size}, remote files'][0])})")  # fmt: skip
        for mark, label in MARKS.items():
            rss, peak = results[f"{size}, rss {mark}"], results[f"{size}, peak {mark}"]
            print(f"  {label:<14} RSS {spread(rss, 'MiB', digits=1):<28} peak {spread(peak, 'MiB', digits=1)}")
    if len(args.sizes) > 1:
        small, large = args.sizes[0], args.sizes[-1]
        low = statistics.median(results[f"{small}, peak synced"])
        high = statistics.median(results[f"{large}, peak synced"])
        start = statistics.median(results[f"{large}, peak start"])
        print(
            f"median peak RSS at the end, {small} -> {large}: {low:.1f} -> {high:.1f} MiB ({high - low:+.1f} MiB, "
            f"{high / low:.2f}x); within {large}, start -> end of sync: {high - start:+.1f} MiB"
        )


if __name__ == "__main__":
    main()

"""Listing runs: phd_flow's `ls` vs a naive walk of every file vs MLflow's `search_runs`.

    python benchmarks/bench_ls.py [--n 10000] [--mlflow-n N] [--skip-remote] [--skip-mlflow]

Makes N synthetic but valid run directories (run.json written from a real RunRecord, args.json,
output.log, metrics.jsonl, results.pickle) and times:

* local `ls`: in-process (`list_runs`) and the real CLI (`python -m bench_project ls --json`);
* the naive listing the seed's ancestor did: walk every file below local_path, load each run.json;
* `ls --remote` against a moto S3 server (in its own process), cold (no cache) and warm;
* MLflow `search_runs` over the same runs in a sqlite store (all pages).

Goals (issue 5): local `ls` under 1 s and `ls --remote` under 5 s for 10,000 runs.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from phd_flow import Config
from phd_flow.config import StorageConfig
from phd_flow.run.record import RunRecord
from phd_flow.runs.query import list_runs

STATUSES = ["completed"] * 17 + ["failed"] * 2 + ["killed"]
RUNNING = 10  # the newest runs are still running (live heartbeats)
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def make_runs(local_path: Path, n: int) -> list[dict[str, Any]]:
    """N run directories with a valid run.json each (a real RunRecord as the template)."""
    template = RunRecord.create(local_path / "template", node="FitOLS").data
    shutil.rmtree(local_path / "template")
    rng = random.Random(0)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    records = []
    for i in range(n):
        began = start + timedelta(minutes=7 * i)
        key = f"FitOLS_{began.strftime('%Y-%m-%dT%H-%M-%S.%fZ')}_{i:08d}"
        args = {"dataset": "data/diabetes.csv", "target": "target", "seed": i % 50, "lr": rng.choice([0.1, 0.01])}
        status = "running" if i >= n - RUNNING else STATUSES[i % len(STATUSES)]
        ended = None if status == "running" else (began + timedelta(seconds=rng.randint(5, 5000))).isoformat()
        data = {
            **template,
            "key": key,
            "status": status,
            "args": args,
            "path": key,
            "started_at": began.isoformat(),
            "heartbeat_at": ended or datetime.now(timezone.utc).isoformat(),
            "ended_at": ended,
            "sync": {"state": "synced"},
            "mlflow": {"state": "synced", "run_id": f"{i:032x}"},
            "result": {"file": "results.pickle", "sha256": "0" * 64, "type": "FitOLSResult"},
        }
        run_dir = local_path / key
        run_dir.mkdir(parents=True)
        (run_dir / "run.json").write_text(json.dumps(data, indent=2))
        (run_dir / "args.json").write_text(json.dumps(args))
        (run_dir / "output.log").write_text(f"{began} | INFO | fit_ols:40 - Got 442 samples.\n" * 5)
        (run_dir / "metrics.jsonl").write_text(
            json.dumps({"name": "mse", "value": 3000.0 + i, "step": 0, "timestamp": 0}) + "\n"
        )
        (run_dir / "results.pickle").write_bytes(pickle.dumps({"mse": 3000.0 + i}))
        records.append(data)
    return records


def naive_listing(local_path: Path) -> int:
    """What the seed's ancestor did: walk every file, load every run.json found."""
    found = 0
    for dirpath, _dirs, files in os.walk(local_path):
        for name in files:
            path = os.path.join(dirpath, name)
            os.stat(path)
            if name == "run.json":
                with open(path, "rb") as handle:
                    json.load(handle)
                found += 1
    return found


def timed(label: str, func: Callable[[], Any], results: dict[str, float]) -> Any:
    start = time.perf_counter()
    value = func()
    results[label] = time.perf_counter() - start
    print(f"  {label:<42} {results[label]:8.3f} s", flush=True)
    return value


def bench_local(root: Path, config: Config, n: int, results: dict[str, float]) -> None:
    runs = timed("ls, in-process (list_runs)", lambda: list_runs(config), results)
    assert len(runs) == n, len(runs)
    package = root / "bench_project"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text("import phd_flow\nphd_flow.run_main('bench_project')\n")
    (root / "config").mkdir(exist_ok=True)
    (root / "config" / "default.toml").write_text(f'local_path = "{config.local_path}"\n')
    command = [sys.executable, "-m", "bench_project", "ls", "--json"]
    proc = timed(
        "ls --json, CLI subprocess (incl. startup)",
        lambda: subprocess.run(command, cwd=root, capture_output=True, check=True),
        results,
    )
    assert len(json.loads(proc.stdout)) == n
    timed(
        "python -c 'import phd_flow' (startup alone)",
        lambda: subprocess.run([sys.executable, "-c", "import phd_flow.cli"], check=True),
        results,
    )
    found = timed("naive: os.walk every file + load run.json", lambda: naive_listing(config.local_path), results)
    assert found == n


def bench_remote(root: Path, config: Config, n: int, results: dict[str, float]) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(CREDENTIALS)
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        client = _wait_for_s3(endpoint)
        client.create_bucket(Bucket="bench")
        files = [
            p for p in config.local_path.rglob("*") if p.is_file() and p.name in ("run.json", "args.json", "output.log")
        ]
        start = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            list(
                pool.map(
                    lambda p: client.upload_file(
                        str(p), "bench", f"proj/{p.relative_to(config.local_path).as_posix()}"
                    ),
                    files,
                )
            )
        print(f"  (uploaded {len(files)} files in {time.perf_counter() - start:.1f} s)", flush=True)
        other = Config(
            local_path=root / "machine2",
            project_root=root,
            storage=StorageConfig(backend="s3", bucket="bench", prefix="proj", endpoint_url=endpoint),
        )
        runs = timed("ls --remote, cold (fetch every run.json)", lambda: list_runs(other, remote=True), results)
        assert len(runs) == n, len(runs)
        runs = timed("ls --remote, warm (local index)", lambda: list_runs(other, remote=True), results)
        assert len(runs) == n
        third = Config(local_path=root / "machine3", project_root=root, storage=other.storage)
        runs = timed("ls --remote, new machine (shared index)", lambda: list_runs(third, remote=True), results)
        assert len(runs) == n
    finally:
        server.terminate()
        server.wait()


def _wait_for_s3(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config as BotoConfig

    client = boto3.client("s3", endpoint_url=endpoint, config=BotoConfig(max_pool_connections=32))
    for _ in range(200):
        try:
            client.list_buckets()
            return client
        except Exception:
            time.sleep(0.1)
    raise RuntimeError(f"moto server at {endpoint} did not start")


def bench_mlflow(root: Path, records: list[dict[str, Any]], results: dict[str, float]) -> None:
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.create_experiment("bench")
    start = time.perf_counter()
    for data in records:
        run = client.create_run(experiment, run_name=data["key"], tags={"phd_flow.key": data["key"]})
        client.log_batch(run.info.run_id, params=[Param(k, str(v)) for k, v in data["args"].items()])
    print(f"  (created {len(records)} MLflow runs in {time.perf_counter() - start:.1f} s)", flush=True)

    def search_all() -> int:
        found, token = 0, None
        while True:
            page = client.search_runs([experiment], max_results=1000, page_token=token)
            found += len(page)
            token = page.token
            if not token:
                return found

    assert timed(f"MLflow search_runs, {len(records)} runs (sqlite)", search_all, results) == len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="runs to create")
    parser.add_argument("--mlflow-n", type=int, default=None, help="MLflow runs (default: --n)")
    parser.add_argument("--skip-remote", action="store_true")
    parser.add_argument("--skip-mlflow", action="store_true")
    options = parser.parse_args()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench_ls-") as tmp:
        root = Path(tmp)
        config = Config(local_path=root / "data_storage", project_root=root)
        start = time.perf_counter()
        records = make_runs(config.local_path, options.n)
        print(f"{options.n} runs made in {time.perf_counter() - start:.1f} s")
        bench_local(root, config, options.n, results)
        if not options.skip_remote:
            bench_remote(root, config, options.n, results)
        if not options.skip_mlflow:
            bench_mlflow(root, records[: options.mlflow_n or options.n], results)
    _ratios(results, options)


def _ratios(results: dict[str, float], options: argparse.Namespace) -> None:
    ours = results["ls, in-process (list_runs)"]
    print("ratios (higher = phd_flow faster):")
    print(f"  naive walk / ls:                {results['naive: os.walk every file + load run.json'] / ours:6.1f}x")
    mlflow_key = next((k for k in results if k.startswith("MLflow")), None)
    if mlflow_key:
        per_run = results[mlflow_key] / (options.mlflow_n or options.n) * options.n
        print(f"  MLflow search_runs / ls:        {per_run / ours:6.1f}x (scaled to {options.n} runs)")
    if "ls --remote, cold (fetch every run.json)" in results:
        cold, warm = (
            results["ls --remote, cold (fetch every run.json)"],
            results["ls --remote, warm (local index)"],
        )
        print(f"  remote cold / warm:             {cold / warm:6.1f}x")


if __name__ == "__main__":
    main()

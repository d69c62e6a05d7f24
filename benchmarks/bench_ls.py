"""Listing runs: phd_flow's `ls` vs a naive walk of every file vs MLflow's `search_runs`.

    python benchmarks/bench_ls.py [--n 10000] [--reps 5] [--quick] [--skip-remote] [--skip-mlflow]

Makes N synthetic but valid run directories (run.json written from a real RunRecord, args.json,
output.log, metrics.jsonl, results.pickle), the same N runs in a sqlite MLflow store and (their
run.json, args.json, output.log) in a moto S3 server in its own process, once; then, in every
repetition (``--reps``, alternating the order), times:

* local `ls`: in-process (`list_runs`) and the real CLI (`python -m bench_project ls --json`);
* the naive listing the seed's ancestor did: walk every file below local_path, load each run.json;
* MLflow `search_runs` over the same N runs (all pages of 1,000), measured, not scaled;
* `ls --remote` on a new machine: cold (no index anywhere: fetches every run.json), warm (its
  local index) and a third machine (the shared index the first one left in the bucket).

Printed: medians with the spread (min-max) and ratios against phd_flow's `ls` from the same
run. ``--quick`` makes 2,000 runs instead of 10,000 (creating 10,000 MLflow runs takes minutes).
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
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from reps import alternate, ratio, spread

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
    (local_path / "template").mkdir(parents=True)
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


def project(root: Path, config: Config) -> list[str]:
    """A package ``bench_project`` with phd_flow's CLI over ``config.local_path``; its ls argv."""
    package = root / "bench_project"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text("import phd_flow\nphd_flow.run_main('bench_project')\n")
    (root / "config").mkdir(exist_ok=True)
    (root / "config" / "default.toml").write_text(f'local_path = "{config.local_path}"\n')
    return [sys.executable, "-m", "bench_project", "ls", "--json"]


def local_contenders(root: Path, config: Config, n: int) -> dict[str, Callable[[], Any]]:
    command = project(root, config)

    def ls() -> None:
        assert len(list_runs(config)) == n

    def cli() -> None:
        proc = subprocess.run(command, cwd=root, capture_output=True, check=True)
        assert len(json.loads(proc.stdout)) == n

    def startup() -> None:
        subprocess.run([sys.executable, "-c", "import phd_flow.cli"], check=True)

    def naive() -> None:
        assert naive_listing(config.local_path) == n

    return {
        "ls, in-process (list_runs)": ls,
        "ls --json, CLI subprocess (incl. start-up)": cli,
        "python -c 'import phd_flow.cli' (start-up alone)": startup,
        "naive: os.walk every file + load run.json": naive,
    }


@contextmanager
def s3_store(config: Config) -> Iterator[str]:
    """A moto S3 server (own process) holding every run's run.json, args.json and output.log."""
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
        yield endpoint
    finally:
        server.terminate()
        server.wait()


def remote_contender(root: Path, endpoint: str, n: int) -> Callable[[], dict[str, float]]:
    """``ls --remote`` from new machines, in order: cold, warm, a third machine (shared index)."""
    from phd_flow.runs.listing import SHARED_INDEX

    storage = StorageConfig(backend="s3", bucket="bench", prefix="proj", endpoint_url=endpoint)
    client = _wait_for_s3(endpoint)
    rep = iter(range(1_000_000))

    def steps() -> dict[str, float]:
        i = next(rep)
        client.delete_object(Bucket="bench", Key=f"proj/{SHARED_INDEX}")  # nobody listed before
        measured = {}
        for label, machine in [("cold", f"m{i}a"), ("warm (local index)", f"m{i}a"), ("new machine", f"m{i}b")]:
            other = Config(local_path=root / machine, project_root=root, storage=storage)
            start = time.perf_counter()
            assert len(list_runs(other, remote=True)) == n
            measured[label] = time.perf_counter() - start
        return measured

    return steps


def mlflow_contender(root: Path, records: list[dict[str, Any]]) -> Callable[[], None]:
    """MLflow ``search_runs`` of every page over the runs, in a sqlite store made once.

    The store is filled through MLflow's own SQLAlchemy models in one transaction, copying a run
    made by ``MlflowClient.create_run`` (one ``create_run`` + ``log_batch`` per run takes about
    0.1 s here, 15 minutes for 10,000 runs); what is timed is the public ``search_runs``."""
    import uuid

    from mlflow.store.tracking.dbmodels.models import SqlParam, SqlRun, SqlTag
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("bench")
    template_id = client.create_run(experiment, run_name="template").info.run_id
    client.delete_run(template_id)
    start = time.perf_counter()
    with SqlAlchemyStore(uri, str(root / "mlartifacts")).ManagedSessionMaker() as session:
        template = session.query(SqlRun).filter(SqlRun.run_uuid == template_id).one()
        columns = {c.name: getattr(template, c.name) for c in SqlRun.__table__.columns}
        rows: list[Any] = []
        for i, data in enumerate(records):
            run_id = uuid.uuid4().hex
            fields = {"run_uuid": run_id, "name": data["key"], "start_time": columns["start_time"] + i}
            rows.append(SqlRun(**{**columns, **fields, "lifecycle_stage": "active", "deleted_time": None}))
            rows += [SqlTag(key=k, value=data["key"], run_uuid=run_id) for k in ("phd_flow.key", "mlflow.runName")]
            rows += [SqlParam(key=k, value=str(v), run_uuid=run_id) for k, v in data["args"].items()]
        session.add_all(rows)
    print(f"  (made {len(records)} MLflow runs in {time.perf_counter() - start:.1f} s)", flush=True)

    def search_all() -> None:
        found, token = 0, None
        while True:
            page = client.search_runs([experiment], max_results=1000, page_token=token)
            found += len(page)
            token = page.token
            if not token:
                assert found == len(records), found
                return

    return search_all


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=10_000, help="runs to create")
    parser.add_argument("--quick", action="store_true", help="2,000 runs (overrides --n)")
    parser.add_argument("--reps", type=int, default=5, help="alternated repetitions (>= 5 for a median)")
    parser.add_argument("--skip-remote", action="store_true")
    parser.add_argument("--skip-mlflow", action="store_true")
    options = parser.parse_args()
    n = 2_000 if options.quick else options.n
    with tempfile.TemporaryDirectory(prefix="bench_ls-") as tmp:
        root = Path(tmp)
        config = Config(local_path=root / "data_storage", project_root=root)
        start = time.perf_counter()
        records = make_runs(config.local_path, n)
        print(f"{n} runs made in {time.perf_counter() - start:.1f} s", flush=True)
        contenders = local_contenders(root, config, n)
        if not options.skip_mlflow:
            contenders[f"MLflow search_runs, {n} runs (sqlite)"] = mlflow_contender(root, records)
        with nullcontext(None) if options.skip_remote else s3_store(config) as endpoint:
            if endpoint is not None:
                contenders["ls --remote (moto S3)"] = remote_contender(root, endpoint, n)
            results = alternate(contenders, options.reps)
    report(results, n, options.reps)


def report(results: dict[str, list[float]], n: int, reps: int) -> None:
    print(f"{n} runs, {reps} alternated repetitions; median (min-max)")
    for label, values in results.items():
        print(f"  {label:<52} {spread(values, digits=3)}")
    ours = results["ls, in-process (list_runs)"]
    print("ratios (higher = phd_flow faster; medians of this run):")
    print(f"  naive walk / ls:                {ratio(results['naive: os.walk every file + load run.json'], ours)}")
    mlflow_key = next((k for k in results if k.startswith("MLflow")), None)
    if mlflow_key:
        print(f"  MLflow search_runs / ls:        {ratio(results[mlflow_key], ours)} (both over {n} runs)")
        cli = results["ls --json, CLI subprocess (incl. start-up)"]
        print(f"  MLflow search_runs / ls CLI:    {ratio(results[mlflow_key], cli)}")
    if "ls --remote (moto S3), cold" in results:
        cold, warm = results["ls --remote (moto S3), cold"], results["ls --remote (moto S3), warm (local index)"]
        print(f"  remote cold / warm:             {ratio(cold, warm)}")


if __name__ == "__main__":
    main()

"""The first `ls --remote` of runs pushed by phd_flow (day shards) vs never-indexed runs.

    python benchmarks/bench_remote_ls.py [--runs 10000] [--reps 5] [--sequential-reps N] [--per-run-index]

Puts N valid run.json objects (a real RunRecord as the template; 1 in 20 still running) into a
bucket of a moto S3 server running in its own process (`python -m moto.server`, the server
tests/s3_fixtures.py starts in-process: here the listing must not share the server's GIL, as it
would not with real S3), and files the finished ones in the push-time day shards
(``.phd_flow/index/<day>.json.gz``) with the function every push calls,
:func:`phd_flow.runs.index.index_pushed`: by default once with all runs (one read-modify-write
per day shard: what the pushes leave behind when none was lost), with ``--per-run-index`` once
per run, as N pushes do (slow: 3 requests per run). Then times `list_runs(config, remote=True)`,
as `ls --remote` does:

* first, pushed runs: a new machine (empty local_path), no shared index: the listing reads the
  day shards and fetches only the running runs' run.json;
* never-indexed (the old path, the peer): a new machine with `--refresh` (no index read), so
  every run.json is fetched with the listing's thread pool, as before runs were indexed at push;
* never-indexed, sequential (optional, ``--sequential-reps``): the same with one fetch at a time;
* warm: the first machine again (its local index: only running runs are fetched);
* shared index: another new machine (the shared index the never-indexed listing left).

First and never-indexed alternate; each figure is the median of its repetitions (the spread is
printed). Goals (issue 17): the first listing under 10 s, later ones under 5 s, for 10,000 runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from functools import partial
from pathlib import Path
from typing import Any

from phd_flow import Config
from phd_flow.config import StorageConfig
from phd_flow.run.record import RunRecord
from phd_flow.runs import listing
from phd_flow.runs.index import SHARDS, index_pushed
from phd_flow.runs.query import list_runs
from phd_flow.storage.registry import make_remote

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET, PREFIX = "bench", "proj"


def run_json(template: dict[str, Any], i: int) -> dict[str, Any]:
    began = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(minutes=7 * i)
    key = f"FitOLS_{began.strftime('%Y-%m-%dT%H-%M-%S.%fZ')}_{i:08d}"
    running = i % 20 == 19
    return {
        **template,
        "key": key,
        "status": "running" if running else "completed",
        "started_at": began.isoformat(),
        "ended_at": None if running else (began + timedelta(seconds=30)).isoformat(),
        "heartbeat_at": (began + timedelta(seconds=30)).isoformat(),
        "args": {"dataset": "data/diabetes.csv", "target": "target", "seed": i % 50},
        "sync": {"state": "synced"},
    }


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(CREDENTIALS)
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return server, f"http://127.0.0.1:{port}"


def client_for(endpoint: str) -> Any:
    import boto3
    from botocore.config import Config as BotoConfig

    client = boto3.client("s3", endpoint_url=endpoint, config=BotoConfig(max_pool_connections=32))
    deadline = time.monotonic() + 30
    while True:
        try:
            client.list_buckets()
            return client
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def fill(client: Any, root: Path, n: int, endpoint: str, per_run: bool) -> None:
    """N run.json objects, and the day shards their pushes file them in."""
    (root / "template").mkdir()
    template = RunRecord.create(root / "template", node="FitOLS").data
    records = [run_json(template, i) for i in range(n)]
    started = time.perf_counter()
    client.create_bucket(Bucket=BUCKET)
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda data: client.put_object(
                    Bucket=BUCKET, Key=f"{PREFIX}/{data['key']}/run.json", Body=json.dumps(data, indent=1).encode()
                ),
                records,
            )
        )
    print(f"  (put {n} run.json objects in {time.perf_counter() - started:.1f} s)", flush=True)
    remote = make_remote(machine(root, "pusher", endpoint))
    assert remote is not None
    started = time.perf_counter()
    # per run: as N pushes do, one after another; else one read-modify-write per day shard
    filed = sum(index_pushed(remote, [data]) for data in records) if per_run else index_pushed(remote, records)
    shards = sum(1 for _ in remote.list(SHARDS))
    how = "one push at a time" if per_run else "batched per shard"
    print(f"  (filed {filed} finished runs in {shards} day shards, {how}, in {time.perf_counter() - started:.1f} s)")


def machine(root: Path, name: str, endpoint: str) -> Config:
    storage = StorageConfig(backend="s3", bucket=BUCKET, prefix=PREFIX, endpoint_url=endpoint)
    return Config(local_path=root / name, project_root=root, storage=storage)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc; 0 elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def timed(func: Callable[[], int], n: int, server: int, cpu: list[tuple[float, float]] | None = None) -> float:
    client_cpu, server_cpu = time.process_time(), cpu_seconds(server)
    started = time.perf_counter()
    found = func()
    elapsed = time.perf_counter() - started
    assert found == n, (found, n)
    if cpu is not None:
        cpu.append((time.process_time() - client_cpu, cpu_seconds(server) - server_cpu))
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--sequential-reps", type=int, default=0, help="repetitions of the one-GET-at-a-time peer")
    parser.add_argument("--per-run-index", action="store_true", help="file the shards one run at a time")
    options = parser.parse_args()
    n, reps, seq_reps = options.runs, options.reps, options.sequential_reps
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"bench_remote_ls: {n} runs, {reps} reps, {platform.node()}, {os.cpu_count()} CPUs, load {load:.1f}")
    server, endpoint = start_moto()
    first, old, seq = "first, pushed runs", "never-indexed (old path)", "never-indexed, sequential"
    times: dict[str, list[float]] = {first: [], old: [], seq: [], "warm": [], "shared index": []}
    cpu: dict[str, list[tuple[float, float]]] = {first: [], old: []}
    workers = listing.FETCH_WORKERS
    try:
        with tempfile.TemporaryDirectory(prefix="bench_remote_ls-") as tmp:
            root = Path(tmp)
            client = client_for(endpoint)
            fill(client, root, n, endpoint, options.per_run_index)

            def count(config: Config, refresh: bool) -> int:
                return len(list_runs(config, remote=True, refresh=refresh))

            for rep in range(reps):
                kinds = [first, old, seq] if rep < seq_reps else [first, old]
                for kind in kinds if rep % 2 == 0 else kinds[::-1]:
                    listing.FETCH_WORKERS = 1 if kind == seq else workers
                    config = machine(root, f"m{rep}-{kinds.index(kind)}", endpoint)
                    if kind == first:  # nobody listed before: no shared index, only the shards
                        client.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/{listing.SHARED_INDEX}")
                    timing = cpu.get(kind)
                    times[kind].append(timed(partial(count, config, kind != first), n, server.pid, timing))
                listing.FETCH_WORKERS = workers
                config = machine(root, f"m{rep}-0", endpoint)
                times["warm"].append(timed(partial(count, config, False), n, server.pid))
                new = machine(root, f"new{rep}", endpoint)  # the shared index the old path left
                times["shared index"].append(timed(partial(count, new, False), n, server.pid))
                print(f"  rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items() if v), flush=True)
    finally:
        server.terminate()
        server.wait()
    medians = {k: statistics.median(v) for k, v in times.items() if v}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"\n`ls --remote` of {n} runs (moto S3 server in its own process; load {load:.1f}), medians:")
    for kind, values in times.items():
        if values:
            print(
                f"  {kind:<26} {medians[kind]:7.2f} s   (min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"
            )
    print(f"  first listing: pushed runs are {medians[old] / medians[first]:.1f}x faster than never-indexed ones")
    if seq in medians:
        print(f"  never-indexed: parallel is {medians[seq] / medians[old]:.1f}x faster than one GET at a time")
    for kind, pairs in cpu.items():
        client_s, server_s = (statistics.median(p[i] for p in pairs) for i in (0, 1))
        print(f"  CPU, {kind}: client {client_s:.2f} s, moto server {server_s:.2f} s")


if __name__ == "__main__":
    main()

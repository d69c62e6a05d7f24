"""The first `ls --remote` of never-indexed runs: parallel run.json reads vs one at a time.

    python benchmarks/bench_remote_ls.py [--runs 10000] [--reps 5] [--sequential-reps N]

Puts N valid run.json objects (a real RunRecord as the template; 1 in 20 still running) into a
bucket of a moto S3 server running in its own process (`python -m moto.server`, the server
tests/s3_fixtures.py starts in-process: here the listing must not share the server's GIL, as it
would not with real S3), then times `list_runs(config, remote=True)`, as `ls --remote` does:

* cold, parallel: a new machine (empty local_path) and `--refresh` (neither the local nor the
  shared index is read), so every run.json is fetched with the listing's thread pool;
* cold, sequential: the same with one fetch at a time (the peer: what one GET per run costs);
* warm: the same machine again (its local index: only running runs are fetched);
* shared index: another new machine without `--refresh` (the index the first listing shared).

Cold parallel and cold sequential alternate; each figure is the median of its repetitions (the
spread is printed). Goals (issue 17): cold under 10 s, later listings under 5 s, for 10,000 runs.
"""

from __future__ import annotations

import argparse
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
from pathlib import Path
from typing import Any

from phd_flow import Config
from phd_flow.config import StorageConfig
from phd_flow.run.record import RunRecord
from phd_flow.runs import listing
from phd_flow.runs.query import list_runs

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
BUCKET, PREFIX = "bench", "proj"


def run_json(template: dict[str, Any], i: int) -> tuple[str, bytes]:
    began = datetime(2026, 1, 1, tzinfo=timezone.utc) + timedelta(minutes=7 * i)
    key = f"FitOLS_{began.strftime('%Y-%m-%dT%H-%M-%S.%fZ')}_{i:08d}"
    running = i % 20 == 19
    data = {
        **template,
        "key": key,
        "status": "running" if running else "completed",
        "started_at": began.isoformat(),
        "ended_at": None if running else (began + timedelta(seconds=30)).isoformat(),
        "heartbeat_at": (began + timedelta(seconds=30)).isoformat(),
        "args": {"dataset": "data/diabetes.csv", "target": "target", "seed": i % 50},
    }
    import json

    return key, json.dumps(data, indent=1).encode()


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


def fill(client: Any, root: Path, n: int) -> None:
    (root / "template").mkdir()
    template = RunRecord.create(root / "template", node="FitOLS").data
    started = time.perf_counter()
    client.create_bucket(Bucket=BUCKET)
    with ThreadPoolExecutor(16) as pool:
        list(
            pool.map(
                lambda item: client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{item[0]}/run.json", Body=item[1]),
                (run_json(template, i) for i in range(n)),
            )
        )
    print(f"  (put {n} run.json objects in {time.perf_counter() - started:.1f} s)", flush=True)


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
    parser.add_argument(
        "--sequential-reps", type=int, default=None, help="repetitions of the slow sequential peer (default: --reps)"
    )
    options = parser.parse_args()
    n, reps = options.runs, options.reps
    seq_reps = reps if options.sequential_reps is None else options.sequential_reps
    print(f"bench_remote_ls: {n} runs, {reps} reps ({seq_reps} sequential), {platform.node()}, {os.cpu_count()} CPUs")
    server, endpoint = start_moto()
    times: dict[str, list[float]] = {"cold, parallel": [], "cold, sequential": [], "warm": [], "shared index": []}
    workers = listing.FETCH_WORKERS
    cpu: list[tuple[float, float]] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench_remote_ls-") as tmp:
            root = Path(tmp)
            fill(client_for(endpoint), root, n)

            def count(config: Config, refresh: bool) -> int:
                return len(list_runs(config, remote=True, refresh=refresh))

            for rep in range(reps):
                order = ["parallel", "sequential"] if rep % 2 == 0 else ["sequential", "parallel"]
                for kind in order:
                    if kind == "sequential" and rep >= seq_reps:
                        continue
                    listing.FETCH_WORKERS = workers if kind == "parallel" else 1
                    config = machine(root, f"m{rep}{kind}", endpoint)
                    cold_cpu = cpu if kind == "parallel" else None
                    times[f"cold, {kind}"].append(timed(lambda c=config: count(c, True), n, server.pid, cold_cpu))
                listing.FETCH_WORKERS = workers
                config = machine(root, f"m{rep}parallel", endpoint)
                times["warm"].append(timed(lambda c=config: count(c, False), n, server.pid))
                new = machine(root, f"new{rep}", endpoint)
                times["shared index"].append(timed(lambda c=new: count(c, False), n, server.pid))
                print(f"  rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items() if v), flush=True)
    finally:
        server.terminate()
        server.wait()
    medians = {k: statistics.median(v) for k, v in times.items() if v}
    print(f"\n`ls --remote` of {n} runs (moto S3 server in its own process), medians:")
    for kind, values in times.items():
        if values:
            print(
                f"  {kind:<17} {medians[kind]:7.2f} s   (min {min(values):.2f}, max {max(values):.2f}, n={len(values)})"
            )
    if "cold, sequential" in medians:
        ratio = medians["cold, sequential"] / medians["cold, parallel"]
        print(f"  cold: parallel is {ratio:.1f}x faster than one GET at a time")
    client_ms = statistics.median(c for c, _ in cpu) / n * 1000
    server_ms = statistics.median(s for _, s in cpu) / n * 1000
    print(
        f"  CPU per run.json GET (cold, parallel): client {client_ms:.2f} ms, moto server {server_ms:.2f} ms; "
        f"the server alone needs {server_ms * n / 1000:.1f} s of one core for {n} GETs"
    )


if __name__ == "__main__":
    main()

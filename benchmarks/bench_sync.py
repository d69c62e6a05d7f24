"""Sync to S3: phd_flow (in-process and through its CLI) vs ``aws s3 sync``, on one moto server.

    python benchmarks/bench_sync.py [--small 1000] [--large-mb 200] [--reps 5] [--server process|thread]

Two run directories, many small files (``--small`` x 1 KB) and one large file (``--large-mb``),
each a first sync into an empty prefix and then an unchanged re-sync. Three contenders, run in
alternating order in every repetition (``--reps``), each into its own prefix of one bucket:

* ``phd_flow upload``: ``Storage.upload`` in this process (the boto3 client is built inside the
  timing; the local manifest is deleted first, so a first sync hashes every file);
* ``phd_flow sync KEY``: the CLI a user runs (``python -m bench_project sync KEY``, a
  subprocess, start-up included like ``aws``'s). It does a bit more than sending files: it also
  records the sync in the run's run.json and sends that file again;
* ``aws s3 sync``: the AWS CLI, as a subprocess.

The work differs on an unchanged re-sync, and the table says so: phd_flow trusts its remote
manifest (one GET: it is written after the files it lists) while ``aws s3 sync`` lists the
bucket and compares sizes and times. Printed: medians with the spread (min-max), the ratio of
each contender to ``phd_flow sync KEY`` (CLI vs CLI), and each CLI's bare start-up.

``--server process`` (default) runs ``moto_server`` in its own process, so the server does not
compete with phd_flow's transfer threads for this interpreter's GIL; ``--server thread`` uses
moto's ``ThreadedMotoServer`` in this process (which handicaps phd_flow, not the CLIs).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from reps import ratio, spread

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
BIN = Path(sys.executable).parent
KEYS = {"small": "Bench_2026-01-01T00-00-00.000000Z_small001", "large": "Bench_2026-01-01T00-00-00.000000Z_large001"}
CONTENDERS = ["phd_flow upload (in-process)", "phd_flow sync KEY (CLI)", "aws s3 sync (CLI)"]


@contextmanager
def moto(kind: str) -> Iterator[str]:
    """A moto S3 server on 127.0.0.1; yields its endpoint URL."""
    if kind == "thread":
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def make_data(local_path: Path, small: int, large_mb: int) -> None:
    """Two completed run directories below ``local_path``: ``small`` 1 KB files, one ``large_mb`` file."""
    from phd_flow.run.record import RunRecord

    for key in KEYS.values():
        (local_path / key).mkdir(parents=True)
        RunRecord.create(local_path / key, key=key, node="Bench", status="completed", mlflow={"state": "disabled"})
    for i in range(small):
        path = local_path / KEYS["small"] / f"d{i // 100:02d}" / f"f{i:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(1024))
    with open(local_path / KEYS["large"] / "big.bin", "wb") as f:
        for _ in range(large_mb):
            f.write(os.urandom(1 << 20))


def make_project(root: Path, local_path: Path, endpoint: str, prefix: str) -> Path:
    """A package ``bench_project`` with phd_flow's CLI, and a config syncing into ``prefix``."""
    package = root / "bench_project"
    package.mkdir(exist_ok=True)
    (package / "__init__.py").write_text("")
    (package / "__main__.py").write_text("import phd_flow\nphd_flow.run_main('bench_project')\n")
    config = root / f"config-{prefix.replace('/', '-')}.toml"
    config.write_text(
        f'local_path = "{local_path}"\n[storage]\nbackend = "s3"\nbucket = "bench"\nprefix = "{prefix}"\n'
        f'endpoint_url = "{endpoint}"\n[mlflow]\nenabled = false\n'
    )
    return config


def run(argv: list[str], cwd: Path | None = None) -> None:
    proc = subprocess.run(argv, cwd=cwd, env={**os.environ, **CREDENTIALS}, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(argv[:4])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def forget_manifest(run_dir: Path) -> None:
    """Delete phd_flow's local manifest and journal: the next push hashes every file again."""
    from phd_flow.storage.engine import JOURNAL, MANIFEST

    for name in (MANIFEST, JOURNAL):
        (run_dir / name).unlink(missing_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", type=int, default=1000, help="number of 1 KB files")
    parser.add_argument("--large-mb", type=int, default=200, help="size of the large file in MB")
    parser.add_argument("--reps", type=int, default=5, help="alternated repetitions (>= 5 for a median)")
    parser.add_argument("--server", choices=["process", "thread"], default="process")
    opts = parser.parse_args()
    os.environ.update(CREDENTIALS)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    import boto3

    from phd_flow.config import Config
    from phd_flow.storage import Storage
    from phd_flow.storage.s3 import S3Remote

    root = Path(tempfile.mkdtemp(prefix="bench_sync-"))
    local_path = root / "data_storage"
    times: dict[tuple[str, str, str], list[float]] = {}
    startup: dict[str, list[float]] = {"aws --version": [], "python -m bench_project --help": []}
    try:
        make_data(local_path, opts.small, opts.large_mb)
        with moto(opts.server) as endpoint:
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")

            def ours(case: str, prefix: str) -> None:
                remote = S3Remote("bench", prefix, endpoint_url=endpoint)
                Storage(Config(local_path=local_path, project_root=root), remote).upload(KEYS[case])
                remote.close()

            def cli(case: str, prefix: str) -> None:
                config = make_project(root, local_path, endpoint, prefix)
                run([sys.executable, "-m", "bench_project", "--config", str(config), "sync", KEYS[case]], cwd=root)

            def aws(case: str, prefix: str) -> None:
                target = f"s3://bench/{prefix}/{KEYS[case]}"
                run([str(BIN / "aws"), "s3", "sync", str(local_path / KEYS[case]), target, "--exclude", ".phd_flow-*",
                     "--endpoint-url", endpoint, "--only-show-errors"])  # fmt: skip

            contenders = dict(zip(CONTENDERS, (ours, cli, aws), strict=True))
            warm = make_project(root, local_path, endpoint, "warm-up")
            help_argv = [sys.executable, "-m", "bench_project", "--config", str(warm), "--help"]
            for rep in range(opts.reps):
                startup["aws --version"].append(timed(lambda: run([str(BIN / "aws"), "--version"])))
                startup["python -m bench_project --help"].append(timed(lambda: run(help_argv, cwd=root)))
                for case in KEYS:
                    for name in CONTENDERS if rep % 2 == 0 else CONTENDERS[::-1]:
                        prefix = f"{name.split()[0]}-{name.split()[1]}/r{rep}"
                        forget_manifest(local_path / KEYS[case])
                        for phase in ("first sync", "unchanged re-sync"):
                            seconds = timed(lambda: contenders[name](case, prefix))  # noqa: B023
                            times.setdefault((case, phase, name), []).append(seconds)
                print(f"repetition {rep + 1}/{opts.reps} done", file=sys.stderr, flush=True)
        report(times, startup, opts)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def report(
    times: dict[tuple[str, str, str], list[float]], startup: dict[str, list[float]], opts: argparse.Namespace
) -> None:
    labels = {"small": f"{opts.small} x 1 KB", "large": f"1 x {opts.large_mb} MB"}
    print(f"{opts.reps} alternated repetitions, moto server: {opts.server}; median (min-max)")
    for name, values in startup.items():
        print(f"  start-up alone, {name}: {spread(values)}")
    print(f"{'case':<32} " + " ".join(f"{n:>30}" for n in CONTENDERS) + "   aws / phd_flow CLI")
    for case in ("small", "large"):
        for phase in ("first sync", "unchanged re-sync"):
            row = [times[(case, phase, n)] for n in CONTENDERS]
            cells = " ".join(f"{spread(v):>30}" for v in row)
            print(f"{labels[case] + ', ' + phase:<32} {cells}   {ratio(row[2], row[1]):>8}")
    print(
        "work on an unchanged re-sync: phd_flow upload = 1 GET of the remote manifest (trusted); "
        "phd_flow sync KEY = the same, then records the sync in run.json and sends run.json again; "
        "aws s3 sync = lists the prefix and compares size and mtime of every file"
    )


if __name__ == "__main__":
    main()

"""Sync to S3: phd_flow's ``Storage.upload`` vs ``aws s3 sync``, against one moto server.

    python benchmarks/bench_sync.py [--small 1000] [--large-mb 200] [--server process|thread]

Four cases, each a first sync into an empty prefix and then an unchanged re-sync: many small
files (``--small`` x 1 KB) and one large file (``--large-mb``). Both tools talk to the same
moto server with the same fake credentials, into different prefixes of one bucket. phd_flow is
timed in-process (``Storage.upload``, including building the boto3 client); ``aws`` is timed as
the subprocess a user would run, and its bare start-up (``aws --version``) is printed too.

``--server process`` (default) runs ``moto_server`` in its own process, so the server does not
compete with phd_flow's transfer threads for this interpreter's GIL; ``--server thread`` uses
moto's ``ThreadedMotoServer`` in this process (which handicaps phd_flow, not the aws CLI).
"""

from __future__ import annotations

import argparse
import functools
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

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}
BIN = Path(sys.executable).parent


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


def make_data(root: Path, small: int, large_mb: int) -> None:
    """``root/small/`` with ``small`` 1 KB files, ``root/large/`` with one ``large_mb`` file."""
    for i in range(small):
        path = root / "small" / f"d{i // 100:02d}" / f"f{i:05d}.bin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(1024))
    (root / "large").mkdir()
    with open(root / "large" / "big.bin", "wb") as f:
        for _ in range(large_mb):
            f.write(os.urandom(1 << 20))


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def aws(endpoint: str, *args: str) -> None:
    subprocess.run(
        [str(BIN / "aws"), *args, "--endpoint-url", endpoint, "--only-show-errors"],
        env={**os.environ, **CREDENTIALS},
        check=True,
        stdout=subprocess.DEVNULL,
    )


def phd_flow_upload(root: Path, endpoint: str, bucket: str, name: str) -> tuple[float, str]:
    """Time one ``Storage.upload(name)`` with a fresh remote (client built inside the timing)."""
    from phd_flow.config import Config
    from phd_flow.storage import Storage
    from phd_flow.storage.s3 import S3Remote

    start = time.perf_counter()
    remote = S3Remote(bucket, "phd_flow", endpoint_url=endpoint)
    report = Storage(Config(local_path=root, project_root=root), remote).upload(name)
    seconds = time.perf_counter() - start
    remote.close()
    return seconds, str(report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", type=int, default=1000, help="number of 1 KB files")
    parser.add_argument("--large-mb", type=int, default=200, help="size of the large file in MB")
    parser.add_argument("--server", choices=["process", "thread"], default="process")
    opts = parser.parse_args()
    os.environ.update(CREDENTIALS)
    import boto3

    root = Path(tempfile.mkdtemp(prefix="bench_sync-"))
    try:
        make_data(root, opts.small, opts.large_mb)
        startup = timed(lambda: subprocess.run([str(BIN / "aws"), "--version"], capture_output=True, check=True))
        print(f"aws CLI start-up alone: {startup:.2f} s   (moto server: {opts.server})")
        print(f"{'case':<34} {'phd_flow':>9} {'aws s3 sync':>12} {'speed-up':>9}")
        with moto(opts.server) as endpoint:
            bucket = "bench"
            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
            cases = [("small", f"{opts.small} x 1 KB"), ("large", f"1 x {opts.large_mb} MB")]
            for name, label in cases:
                for phase in ("first sync", "unchanged re-sync"):
                    ours, report = phd_flow_upload(root, endpoint, bucket, name)
                    target = f"s3://{bucket}/aws/{name}"
                    theirs = timed(functools.partial(aws, endpoint, "s3", "sync", str(root / name), target))
                    print(
                        f"{label + ', ' + phase:<34} {ours:>8.2f}s {theirs:>11.2f}s {theirs / ours:>8.1f}x   [{report}]"
                    )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

"""Storage faults (issue 8, "Faults survived"): a store that is down, dies mid-sync, answers
errors for a while, or hands back corrupted bytes. Nothing local is lost, the run is honestly
"not synced", a later sync sends exactly what is missing, and the remote verifies byte-identical.

The S3 stand-in is the session's moto server; faults come from :class:`FaultProxy`, a small
HTTP reverse proxy in front of it that can answer 503 SlowDown, drop connections, or stop
listening altogether (and restart on the same port, over the same moto state). B2 faults are
injected into b2sdk's RawSimulator through its ``upload_errors`` queue.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import http.client
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from b2sdk.v2 import exception as b2_exc

from phd_flow import Node, node
from phd_flow.config import Config, MlflowConfig, StorageConfig
from phd_flow.errors import ChecksumMismatchError, StorageError, StorageUnavailableError
from phd_flow.project import Project
from phd_flow.run.record import RunRecord
from phd_flow.runs.catchup import sync_one
from phd_flow.storage.engine import JOURNAL, LOCKS, MANIFEST, parse_manifest
from phd_flow.storage.facade import Storage
from phd_flow.storage.s3 import S3Remote
from phd_flow.testing import storage_for, write_tree
from phd_flow.testing.contract import read_tree
from tests import s3_fixtures
from tests.conftest import cli, write_config
from tests.fault_proxy import FaultProxy, FaultRule
from tests.s3_fixtures import S3Server, closed_port_url, make_bucket
from tests.test_storage_b2 import Simulated

moto_server = s3_fixtures.moto_server  # the session's S3 server fixture

PREFIX = "proj"


@pytest.fixture
def proxies(moto_server: S3Server) -> Iterator[Callable[[FaultRule], FaultProxy]]:
    """Start fault proxies in front of the session's moto server; all are stopped afterwards."""
    started: list[FaultProxy] = []

    def make(rule: FaultRule) -> FaultProxy:
        proxy = FaultProxy(moto_server.endpoint_url, rule).start()
        started.append(proxy)
        return proxy

    yield make
    for proxy in started:
        proxy.stop()


# --- helpers ---------------------------------------------------------------------------------------


def sha256_tree(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` (relative POSIX path -> hex); the sync engine's own
    bookkeeping (manifest, push journal) and a run's lock files (``.phd_flow-*.lock``) left out."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in (MANIFEST, JOURNAL) and not p.name.endswith(".lock")
    }


def remote_objects(server: S3Server, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object below ``prefix/`` read straight from moto (no proxy): relative key -> bytes."""
    client = server.client()
    out: dict[str, bytes] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            out[obj["Key"].removeprefix(f"{prefix}/")] = body
    return out


def assert_remote_identical(server: S3Server, bucket: str, prefix: str, local: Path) -> None:
    """The remote copy of ``local`` (at ``bucket/prefix``) has every file byte-identical, no
    extras, and a manifest that vouches for exactly those bytes."""
    objects = remote_objects(server, bucket, prefix)
    manifest = parse_manifest(objects.pop(MANIFEST, None))
    remote = {rel: hashlib.sha256(data).hexdigest() for rel, data in objects.items()}
    assert remote == sha256_tree(local)
    assert {rel: e.sha256 for rel, e in manifest.items()} == remote


def small_files(count: int) -> dict[str, bytes]:
    """``count`` distinct small files in a few subdirectories."""
    return {f"parts/{i % 7}/part-{i:05d}.txt": f"part {i}\n".encode() * (1 + i % 5) for i in range(count)}


def s3_storage(endpoint: str, bucket: str, local_path: Path, *, retries: int = 3) -> Storage:
    """A Storage over ``local_path`` mirrored into ``s3://bucket/proj`` at ``endpoint``."""
    return storage_for(S3Remote(bucket, PREFIX, endpoint_url=endpoint), local_path, retries=retries)


# --- storage down for the whole run ----------------------------------------------------------------


@dataclasses.dataclass
class PartsArgs(node.Args):
    files: int = 50


class WriteParts(Node[PartsArgs, int]):
    """Write ``files`` small files into the run directory."""

    def _run(self) -> int:
        write_tree(self.output_dir, small_files(self.args.files))
        self.log_metric("files", self.args.files)
        return self.args.files


def test_store_down_for_the_whole_run_then_sync_is_byte_identical(moto_server: S3Server, tmp_path: Path) -> None:
    """(The CLI flavour, exit code 3 and `sync`, is tests/test_storage_e2e_s3.py; this one checks
    every byte of the catch-up.)"""
    bucket = make_bucket(moto_server)

    def config(endpoint: str) -> Config:
        storage = StorageConfig(backend="s3", bucket=bucket, prefix=PREFIX, endpoint_url=endpoint, retries=2)
        return Config(
            local_path=tmp_path / "local", project_root=tmp_path, storage=storage, mlflow=MlflowConfig(enabled=False)
        )

    run = WriteParts(PartsArgs(files=50), config=config(closed_port_url()))
    assert run.run() == 50
    record = RunRecord.load(run.output_dir)
    assert record.status == "completed" and record.data["sync"]["state"] == "not_synced"
    assert "Cannot reach" in record.data["sync"]["error"]
    before = sha256_tree(run.output_dir)
    assert len(before) > 50 and remote_objects(moto_server, bucket, PREFIX) == {}

    assert sync_one(Project.of(config(moto_server.endpoint_url)), record) is True
    assert RunRecord.load(run.output_dir).data["sync"]["state"] == "synced"
    assert_remote_identical(moto_server, bucket, f"{PREFIX}/{run.key}", run.output_dir)
    assert {k: v for k, v in sha256_tree(run.output_dir).items() if k != "run.json"} == {
        k: v for k, v in before.items() if k != "run.json"
    }


# --- storage going down in the middle of a sync ----------------------------------------------------


def test_a_downed_proxy_forwards_nothing_even_on_a_connection_accepted_before_it_stops(
    moto_server: S3Server, proxies: Callable[[FaultRule], FaultProxy], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fault proxy itself: once a request took it down, a new connection accepted while its
    stop() is still on its way (late on a busy machine: the test's store then 'died' after
    more files than requests arrived) is dropped, not forwarded."""
    bucket = make_bucket(moto_server)
    proxy = proxies(lambda n: "down" if n == 2 else None)
    real_stop, go = proxy.stop, threading.Event()
    monkeypatch.setattr(proxy, "stop", lambda: (go.wait(10), real_stop()))

    def put(name: str) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
        with contextlib.suppress(http.client.HTTPException, OSError):
            conn.request("PUT", f"/{bucket}/{name}", body=b"x", headers={"Content-Length": "1"})
            conn.getresponse().read()
        conn.close()

    put("forwarded")
    put("down")  # the store goes down on it
    put("late")  # a new connection, accepted before stop() closes the listener
    go.set()
    assert proxy.stopped.wait(10)
    listed = moto_server.client().list_objects_v2(Bucket=bucket).get("Contents", [])
    assert [obj["Key"] for obj in listed] == ["forwarded"]


@pytest.mark.slow
def test_store_dies_mid_sync_then_resync_sends_exactly_the_missing_files(
    moto_server: S3Server, proxies: Callable[[FaultRule], FaultProxy], tmp_path: Path
) -> None:
    bucket = make_bucket(moto_server)
    proxy = proxies(lambda n: "down" if n == 80 else None)
    storage = s3_storage(proxy.url, bucket, tmp_path / "local", retries=2)
    files = small_files(300)
    write_tree(storage.path("run_1"), files)
    before = sha256_tree(storage.path("run_1"))

    with pytest.raises(StorageUnavailableError, match="Cannot reach"):
        storage.upload("run_1")
    assert proxy.stopped.is_set()
    assert sha256_tree(storage.path("run_1")) == before, "nothing local may change"
    arrived = remote_objects(moto_server, bucket, f"{PREFIX}/run_1")
    assert MANIFEST not in arrived, "the remote manifest must not vouch for an incomplete upload"
    # the push's turn marker could not be removed (the store is down): the next push removes it
    markers = [rel for rel in arrived if rel.startswith(f"{LOCKS}/")]
    assert len(markers) == 1, arrived.keys()
    del arrived[markers[0]]
    # the store died at request 80 (the first few read the manifest, took the turn and listed):
    # some files arrived, not all; how many depends on botocore's requests per upload
    assert 0 < len(arrived) < len(files) and len(arrived) <= 80 - 6
    for rel, data in arrived.items():
        assert data == files[rel]
    journal = json.loads(storage.path(f"run_1/{JOURNAL}").read_text())
    assert sorted(journal["files"]) == sorted(arrived)  # what the next push may skip

    proxy.start()  # the store is back, same port, same state
    elsewhere = s3_storage(moto_server.endpoint_url, make_bucket(moto_server), storage.local_path)
    assert len(elsewhere.upload("run_1").transferred) == len(files), "the journal is for one remote only"
    assert storage.path(f"run_1/{JOURNAL}").exists()
    report = storage.upload("run_1")
    missing = sorted(set(files) - set(arrived))
    assert sorted(report.transferred) == missing
    assert report.skipped == len(arrived)
    assert_remote_identical(moto_server, bucket, f"{PREFIX}/run_1", storage.path("run_1"))
    assert not storage.path(f"run_1/{JOURNAL}").exists()
    assert storage.upload("run_1").transferred == []


# --- a store answering errors for a while ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("rule", "files"),
    [
        # More 503s in a row than botocore's own 4 attempts (S3Remote: 3 retries): only the
        # sync engine's retry with backoff gets past them.
        pytest.param(lambda n: 503 if n <= 6 else None, 40, id="first-6-requests"),
        pytest.param(lambda n: 503 if n % 3 == 0 else None, 30, id="every-3rd-request"),
    ],
)
def test_s3_slow_down_errors_are_retried_and_contents_verify(
    moto_server: S3Server,
    proxies: Callable[[FaultRule], FaultProxy],
    tmp_path: Path,
    rule: FaultRule,
    files: int,
) -> None:
    bucket = make_bucket(moto_server)
    proxy = proxies(rule)
    storage = s3_storage(proxy.url, bucket, tmp_path / "local", retries=3)
    write_tree(storage.path("run_1"), small_files(files))
    report = storage.upload("run_1")
    assert len(report.transferred) == files
    assert proxy.faults >= 5
    assert_remote_identical(moto_server, bucket, f"{PREFIX}/run_1", storage.path("run_1"))

    second = s3_storage(proxy.url, bucket, tmp_path / "machine2", retries=3)
    assert len(second.download_report("run_1").transferred) == files
    assert sha256_tree(second.path("run_1")) == sha256_tree(storage.path("run_1"))


@pytest.mark.slow
def test_s3_that_keeps_failing_leaves_the_run_not_synced_and_local_files_intact(
    moto_server: S3Server, proxies: Callable[[FaultRule], FaultProxy], tmp_path: Path
) -> None:
    bucket = make_bucket(moto_server)
    proxy = proxies(lambda n: 503)
    storage = s3_storage(proxy.url, bucket, tmp_path / "local", retries=1)
    write_tree(storage.path("run_1"), small_files(10))
    before = sha256_tree(storage.path("run_1"))
    with pytest.raises(StorageUnavailableError, match="SlowDown"):
        storage.upload("run_1")
    assert sha256_tree(storage.path("run_1")) == before
    assert remote_objects(moto_server, bucket, PREFIX) == {}


def test_b2_transient_upload_errors_are_retried(tmp_path: Path) -> None:
    b2 = Simulated()
    storage = storage_for(b2.remote(), tmp_path / "local", workers=1, retries=3)
    files = {f"f{i:02d}.txt": f"file {i}\n".encode() for i in range(20)}  # < 200 B: simple uploads
    write_tree(storage.path("run_1"), files)
    # Two more errors than b2sdk's own 5 upload attempts, then a dropped connection.
    b2.raw.upload_errors = [b2_exc.ServiceError("503 service_unavailable") for _ in range(7)]
    b2.raw.upload_errors.append(b2_exc.B2ConnectionError("connection reset"))
    report = storage.upload("run_1")
    assert b2.raw.upload_errors == [] and len(report.transferred) == len(files)

    second = storage_for(b2.remote(), tmp_path / "machine2")
    second.download("run_1")
    assert sha256_tree(second.path("run_1")) == sha256_tree(storage.path("run_1"))


def test_b2_permanent_failure_is_unavailable_and_nothing_local_is_deleted(tmp_path: Path) -> None:
    b2 = Simulated()
    storage = storage_for(b2.remote(), tmp_path / "local", workers=1, retries=2)
    write_tree(storage.path("run_1"), {"a.txt": b"a", "sub/b.txt": b"b"})
    before = sha256_tree(storage.path("run_1"))
    b2.raw.upload_errors = [b2_exc.ServiceError("503 service_unavailable") for _ in range(1000)]
    with pytest.raises(StorageUnavailableError, match="B2 is unavailable"):
        storage.upload("run_1")
    assert sha256_tree(storage.path("run_1")) == before
    assert b2.names() == []

    b2.raw.upload_errors = []  # the store recovers
    assert sorted(storage.upload("run_1").transferred) == ["a.txt", "sub/b.txt"]


# --- a corrupted object is caught on download ------------------------------------------------------


def _upload_and_corrupt(server: S3Server, bucket: str, local_path: Path) -> tuple[Storage, str, bytes]:
    """Upload a run and overwrite one of its objects with different bytes of the same size."""
    storage = s3_storage(server.endpoint_url, bucket, local_path, retries=2)
    write_tree(storage.path("run_1"), {**small_files(20), "results.pickle": bytes(range(256)) * 4})
    storage.upload("run_1")
    victim = "results.pickle"
    good = storage.path(f"run_1/{victim}").read_bytes()
    bad = bytes(b ^ 0xFF for b in good)
    assert len(bad) == len(good) and bad != good
    server.client().put_object(Bucket=bucket, Key=f"{PREFIX}/run_1/{victim}", Body=bad)
    return storage, victim, good


def test_corrupted_object_is_detected_and_not_left_in_place(moto_server: S3Server, tmp_path: Path) -> None:
    bucket = make_bucket(moto_server)
    _storage, victim, _good = _upload_and_corrupt(moto_server, bucket, tmp_path / "machine1")
    second = s3_storage(moto_server.endpoint_url, bucket, tmp_path / "machine2", retries=2)
    with pytest.raises(ChecksumMismatchError, match="sha256 does not match"):
        second.download("run_1")
    target = second.path(f"run_1/{victim}")
    assert not target.exists(), "a file that failed verification must not look downloaded"
    assert not list(second.path("run_1").rglob("*.phd_flow-part"))
    with pytest.raises(ChecksumMismatchError):
        second.download(f"run_1/{victim}")  # one file, verified against the run's manifest
    assert not target.exists()


@pytest.mark.slow
def test_cli_download_of_a_corrupted_run_fails_clearly(moto_server: S3Server, project: Path, tmp_path: Path) -> None:
    bucket = make_bucket(moto_server)
    _storage, victim, _good = _upload_and_corrupt(moto_server, bucket, tmp_path / "machine1")
    write_config(
        project,
        'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nenabled = false\n'
        f'[storage]\nbackend = "s3"\nbucket = "{bucket}"\nprefix = "{PREFIX}"\n'
        f'endpoint_url = "{moto_server.endpoint_url}"\nretries = 2\n',
    )
    proc = cli(project, "download", "run_1", env=moto_server.env())
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"run_1/{victim}" in proc.stderr and "sha256 does not match" in proc.stderr, proc.stderr
    assert not (project / "data_storage" / "run_1" / victim).exists()
    manifest = project / "data_storage" / "run_1" / MANIFEST
    assert not manifest.exists() or victim not in json.loads(manifest.read_text())["files"]


def test_fault_proxy_really_faults(moto_server: S3Server, proxies: Callable[[FaultRule], FaultProxy]) -> None:
    """The stand-in itself: forwards, answers 503, and refuses connections once down."""
    bucket = make_bucket(moto_server)
    proxy = proxies(lambda n: 503 if n == 2 else ("down" if n == 4 else None))
    remote = S3Remote(bucket, "p", endpoint_url=proxy.url)
    remote.write_bytes("x.txt", b"forwarded")
    assert remote_objects(moto_server, bucket, "p") == {"x.txt": b"forwarded"}
    try:
        remote.write_bytes("y.txt", b"retried by botocore after one 503")
        with pytest.raises(StorageError):
            remote.write_bytes("z.txt", b"never")
        assert proxy.stopped.wait(5)
        assert set(remote_objects(moto_server, bucket, "p")) == {"x.txt", "y.txt"}
    finally:
        remote.close()


def test_a_file_deleted_between_scan_and_upload_is_skipped_and_private_files_never_go(tmp_path: Path) -> None:
    """Issue 14 row 1: a live run's files come and go (temp files of atomic writes, lock files);
    a push of its directory skips what vanished and never sends phd_flow's own ``.phd_flow-*``."""
    from phd_flow.storage.engine import push
    from phd_flow.storage.local import LocalRemote

    class Racing(LocalRemote):
        def list(self, prefix: str = "") -> Iterator[Any]:
            if prefix == "run_1":  # the push's listing: after the scan, before uploads
                (run_dir / "gone.txt").unlink()
                (run_dir / ".phd_flow-run.json.123.tmp").write_text("half a record")
            return super().list(prefix)

    run_dir = tmp_path / "local" / "run_1"
    write_tree(run_dir, {"kept.txt": b"kept", "gone.txt": b"gone", ".phd_flow-run.lock": b"pid 1 on h"})
    remote = Racing(tmp_path / "remote")
    report = push(remote, run_dir, "run_1")
    arrived = sorted(p.name for p in (tmp_path / "remote" / "run_1").iterdir())
    assert arrived == [MANIFEST, "kept.txt"], arrived
    assert report.transferred == ["kept.txt"] and report.skipped == 1
    assert set(parse_manifest((tmp_path / "remote" / "run_1" / MANIFEST).read_bytes())) == {"kept.txt"}


# --- a push that died leaves its turn marker ------------------------------------------------------


def _marker(remote_root: Path, prefix: str, name: str, body: dict[str, Any]) -> Path:
    path = remote_root / prefix / LOCKS / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(body))
    return path


def test_a_marker_left_by_a_dead_push_on_this_host_is_removed_at_once(tmp_path: Path) -> None:
    import socket
    import subprocess
    import sys

    from phd_flow.storage.local import LocalRemote

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    left = _marker(
        tmp_path / "remote", "run_1", "00000000000000000001-dead", {"host": socket.gethostname(), "pid": pid}
    )
    storage = storage_for(LocalRemote(tmp_path / "remote"), tmp_path / "local")
    write_tree(storage.path("run_1"), {"a.txt": b"a"})
    assert storage.upload("run_1").transferred == ["a.txt"]  # no wait: its pid is gone
    assert not left.exists() and not (tmp_path / "remote" / "run_1" / LOCKS).exists()


def test_a_marker_whose_heartbeat_stopped_is_removed_after_the_stale_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from phd_flow.storage import engine
    from phd_flow.storage.local import LocalRemote

    monkeypatch.setattr(engine, "STALE_SECONDS", 1.0)
    left = _marker(
        tmp_path / "remote", "run_1", "00000000000000000001-gone", {"host": "elsewhere", "pid": 1, "beat": 3}
    )
    storage = storage_for(LocalRemote(tmp_path / "remote"), tmp_path / "local")
    write_tree(storage.path("run_1"), {"a.txt": b"a"})
    assert storage.upload("run_1").transferred == ["a.txt"]
    assert not left.exists()


def test_a_store_that_cannot_delete_gets_its_markers_released(tmp_path: Path) -> None:
    from phd_flow.storage.local import LocalRemote

    class NoDelete(LocalRemote):
        def delete(self, keys: list[str]) -> None:
            raise StorageError("this store cannot delete")

    first = storage_for(NoDelete(tmp_path / "remote"), tmp_path / "first")
    second = storage_for(NoDelete(tmp_path / "remote"), tmp_path / "second")
    write_tree(first.path("run_1"), {"a.txt": b"first"})
    write_tree(second.path("run_1"), {"a.txt": b"2nd!!"})
    first.upload("run_1")
    second.upload("run_1")  # does not wait for the first push's marker: it is released
    markers = list((tmp_path / "remote" / "run_1" / LOCKS).iterdir())
    assert len(markers) == 2 and all(json.loads(m.read_text())["released"] for m in markers)
    assert (tmp_path / "remote" / "run_1" / "a.txt").read_bytes() == b"2nd!!"
    storage_for(LocalRemote(tmp_path / "remote"), tmp_path / "third").download("run_1")
    assert read_tree(tmp_path / "third" / "run_1") == {"a.txt": b"2nd!!"}, "downloads never bring markers"

"""Runs are indexed when they are pushed: a new machine's ``ls --remote`` of pushed, finished
runs reads their day shards instead of one run.json per run (issue 17)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

import phd_flow
from phd_flow import Config, RunFailedError
from phd_flow.config import MlflowConfig, StorageConfig
from tests import s3_fixtures
from tests.nodes import Add, AddArgs, Fail, FailArgs
from tests.s3_fixtures import S3Server, make_bucket

moto_server = s3_fixtures.moto_server  # the session's S3 server fixture


class Bucket:
    """The remote both machines share: a folder (local backend) or a moto S3 bucket."""

    def __init__(self, kind: str, tmp_path: Path, server: S3Server | None) -> None:
        self.kind, self.server = kind, server
        self.folder = tmp_path / "shared"
        self.bucket = make_bucket(server) if server is not None else ""

    def config(self, root: Path, machine: str) -> Config:
        if self.server is not None:
            storage = StorageConfig(backend="s3", bucket=self.bucket, endpoint_url=self.server.endpoint_url)
        else:
            storage = StorageConfig(backend="local", remote=str(self.folder))
        return Config(local_path=root / machine, project_root=root, storage=storage, mlflow=MlflowConfig(enabled=False))

    def names(self) -> list[str]:
        if self.server is not None:
            pages = self.server.client().get_paginator("list_objects_v2").paginate(Bucket=self.bucket)
            return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))
        return sorted(p.relative_to(self.folder).as_posix() for p in self.folder.rglob("*") if p.is_file())

    def read(self, name: str) -> bytes:
        if self.server is not None:
            body: bytes = self.server.client().get_object(Bucket=self.bucket, Key=name)["Body"].read()
            return body
        return (self.folder / name).read_bytes()

    def write(self, name: str, data: bytes) -> None:
        if self.server is not None:
            self.server.client().put_object(Bucket=self.bucket, Key=name, Body=data)
        else:
            (self.folder / name).write_bytes(data)

    def hide_run_json(self, keys: list[str] | None = None) -> int:
        """Move run.json of these runs (all when None) aside: a listing that still shows them
        never read them. The run prefixes stay (their other files are there)."""
        hidden = 0
        for name in self.names():
            key, _, rest = name.partition("/")
            if rest == "run.json" and (keys is None or key in keys):
                data = self.read(name)
                self.write(f"{key}/hidden.json", data)
                if self.server is not None:
                    self.server.client().delete_object(Bucket=self.bucket, Key=name)
                else:
                    (self.folder / name).unlink()
                hidden += 1
        return hidden


@pytest.fixture(params=["local", "s3"])
def bucket(request: pytest.FixtureRequest, tmp_path: Path) -> Bucket:
    server = request.getfixturevalue("moto_server") if request.param == "s3" else None
    return Bucket(request.param, tmp_path, server)


def pushed_history(config: Config) -> list[str]:
    """Add a=1, Add a=2 (completed), Fail (failed), pushed by their own end; their keys."""
    keys = [run_add(config, 1), run_add(config, 2)]
    with pytest.raises(RunFailedError):
        Fail(FailArgs(), config=config).run()
    return [*keys, phd_flow.find_runs(node="Fail", config=config)[0].key]


def run_add(config: Config, a: int) -> str:
    node = Add(AddArgs(a=a), config=config)
    node.run()
    return str(node.key)


def shard_entries(bucket: Bucket) -> dict[str, Any]:
    entries: dict[str, Any] = {}
    for name in bucket.names():
        if name.startswith(".phd_flow/index/"):
            entries.update(json.loads(gzip.decompress(bucket.read(name))))
    return entries


def test_pushed_runs_are_listed_by_a_new_machine_without_reading_their_run_json(bucket: Bucket, tmp_path: Path) -> None:
    keys = pushed_history(bucket.config(tmp_path, "machine1"))
    day = keys[0].rsplit("_", 2)[1][:10]
    assert f".phd_flow/index/{day}.json.gz" in bucket.names()  # filed in its UTC day's shard
    assert sorted(shard_entries(bucket)) == sorted(keys)
    assert bucket.hide_run_json() == 3
    runs = phd_flow.find_runs(remote=True, config=bucket.config(tmp_path, "machine2"))
    assert runs.keys == keys
    assert [r.state for r in runs] == ["completed", "completed", "failed"]
    assert [r.args.get("a") for r in runs[:2]] == [1, 2] and [r.where for r in runs] == ["remote"] * 3


def test_a_lost_shard_entry_costs_one_run_json_read(bucket: Bucket, tmp_path: Path) -> None:
    keys = pushed_history(bucket.config(tmp_path, "machine1"))
    (name,) = [n for n in bucket.names() if n.startswith(".phd_flow/index/")]
    entries = shard_entries(bucket)
    del entries[keys[1]]  # a concurrent pusher overwrote it
    bucket.write(name, gzip.compress(json.dumps(entries).encode()))
    bucket.hide_run_json([keys[0], keys[2]])  # those come from the shard; keys[1] from its run.json
    runs = phd_flow.find_runs(remote=True, config=bucket.config(tmp_path, "machine2"))
    assert runs.keys == keys and [r.args.get("a") for r in runs[:2]] == [1, 2]
    assert [r.state for r in runs] == ["completed", "completed", "failed"]


def test_refresh_reads_every_run_json_not_the_shards(bucket: Bucket, tmp_path: Path) -> None:
    keys = pushed_history(bucket.config(tmp_path, "machine1"))
    bucket.hide_run_json([keys[0]])
    other = bucket.config(tmp_path, "machine2")
    assert phd_flow.find_runs(remote=True, config=other).keys == keys
    from phd_flow.runs.query import list_runs

    assert [r.key for r in list_runs(other, remote=True, refresh=True)] == keys[1:]


def test_a_run_pushed_again_updates_its_entry(tmp_path: Path) -> None:
    from phd_flow.project import Project
    from phd_flow.run.record import RunRecord
    from phd_flow.runs.catchup import sync_runs

    bucket = Bucket("local", tmp_path, None)
    config = bucket.config(tmp_path, "machine1")
    key = run_add(config, 1)
    assert shard_entries(bucket)[key]["status"] == "completed"
    record = RunRecord.load(config.local_path / key)  # resumed, and this time it failed
    record.update(status="failed", error="RuntimeError: resumed and failed")
    record.update_section("sync", state="not_synced")
    assert sync_runs(Project(config=config), [key]) == {key: True}
    assert shard_entries(bucket)[key]["status"] == "failed"
    bucket.hide_run_json()
    (run,) = phd_flow.find_runs(remote=True, config=bucket.config(tmp_path, "machine2"))
    assert run.state == "failed" and run.data["error"] == "RuntimeError: resumed and failed"


def test_a_failing_index_write_never_fails_the_push(tmp_path: Path) -> None:
    from phd_flow import logger

    bucket = Bucket("local", tmp_path, None)
    (bucket.folder / ".phd_flow").mkdir(parents=True)
    (bucket.folder / ".phd_flow" / "index").write_text("a file where the shard folder goes\n")
    config = bucket.config(tmp_path, "machine1")
    said: list[Any] = []
    sink = logger.add(said.append, level="DEBUG", format="{level} {message}")
    try:
        key = run_add(config, 1)
    finally:
        logger.remove(sink)
    (run,) = phd_flow.find_runs(config=config)
    assert run.data["sync"]["state"] == "synced"
    about = [str(line) for line in said if "Run index" in str(line)]
    assert len(about) == 1 and about[0].startswith("DEBUG")  # one debug line, nothing louder
    assert phd_flow.find_runs(remote=True, config=bucket.config(tmp_path, "machine2")).keys == [key]


def test_an_entry_overwritten_by_a_concurrent_push_is_filed_again(tmp_path: Path) -> None:
    """No conditional writes: a push re-reads the shard after writing it and files its entry
    again when another push's write (made from an older read) replaced it."""
    from phd_flow.run.record import RunRecord
    from phd_flow.runs.index import dump_index, index_pushed, parse_index, shard_path
    from phd_flow.storage.local import LocalRemote

    (tmp_path / "template").mkdir()
    template = RunRecord.create(tmp_path / "template", node="Add").data
    mine, theirs = (
        {**template, "key": f"Add_2026-01-01T0{i}-00-00.000000Z_racer00{i}", "status": "completed"} for i in (1, 2)
    )
    path = shard_path("2026-01-01")

    class RacingRemote(LocalRemote):
        raced = False

        def write_bytes(self, key: str, data: bytes) -> None:
            super().write_bytes(key, data)
            if key == path and not self.raced:  # the other push read the shard before this write
                self.raced = True
                super().write_bytes(key, dump_index({theirs["key"]: {k: theirs[k] for k in ("key", "status")}}))

    remote = RacingRemote(tmp_path / "remote")
    assert index_pushed(remote, [mine]) == 1 and remote.raced
    filed = parse_index(remote.read_small(path), "2026-01-01")
    assert sorted(filed) == [mine["key"], theirs["key"]]


def test_a_shard_that_cannot_be_read_is_never_overwritten(tmp_path: Path) -> None:
    """A timeout reading the shard must not replace the day's entries with one push's entry."""
    from phd_flow.errors import StorageError
    from phd_flow.run.record import RunRecord
    from phd_flow.runs.index import index_pushed, shard_path
    from phd_flow.storage.local import LocalRemote

    (tmp_path / "template").mkdir()
    template = RunRecord.create(tmp_path / "template", node="Add").data
    record = {**template, "key": "Add_2026-01-01T01-00-00.000000Z_unread01", "status": "completed"}
    path = shard_path("2026-01-01")

    class FlakyRemote(LocalRemote):
        def read_small(self, key: str, limit: int = 1 << 20) -> bytes | None:
            if key == path:
                raise StorageError("read timed out")
            return super().read_small(key, limit)

    remote = FlakyRemote(tmp_path / "remote")
    remote.write_bytes(path, b"the day's entries")
    assert index_pushed(remote, [record]) == 0
    assert remote.read_bytes(path) == b"the day's entries"


def test_to_frame_loads_the_results_of_runs_listed_from_the_shards(tmp_path: Path) -> None:
    """An index entry is a listing's record, not the run's: ``to_frame(results=True)`` loads the
    result of every completed run listed from the shards (through load_result, which reads the
    run's own run.json)."""
    bucket = Bucket("local", tmp_path, None)
    keys = [run_add(bucket.config(tmp_path, "machine1"), 1)]
    assert sorted(shard_entries(bucket)) == keys
    runs = phd_flow.find_runs(remote=True, config=bucket.config(tmp_path, "machine2"))
    assert [r.where for r in runs] == ["remote"]
    frame = runs.to_frame(results=True, trust_remote=True)
    assert list(frame["result.total"]) == [3]

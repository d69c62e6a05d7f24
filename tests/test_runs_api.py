"""The Python API for past runs: find_runs, load_result, load_args, honest status, remote runs."""

from __future__ import annotations

import json
import os
import pickle
import socket
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import phd_flow
from phd_flow import Config, RunFailedError
from phd_flow.config import MlflowConfig, RunsConfig, StorageConfig
from phd_flow.errors import ArgsError, CorruptRunError, NoResultError, RunNotFoundError, UntrustedResultError
from phd_flow.runs.query import is_stale, parse_duration
from tests.nodes import Add, AddArgs, Fail, FailArgs


def make_config(root: Path, shared: Path | None = None, name: str = "runs") -> Config:
    storage = StorageConfig(backend="local", remote=str(shared)) if shared else StorageConfig()
    return Config(
        local_path=root / name,
        project_root=root,
        storage=storage,
        mlflow=MlflowConfig(enabled=False),
        runs=RunsConfig(stale_after_seconds=60),
    )


@pytest.fixture
def history(tmp_path: Path) -> Config:
    """Three real runs: Add a=1, Add a=2 (completed), Fail (failed)."""
    config = make_config(tmp_path, tmp_path / "shared")
    Add(AddArgs(a=1), config=config).run()
    Add(AddArgs(a=2), config=config).run()
    with pytest.raises(RunFailedError):
        Fail(FailArgs(), config=config).run()
    return config


def test_find_runs_filters_by_node_status_args_and_time(history: Config) -> None:
    runs = phd_flow.find_runs(config=history)
    assert [r.node for r in runs] == ["Add", "Add", "Fail"]  # oldest first
    assert [r.state for r in runs] == ["completed", "completed", "failed"]
    assert len(phd_flow.find_runs(node="Add", config=history)) == 2
    assert phd_flow.find_runs(status="failed", config=history).keys == [runs[2].key]
    assert len(phd_flow.find_runs(status=["failed", "completed"], config=history)) == 3
    assert [r.args["a"] for r in phd_flow.find_runs(where={"a": 2}, config=history)] == [2]
    assert len(phd_flow.find_runs(where={"optim.lr": 0.1, "b": "2"}, config=history)) == 2
    assert phd_flow.find_runs(where={"a": "1.0"}, config=history) == []  # JSON text, not numbers
    assert len(phd_flow.find_runs(after="1h", config=history)) == 3
    assert phd_flow.find_runs(before=timedelta(hours=1), config=history) == []
    assert len(phd_flow.find_runs(prefix=runs[0].key[:-3], config=history)) == 1
    with pytest.raises(ArgsError, match="Unknown status"):
        phd_flow.find_runs(status="done", config=history)
    with pytest.raises(ArgsError, match="ISO date"):
        phd_flow.find_runs(after="yesterday", config=history)


def test_to_frame_has_one_row_per_run_with_flat_args(history: Config) -> None:
    frame = phd_flow.find_runs(node="Add", config=history).to_frame()
    assert list(frame["args.a"]) == [1, 2] and list(frame["args.optim.lr"]) == [0.1, 0.1]
    assert set(frame["status"]) == {"completed"} and frame.index.name == "key"
    assert (frame["duration_s"] >= 0).all()


def test_load_result_and_args_by_prefix(history: Config) -> None:
    first = phd_flow.find_runs(node="Add", config=history)[0]
    assert phd_flow.load_result(first.key[:-4], config=history).total == 3
    assert phd_flow.load_args(first.key, config=history)["a"] == 1
    failed = phd_flow.find_runs(status="failed", config=history)[0]
    with pytest.raises(NoResultError, match=r"failed.*no result"):
        phd_flow.load_result(failed.key, config=history)
    with pytest.raises(RunNotFoundError, match="matches 2 runs"):
        phd_flow.load_result("Add_", config=history)


def _mkdir_payload(path: Path) -> bytes:
    """A pickle that, when loaded, creates the directory ``path`` (a harmless, visible sentinel)."""
    return b"cos\nmkdir\n(S'" + str(path).encode() + b"'\ntR."


def test_a_tampered_result_is_not_unpickled(history: Config, tmp_path: Path) -> None:
    probe, sentinel = tmp_path / "payload-works", tmp_path / "payload-ran"
    pickle.loads(_mkdir_payload(probe))  # the payload is live: unpickling it runs code
    assert probe.is_dir()
    first = phd_flow.find_runs(node="Add", config=history)[0]
    (first.run_dir / "results.pickle").write_bytes(_mkdir_payload(sentinel))
    with pytest.raises(CorruptRunError, match="does not match the sha256"):
        phd_flow.load_result(first.key, config=history)
    assert not sentinel.exists(), "the tampered pickle was unpickled"


def test_runs_of_another_machine_are_listed_and_loaded_from_storage(history: Config, tmp_path: Path) -> None:
    other = make_config(tmp_path, tmp_path / "shared", name="machine2")
    assert phd_flow.find_runs(config=other) == []
    runs = phd_flow.find_runs(remote=True, config=other)
    assert [r.where for r in runs] == ["remote"] * 3
    assert [r.state for r in runs] == ["completed", "completed", "failed"]
    key = runs[1].key
    assert phd_flow.load_args(key, config=other)["a"] == 2
    with pytest.raises(UntrustedResultError, match="--trust-remote"):  # no signing key: not unpickled
        phd_flow.load_result(key, config=other)
    assert not (other.local_path / key / "results.pickle").exists()  # refused before the download
    assert phd_flow.load_result(key, config=other, trust_remote=True).total == 4  # downloaded and verified
    assert (other.local_path / key / "results.pickle").is_file()
    mine = phd_flow.find_runs(remote=True, config=history)
    assert {r.where for r in mine} == {"local+remote"}


def test_remote_index_is_shared_and_sees_new_and_deleted_runs(history: Config, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    other = make_config(tmp_path, shared, name="machine2")
    assert len(phd_flow.find_runs(remote=True, config=other)) == 3
    assert (shared / ".phd_flow" / "runs_index.json.gz").is_file()  # shared for other machines
    for run_json in shared.glob("*/run.json"):  # a third machine must not need them any more
        run_json.rename(run_json.with_name("hidden.json"))
    third = make_config(tmp_path, shared, name="machine3")
    assert [r.state for r in phd_flow.find_runs(remote=True, config=third)] == ["completed", "completed", "failed"]
    for hidden in shared.glob("*/hidden.json"):
        hidden.rename(hidden.with_name("run.json"))
    Add(AddArgs(a=5), config=history).run()  # a new run from the first machine
    runs = phd_flow.find_runs(remote=True, config=other)
    assert [r.args.get("a") for r in runs][-1] == 5
    from phd_flow.storage import make_storage

    make_storage(history).remove(runs[0].key, local=False, remote=True)
    assert runs[0].key not in phd_flow.find_runs(remote=True, config=third).keys
    assert len(phd_flow.find_runs(remote=True, config=third)) == 3


def test_corrupt_run_json_is_skipped_with_a_warning(history: Config) -> None:
    first = phd_flow.find_runs(config=history)[0]
    (first.run_dir / "run.json").write_text("{not json")
    warnings: list[str] = []
    from phd_flow.runs.query import list_runs

    runs = list_runs(history, warn=warnings.append)
    assert len(runs) == 2 and first.key not in runs.keys
    assert len(warnings) == 1 and str(first.run_dir / "run.json") in warnings[0]


def test_stale_by_heartbeat_age_and_by_dead_pid() -> None:
    now = datetime.now(timezone.utc)
    old = (now - timedelta(seconds=120)).isoformat()
    fresh = now.isoformat()
    other_host = {"status": "running", "host": "elsewhere", "pid": 1, "heartbeat_at": fresh}
    assert not is_stale(other_host, 60, now, socket.gethostname())
    assert is_stale({**other_host, "heartbeat_at": old}, 60, now, socket.gethostname())
    assert not is_stale({**other_host, "heartbeat_at": old, "status": "completed"}, 60, now, "x")
    here = socket.gethostname()
    alive = {"status": "running", "host": here, "pid": os.getpid(), "heartbeat_at": fresh}
    assert not is_stale(alive, 60, now, here)
    assert is_stale({**alive, "pid": _dead_pid()}, 60, now, here)


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_parse_duration_accepts_units_and_names_them_on_error() -> None:
    assert parse_duration("90s") == timedelta(seconds=90)
    assert parse_duration("1.5h") == timedelta(minutes=90)
    assert parse_duration("1w") == timedelta(days=7)
    with pytest.raises(ArgsError, match=r"s \(seconds\), m \(minutes\).*e\.g\. 30m, 3h, 2d, 1w"):
        parse_duration("3x")


def test_config_is_found_from_the_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "default.toml").write_text(
        'local_path = "${PROJECT_ROOT}/store"\n[mlflow]\nenabled = false\n'
    )
    config = make_config(tmp_path, name="store")
    Add(AddArgs(a=7), config=config).run()
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    (run,) = phd_flow.find_runs()
    assert phd_flow.load_result(run.key[:12]).total == 9
    data = json.loads((run.run_dir / "run.json").read_text())
    assert run.to_dict()["started_at"] == data["started_at"] and run.to_dict()["synced"] is True

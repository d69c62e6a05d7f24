"""Hostile review (hostile3) of stage dedup (fix-19dedup) and the MLflow feeder (fix-17feed).

Each test asserts the behaviour the docs promise; a failing test is an attack that worked.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from phd_flow import Node, RunFailedError, RunOptions, node
from phd_flow.project import Project
from tests.conftest import cli, run_dirs, write_config
from tests.stage_nodes import Outer, Prepare
from tests.test_stage_dedup import make_config

CONFIG = """\
local_path = "${{PROJECT_ROOT}}/data_storage"
[storage]
backend = "local"
remote = "{shared}"
[mlflow]
enabled = {mlflow}
experiment = "test"
"""


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "d.csv"
    path.write_text("x,y\n" + "".join(f"{i},{i * i % 7}\n" for i in range(400)))
    return path


def rewrite_remote(shared: Path, key: str, rel: str, data: bytes) -> None:
    """What a user with write access to the shared directory does: replace a file of a run and
    its manifest entry, so the download verifies."""
    (shared / key / rel).write_bytes(data)
    manifest_path = shared / key / ".phd_flow-manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][rel] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "mtime_ns": 0}
    manifest_path.write_text(json.dumps(manifest))


def mlflow_runs_tagged(local_path: Path, key: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{local_path / 'mlflow.db'}")
    experiments = [e.experiment_id for e in client.search_experiments()]
    return list(client.search_runs(experiments, filter_string=f"tags.`phd_flow.key` = '{key}'"))


# --- rm --remote and stored-by-reference bytes ---------------------------------------------------


def test_rm_remote_refuses_a_source_whose_bytes_a_remote_only_pipelines_child_run_references(
    tmp_path: Path, dataset: Path
) -> None:
    """A pipeline's child run loads a stage (stored by reference to the source). On a machine
    that has the pipeline only in the remote, ``rm --remote SOURCE`` must still see the child's
    reference: ``remote_holders`` only opens child runs of local runs."""
    from phd_flow.cli.rm import remote_holders

    config = make_config(tmp_path, rules='[stages.load_data]\nload_from = "latest"\n')
    first = Prepare({"dataset": str(dataset), "note": "not the child's args"}, config=config)
    first.run()
    outer = Outer({"dataset": str(dataset)}, config=config)
    outer.run()
    (child,) = [p for p in outer.output_dir.iterdir() if (p / "run.json").is_file()]
    assert json.loads((child / "run.json").read_text())["stages"]["load_data"]["stored_in"]

    other = make_config(tmp_path, store="machine2")  # same remote, nothing local
    held = remote_holders(Project.of(other), {str(first.key)})
    assert str(first.key) in held, "rm --remote would delete bytes the pipeline's child run stores by reference"


@dataclasses.dataclass
class VersionedArgs(node.Args):
    version: str
    crash: bool = False


class Versioned(Node[VersionedArgs, int]):
    """Stage load_data holds the version; crashes after it when asked (a job to requeue)."""

    def _run(self) -> int:
        with self.stage("load_data", depends_on=["version"]) as st:
            (st.path / "train.csv").write_text(f"data {self.args.version}\n")
        if self.args.crash:
            raise RuntimeError("crashed after load_data")
        return 0


def test_requeueing_a_failed_source_run_never_loses_the_bytes_a_loader_stores_by_reference(tmp_path: Path) -> None:
    """A failed run's completed stage may be loaded (docs/stages.md); the loader stores it by
    reference to the failed run's remote copy. Requeueing the failed run under its key (with the
    bug fixed: the stage is recomputed) overwrites that copy: the loader's bytes are gone."""
    config = make_config(tmp_path)
    first = Versioned({"version": "v1", "crash": True}, config=config)
    with pytest.raises(RunFailedError):
        first.run()
    loader = Versioned({"version": "v1"}, config=config, options=RunOptions(load={"load_data": str(first.key)}))
    loader.run()
    info = json.loads((loader.output_dir / "run.json").read_text())["stages"]["load_data"]
    # fixed: only a completed run's copy (written once) stores another run's bytes; here the
    # loader uploads its own copy
    assert "stored_in" not in info
    Versioned({"version": "v2"}, config=config, options=RunOptions(key=str(first.key))).run()  # requeued

    other = make_config(tmp_path, store="machine2")  # a colleague downloads the loader
    Project.of(other).storage.download(str(loader.key))
    got = other.local_path / str(loader.key) / "load_data" / "train.csv"
    assert got.read_text() == "data v1\n"


@dataclasses.dataclass
class RewriteArgs(node.Args):
    version: str
    extra: str = ""  # not in depends_on: the stage stays valid when it changes
    crash: bool = False


class Rewriter(Node[RewriteArgs, int]):
    """Writes its stage's file whether loaded or not (code that regenerates a file)."""

    def _run(self) -> int:
        with self.stage("load_data", depends_on=["version"]) as st:
            (st.path / "train.csv").write_text(f"data {self.args.version}\n{self.args.extra}")
        if self.args.crash:
            raise RuntimeError("crashed after load_data")
        return 0


def test_a_resumed_run_never_writes_through_a_kept_loaded_stage_into_its_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a stage is open its loaded files are copies, even with PHD_FLOW_DEDUP=hardlink
    (tests/test_stage_dedup.py). A resumed attempt keeps the earlier attempt's completed stage
    (read-only hardlinks of the source, after store_once) without unsharing it: the code inside
    the open stage writes straight into the source run's file."""
    monkeypatch.setenv("PHD_FLOW_DEDUP", "hardlink")  # as a normal user, auto links too
    config = make_config(tmp_path, storage="")
    source = Rewriter({"version": "v1"}, config=config)
    source.run()
    original = (source.output_dir / "load_data" / "train.csv").read_bytes()
    load = {"load_data": str(source.key)}
    loader = Rewriter({"version": "v1", "crash": True}, config=config, options=RunOptions(load=load))
    with pytest.raises(RunFailedError):
        loader.run()
    again = Rewriter(
        {"version": "v1", "extra": "EVIL"}, config=config, options=RunOptions(load=load, key=str(loader.key))
    )
    with contextlib.suppress(RunFailedError):  # a refusal is fine; a write-through is not
        again.run()
    assert (source.output_dir / "load_data" / "train.csv").read_bytes() == original


# --- ls --stale --fix on a run downloaded from the bucket ---------------------------------------


def test_ls_stale_fix_never_feeds_mlflow_with_a_run_downloaded_from_the_bucket(project: Path, tmp_path: Path) -> None:
    """`sync` refuses to record a downloaded run in MLflow (docs: it is data, not a to-do). A
    bucket writer makes a run.json say `running` (old heartbeat, MLflow pending): `ls --stale
    --fix` on the colleague's machine marks it killed and feeds it into the colleague's MLflow."""
    shared = tmp_path / "shared"
    write_config(project, textwrap.dedent(CONFIG.format(shared=shared, mlflow="false")))
    proc = cli(project, "run", "Prepare", "--dataset", "data/diabetes.csv")
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(project / "data_storage")
    key = run_dir.name
    shutil.rmtree(run_dir)  # the colleague's machine has only the bucket copy

    data = json.loads((shared / key / "run.json").read_text())
    data.update(status="running", host="elsewhere", heartbeat_at="2026-01-01T00:00:00+00:00", ended_at=None)
    data["mlflow"] = {"state": "pending", "experiment": "test"}
    rewrite_remote(shared, key, "run.json", json.dumps(data).encode())

    write_config(project, textwrap.dedent(CONFIG.format(shared=shared, mlflow="true")))
    assert cli(project, "download", key).returncode == 0
    proc = cli(project, "ls", "--stale", "--fix")
    assert mlflow_runs_tagged(project / "data_storage", key) == [], proc.stdout + proc.stderr


# --- the feeder's queue --------------------------------------------------------------------------


@pytest.mark.slow
def test_the_feeder_feeds_a_run_whose_key_has_a_plus(project: Path) -> None:
    """`--key` accepts '+' (letters, digits and . _ - + ...), but the queue's marker maps '/' to '+'
    and back: the feeder looks for local_path/exp/1, gives up, and MLflow never gets run exp+1."""
    env = {"PHD_FLOW_WAIT_MLFLOW": "false"}
    proc = cli(project, "run", "Prepare", "--dataset", "data/diabetes.csv", "--key", "exp+1", env=env)
    assert proc.returncode == 0, proc.stderr
    run_json = project / "data_storage" / "exp+1" / "run.json"
    deadline = time.monotonic() + 30  # the feeder takes ~1 s here
    while json.loads(run_json.read_text())["mlflow"].get("state") == "pending" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert json.loads(run_json.read_text())["mlflow"].get("state") == "synced"
    assert len(mlflow_runs_tagged(project / "data_storage", "exp+1")) == 1


# --- references resolved from local_path ---------------------------------------------------------


def test_a_bucket_reference_never_links_or_chmods_a_local_runs_private_files(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A references file written into the bucket points at a file of the colleague's own run that
    everyone can hash: its empty run.json lock. `download` resolves it from local_path, hardlinks it
    into the downloaded tree and makes that inode read-only: the colleague's run.json lock. For a
    normal user (auto links there) every later write of that run's record fails with EACCES."""
    monkeypatch.setenv("PHD_FLOW_DEDUP", "hardlink")  # what auto does for a normal user; root ignores modes
    config = make_config(tmp_path)
    own = Prepare({"dataset": str(dataset)}, config=config)
    own.run()
    lock = own.output_dir / ".phd_flow-run.json.lock"
    assert lock.is_file() and lock.stat().st_size == 0
    evil = "Evil_2026-11-30T10-00-00.000000Z_abcdefgh"
    refs = {
        "version": 1,
        "files": {
            "x": {"key": f"{own.key}/.phd_flow-run.json.lock", "size": 0, "sha256": hashlib.sha256(b"").hexdigest()}
        },
    }
    (tmp_path / "remote" / evil).mkdir(parents=True)
    (tmp_path / "remote" / evil / ".phd_flow-refs.json").write_text(json.dumps(refs))

    with contextlib.suppress(Exception):  # refusing the download is fine
        Project.of(config).storage.download(evil)
    assert lock.stat().st_nlink == 1, "the colleague's lock file is now also a file of the downloaded run"
    assert lock.stat().st_mode & 0o222, "the colleague's run.json lock was made read-only"


def test_downloading_a_file_stored_by_reference_never_writes_through_a_symlink(tmp_path: Path, dataset: Path) -> None:
    """`download KEY SUBPATH` of a path that a (bucket-written) references file names: the target
    is local_path/KEY/SUBPATH itself, joined without the symlink check every other download path
    has, so a run folder that links to a data directory gets a file outside local_path overwritten."""
    config = make_config(tmp_path)
    own = Prepare({"dataset": str(dataset)}, config=config)
    own.run()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file").write_text("the colleague's data\n")
    (own.output_dir / "sub").symlink_to(outside)  # a run folder linking its big data directory

    payload = b"written by whoever can write to the bucket\n"
    evil = "Evil_2026-11-30T10-00-00.000000Z_abcdefgh"
    (tmp_path / "remote" / evil).mkdir(parents=True)
    (tmp_path / "remote" / evil / "payload").write_bytes(payload)
    ref = {"key": f"{evil}/payload", "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
    refs = {"version": 1, "files": {"sub/file": ref}}
    (tmp_path / "remote" / str(own.key) / ".phd_flow-refs.json").write_text(json.dumps(refs))

    with contextlib.suppress(Exception):  # refusing is fine
        Project.of(config).storage.download(f"{own.key}/sub/file")
    assert (outside / "file").read_text() == "the colleague's data\n"

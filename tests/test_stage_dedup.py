"""Identical stage files are stored once (issue 19 row 4): a loaded stage is linked locally
(hardlink, read-only, or a reflink; a copy where neither is safe) and not uploaded again
(the remote keeps one copy, found by digest); downloads resolve and verify it from the source
run; ``rm --remote`` refuses to delete a run whose remote copy another run's stage relies on."""

from __future__ import annotations

import json
import os
import shutil
import stat
import textwrap
from pathlib import Path
from typing import Any

import pytest

from phd_flow import Config, RunFailedError, RunOptions, StageError, load_config
from phd_flow.project import Project
from tests.conftest import cli, run_dirs, write_config
from tests.s3_fixtures import S3Server, make_bucket, moto_server  # noqa: F401
from tests.stage_nodes import Outer, Prepare

DEDUP = "PHD_FLOW_DEDUP"


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    path = tmp_path / "d.csv"
    path.write_text("x,y\n" + "".join(f"{i},{i * i % 7}\n" for i in range(400)))
    return path


def make_config(tmp_path: Path, storage: str | None = None, store: str = "store", rules: str = "") -> Config:
    remote = storage if storage is not None else f'[storage]\nbackend = "local"\nremote = "{tmp_path / "remote"}"\n'
    text = f'local_path = "{tmp_path / store}"\n{remote}[mlflow]\nenabled = false\n{rules}'
    path = write_config(tmp_path / f"cfg-{store}", text)
    return load_config(tmp_path / f"cfg-{store}", path)


def s3_storage(server: S3Server) -> str:
    bucket = make_bucket(server)
    return f'[storage]\nbackend = "s3"\nbucket = "{bucket}"\nprefix = "p"\nendpoint_url = "{server.endpoint_url}"\n'


def run(config: Config, dataset: Path, seed: int = 0, **options: Any) -> Prepare:
    node = Prepare({"dataset": str(dataset), "seed": seed}, config=config, options=RunOptions(**options))
    node.run()
    return node


def stages(run_dir: Path) -> dict[str, Any]:
    return dict(json.loads((run_dir / "run.json").read_text())["stages"])


def remote_sizes(config: Config, prefix: str) -> dict[str, int]:
    """``{key: size}`` of the remote's objects below ``prefix`` (phd_flow's own files left out)."""
    remote = Project.of(config).storage.remote
    assert remote is not None
    return {f.key: f.size for f in remote.list(prefix) if ".phd_flow-" not in f.key}


@pytest.mark.parametrize("backend", ["shared-dir", "s3"])
def test_a_loaded_stage_is_uploaded_once_and_downloads_resolve_it_from_its_source(
    tmp_path: Path, dataset: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    storage = s3_storage(request.getfixturevalue("moto_server")) if backend == "s3" else None
    config = make_config(tmp_path, storage)
    first = run(config, dataset, seed=0)
    train = (first.output_dir / "load_data" / "train.csv").read_bytes()
    second = run(config, dataset, seed=1, load={"load_data": str(first.key)})

    # the remote holds train.csv once: under the run that made it, not under the one that loaded it
    assert f"{first.key}/load_data/train.csv" in remote_sizes(config, str(first.key))
    assert not [k for k in remote_sizes(config, str(second.key)) if "/load_data/" in k]
    info = stages(second.output_dir)["load_data"]
    assert info["stored_in"] == {"train.csv": str(first.key)}  # run.json says where the bytes are
    assert info["files"] == stages(first.output_dir)["load_data"]["files"]

    # another machine (same remote, empty local_path) downloads the run: the stage is resolved
    other = make_config(tmp_path, storage, store="machine2")
    assert Project.of(other).storage.exists(f"{second.key}/load_data/train.csv")
    Project.of(other).storage.download(str(second.key))
    assert (other.local_path / str(second.key) / "load_data" / "train.csv").read_bytes() == train
    # ... and `--load` of a run that only exists remotely (itself a loader) resolves it too, verified
    third = run(other, dataset, seed=0, load={"load_data": str(second.key)})
    assert (third.output_dir / "load_data" / "train.csv").read_bytes() == train
    assert not [k for k in remote_sizes(other, str(third.key)) if "/load_data/" in k]
    assert stages(third.output_dir)["load_data"]["stored_in"] == {"train.csv": str(first.key)}
    shutil.rmtree(third.output_dir)
    fourth = run(make_config(tmp_path, storage, store="machine3"), dataset, seed=2, load={"load_data": str(third.key)})
    assert (fourth.output_dir / "load_data" / "train.csv").read_bytes() == train


def test_a_changed_or_added_file_of_a_loaded_stage_is_uploaded(tmp_path: Path, dataset: Path) -> None:
    config = make_config(tmp_path)
    first = run(config, dataset, seed=0)

    class Extra(Prepare):
        def _run(self) -> int:
            with self.stage("load_data", depends_on=["dataset", "seed"]) as st:
                (st.path / "extra.txt").write_text("only in this run\n")
            return 0

    second = Extra({"dataset": str(dataset)}, config=config, options=RunOptions(load={"load_data": str(first.key)}))
    second.run()
    names = remote_sizes(config, str(second.key))
    assert f"{second.key}/load_data/extra.txt" in names and f"{second.key}/load_data/train.csv" not in names
    assert stages(second.output_dir)["load_data"]["stored_in"] == {"train.csv": str(first.key)}


def test_a_child_run_of_a_pipeline_that_loads_a_stage_is_not_uploaded_again_by_its_parent(
    tmp_path: Path, dataset: Path
) -> None:
    config = make_config(tmp_path, rules='[stages.load_data]\nload_from = "latest"\n')
    first = Prepare({"dataset": str(dataset), "note": "not the child's args"}, config=config)
    first.run()  # same load_data inputs as Outer's child, other args: the child runs, loads it
    outer = Outer({"dataset": str(dataset)}, config=config)
    outer.run()
    (child,) = [p for p in outer.output_dir.iterdir() if (p / "run.json").is_file()]
    assert stages(child)["load_data"]["loaded_from"] == str(first.key)
    uploaded = remote_sizes(config, str(outer.key))
    assert not [k for k in uploaded if k.endswith("/load_data/train.csv")], uploaded
    other = make_config(tmp_path, store="machine2")  # the whole pipeline downloads, resolved
    Project.of(other).storage.download(str(outer.key))
    got = other.local_path / str(outer.key) / child.name / "load_data" / "train.csv"
    assert got.read_bytes() == (first.output_dir / "load_data" / "train.csv").read_bytes()


def test_verification_is_unchanged_a_tampered_source_copy_is_refused(tmp_path: Path, dataset: Path) -> None:
    config = make_config(tmp_path)
    first = run(config, dataset, seed=0)
    second = run(config, dataset, seed=1, load={"load_data": str(first.key)})
    remote_copy = tmp_path / "remote" / str(first.key) / "load_data" / "train.csv"
    remote_copy.write_bytes(remote_copy.read_bytes().replace(b"1", b"2"))
    other = make_config(tmp_path, store="machine2")
    with pytest.raises((StageError, RunFailedError), match="sha256"):  # as before: nothing is used
        run(other, dataset, seed=1, load={"load_data": str(second.key)})


def test_a_loaded_stage_is_hardlinked_read_only_and_writing_it_never_changes_the_source(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DEDUP, "hardlink")  # root ignores read-only bits, so auto would copy here
    config = make_config(tmp_path, storage="")
    first = run(config, dataset, seed=0)
    second = run(config, dataset, seed=1, load={"load_data": str(first.key)})
    source, loaded = first.output_dir / "load_data" / "train.csv", second.output_dir / "load_data" / "train.csv"
    assert os.stat(source).st_ino == os.stat(loaded).st_ino  # stored once
    assert stat.S_IMODE(os.stat(loaded).st_mode) & 0o222 == 0  # read-only: a write fails, not corrupts
    third = run(config, dataset, seed=0, cache=True)  # the stage cache links too
    assert os.stat(third.output_dir / "load_data" / "train.csv").st_ino == os.stat(source).st_ino


def test_auto_links_read_only_where_that_stops_this_user_and_copies_where_it_does_not(
    tmp_path: Path, dataset: Path
) -> None:
    probe = tmp_path / "probe"
    probe.write_text("")
    probe.chmod(0o444)
    protects = not os.access(probe, os.W_OK)  # False as root (a container): read-only bits do not stop it
    config = make_config(tmp_path, storage="")
    first = run(config, dataset, seed=0)
    second = run(config, dataset, seed=1, load={"load_data": str(first.key)})
    source, loaded = first.output_dir / "load_data" / "train.csv", second.output_dir / "load_data" / "train.csv"
    before = source.read_bytes()
    assert (os.stat(source).st_ino == os.stat(loaded).st_ino) is protects
    if protects:  # a normal user: one inode, and a write is refused
        with pytest.raises(PermissionError):
            loaded.write_text("overwritten\n")
    else:  # root: its own copy, which it may write
        loaded.write_text("overwritten\n")
    assert source.read_bytes() == before


def test_writing_into_a_loaded_stage_file_never_changes_the_source_run(tmp_path: Path, dataset: Path) -> None:
    config = make_config(tmp_path, storage="")
    first = run(config, dataset, seed=0)
    second = run(config, dataset, seed=1, load={"load_data": str(first.key)})
    source = first.output_dir / "load_data" / "train.csv"
    before = source.read_bytes()
    loaded = second.output_dir / "load_data" / "train.csv"
    try:  # what a user's code might do with a loaded file
        with open(loaded, "w") as handle:
            handle.write("overwritten\n")
    except PermissionError:  # a read-only link (not as root): the write is refused
        pass
    assert source.read_bytes() == before
    # the source still verifies: another run loads it
    third = run(config, dataset, seed=2, load={"load_data": str(first.key)})
    assert (third.output_dir / "load_data" / "train.csv").read_bytes() == before


class Rewrite(Prepare):
    """Loads load_data and writes over its file anyway (as Prepare's stage report does)."""

    def _run(self) -> int:
        with self.stage("load_data", depends_on=["dataset", "seed"]) as st:
            (st.path / "train.csv").write_text("rewritten by the loading run\n")
        return 0


def test_code_writing_a_loaded_file_inside_its_stage_gets_its_own_copy(
    tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DEDUP, "hardlink")  # even where links are forced, the open stage has copies
    config = make_config(tmp_path)
    first = run(config, dataset, seed=0)
    source = first.output_dir / "load_data" / "train.csv"
    before = source.read_bytes()
    second = Rewrite({"dataset": str(dataset)}, config=config, options=RunOptions(load={"load_data": str(first.key)}))
    second.run()
    assert source.read_bytes() == before  # the source run is untouched
    loaded = second.output_dir / "load_data" / "train.csv"
    assert loaded.read_text() == "rewritten by the loading run\n" and os.stat(loaded).st_ino != os.stat(source).st_ino
    assert f"{second.key}/load_data/train.csv" in remote_sizes(config, str(second.key))  # its own bytes go up
    assert "stored_in" not in stages(second.output_dir)["load_data"]


def test_dedup_off_stores_every_copy(tmp_path: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(DEDUP, "off")  # the benchmark's "before"
    config = make_config(tmp_path)
    first = run(config, dataset, seed=0)
    second = run(config, dataset, seed=1, load={"load_data": str(first.key)})
    assert f"{second.key}/load_data/train.csv" in remote_sizes(config, str(second.key))
    source, loaded = first.output_dir / "load_data" / "train.csv", second.output_dir / "load_data" / "train.csv"
    assert os.stat(source).st_ino != os.stat(loaded).st_ino
    assert "stored_in" not in stages(second.output_dir)["load_data"]


CONFIG = """\
local_path = "${{PROJECT_ROOT}}/data_storage"
[storage]
backend = "local"
remote = "{shared}"
[mlflow]
enabled = false
"""


@pytest.mark.slow
def test_rm_remote_refuses_a_run_whose_remote_copy_another_run_relies_on(project: Path, tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    write_config(project, textwrap.dedent(CONFIG.format(shared=shared)))
    assert cli(project, "run", "Prepare", "--dataset", "data/diabetes.csv").returncode == 0
    (first,) = [p.name for p in run_dirs(project / "data_storage")]
    proc = cli(
        project, "run", "Prepare", "--dataset", "data/diabetes.csv", "--seed", "1", "--load", f"load_data={first}"
    )
    assert proc.returncode == 0, proc.stderr
    (second,) = [p.name for p in run_dirs(project / "data_storage") if p.name != first]

    proc = cli(project, "rm", first, "--remote", "--force")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"{second}" in proc.stderr and "load_data/train.csv" in proc.stderr
    assert (shared / first / "load_data" / "train.csv").is_file() and (project / "data_storage" / first).is_dir()
    loaded = project / "data_storage" / second / "load_data" / "train.csv"
    content = loaded.read_bytes()
    proc = cli(project, "rm", first, "--force")  # the local copy may go: the loader's files are its own
    assert proc.returncode == 0 and f"WARNING: run {second} loaded its stage 'load_data'" in proc.stderr
    assert not (project / "data_storage" / first).exists() and loaded.read_bytes() == content

    proc = cli(project, "rm", first, second, "--remote", "--force")  # both go: nobody relies on it
    assert proc.returncode == 0, proc.stderr
    assert not (shared / first).exists() and not (shared / second).exists()

"""Issue 13: what comes from a bucket is untrusted input (black-box: the real CLI and the public API).

An attacker with write access to the shared bucket plants objects; a colleague then runs an
ordinary command. Every test plants through the backend itself (boto3 on moto's S3 server, the
B2 RawSimulator's bucket, files in the shared directory) and looks only at what the victim's
command did. "Attacker code ran" is a sentinel file the forged pickle creates in tmp_path.

B2 through the CLI: b2sdk's simulator lives in one process, so the CLI subprocess is started by
a small bootstrap (``B2_BOOT``) that points ``b2sdk.v2.B2Api`` at a RawSimulator, fills the bucket
from a JSON state file, runs ``python -m my_project ARGS`` and writes the bucket back at exit.
Only b2sdk is patched, never phd_flow. The in-process property test patches b2sdk the same way.

Tests marked ``xfail(strict=True)`` fail on 88f7b9f because the attack works; the fix for
issue 13 removes the markers.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import phd_flow
from tests import s3_fixtures
from tests.conftest import EXAMPLES, REPO, cli, write_config
from tests.s3_fixtures import S3Server, closed_port_url, make_bucket

moto_server = s3_fixtures.moto_server  # the session's S3 server fixture

B2_BUCKET = "tb-bucket"
MANIFEST = ".phd_flow-manifest.json"  # the manifest file name the README documents
DATASET = "data/diabetes.csv"
SECRET = b"-----BEGIN OPENSSH PRIVATE KEY----- not-a-real-key-0xC0FFEE\n"

XF = "issue 13 row {}: {}"


def xfail(row: str, what: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, reason=XF.format(row, what))


# --- the B2 simulator behind the CLI ----------------------------------------------------------

B2_BOOT = r"""
import base64, io, json, os, runpy, sys
from b2sdk.v2 import B2Api, B2HttpApiConfig, InMemoryAccountInfo, RawSimulator

_init = B2Api.__init__
_shared = {}


def _simulated_init(self, account_info=None, *args, **kwargs):
    kwargs["api_config"] = B2HttpApiConfig(_raw_api_class=RawSimulator)
    _init(self, account_info or InMemoryAccountInfo(), *args, **kwargs)
    if "raw" in _shared:
        self.session.raw_api = _shared["raw"]  # one simulated account for every B2Api


B2Api.__init__ = _simulated_init
api = B2Api()
_shared["raw"] = api.session.raw_api
key_id, key = _shared["raw"].create_account()
api.authorize_account("production", key_id, key)
bucket = api.create_bucket(os.environ["TB_B2_BUCKET"], "allPrivate")
state = os.environ["TB_B2_STATE"]
if os.path.exists(state):
    with open(state) as handle:
        for name, data in json.load(handle).items():
            bucket.upload_bytes(base64.b64decode(data), name)
os.environ["B2_APPLICATION_KEY_ID"], os.environ["B2_APPLICATION_KEY"] = key_id, key


def _dump():
    out = {}
    for version, _ in bucket.ls("", latest_only=True, recursive=True):
        buf = io.BytesIO()
        bucket.download_file_by_id(version.id_).save(buf)
        out[version.file_name] = base64.b64encode(buf.getvalue()).decode()
    with open(state + ".tmp", "w") as handle:
        json.dump(out, handle)
    os.replace(state + ".tmp", state)


sys.path.insert(0, os.getcwd())
sys.argv = ["my_project", *sys.argv[1:]]
try:
    runpy.run_module("my_project", run_name="__main__", alter_sys=True)
finally:
    _dump()  # before interpreter shutdown: b2sdk downloads need its thread pool
"""


@contextlib.contextmanager
def simulated_b2_in_process() -> Iterator[tuple[Any, str, str]]:
    """Patch b2sdk (not phd_flow) in this process: every B2Api talks to one RawSimulator."""
    from b2sdk.v2 import B2Api, B2HttpApiConfig, InMemoryAccountInfo, RawSimulator

    original = B2Api.__init__
    shared: dict[str, Any] = {}

    def init(self: Any, account_info: Any = None, *args: Any, **kwargs: Any) -> None:
        kwargs["api_config"] = B2HttpApiConfig(_raw_api_class=RawSimulator)
        original(self, account_info or InMemoryAccountInfo(), *args, **kwargs)
        if "raw" in shared:
            self.session.raw_api = shared["raw"]

    B2Api.__init__ = init  # type: ignore[method-assign]
    try:
        api = B2Api()
        shared["raw"] = api.session.raw_api
        key_id, key = shared["raw"].create_account()
        api.authorize_account("production", key_id, key)
        bucket = api.create_bucket(B2_BUCKET, "allPrivate")
        yield bucket, key_id, key
    finally:
        B2Api.__init__ = original  # type: ignore[method-assign]


# --- backends as the attacker and the victim see them -------------------------------------------


@dataclass
class Backend:
    """One remote: how to configure it, how to plant objects in it, how to run the CLI on it."""

    kind: str  # s3 | b2 | shared
    root: Path  # a private folder for this test (B2 state, shared directory)
    prefix: str = field(default_factory=lambda: f"t{uuid.uuid4().hex[:10]}")
    server: S3Server | None = None
    bucket: str = ""

    def toml(self) -> str:
        if self.kind == "s3":
            assert self.server is not None
            return (
                f'[storage]\nbackend = "s3"\nbucket = "{self.bucket}"\nprefix = "{self.prefix}"\n'
                f'endpoint_url = "{self.server.endpoint_url}"\nretries = 2\n'
            )
        if self.kind == "b2":
            return f'[storage]\nbackend = "b2"\nbucket = "{B2_BUCKET}"\nprefix = "{self.prefix}"\nretries = 2\n'
        return f'[storage]\nbackend = "local"\nremote = "{self.root / "shared"}"\nprefix = "{self.prefix}"\n'

    # the attacker's side

    def put(self, name: str, data: bytes) -> bool:
        """Plant ``<prefix>/<name>``; False when the backend itself refuses the name."""
        full = f"{self.prefix}/{name}"
        if self.kind == "s3":
            assert self.server is not None
            self.server.client().put_object(Bucket=self.bucket, Key=full, Body=data)
            return True
        if self.kind == "b2":
            if full.startswith("/") or full.endswith("/") or "//" in full or "\\" in full or "\x7f" in full:
                return False  # b2sdk refuses these names itself
            state = self._state()
            state[full] = base64.b64encode(data).decode()
            self._state_path().write_text(json.dumps(state))
            return True
        segments = name.split("/")
        if any(s in ("", ".", "..") or "\x00" in s for s in segments):
            return False  # not a file name a directory can hold
        path = self.root / "shared" / self.prefix / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        except OSError:
            return False
        return True

    def objects(self) -> dict[str, bytes]:
        """Every object below the prefix (name relative to it) and its bytes."""
        if self.kind == "s3":
            assert self.server is not None
            client = self.server.client()
            out = {}
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=f"{self.prefix}/"):
                for obj in page.get("Contents", []):
                    body = client.get_object(Bucket=self.bucket, Key=obj["Key"])["Body"].read()
                    out[obj["Key"].removeprefix(f"{self.prefix}/")] = body
            return out
        if self.kind == "b2":
            return {
                k.removeprefix(f"{self.prefix}/"): base64.b64decode(v)
                for k, v in self._state().items()
                if k.startswith(f"{self.prefix}/")
            }
        base = self.root / "shared" / self.prefix
        return {p.relative_to(base).as_posix(): p.read_bytes() for p in base.rglob("*") if p.is_file()}

    def plant_run(
        self, run_dir: Path, key: str, edit: dict[str, Any] | None = None, extra: dict[str, bytes] | None = None
    ) -> None:
        """Plant a copy of ``run_dir`` as run ``key`` (run.json fields in ``edit`` replaced,
        ``extra`` files added) with a manifest that vouches for every planted file."""
        files = {
            p.relative_to(run_dir).as_posix(): p.read_bytes()
            for p in run_dir.rglob("*")
            if p.is_file() and p.name != MANIFEST
        }
        record = json.loads(files["run.json"])
        record.update({"key": key, "path": key, "sync": {"state": "synced"}, "mlflow": {"state": "disabled"}})
        record.update(edit or {})
        files["run.json"] = json.dumps(record, indent=2).encode()
        files.update(extra or {})
        manifest = {rel: {"size": len(data), "sha256": sha(data), "mtime_ns": 0} for rel, data in sorted(files.items())}
        files[MANIFEST] = json.dumps({"version": 1, "files": manifest}).encode()
        for rel, data in files.items():
            assert self.put(f"{key}/{rel}", data), rel

    def _state_path(self) -> Path:
        return self.root / "b2-state.json"

    def _state(self) -> dict[str, str]:
        path = self._state_path()
        return json.loads(path.read_text()) if path.exists() else {}

    # the victim's side

    def cli(self, project: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        if self.kind == "s3":
            assert self.server is not None
            return cli(project, *args, env={**self.server.env(), **(env or {})})
        if self.kind == "shared":
            return cli(project, *args, env=env)
        boot = self.root / "b2_boot.py"
        boot.write_text(B2_BOOT)
        full_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST", "MLFLOW_", "B2_"))}
        full_env.update(
            {"MLFLOW_DISABLE_TELEMETRY": "true", "TB_B2_STATE": str(self._state_path()), "TB_B2_BUCKET": B2_BUCKET}
        )
        full_env.update(env or {})
        return subprocess.run(
            [sys.executable, str(boot), *args],
            cwd=project,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def s3_bucket(moto_server: S3Server) -> str:
    """One bucket for the module; every test gets its own prefix in it."""
    return make_bucket(moto_server)


def make_backend(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    root = tmp_path / "remote-side"
    root.mkdir()
    if kind == "s3":
        server = request.getfixturevalue("moto_server")
        return Backend("s3", root, server=server, bucket=request.getfixturevalue("s3_bucket"))
    return Backend(kind, root)


@pytest.fixture(params=["s3", "b2"])
def remote(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """S3 (moto server) and B2 (simulator): the object stores."""
    return make_backend(request.param, request, tmp_path)


@pytest.fixture(params=["s3", "b2", "shared"])
def any_remote(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """Every backend that can hold a planted run, the shared directory included."""
    return make_backend(request.param, request, tmp_path)


# --- genuine runs, made once in-process with the public API ---------------------------------------


@dataclass(frozen=True)
class Seed:
    root: Path
    add: str  # a completed Add run (result AddResult(total=3))
    prep: str  # a completed Prepare run (stages load_data, summary, report), seed 0
    older_prep: str  # an older completed Prepare run, seed 1

    def run_dir(self, key: str) -> Path:
        return self.root / "data_storage" / key


@pytest.fixture(scope="module")
def seed(tmp_path_factory: pytest.TempPathFactory) -> Seed:
    from tests.nodes import Add, AddArgs
    from tests.stage_nodes import Prepare

    root = tmp_path_factory.mktemp("tb-seed")
    write_config(root, 'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nenabled = false\n')
    config = phd_flow.load_config(root)
    dataset = str(EXAMPLES / DATASET)
    older = Prepare({"dataset": dataset, "seed": 1}, config=config)
    older.run()
    add = Add(AddArgs(a=1), config=config)
    add.run()
    prep = Prepare({"dataset": dataset, "seed": 0}, config=config)
    prep.run()
    return Seed(root, str(add.key), str(prep.key), str(older.key))


def victim(tmp_path: Path, backend: Backend | None, extra: str = "", mlflow: str = "enabled = false\n") -> Path:
    """The colleague's project: the example package plus the test nodes, no runs yet."""
    root = tmp_path / "home" / "proj"
    shutil.copytree(EXAMPLES / "my_project", root / "my_project", ignore=shutil.ignore_patterns("__pycache__"))
    # over the example's prepare.py (the same Prepare, plus Broken): one Prepare in the package
    shutil.copy(REPO / "tests" / "stage_nodes.py", root / "my_project" / "prepare.py")
    shutil.copy(REPO / "tests" / "nodes.py", root / "my_project" / "small_nodes.py")
    shutil.copytree(EXAMPLES / "data", root / "data")
    text = f'local_path = "${{PROJECT_ROOT}}/data_storage"\n[mlflow]\n{mlflow}' + extra
    write_config(root, text + (backend.toml() if backend else ""))
    return root


def local_path(project: Path) -> Path:
    return project / "data_storage"


def new_runs(project: Path) -> list[Path]:
    base = local_path(project)
    return sorted(p for p in base.iterdir() if (p / "run.json").is_file()) if base.exists() else []


def files_outside(root: Path, inside: Path) -> set[Path]:
    return {p for p in root.rglob("*") if (p.is_file() or p.is_symlink()) and inside not in p.parents}


class Touch:
    """A pickle that, when loaded, creates ``path`` (the "attacker code ran" sentinel)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "a"))


def forged_result(seed: Seed, sentinel: Path, drop_sha: bool = False) -> tuple[dict[str, Any], dict[str, bytes]]:
    """run.json edits and files of the Add run with results.pickle replaced by a payload."""
    payload = pickle.dumps(Touch(sentinel))
    record = json.loads((seed.run_dir(seed.add) / "run.json").read_text())
    result = {**record["result"], "sha256": sha(payload)}
    if drop_sha:
        result.pop("sha256")
    return {"result": result}, {"results.pickle": payload}


def prep_with(
    seed: Seed, key: str, train: bytes, started: str | None = None, **edit: Any
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """run.json edits and files of the Prepare run with load_data/train.csv replaced (and its
    recorded sha256 updated, as an attacker with write access can)."""
    record = json.loads((seed.run_dir(seed.prep) / "run.json").read_text())
    stages = json.loads(json.dumps(record["stages"]))
    stages["load_data"]["files"] = {"train.csv": sha(train)}
    changes: dict[str, Any] = {"stages": stages}
    if started:
        changes.update(started_at=started, ended_at=started, heartbeat_at=started)
    changes.update(edit)
    return changes, {"load_data/train.csv": train}


def with_victims_inputs(project: Path, seed: Seed, key: str, stages: dict[str, Any] | None = None) -> dict[str, Any]:
    """A run.json edit giving ``key``'s stage load_data the fingerprint the victim's run of
    Prepare (data/diabetes.csv, seed 0) computes: ``latest`` loads only a stage made with this
    run's inputs (issue 19), so a planted run must claim them to be a candidate at all."""
    code = (
        "from phd_flow import reuse; from my_project.prepare import Prepare; "
        "code = reuse.code_of_stage(Prepare, 'load_data'); "
        "print(reuse.fingerprint('load_data', reuse.inputs_of(Prepare, {'dataset': 'data/diabetes.csv', 'seed': 0}, code=code)))"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=project, capture_output=True, text=True, check=True)
    if stages is None:
        stages = json.loads((seed.run_dir(key) / "run.json").read_text())["stages"]
    stages = json.loads(json.dumps(stages))
    stages["load_data"]["fingerprint"] = done.stdout.strip()
    return {"stages": stages}


def loaded_from(project: Path) -> Any:
    (run,) = new_runs(project)
    return json.loads((run / "run.json").read_text())["stages"]["load_data"]["loaded_from"]


def assert_ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


# === row 1: a remote name with '..' writes outside local_path ====================================


@pytest.mark.slow
def test_row1_download_never_writes_outside_local_path(seed: Seed, remote: Backend, tmp_path: Path) -> None:
    project = victim(tmp_path, remote)
    remote.plant_run(seed.run_dir(seed.add), seed.add)
    assert remote.put(f"{seed.add}/../../../escape.txt", b"planted")  # -> tmp_path/home/escape.txt
    proc = remote.cli(project, "download", seed.add)
    assert not (tmp_path / "home" / "escape.txt").exists(), proc.stdout + proc.stderr
    assert proc.returncode != 0 and "escape.txt" in proc.stderr and seed.add in proc.stderr  # reported


@pytest.mark.slow
def test_row1_stage_load_never_writes_outside_local_path(seed: Seed, remote: Backend, tmp_path: Path) -> None:
    project = victim(tmp_path, remote)
    # the stage is pulled into <local_path>/<new key>/.load_data.*.phd_flow-part: 4 levels up is home/
    remote.plant_run(seed.run_dir(seed.prep), seed.prep, extra={"load_data/../../../../escape.txt": b"planted"})
    proc = remote.cli(project, "run", "Prepare", "--dataset", DATASET, "--load", f"load_data={seed.prep}")
    assert not (tmp_path / "home" / "escape.txt").exists(), proc.stderr[-2000:]
    assert proc.returncode != 0 and "escape.txt" in proc.stderr  # reported, nothing of the stage used


@pytest.mark.slow
def test_row1_latest_never_writes_outside_local_path(seed: Seed, remote: Backend, tmp_path: Path) -> None:
    project = victim(tmp_path, remote, extra='[stages.load_data]\nload_from = "latest"\n')
    remote.plant_run(seed.run_dir(seed.prep), seed.prep)
    evil = "Prepare_2099-01-01T00-00-00.000000Z_evil0001"
    edit, files = prep_with(seed, evil, b"x,y\n666,666\n", started="2099-01-01T00:00:00+00:00")
    files["load_data/../../../../escape.txt"] = b"planted"
    remote.plant_run(seed.run_dir(seed.prep), evil, edit=edit, extra=files)
    proc = remote.cli(project, "run", "Prepare", "--dataset", DATASET)  # an ordinary run
    assert not (tmp_path / "home" / "escape.txt").exists(), proc.stderr[-2000:]


def test_row1_listing_reports_names_that_are_not_run_keys(
    seed: Seed, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    backend = make_backend("s3", request, tmp_path)
    project = victim(tmp_path, backend)
    backend.plant_run(seed.run_dir(seed.add), seed.add)
    backend.put("../evil/run.json", b"{}")  # lists as the run prefix '..'
    backend.put("/evil/run.json", b"{}")  # lists as the run prefix ''
    proc = backend.cli(project, "ls", "--remote", "--json")
    assert_ok(proc)
    assert [run["key"] for run in json.loads(proc.stdout)] == [seed.add]
    assert "'..'" in proc.stderr and "''" in proc.stderr, proc.stderr


# --- the property: hostile names never write outside local_path; good names round-trip ----------

BAD_SEGMENTS = ["..", ".", "", "/", "\\", "..\\..", "C:", "c:\\win", "a\x00b", "\x01", "\x1b[31m", "\x7f", "/etc", "~"]
GOOD_SEGMENT = st.text(alphabet="abcxyz0189._-", min_size=1, max_size=6).filter(lambda s: s not in (".", ".."))
HOSTILE_NAME = (
    st.lists(st.one_of(st.sampled_from(BAD_SEGMENTS), GOOD_SEGMENT), min_size=1, max_size=5)
    .map("/".join)
    .filter(lambda n: n.split("/").count("..") <= 3)  # the sandbox is 5 levels deep: never above it
)
GOOD_NAME = st.lists(GOOD_SEGMENT, min_size=1, max_size=3).map("/".join)


def _no_file_dir_clash(names: list[str]) -> bool:
    return not any(b.startswith(a + "/") for a in names for b in names)


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind",
    [
        "s3",
        "b2",
        "shared",
    ],
)
def test_property_hostile_remote_names_stay_inside_local_path(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if kind == "s3":
        server: S3Server = request.getfixturevalue("moto_server")
        bucket = request.getfixturevalue("s3_bucket")
    with contextlib.ExitStack() as stack:
        if kind == "b2":
            b2_bucket, key_id, key = stack.enter_context(simulated_b2_in_process())
            mp = stack.enter_context(pytest.MonkeyPatch.context())
            mp.setenv("B2_APPLICATION_KEY_ID", key_id)
            mp.setenv("B2_APPLICATION_KEY", key)

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        @given(
            hostile=st.lists(HOSTILE_NAME, min_size=1, max_size=6),
            good=st.lists(GOOD_NAME, min_size=1, max_size=6, unique=True).filter(_no_file_dir_clash),
        )
        @example(hostile=["../../../escape.txt", "ok.txt"], good=["a.txt", "d/b.txt"])
        def check(hostile: list[str], good: list[str]) -> None:
            sandbox = tmp_path / uuid.uuid4().hex
            base = sandbox / "l1" / "l2" / "l3" / "l4" / "local"
            base.mkdir(parents=True)
            prefix = f"p{uuid.uuid4().hex[:8]}"
            backend = Backend(kind, sandbox / "remote-side" if kind == "shared" else sandbox, prefix=prefix)
            (sandbox / "remote-side").mkdir(exist_ok=True)
            if kind == "s3":
                backend.server, backend.bucket = server, bucket
            if kind == "b2":

                def b2_put(name: str, data: bytes) -> bool:
                    full = f"{prefix}/{name}"
                    if full.endswith("/") or "//" in full or "\\" in full or "\x7f" in full:
                        return False  # b2sdk refuses these names itself
                    b2_bucket.upload_bytes(data, full)
                    return True

                backend.put = b2_put  # type: ignore[method-assign]
            config_path = sandbox / "config" / "default.toml"
            config_path.parent.mkdir()
            config_path.write_text(f'local_path = "{base}"\n[mlflow]\nenabled = false\n' + backend.toml())
            config = phd_flow.load_config(sandbox, config_path)

            bad_key, good_key = f"Evil_{uuid.uuid4().hex[:12]}", f"Good_{uuid.uuid4().hex[:12]}"
            for i, name in enumerate(hostile):
                backend.put(f"{bad_key}/{name}", f"hostile {i}".encode())
            for i, name in enumerate(good):
                assert backend.put(f"{good_key}/{name}", f"good {i}".encode()), name
            before = files_outside(sandbox, base)
            storage = phd_flow.Storage(config)
            with contextlib.suppress(Exception):  # refusing is fine; writing outside is not
                storage.download(bad_key)
            written = files_outside(sandbox, base) - before
            assert not written, f"written outside local_path: {sorted(map(str, written))}"

            storage.download(good_key)
            got = {
                p.relative_to(base / good_key).as_posix(): p.read_bytes()
                for p in (base / good_key).rglob("*")
                if p.is_file() and p.name != MANIFEST
            }
            assert got == {name: f"good {i}".encode() for i, name in enumerate(good)}

        check()


# === row 2: a forged pickle (checksum rewritten, or missing) is unpickled =========================


def test_row2_forged_remote_result_is_not_unpickled(seed: Seed, any_remote: Backend, tmp_path: Path) -> None:
    project = victim(tmp_path, any_remote)
    sentinel = tmp_path / "attacker-code-ran"
    edit, files = forged_result(seed, sentinel)
    any_remote.plant_run(seed.run_dir(seed.add), seed.add, edit=edit, extra=files)
    proc = any_remote.cli(project, "result", seed.add)
    assert not sentinel.exists(), "the forged pickle was unpickled: " + proc.stdout
    assert proc.returncode == 2 and seed.add in proc.stderr


def test_row2_result_without_checksum_is_refused_by_load_result(seed: Seed, tmp_path: Path) -> None:
    backend = Backend("shared", tmp_path / "remote-side")
    project = victim(tmp_path, backend)
    sentinel = tmp_path / "attacker-code-ran"
    edit, files = forged_result(seed, sentinel, drop_sha=True)
    backend.plant_run(seed.run_dir(seed.add), seed.add, edit=edit, extra=files)
    config = phd_flow.load_config(project)
    with contextlib.suppress(phd_flow.PhdFlowError):
        phd_flow.load_result(seed.add, config=config)
    assert not sentinel.exists(), "load_result unpickled a remote result with no checksum"
    with pytest.raises(phd_flow.PhdFlowError):  # no "loaded unverified" fallback, even when trusted
        phd_flow.load_result(seed.add, config=config, trust_remote=True)
    assert not sentinel.exists()


def test_row2_stage_without_file_list_is_refused(seed: Seed, remote: Backend, tmp_path: Path) -> None:
    project = victim(tmp_path, remote)
    planted = b"x,y\n666,666\n"
    edit, files = prep_with(seed, seed.prep, planted)
    edit["stages"]["load_data"].pop("files")
    remote.plant_run(seed.run_dir(seed.prep), seed.prep, edit=edit, extra=files)
    proc = remote.cli(project, "run", "Prepare", "--dataset", DATASET, "--load", f"load_data={seed.prep}")
    used = [
        r
        for r in new_runs(project)
        if (r / "load_data" / "train.csv").is_file() and (r / "load_data" / "train.csv").read_bytes() == planted
    ]
    assert not used, "the unverified stage was used: " + proc.stderr[-1500:]
    assert proc.returncode == 2 and seed.prep in proc.stderr and "unverified" not in proc.stderr


def test_row2_signing_key_refuses_an_unsigned_remote_result(seed: Seed, remote: Backend, tmp_path: Path) -> None:
    project = victim(tmp_path, remote)
    sentinel = tmp_path / "attacker-code-ran"
    edit, files = forged_result(seed, sentinel)
    remote.plant_run(seed.run_dir(seed.add), seed.add, edit=edit, extra=files)
    proc = remote.cli(project, "result", seed.add, env={"PHD_FLOW_SIGNING_KEY": "lab-secret-for-tests"})
    assert not sentinel.exists(), "the unsigned pickle was unpickled"
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr
    assert seed.add in errors[0] and "sign" in errors[0].lower()
    assert "lab-secret-for-tests" not in proc.stderr + proc.stdout


def test_remote_only_result_needs_trust_remote(seed: Seed, tmp_path: Path) -> None:
    backend = Backend("shared", tmp_path / "remote-side")
    project = victim(tmp_path, backend)
    backend.plant_run(seed.run_dir(seed.add), seed.add)  # a genuine result, only in storage
    env = {"PYTHONPATH": str(REPO)}
    proc = cli(project, "result", seed.add, env=env)
    assert proc.returncode == 2, "loaded without --trust-remote: " + proc.stdout
    assert seed.add in proc.stderr and "--trust-remote" in proc.stderr
    proc = cli(project, "result", seed.add, "--trust-remote", env=env)
    assert proc.returncode == 0 and proc.stdout.strip() == "AddResult(total=3)", proc.stderr
    config = phd_flow.load_config(project)
    assert phd_flow.load_result(seed.add, config=config, trust_remote=True).total == 3


def test_local_results_made_here_keep_loading(seed: Seed, tmp_path: Path) -> None:
    project = victim(tmp_path, None)
    shutil.copytree(seed.run_dir(seed.add), local_path(project) / seed.add)
    proc = cli(project, "result", seed.add, env={"PYTHONPATH": str(REPO)})
    assert proc.returncode == 0 and proc.stdout.strip() == "AddResult(total=3)", proc.stderr
    assert phd_flow.load_result(seed.add, config=phd_flow.load_config(project)).total == 3


# === row 3: run.json's `path` field points at a private directory =================================


def test_row3_path_field_is_never_followed(seed: Seed, any_remote: Backend, tmp_path: Path) -> None:
    project = victim(tmp_path, any_remote)
    private = tmp_path / "home" / "private"
    (private / "load_data").mkdir(parents=True)
    (private / "load_data" / "secret.txt").write_bytes(SECRET)
    record = json.loads((seed.run_dir(seed.prep) / "run.json").read_text())
    stages = record["stages"]
    stages["load_data"]["files"] = {"secret.txt": sha(SECRET)}  # a guessable file (id_rsa.pub ...)
    any_remote.plant_run(seed.run_dir(seed.prep), seed.prep, edit={"path": str(private), "stages": stages})
    proc = any_remote.cli(project, "run", "Prepare", "--dataset", DATASET, "--load", f"load_data={seed.prep}")
    copied = [p for p in local_path(project).rglob("*") if p.is_file() and p.read_bytes() == SECRET]
    assert not copied, f"private files copied into the run: {copied}\n{proc.stderr[-1500:]}"
    leaked = [name for name, data in any_remote.objects().items() if data == SECRET]
    assert not leaked, f"private files uploaded to the bucket: {leaked}"


# === row 4 and "key disagrees with its location" ===================================================


def test_row4_rm_never_acts_on_the_key_a_record_claims(seed: Seed, any_remote: Backend, tmp_path: Path) -> None:
    project = victim(tmp_path, any_remote)
    any_remote.plant_run(seed.run_dir(seed.add), seed.add)
    junk = "Add_2026-01-01T00-00-00.000000Z_junk0001"
    any_remote.plant_run(seed.run_dir(seed.add), junk, edit={"key": seed.add, "path": seed.add})
    proc = any_remote.cli(project, "rm", "--remote", junk, "--force")
    left = any_remote.objects()
    assert f"{seed.add}/run.json" in left and f"{seed.add}/results.pickle" in left, (
        "the other run was deleted: " + proc.stdout
    )
    assert proc.returncode == 2 and junk in proc.stderr and seed.add in proc.stderr


@pytest.mark.slow
def test_row4_rm_never_deletes_an_mlflow_run_tagged_with_another_key(
    seed: Seed, tmp_path: Path, migrated_store: Callable[[Path], str]
) -> None:
    import mlflow

    backend = Backend("shared", tmp_path / "remote-side")
    uri = migrated_store(tmp_path / "home" / "mlflow.db")
    project = victim(tmp_path, backend, mlflow=f'enabled = true\ntracking_uri = "{uri}"\n')
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("victim")
    precious = client.create_run(experiment, tags={"phd_flow.key": seed.add}).info.run_id
    junk = "Add_2026-01-01T00-00-00.000000Z_junk0002"  # a consistent record, another run's MLflow id
    backend.plant_run(seed.run_dir(seed.add), junk, edit={"mlflow": {"state": "logged", "run_id": precious}})
    proc = backend.cli(project, "rm", "--remote", junk, "--force")
    assert client.get_run(precious).info.lifecycle_stage == "active", proc.stdout + proc.stderr
    assert proc.returncode != 0 and precious in proc.stderr and seed.add in proc.stderr


@pytest.mark.parametrize("command", ["show", "result", "load"])
def test_record_whose_key_disagrees_with_its_location_is_refused(
    seed: Seed, command: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    backend = make_backend("s3", request, tmp_path)
    project = victim(tmp_path, backend)
    backend.plant_run(seed.run_dir(seed.prep), seed.prep)
    junk = seed.prep.rsplit("_", 1)[0] + "_zzzzjunk"
    backend.plant_run(seed.run_dir(seed.prep), junk, edit={"key": seed.prep, "path": seed.prep})
    args = {
        "show": ["show", junk],
        "result": ["result", junk],
        "load": ["run", "Prepare", "--dataset", DATASET, "--load", f"load_data={junk}"],
    }[command]
    proc = backend.cli(project, *args)
    assert proc.returncode == 2, f"exit {proc.returncode}: {proc.stdout[-800:]}{proc.stderr[-800:]}"
    assert junk in proc.stderr and seed.prep in proc.stderr, proc.stderr
    assert not new_runs(project) or command != "load"


@pytest.mark.slow
def test_latest_skips_a_record_whose_key_disagrees_with_its_location(
    seed: Seed, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    backend = make_backend("s3", request, tmp_path)
    project = victim(tmp_path, backend, extra='[stages.load_data]\nload_from = "latest"\n')
    backend.plant_run(
        seed.run_dir(seed.older_prep), seed.older_prep, edit=with_victims_inputs(project, seed, seed.older_prep)
    )
    backend.plant_run(seed.run_dir(seed.prep), seed.prep, edit=with_victims_inputs(project, seed, seed.prep))
    junk = seed.prep.rsplit("_", 1)[0] + "_zzzzjunk"  # newest key, its record claims the oldest run
    edit = {"key": seed.older_prep, "path": seed.older_prep, **with_victims_inputs(project, seed, seed.prep)}
    backend.plant_run(seed.run_dir(seed.prep), junk, edit=edit)
    proc = backend.cli(project, "run", "Prepare", "--dataset", DATASET)
    assert_ok(proc)
    assert loaded_from(project) == seed.prep, proc.stderr[-1500:]
    assert junk in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "kind",
    [
        "s3",
        "shared",
    ],
)
def test_latest_never_picks_a_run_from_the_future(
    seed: Seed, kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    backend = make_backend(kind, request, tmp_path)
    project = victim(tmp_path, backend, extra='[stages.load_data]\nload_from = "latest"\n')
    backend.plant_run(seed.run_dir(seed.prep), seed.prep, edit=with_victims_inputs(project, seed, seed.prep))
    evil = "Prepare_2099-01-01T00-00-00.000000Z_evil0001"
    edit, files = prep_with(seed, evil, b"x,y\n666,666\n", started="2099-01-01T00:00:00+00:00")
    edit.update(with_victims_inputs(project, seed, seed.prep, edit["stages"]))
    backend.plant_run(seed.run_dir(seed.prep), evil, edit=edit, extra=files)
    proc = backend.cli(project, "run", "Prepare", "--dataset", DATASET)
    assert_ok(proc)
    assert loaded_from(project) == seed.prep, proc.stderr[-1500:]


# === row 5: a symlink in a shared-directory run ====================================================


def test_row5_symlinks_in_a_shared_directory_are_not_followed(seed: Seed, tmp_path: Path) -> None:
    backend = Backend("shared", tmp_path / "remote-side")
    project = victim(tmp_path, backend)
    ssh = tmp_path / "home" / ".ssh"
    ssh.mkdir(parents=True)
    (ssh / "id_rsa").write_bytes(SECRET)
    backend.plant_run(seed.run_dir(seed.add), seed.add)
    link = tmp_path / "remote-side" / "shared" / backend.prefix / seed.add / "st" / "x"
    link.parent.mkdir()
    link.symlink_to(ssh / "id_rsa")
    proc = backend.cli(project, "download", seed.add)
    copied = [p for p in local_path(project).rglob("*") if p.is_symlink() or (p.is_file() and p.read_bytes() == SECRET)]
    assert not copied, f"{copied}: {proc.stdout}{proc.stderr[-1000:]}"


def test_row5_a_symlinked_run_directory_in_a_shared_directory_is_not_a_run(seed: Seed, tmp_path: Path) -> None:
    backend = Backend("shared", tmp_path / "remote-side")
    project = victim(tmp_path, backend)
    backend.plant_run(seed.run_dir(seed.add), seed.add)
    elsewhere = tmp_path / "home" / "private-run"
    shutil.copytree(tmp_path / "remote-side" / "shared" / backend.prefix / seed.add, elsewhere)
    (elsewhere / "secret.txt").write_bytes(SECRET)
    linked = seed.add.rsplit("_", 1)[0] + "_link0001"
    (tmp_path / "remote-side" / "shared" / backend.prefix / linked).symlink_to(elsewhere)
    proc = backend.cli(project, "ls", "--remote", "--json")
    assert_ok(proc)
    assert [run["key"] for run in json.loads(proc.stdout)] == [seed.add]
    proc = backend.cli(project, "download", linked)
    assert proc.returncode == 2 and linked in proc.stderr, proc.stdout + proc.stderr
    assert not [p for p in local_path(project).rglob("*") if p.is_file() and p.read_bytes() == SECRET]


# === row 6: escape sequences in args reach the terminal raw ========================================

ANSI = "\x1b]0;pwned\x07\x1b[2J\x1b[31mRED"


def ansi_project(seed: Seed, tmp_path: Path) -> tuple[Path, str, str]:
    project = victim(tmp_path, None)
    other = seed.add.rsplit("_", 1)[0] + "_ansi0002"
    for key, value in ((seed.add, ANSI), (other, "plain")):
        run_dir = local_path(project) / key
        shutil.copytree(seed.run_dir(seed.add), run_dir)
        record = json.loads((run_dir / "run.json").read_text())
        record.update(key=key, path=key, args={**record["args"], "a": value})
        (run_dir / "run.json").write_text(json.dumps(record))
        (run_dir / "args.json").write_text(json.dumps(record["args"]))
    return project, seed.add, other


@pytest.mark.parametrize("command", ["ls", "show", "compare"])
def test_row6_escape_sequences_from_run_data_are_shown_escaped(seed: Seed, command: str, tmp_path: Path) -> None:
    project, key, other = ansi_project(seed, tmp_path)
    args = {"ls": ["ls"], "show": ["show", key], "compare": ["compare", key, other]}[command]
    proc = cli(project, *args)
    assert_ok(proc)
    assert "RED" in proc.stdout, proc.stdout
    assert "\x1b" not in proc.stdout and "\x07" not in proc.stdout, repr(proc.stdout[-600:])


# === row 7: secrets of an uncommitted config change land in reproducible.json ======================


def test_row7_secrets_in_an_uncommitted_config_never_reach_reproducible_json(tmp_path: Path) -> None:
    backend = Backend("b2", tmp_path / "remote-side")
    backend.root.mkdir(parents=True)
    project = victim(tmp_path, None)
    head = 'local_path = "${{PROJECT_ROOT}}/data_storage"\n[mlflow]\nenabled = false\n'
    seed_form = head.replace(
        "[mlflow]", 'b2_bucket = "{b}"\nb2_prefix = "{p}"\nb2_key_id = "{i}"\nb2_key = "{k}"\n[mlflow]'
    )
    write_config(project, seed_form.format(b=B2_BUCKET, p=backend.prefix, i="CHANGEME", k="CHANGEME"))
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run([*git, "init", "-q"], cwd=project, check=True)
    subprocess.run([*git, "add", "config/default.toml"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "config"], cwd=project, check=True)
    key_id, key = "0012ab34cd56ef0000000001", "K001SuperSecretApplicationKeyValue9"
    write_config(project, seed_form.format(b=B2_BUCKET, p=backend.prefix, i=key_id, k=key))
    proc = backend.cli(project, "run", "Add", "--a", "1")
    assert_ok(proc)
    (run,) = new_runs(project)
    repro = (run / "reproducible.json").read_text()
    assert "CHANGEME" in repro or "config/default.toml" in repro  # the diff was recorded at all
    texts = {f"local {p.relative_to(run)}": p.read_bytes() for p in run.rglob("*") if p.is_file()}
    texts.update({f"bucket {name}": data for name, data in backend.objects().items()})
    leaked = sorted(where for where, data in texts.items() if key_id.encode() in data or key.encode() in data)
    assert not leaked, f"the B2 keys appear in {leaked}"


# === row 8: a password in tracking_uri is logged ===================================================


@pytest.mark.slow
def test_row8_password_in_tracking_uri_is_redacted_everywhere(tmp_path: Path) -> None:
    password = "Pa55w0rdTB13"
    host = closed_port_url().removeprefix("http://")
    project = victim(tmp_path, None, mlflow=f'tracking_uri = "http://user:{password}@{host}"\n')
    proc = cli(project, "run", "Add", "--a", "1")
    assert proc.returncode in (0, 3), proc.stderr[-2000:]
    (run,) = new_runs(project)
    where = {"stderr": proc.stderr, "stdout": proc.stdout}
    where.update({name: (run / name).read_text() for name in ("run.json", "output.log", "output.jsonl")})
    leaked = [name for name, text in where.items() if password in text]
    assert not leaked, f"the password appears in {leaked}"
    assert "user:***@" in proc.stderr + where["run.json"] + where["output.log"]  # named, redacted


# === hostile review ================================================================================
# A second look, by a reviewer with write access to the bucket and the code (issue 13).


def shared_remote(tmp_path: Path) -> Backend:
    return Backend("shared", tmp_path / "remote-side")


def shared_prefix(backend: Backend) -> Path:
    return backend.root / "shared" / backend.prefix


def test_hostile_symlink_at_the_temp_name_is_never_written_through(seed: Seed, tmp_path: Path) -> None:
    backend = shared_remote(tmp_path)
    project = victim(tmp_path, backend)
    backend.plant_run(seed.run_dir(seed.add), seed.add)
    precious = tmp_path / "authorized_keys"
    precious.write_bytes(SECRET)
    index = shared_prefix(backend) / ".phd_flow" / "runs_index.json.gz"
    index.parent.mkdir(parents=True)
    (index.parent / (index.name + ".phd_flow-tmp")).symlink_to(precious)  # the old fixed temp name
    proc = backend.cli(project, "ls", "--remote")  # learns the run: writes the shared index
    assert_ok(proc)
    assert precious.read_bytes() == SECRET, "the victim's file was overwritten through the link"
    assert index.is_file() and not index.is_symlink()


def test_hostile_symlinked_prefix_folder_is_refused(tmp_path: Path) -> None:
    backend = shared_remote(tmp_path)
    outside = tmp_path / "outside"  # stands for ~ or another project's local_path
    outside.mkdir()
    shared_prefix(backend).parent.mkdir(parents=True)
    shared_prefix(backend).symlink_to(outside)
    project = victim(tmp_path, backend)
    proc = backend.cli(project, "run", "Add", "--a", "1")
    assert not list(outside.iterdir()), f"pushed through the linked prefix: {list(outside.rglob('*'))}"
    assert proc.returncode == 3 and "symlink" in proc.stderr, proc.stderr[-2000:]


def test_hostile_forged_sweep_record_cannot_write_files_or_pick_the_config(seed: Seed, tmp_path: Path) -> None:
    backend = shared_remote(tmp_path)
    project = victim(tmp_path, backend)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.log").write_text("victim's log\n")
    evil_config = shared_prefix(backend) / "cfg" / "evil.toml"
    evil_config.parent.mkdir(parents=True)
    evil_config.write_text(f'local_path = "{outside / "attacker_local_path"}"\n[mlflow]\nenabled = false\n')
    argv = ["--a", "1"]
    procs = []
    for name, point_key in [
        ("Sweep_2026-11-01T00-00-00.000000Z_sweep001", str(outside / "precious")),  # a path as a key
        ("Sweep_2026-11-01T00-00-00.000000Z_sweep002", "Add_2026-11-01T00-00-00.000000Z_pt000002"),
    ]:
        record = {
            "kind": "sweep",
            "key": name,
            "node": "Add",
            "node_class": "my_project.small_nodes.Add",
            "package": "my_project",
            "status": "failed",
            "config_path": str(evil_config),
            "executor": "local",
            "slurm_job_ids": [],
            "points": [{"key": point_key, "params": {}, "argv": argv, "status": "failed"}],
        }
        assert backend.put(f"{name}/run.json", json.dumps(record).encode())
        assert_ok(backend.cli(project, "download", name))
        # the user vouches for the bucket (deletes the downloaded mark): the record's checks still hold
        (local_path(project) / ".phd_flow" / "downloaded" / name).unlink()
        procs.append(backend.cli(project, "sweep", "--resume", name))
        assert (outside / "precious.log").read_text() == "victim's log\n", procs[-1].stderr[-2000:]
        assert not (outside / "attacker_local_path").exists(), "the sweep record chose the config"
    assert procs[0].returncode == 2 and "not a run key" in procs[0].stderr, procs[0].stderr[-2000:]
    assert_ok(procs[1])  # a valid point runs, with this project's config
    assert (local_path(project) / "Add_2026-11-01T00-00-00.000000Z_pt000002" / "run.json").is_file()


def test_hostile_sweep_node_class_outside_the_package_is_refused(tmp_path: Path) -> None:
    backend = shared_remote(tmp_path)
    project = victim(tmp_path, backend)
    name = "Sweep_2026-11-01T00-00-00.000000Z_sweep003"
    record = {
        "kind": "sweep",
        "key": name,
        "node": "Add",
        "node_class": "tests.nodes.Add",
        "status": "failed",
        "executor": "local",
        "points": [{"key": "Add_2026-11-01T00-00-00.000000Z_pt000003", "params": {}, "argv": [], "status": "x"}],
    }
    assert backend.put(f"{name}/run.json", json.dumps(record).encode())
    assert_ok(backend.cli(project, "download", name))
    proc = backend.cli(project, "sweep", "--resume", name)
    assert proc.returncode == 2 and "tests.nodes.Add" in proc.stderr, proc.stderr[-2000:]
    assert not (local_path(project) / "Add_2026-11-01T00-00-00.000000Z_pt000003").exists()


def test_hostile_show_of_a_sweep_never_follows_a_point_key_that_is_a_path(tmp_path: Path) -> None:
    backend = shared_remote(tmp_path)
    project = victim(tmp_path, backend)
    trap = shared_prefix(backend) / "trap"
    trap.mkdir(parents=True)
    os.mkfifo(trap / "run.json")  # reading it blocks forever
    name = "Sweep_2026-11-01T00-00-00.000000Z_sweep004"
    record = {"key": name, "status": "completed", "kind": "sweep", "points": [{"key": str(trap), "status": "x"}]}
    assert backend.put(f"{name}/run.json", json.dumps(record).encode())
    proc = cli(project, "show", name, timeout=60)
    assert_ok(proc)
    assert "invalid key" in proc.stdout, proc.stdout


def test_hostile_downloaded_run_is_never_pushed_back_by_sync(seed: Seed, tmp_path: Path) -> None:
    backend = shared_remote(tmp_path)
    project = victim(tmp_path, backend)
    private = local_path(project) / "private"
    private.mkdir(parents=True)
    (private / "notes.txt").write_bytes(SECRET)
    evil = "Add_2026-11-01T00-00-00.000000Z_evil0002"
    edit = {"sync": {"state": "not_synced", "pending": ["private"]}, "mlflow": {"state": "not_synced"}}
    backend.plant_run(seed.run_dir(seed.add), evil, edit=edit)
    assert_ok(backend.cli(project, "download", evil))
    proc = backend.cli(project, "sync")
    assert_ok(proc)
    assert not [name for name in backend.objects() if name.startswith("private")], "exfiltrated"
    assert evil in proc.stderr and "downloaded" in proc.stderr


def test_hostile_pending_uploads_outside_the_run_are_dropped(seed: Seed, tmp_path: Path) -> None:
    backend = shared_remote(tmp_path)
    project = victim(tmp_path, backend)
    private = local_path(project) / "private"
    private.mkdir(parents=True)
    (private / "notes.txt").write_bytes(SECRET)
    key = "Add_2026-11-01T00-00-00.000000Z_evil0003"  # a run copied in by hand (rsync, a colleague)
    shutil.copytree(seed.run_dir(seed.add), local_path(project) / key)
    record = json.loads((local_path(project) / key / "run.json").read_text())
    record.update(key=key, sync={"state": "not_synced", "pending": ["private", f"{key}/args.json"]})
    record["mlflow"] = {"state": "disabled"}
    (local_path(project) / key / "run.json").write_text(json.dumps(record))
    proc = backend.cli(project, "sync")
    assert_ok(proc)
    uploaded = backend.objects()
    assert not [name for name in uploaded if name.startswith("private")], "uploaded a folder outside the run"
    assert f"{key}/run.json" in uploaded and "'private'" in proc.stderr


@pytest.mark.slow
def test_hostile_sync_never_reopens_another_runs_mlflow_run(
    seed: Seed, tmp_path: Path, migrated_store: Callable[[Path], str]
) -> None:
    backend, project, client, precious = _mlflow_victim(seed, tmp_path, migrated_store)
    key = "Add_2026-11-01T00-00-00.000000Z_evil0004"  # a record naming the genuine MLflow run
    shutil.copytree(seed.run_dir(seed.add), local_path(project) / key)
    record = json.loads((local_path(project) / key / "run.json").read_text())
    record.update(key=key, status="failed", sync={"state": "local"}, tags={"phd_flow.key": seed.add, "note": "x"})
    record["mlflow"] = {"state": "not_synced", "run_id": precious}
    (local_path(project) / key / "run.json").write_text(json.dumps(record))
    proc = backend.cli(project, "sync")
    assert_ok(proc)
    genuine = client.get_run(precious)
    assert genuine.data.tags["phd_flow.key"] == seed.add and "note" not in genuine.data.tags, proc.stderr[-1500:]
    assert genuine.info.status == "FINISHED" and not genuine.data.params
    mine = json.loads((local_path(project) / key / "run.json").read_text())["mlflow"]["run_id"]
    assert mine != precious and client.get_run(mine).data.tags["phd_flow.key"] == key


@pytest.mark.slow
def test_hostile_mlflow_backend_refuses_a_second_run_tagged_with_a_key(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from phd_flow.errors import StorageError
    from phd_flow.storage.mlflow_artifacts import KEY_TAG, MlflowRemote

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    key = "FitOLS_2026-11-01T00-00-00.000000Z_genuine1"
    source = tmp_path / "run.json"
    source.write_text('{"genuine": true}')
    MlflowRemote(uri, "exp").put(source, f"{key}/run.json")
    client = MlflowClient(uri)
    evil = client.create_run(client.get_experiment_by_name("exp").experiment_id, tags={KEY_TAG: key})
    (tmp_path / "evil").mkdir()
    (tmp_path / "evil" / "run.json").write_text('{"forged": true}')
    client.log_artifact(evil.info.run_id, str(tmp_path / "evil" / "run.json"))
    with pytest.raises(StorageError) as caught:
        MlflowRemote(uri, "exp").read_bytes(f"{key}/run.json")  # the victim's next command
    assert evil.info.run_id in str(caught.value) and key in str(caught.value)


def test_hostile_planted_names_never_win_a_key_prefix(seed: Seed, tmp_path: Path) -> None:
    backend = shared_remote(tmp_path)
    project = victim(tmp_path, backend)
    backend.plant_run(seed.run_dir(seed.add), seed.add)  # the victim's run, only in the bucket
    suffix = seed.add.rsplit("_", 1)[1]
    backend.plant_run(seed.run_dir(seed.add), f"{suffix}_evil", edit={"args": {"a": 666}})
    backend.plant_run(seed.run_dir(seed.add), f"{seed.add}x")  # a longer name the full key prefixes
    proc = backend.cli(project, "show", suffix)
    assert_ok(proc)
    # the victim's run (args a = 1), not the planted one (a = 666; "666" alone can be in a pid)
    assert seed.add in proc.stdout and "_evil" not in proc.stdout, proc.stdout
    assert re.search(r"^ +a +1$", proc.stdout, re.M) and not re.search(r"^ +a +666$", proc.stdout, re.M), proc.stdout
    assert_ok(backend.cli(project, "download", seed.add))
    assert (local_path(project) / seed.add / "run.json").is_file()


def test_hostile_malformed_remote_records_never_break_latest(seed: Seed, tmp_path: Path) -> None:
    from datetime import datetime, timezone

    backend = shared_remote(tmp_path)
    project = victim(tmp_path, backend, extra='[stages.load_data]\nload_from = "latest"\n')
    now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H-%M-%S.%fZ")
    no_key = {"status": "completed", "node": "Prepare", "stages": {"load_data": {"status": "completed"}}}
    assert backend.put(f"Prepare_{now}_zzzzzzz1/run.json", json.dumps(no_key).encode())
    listed = {"key": f"Prepare_{now}_zzzzzzz2", "status": "completed", "node": "Prepare", "stages": [1]}
    assert backend.put(f"Prepare_{now}_zzzzzzz2/run.json", json.dumps(listed).encode())
    proc = backend.cli(project, "run", "Prepare", "--dataset", DATASET)
    assert_ok(proc)
    assert "zzzzzzz1" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "record",
    [
        '{"key": "K", "status": "completed", "sync": "x", "mlflow": []}',
        '{"status": ' + "[" * 100_000 + "]" * 100_000 + "}",
        '{"key": "K", "status": "completed", "result": "x"}',
        '{"key": "K", "status": "completed", "attempts": 5}',
        '{"key": "K", "status": "completed", "attempts": [{"metrics_from": "x"}]}',
        '{"key": "K", "status": "completed", "mlflow": {"run_id": {"a": 1}}}',
    ],
    ids=["sync-not-object", "deep-json", "result-not-object", "attempts-int", "attempt-start-text", "mlflow-id-object"],
)
def test_hostile_malformed_run_json_is_one_message(record: str, tmp_path: Path) -> None:
    backend = shared_remote(tmp_path)
    project = victim(tmp_path, backend)
    key = "Add_2026-11-01T00-00-00.000000Z_evil0005"
    assert backend.put(f"{key}/run.json", record.replace('"K"', f'"{key}"').encode())
    for args in (["ls", "--remote"], ["show", key], ["result", key]):
        proc = backend.cli(project, *args)
        assert "Traceback" not in proc.stderr, f"{args}: {proc.stderr[-1500:]}"
        assert proc.returncode in (0, 2), f"{args}: {proc.stderr[-1500:]}"
    assert key in backend.cli(project, "ls", "--remote").stderr


def test_hostile_poisoned_index_entry_is_dropped(seed: Seed, tmp_path: Path) -> None:
    import gzip

    backend = shared_remote(tmp_path)
    project = victim(tmp_path, backend)
    backend.plant_run(seed.run_dir(seed.add), seed.add)
    entry = {"key": seed.add, "status": "completed", "node": "Add", "args": {"a": 1}, "sync": 7}
    assert backend.put(".phd_flow/runs_index.json.gz", gzip.compress(json.dumps({seed.add: entry}).encode()))
    proc = backend.cli(project, "ls", "--remote")
    assert_ok(proc)
    assert seed.add in proc.stdout and "Traceback" not in proc.stderr


def _day(key: str) -> str:
    return key.rsplit("_", 2)[1][:10]


def _gz(text: str | bytes) -> bytes:
    import gzip

    return gzip.compress(text.encode() if isinstance(text, str) else text)


_FORGED = {"node": "Add", "status": "completed", "args": {"a": 777}, "sync": {"state": "synced"}}
_OTHER_DAY = "Add_2020-01-01T00-00-00.000000Z_other001"


@pytest.mark.parametrize(
    "case",
    ["well-formed", "schema", "running", "key-elsewhere", "misfiled", "not-gzip", "not-json", "deep", "bomb", "list"],
)
def test_hostile_day_shard_entries_are_dropped(seed: Seed, case: str, tmp_path: Path) -> None:
    """A push-time day shard (``.phd_flow/index/<day>.json.gz``) is remote data: only an entry
    that could be the run's own record, filed in its own day, is listed; anything else is dropped
    (the run's run.json is read instead), never a traceback, never inflated past the cap."""
    from phd_flow.runs.index import MAX_INDEX_BYTES

    backend = shared_remote(tmp_path)
    project = victim(tmp_path, backend)
    backend.plant_run(seed.run_dir(seed.add), seed.add)  # its true run.json says a=1
    own, entry = f".phd_flow/index/{_day(seed.add)}.json.gz", {**_FORGED, "key": seed.add}
    shards = {
        "well-formed": {own: _gz(json.dumps({seed.add: entry}))},  # the control: shards are read
        "schema": {own: _gz(json.dumps({seed.add: {**entry, "sync": 7}}))},
        "running": {own: _gz(json.dumps({seed.add: {**entry, "status": "running"}}))},
        "key-elsewhere": {own: _gz(json.dumps({seed.add: {**entry, "key": _OTHER_DAY}}))},
        "misfiled": {f".phd_flow/index/{_day(_OTHER_DAY)}.json.gz": _gz(json.dumps({seed.add: entry}))},
        "not-gzip": {own: b"{not gzip"},
        "not-json": {own: _gz("{not json")},
        "deep": {own: _gz("[" * 100_000 + "]" * 100_000)},
        "bomb": {own: _gz(b" " * (MAX_INDEX_BYTES + 1))},
        "list": {own: _gz(json.dumps([entry]))},
    }[case]
    if case == "misfiled":  # a run of that day, so that its shard is read
        backend.plant_run(seed.run_dir(seed.add), _OTHER_DAY)
    for name, data in shards.items():
        assert backend.put(name, data)
    proc = backend.cli(project, "ls", "--remote", "--json")
    assert_ok(proc)
    listed = {row["key"]: row for row in json.loads(proc.stdout)}
    assert listed[seed.add]["args"]["a"] == (777 if case == "well-formed" else 1), case
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "manifest",
    ['{"files": []}', '{"files": {"run.json": {"size": 1e999, "sha256": ""}}}', "[" * 100_000],
    ids=["list", "overflow", "deep"],
)
def test_hostile_malformed_manifest_is_not_a_traceback(seed: Seed, manifest: str, tmp_path: Path) -> None:
    backend = shared_remote(tmp_path)
    project = victim(tmp_path, backend)
    backend.plant_run(seed.run_dir(seed.add), seed.add)
    assert backend.put(f"{seed.add}/{MANIFEST}", manifest.encode())
    proc = backend.cli(project, "download", seed.add)
    assert_ok(proc)
    assert (local_path(project) / seed.add / "results.pickle").is_file()


@pytest.mark.parametrize(
    "names",
    [["data", "data/x"], [f"{MANIFEST}/x"], ["a.phd_flow-part"], ["st/b.phd_flow-tmp"]],
    ids=["file-and-folder", "manifest-as-folder", "part", "tmp"],
)
def test_hostile_listing_with_a_name_both_file_and_folder_or_reserved_is_refused(
    seed: Seed, names: list[str], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    backend = make_backend("s3", request, tmp_path)
    project = victim(tmp_path, backend)
    backend.plant_run(seed.run_dir(seed.add), seed.add)
    for name in names:
        assert backend.put(f"{seed.add}/{name}", b"x")
    proc = backend.cli(project, "download", seed.add)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-1500:]
    assert seed.add in proc.stderr and names[0].split("/")[0] in proc.stderr
    assert not (local_path(project) / seed.add / "run.json").exists()


def test_hostile_result_section_names_no_other_file(seed: Seed, tmp_path: Path) -> None:
    backend = shared_remote(tmp_path)
    project = victim(tmp_path, backend)
    record = json.loads((seed.run_dir(seed.add) / "run.json").read_text())
    backend.plant_run(seed.run_dir(seed.add), seed.add, edit={"result": {**record["result"], "file": ".."}})
    proc = backend.cli(project, "result", seed.add, "--trust-remote", env={"PYTHONPATH": str(REPO)})
    assert_ok(proc)
    assert "AddResult(total=3)" in proc.stdout


# --- second hostile review -------------------------------------------------------------------------


def _victim_with_an_mlflow_run(tmp_path: Path) -> tuple[Backend, Path, str, str]:
    """A victim project with MLflow on and one genuine run V: (backend, project, V, V's MLflow id)."""
    backend = shared_remote(tmp_path)
    project = victim(tmp_path, backend, mlflow="")
    proc = backend.cli(project, "run", "Add", "--a", "1")
    assert_ok(proc)
    (run_dir,) = [p for p in local_path(project).iterdir() if p.name.startswith("Add_")]
    return backend, project, run_dir.name, json.loads((run_dir / "run.json").read_text())["mlflow"]["run_id"]


def _mlflow_run(project: Path, run_id: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(f"sqlite:///{local_path(project) / 'mlflow.db'}").get_run(run_id)


@pytest.mark.slow
def test_hostile_stale_fix_never_kills_another_runs_mlflow_run(seed: Seed, tmp_path: Path) -> None:
    backend, project, _, victim_id = _victim_with_an_mlflow_run(tmp_path)
    evil = "Add_2026-11-01T00-00-00.000000Z_evil0010"
    edit = {
        "status": "running",
        "host": "other-host",
        "pid": 1,
        "heartbeat_at": "2001-01-01T00:00:00+00:00",
        "mlflow": {"state": "synced", "run_id": victim_id},
    }
    backend.plant_run(seed.run_dir(seed.add), evil, edit=edit)
    assert_ok(backend.cli(project, "download", evil))
    proc = backend.cli(project, "ls", "--stale", "--fix")
    assert_ok(proc)
    assert _mlflow_run(project, victim_id).info.status == "FINISHED", proc.stderr[-2000:]


@pytest.mark.slow
def test_hostile_rm_never_deletes_an_mlflow_run_through_a_planted_child(seed: Seed, tmp_path: Path) -> None:
    backend, project, victim_key, victim_id = _victim_with_an_mlflow_run(tmp_path)
    evil = "Add_2026-11-01T00-00-00.000000Z_evil0011"
    child = {
        "key": victim_key,
        "node": "Add",
        "status": "completed",
        "mlflow": {"state": "synced", "run_id": victim_id},
    }
    backend.plant_run(seed.run_dir(seed.add), evil, extra={f"{victim_key}/run.json": json.dumps(child).encode()})
    assert_ok(backend.cli(project, "download", evil))
    backend.cli(project, "rm", "--force", evil)
    assert _mlflow_run(project, victim_id).info.lifecycle_stage == "active"


def test_hostile_downloaded_sweep_is_never_resumed(tmp_path: Path) -> None:
    backend = shared_remote(tmp_path)
    project = victim(tmp_path, backend)
    private = tmp_path / "private.csv"
    private.write_bytes(b"age,ssn,target\n34,1234,1\n51,9876,0\n")
    sweep, point = "Sweep_2026-11-01T00-00-00.000000Z_sweep003", "FitOLS_2026-11-01T00-00-00.000000Z_pt000003"
    record = {
        "kind": "sweep",
        "key": sweep,
        "node": "FitOLS",
        "node_class": "my_project.fit_ols.FitOLS",
        "package": "my_project",
        "status": "failed",
        "executor": "local",
        "slurm_job_ids": [],
        "base_args": [],
        "grid": [],
        "points": [
            {"key": point, "params": {}, "argv": ["--dataset", str(private), "--target", "target"], "status": "failed"}
        ],
    }
    data = json.dumps(record).encode()
    manifest = {"run.json": {"size": len(data), "sha256": sha(data), "mtime_ns": 0}}
    assert backend.put(f"{sweep}/run.json", data)
    assert backend.put(f"{sweep}/{MANIFEST}", json.dumps({"version": 1, "files": manifest}).encode())
    assert_ok(backend.cli(project, "download", sweep))
    proc = backend.cli(project, "sweep", "--resume", sweep)
    assert proc.returncode == 2 and "downloaded" in proc.stderr, proc.stderr[-2000:]
    assert not (local_path(project) / point).exists(), "a point of the bucket's sweep ran here"


# --- third hostile review: the push-time index, replacement, the feeder ---------------------------


@pytest.mark.slow
def test_hostile_shard_status_never_picks_what_rm_deletes(seed: Seed, tmp_path: Path) -> None:
    """``rm --remote --failed`` deletes what the runs' own run.json say failed, never what an
    index entry claims: a day shard (planted, or stale after a resume elsewhere) saying a
    completed run failed does not get the completed run deleted."""
    backend = shared_remote(tmp_path)
    project = victim(tmp_path, backend)
    backend.plant_run(seed.run_dir(seed.add), seed.add)  # its run.json: completed
    entry = {**_FORGED, "key": seed.add, "status": "failed", "error": "forged"}
    assert backend.put(f".phd_flow/index/{_day(seed.add)}.json.gz", _gz(json.dumps({seed.add: entry})))
    listed = backend.cli(project, "ls", "--remote", "--json")
    assert_ok(listed)
    assert {row["key"]: row for row in json.loads(listed.stdout)}[seed.add]["status"] == "failed"  # a listing cache
    proc = backend.cli(project, "rm", "--remote", "--failed", "--force")
    assert_ok(proc)
    assert f"{seed.add}/run.json" in backend.objects(), proc.stdout
    shown = backend.cli(project, "show", seed.add)
    assert_ok(shown)
    assert "completed" in shown.stdout


_MALFORMED_FIELDS = [
    {"args": [1, 2]},
    {"started_at": 12},
    {"started_at": "yesterday", "ended_at": {"a": 1}},
    {"heartbeat_at": [1], "pid": "abc", "host": ["h"]},
    {"metrics": [1]},
    {"metrics": {"loss": {"last": "x", "min": [], "steps": "y"}}},
    {"children": [1, {"path": 5}], "sweep": 5},
    {"kind": ["sweep"], "error": {"a": 1}, "node": 5},
    {"mlflow": {"run_id": [1], "state": 5}, "sync": {"state": ["x"], "at": 5}},
    {"pid": 10**300, "started_at": 1e308},
]


@pytest.mark.parametrize("command", [("ls", "--remote"), ("ls", "--remote", "--json", "--where", "metrics.loss<1")])
def test_hostile_shard_entries_with_malformed_fields_are_listed_without_a_traceback(
    seed: Seed, command: tuple[str, ...], tmp_path: Path
) -> None:
    """Fields the shape check does not cover (times, args, metrics, children ...) may be anything
    in a planted shard entry: the listing shows or filters them, never a traceback."""
    backend = shared_remote(tmp_path)
    project = victim(tmp_path, backend)
    stamp = seed.add.rsplit("_", 2)[1]
    entries = {}
    for i, fields in enumerate(_MALFORMED_FIELDS):
        key = f"Add_{stamp}_mal{i:05d}"
        backend.plant_run(seed.run_dir(seed.add), key)
        entries[key] = {**_FORGED, "key": key, **fields}
    assert backend.put(f".phd_flow/index/{_day(seed.add)}.json.gz", _gz(json.dumps(entries)))
    proc = backend.cli(project, *command)
    assert_ok(proc)
    assert "Traceback" not in proc.stderr


def _mlflow_victim(seed: Seed, tmp_path: Path, migrated_store: Callable[[Path], str]) -> tuple[Backend, Path, Any, str]:
    """A victim project on its own sqlite MLflow store holding a genuine, finished MLflow run of
    the seed's Add run: (backend, project, client, that run's id)."""
    import mlflow

    backend = shared_remote(tmp_path)
    uri = migrated_store(tmp_path / "home" / "mlflow.db")
    project = victim(tmp_path, backend, mlflow=f'enabled = true\ntracking_uri = "{uri}"\nexperiment = "victim"\n')
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("victim")
    precious = client.create_run(experiment, tags={"phd_flow.key": seed.add}).info.run_id
    client.set_terminated(precious, "FINISHED")
    return backend, project, client, precious


def _hand_over(seed: Seed, project: Path, key: str, **fields: Any) -> Path:
    """A run directory from elsewhere, copied into the victim's local_path, its run.json edited."""
    run_dir = local_path(project) / key
    if not run_dir.exists():
        shutil.copytree(seed.run_dir(seed.add), run_dir)
    record = json.loads((run_dir / "run.json").read_text())
    record.update(key=key, sync={"state": "local"}, **fields)
    (run_dir / "run.json").write_text(json.dumps(record))
    return run_dir


@pytest.mark.slow
@pytest.mark.parametrize("made_by", ["record-tags", "mlflow"])
def test_hostile_settling_a_replacement_never_deletes_another_runs_mlflow_run(
    seed: Seed, made_by: str, tmp_path: Path, migrated_store: Callable[[Path], str]
) -> None:
    """A run.json naming another key's MLflow run as the run its finished replacement replaced
    (``mlflow.run_id``), with a replacement tagged ``phd_flow.replaces`` = that run (through the
    record's own tags, or made in the store by whoever can write to it), never gets that run
    tagged, re-parented or deleted."""
    backend, project, client, precious = _mlflow_victim(seed, tmp_path, migrated_store)
    key = "Add_2026-11-01T00-00-00.000000Z_evil0012"
    if made_by == "record-tags":  # phd_flow itself makes the replacement, from the record's tags
        tags = {"phd_flow.replaces": precious, "phd_flow.attempts": "9", "phd_flow.parent_key": seed.add}
        run_dir = _hand_over(seed, project, key, tags=tags, mlflow={"state": "pending"})
        assert_ok(backend.cli(project, "sync"))
        made = json.loads((run_dir / "run.json").read_text())["mlflow"]["run_id"]
        assert not set(tags) & set(client.get_run(made).data.tags)
    else:
        tags = {"phd_flow.key": key, "phd_flow.replaces": precious}
        made = client.create_run(client.get_run(precious).info.experiment_id, tags=tags).info.run_id
    assert made != precious
    _hand_over(seed, project, key, mlflow={"state": "pending", "run_id": precious, "replacement": made})
    proc = backend.cli(project, "sync")
    assert_ok(proc)
    genuine = client.get_run(precious)
    assert genuine.info.lifecycle_stage == "active", proc.stderr[-2000:]
    assert "phd_flow.replaced_by" not in genuine.data.tags


@pytest.mark.slow
@pytest.mark.parametrize(
    "fields",
    [
        {"attempts": [{"metrics_from": 0}, {"metrics_from": "x"}]},
        {"attempts": 5},
        {"mlflow": {"state": "pending", "replacement": ["a"]}},
    ],
    ids=["attempt-start-text", "attempts-int", "replacement-list"],
)
def test_hostile_sync_names_a_malformed_record_instead_of_blaming_mlflow(
    seed: Seed, fields: dict[str, Any], tmp_path: Path, migrated_store: Callable[[Path], str]
) -> None:
    """A run directory from elsewhere whose run.json has attempts or MLflow ids of the wrong
    shape: ``sync`` names that run.json (never "MLflow is not reachable", never "Everything is
    synced.", never a traceback), and the MLflow store is left alone."""
    backend, project, client, precious = _mlflow_victim(seed, tmp_path, migrated_store)
    key = "Add_2026-11-01T00-00-00.000000Z_evil0014"
    _hand_over(seed, project, key, **{"status": "failed", "mlflow": {"state": "pending"}, **fields})
    proc = backend.cli(project, "sync")
    assert "Traceback" not in proc.stderr and "not reachable" not in proc.stderr, proc.stderr[-2000:]
    assert "Everything is synced" not in proc.stderr, proc.stderr[-2000:]
    assert f"{key}/run.json is not a phd_flow run record" in proc.stderr, proc.stderr[-2000:]
    assert [r.info.run_id for r in client.search_runs([client.get_run(precious).info.experiment_id])] == [precious]


def _serve_queue(queue: Path, uri: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """The store's feeder on ``queue``, as a run starts it, until its queue stays empty."""
    env = {**os.environ, "PHD_FLOW_FEED_URI": uri, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true"}
    return subprocess.run(
        [sys.executable, "-m", "phd_flow.feeder", str(queue), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_hostile_feed_marker_naming_a_path_outside_local_path_is_dropped(
    seed: Seed, tmp_path: Path, migrated_store: Callable[[Path], str]
) -> None:
    """A co-user who can write the feed queue (a shared local_path) plants a marker naming
    ``../<dir>``: the feeder never feeds, locks or writes a run.json outside local_path."""
    from phd_flow.feeder import queue_dir

    _, project, client, precious = _mlflow_victim(seed, tmp_path, migrated_store)
    uri = client.tracking_uri
    outside = tmp_path / "home" / "theirs" / "Add_2026-11-01T00-00-00.000000Z_evil0015"
    shutil.copytree(seed.run_dir(seed.add), outside)
    record = json.loads((outside / "run.json").read_text())
    record.update(key=outside.name, mlflow={"state": "pending"})
    (outside / "run.json").write_text(json.dumps(record))
    before = (outside / "run.json").read_bytes()
    queue = queue_dir(local_path(project), uri)
    queue.mkdir(parents=True)
    (queue / urllib.parse.quote(f"../../theirs/{outside.name}", safe="")).touch()
    proc = _serve_queue(queue, uri)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (outside / "run.json").read_bytes() == before, proc.stderr[-2000:]
    assert not (outside / ".phd_flow-feed.lock").exists()
    assert [r.info.run_id for r in client.search_runs([client.get_run(precious).info.experiment_id])] == [precious]
    assert not list(queue.glob("..*")), "the marker stays queued"


@pytest.mark.slow
def test_hostile_feeder_never_adopts_a_lock_descriptor_it_does_not_hold(tmp_path: Path) -> None:
    """``--lock-fd`` names a descriptor of the queue's feeder.lock that holds no lock while
    another feeder holds it: the new feeder does not feed (no second feeder), it leaves."""
    import fcntl

    queue = tmp_path / "data_storage" / ".phd_flow" / "mlflow-feed" / "0123456789abcdef"
    queue.mkdir(parents=True)
    lock = queue / "feeder.lock"
    running = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)  # the running feeder's lock
    fcntl.flock(running, fcntl.LOCK_EX | fcntl.LOCK_NB)
    unlocked = os.open(lock, os.O_RDWR)
    try:
        env = {**os.environ, "PHD_FLOW_FEED_URI": f"sqlite:///{tmp_path / 'm.db'}", "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "phd_flow.feeder", str(queue), "--lock-fd", str(unlocked)],
            env=env,
            pass_fds=(unlocked,),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _, err = proc.communicate(timeout=120)
    finally:
        os.close(unlocked)
        os.close(running)
    assert proc.returncode == 0, err[-2000:]
    assert f"pid {proc.pid}" not in lock.read_text(), "a second feeder ran on the queue"


@pytest.mark.slow
@pytest.mark.parametrize("given", ["abc", "99999"])
def test_hostile_feeder_with_a_lock_fd_that_is_no_descriptor_takes_the_lock_itself(given: str, tmp_path: Path) -> None:
    queue = tmp_path / "data_storage" / ".phd_flow" / "mlflow-feed" / "0123456789abcdef"
    queue.mkdir(parents=True)
    env = {**os.environ, "PHD_FLOW_FEED_URI": f"sqlite:///{tmp_path / 'm.db'}", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, "-m", "phd_flow.feeder", str(queue), "--lock-fd", given],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("asked", ["completed", "elsewhere"])
def test_hostile_close_request_never_marks_a_failed_sweep_finished(
    seed: Seed, asked: str, tmp_path: Path, migrated_store: Callable[[Path], str]
) -> None:
    """A close request planted in a failed sweep's directory (a co-user of a shared local_path)
    asking for ``completed``, or naming another experiment: the feeder closes a sweep's MLflow
    run only with the status its points' own run.json give, in their experiment, so MLflow never
    shows a failed sweep FINISHED, nor gets a sweep run elsewhere (the real one left open)."""
    from phd_flow.feeder import queue_dir

    backend, project, client, _ = _mlflow_victim(seed, tmp_path, migrated_store)
    proc = backend.cli(project, "sweep", "Fail", "--grid", "message=a,b")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (sweep,) = [p for p in new_runs(project) if json.loads((p / "run.json").read_text()).get("kind") == "sweep"]
    experiments = [e.experiment_id for e in client.search_experiments()]
    (made,) = client.search_runs(experiments, filter_string=f"tags.`phd_flow.key` = '{sweep.name}'")
    assert made.info.status == "FAILED"
    (sweep / ".phd_flow-mlflow-closed").unlink()
    experiment = client.get_experiment(made.info.experiment_id).name
    request = {"status": "completed", "experiment": experiment}
    if asked == "elsewhere":
        request = {"status": "failed", "experiment": "elsewhere"}
    (sweep / ".phd_flow-mlflow-close").write_text(json.dumps(request))
    queue = queue_dir(local_path(project), client.tracking_uri)
    (queue / sweep.name).touch()
    served = _serve_queue(queue, client.tracking_uri)
    assert served.returncode == 0, served.stderr[-2000:]
    assert client.get_run(made.info.run_id).info.status == "FAILED", served.stderr[-2000:]
    assert client.get_experiment_by_name("elsewhere") is None, served.stderr[-2000:]


@pytest.mark.slow
def test_hostile_child_run_is_never_nested_under_an_mlflow_run_of_another_key(
    seed: Seed, tmp_path: Path, migrated_store: Callable[[Path], str]
) -> None:
    """A pipeline run directory from elsewhere whose run.json names another key's MLflow run:
    syncing its child run never nests the child under that MLflow run."""
    backend, project, client, precious = _mlflow_victim(seed, tmp_path, migrated_store)
    key, child = "Add_2026-11-01T00-00-00.000000Z_evil0016", "Add_2026-11-01T00-00-00.000000Z_evil0017"
    _hand_over(seed, project, key, status="completed", mlflow={"state": "synced", "run_id": precious})
    shutil.copytree(seed.run_dir(seed.add), local_path(project) / key / child)
    record = json.loads((local_path(project) / key / child / "run.json").read_text())
    record.update(key=child, parent=key, path=f"{key}/{child}", sync={"state": "local"}, mlflow={"state": "pending"})
    (local_path(project) / key / child / "run.json").write_text(json.dumps(record))
    proc = backend.cli(project, "sync", child)
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    experiment = client.get_run(precious).info.experiment_id
    nested = client.search_runs([experiment], filter_string=f"tags.`mlflow.parentRunId` = '{precious}'")
    assert not nested, proc.stderr[-2000:]


@pytest.mark.slow
def test_hostile_run_claiming_a_sweep_is_never_nested_under_its_mlflow_run(
    seed: Seed, tmp_path: Path, migrated_store: Callable[[Path], str]
) -> None:
    """A run directory from elsewhere whose run.json names one of the user's sweeps (``sweep``):
    MLflow never shows it as a point of that sweep, only the sweep's own points are nested."""
    backend, project, client, _ = _mlflow_victim(seed, tmp_path, migrated_store)
    proc = backend.cli(project, "sweep", "Fail", "--grid", "message=a")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    (sweep,) = [p for p in new_runs(project) if json.loads((p / "run.json").read_text()).get("kind") == "sweep"]
    experiments = [e.experiment_id for e in client.search_experiments()]
    (parent,) = client.search_runs(experiments, filter_string=f"tags.`phd_flow.key` = '{sweep.name}'")
    key = "Add_2026-11-01T00-00-00.000000Z_evil0018"
    _hand_over(seed, project, key, status="completed", sweep=sweep.name, mlflow={"state": "pending"})
    proc = backend.cli(project, "sync")
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    nested = client.search_runs(experiments, filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert key not in {r.data.tags.get("phd_flow.key") for r in nested}, proc.stderr[-2000:]
    assert len(nested) == 1  # the sweep's own point

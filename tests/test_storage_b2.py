"""The B2 backend on b2sdk's RawSimulator: the storage contract, credentials, an end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from b2sdk.v2 import B2Api, B2HttpApiConfig, InMemoryAccountInfo, RawSimulator
from b2sdk.v2 import exception as b2_exc

from phd_flow.config import Config, MlflowConfig, StorageConfig, parse_config
from phd_flow.errors import (
    InvalidKeyError,
    StorageAuthError,
    StorageConfigError,
    StorageNotFoundError,
    StorageUnavailableError,
)
from phd_flow.project import Project
from phd_flow.storage import make_remote, make_storage
from phd_flow.storage.b2 import B2Remote, b2_name_problem
from phd_flow.testing import RemoteContract, storage_for, write_tree
from phd_flow.testing.contract import read_tree
from tests.conftest import cli, run_dirs, write_config
from tests.nodes import Add, AddArgs

BUCKET = "phd-flow-test"
SECRET = "K000-this-is-not-the-real-key"


class Simulated:
    """A RawSimulator account with one bucket, and B2 APIs logged into it."""

    def __init__(self, raw_class: type[RawSimulator] = RawSimulator) -> None:
        self.api = simulator_api(raw_class)
        self.raw: Any = self.api.session.raw_api
        self.key_id, self.key = self.raw.create_account()
        self.api.authorize_account("production", self.key_id, self.key)
        self.api.create_bucket(BUCKET, "allPrivate")

    def remote(self, prefix: str = "proj", credentials: tuple[str, str] | None = None) -> B2Remote:
        """A remote on this account; with ``credentials`` a fresh API that logs in on first use."""
        if credentials is None:
            return B2Remote(self.api, BUCKET, prefix)
        api = simulator_api()
        api.session.raw_api = self.raw  # the same simulated account, a new login
        return B2Remote(api, BUCKET, prefix, credentials=credentials)

    def names(self) -> list[str]:
        """Every file version's name in the bucket (all versions, hidden ones included)."""
        bucket = self.api.get_bucket_by_name(BUCKET)
        return sorted(v.file_name for v, _ in bucket.ls("", latest_only=False, recursive=True))


def simulator_api(raw_class: type[RawSimulator] = RawSimulator) -> B2Api:
    return B2Api(InMemoryAccountInfo(), api_config=B2HttpApiConfig(_raw_api_class=raw_class))


@pytest.fixture
def b2() -> Simulated:
    return Simulated()


class TestB2Contract(RemoteContract):
    """The shared contract on the simulator (200-byte parts: nearly every file is a large file)."""

    large_file_size = 64 << 10  # 328 parts of 200 B on the simulator
    refused_keys = [
        "a//b.txt",
        "trailing/",
        "back\\slash",
        "ctl\x01char",
        "x" * 251,
        "/".join(["d" * 200] * 6),
    ]
    credentials_hint = ("B2_APPLICATION_KEY_ID", "B2_APPLICATION_KEY")
    bad_secret = SECRET

    @pytest.fixture
    def remote(self, b2: Simulated) -> B2Remote:
        return b2.remote()

    @pytest.fixture
    def bad_credentials_remote(self, b2: Simulated) -> B2Remote:
        return b2.remote(credentials=(b2.key_id, SECRET))


def test_delete_removes_every_version(b2: Simulated) -> None:
    remote = b2.remote()
    for content in (b"v1", b"v2", b"v3"):
        remote.write_bytes("run/f.txt", content)
    assert b2.names() == ["proj/run/f.txt"] * 3
    remote.delete(["run/f.txt"])
    assert b2.names() == []


def test_missing_bucket_names_the_bucket(b2: Simulated) -> None:
    remote = B2Remote(b2.api, "no-such-bucket", "p")
    with pytest.raises(StorageNotFoundError, match="no-such-bucket") as info:
        list(remote.list(""))
    assert "[storage] bucket" in str(info.value)


def test_credentials_come_from_env_first_and_never_show(
    b2: Simulated, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = parse_config(f'[storage]\nuri = "b2://{BUCKET}/runs"\nkey_id = "cfg-id"\nkey = "cfg-key"\n', tmp_path)
    monkeypatch.setenv("B2_APPLICATION_KEY_ID", b2.key_id)
    monkeypatch.setenv("B2_APPLICATION_KEY", b2.key)
    remote = make_remote(config)
    assert isinstance(remote, B2Remote)
    assert remote._credentials == (b2.key_id, b2.key)
    assert remote.describe() == f"b2://{BUCKET}/runs" and remote.prefix == "runs"
    shown = " ".join([remote.describe(), repr(remote), repr(config), repr(make_storage(config, remote))])
    assert b2.key not in shown and "cfg-key" not in shown


def test_missing_credentials_name_env_vars_and_config_keys(tmp_path: Path) -> None:
    config = parse_config(f'[storage]\nbackend = "b2"\nbucket = "{BUCKET}"\n', tmp_path)
    with pytest.raises(StorageAuthError) as info:
        make_remote(config)
    message = str(info.value)
    for name in ("B2_APPLICATION_KEY_ID", "B2_APPLICATION_KEY", "key_id", BUCKET):
        assert name in message


def test_missing_bucket_is_a_config_error(tmp_path: Path) -> None:
    config = parse_config('[storage]\nbackend = "b2"\nprefix = "p"\n', tmp_path)
    config.storage.key_id, config.storage.key = "id", "k"
    with pytest.raises(StorageConfigError, match=r"\[storage\] bucket"):
        B2Remote.from_config(config)


def test_seed_flat_keys_select_b2(tmp_path: Path) -> None:
    config = parse_config(
        f'local_path = "/tmp/x"\nb2_key_id = "id"\nb2_key = "{SECRET}"\nb2_bucket = "{BUCKET}"\nb2_prefix = "seed"\n',
        tmp_path,
    )
    remote = make_remote(config)
    assert isinstance(remote, B2Remote) and remote.describe() == f"b2://{BUCKET}/seed"
    assert SECRET not in repr(remote) + repr(config)


@pytest.mark.parametrize(
    ("name", "fragment"),
    [
        ("ok/name ✓.txt", None),
        ("a" * 1001, "UTF-8 bytes"),
        ("a/\x7f", "control"),
        ("é" * 126, "segment"),
    ],
)
def test_name_rules(name: str, fragment: str | None) -> None:
    problem = b2_name_problem(name)
    assert problem is None if fragment is None else fragment in str(problem)


def test_a_refused_name_names_the_file(b2: Simulated, tmp_path: Path) -> None:
    storage = storage_for(b2.remote(), tmp_path / "m")
    write_tree(storage.path("run_1"), {"ok.txt": b"1", "bad\x01name.txt": b"2"})
    with pytest.raises(InvalidKeyError, match=r"bad\\x01name.txt"):
        storage.upload("run_1")


@pytest.mark.slow
def test_node_run_lands_in_b2_and_comes_back_on_a_second_machine(b2: Simulated, tmp_path: Path) -> None:
    def config(machine: str) -> Config:
        return Config(
            local_path=tmp_path / machine,
            project_root=tmp_path,
            mlflow=MlflowConfig(enabled=False),
            storage=StorageConfig(backend="b2", bucket=BUCKET, prefix="proj"),
        )

    # The simulator cannot cross processes: the Project takes it as the remote.
    node = Add(AddArgs(a=40), config=Project(config=config("machine1"), remote=b2.remote()))
    assert node.run().total == 42
    record = json.loads((node.output_dir / "run.json").read_text())
    assert record["sync"]["state"] == "synced" and record["sync"]["remote"] == f"b2://{BUCKET}/proj"
    key = str(node.key)
    assert f"proj/{key}/results.pickle" in b2.names()

    second = make_storage(config("machine2"), b2.remote())
    second.download(key)
    assert read_tree(second.path(key)) == read_tree(node.output_dir)
    assert set(read_tree(second.path(key))) >= {
        "run.json",
        "args.json",
        "output.log",
        "results.pickle",
    }


@pytest.mark.slow
def test_cli_run_without_b2_credentials_completes_locally_and_says_what_to_set(
    project: Path,
) -> None:
    write_config(
        project,
        'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nenabled = false\n'
        f'[storage]\nbackend = "b2"\nbucket = "{BUCKET}"\n',
    )
    proc = cli(project, "run", "FitOLS", "--dataset", "data/diabetes.csv", "--target", "target")
    assert proc.returncode == 3, proc.stderr
    assert "B2_APPLICATION_KEY_ID" in proc.stderr and BUCKET in proc.stderr
    (run_dir,) = run_dirs(project / "data_storage")
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["sync"]["state"] == "not_synced"
    assert (run_dir / "results.pickle").is_file()


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (b2_exc.ServiceError(f"500 internal error for {SECRET}"), StorageUnavailableError),
        (b2_exc.TooManyRequests(retry_after_seconds=3), StorageUnavailableError),
        (b2_exc.B2ConnectionError("connection refused"), StorageUnavailableError),
        (
            b2_exc.InvalidAuthToken(f"token {SECRET} expired", "expired_auth_token"),
            StorageAuthError,
        ),
        (b2_exc.NonExistentBucket("gone"), StorageNotFoundError),
        (b2_exc.FileNotPresent(), StorageNotFoundError),
    ],
)
def test_b2sdk_errors_become_phd_flow_errors_without_secrets(
    b2: Simulated, error: Exception, expected: type[Exception]
) -> None:
    remote = b2.remote(credentials=(b2.key_id, SECRET))
    with pytest.raises(expected) as info, remote._translate("run/x.txt"):
        raise error
    assert SECRET not in str(info.value) and BUCKET in str(info.value)
    assert info.value.__cause__ is error

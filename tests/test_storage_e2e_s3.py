"""End to end on S3 (moto's server): a node run lands in the bucket, a second machine pulls it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from phd_flow.storage.engine import MANIFEST
from tests import s3_fixtures
from tests.conftest import cli, run_dirs, write_config
from tests.s3_fixtures import S3Server, closed_port_url, make_bucket

moto_server = s3_fixtures.moto_server  # the session's S3 server fixture

AWS = str(Path(sys.executable).with_name("aws"))
RUN = ("run", "FitOLS", "--dataset", "data/diabetes.csv", "--target", "target")


def s3_config(bucket: str | None, endpoint: str, local_path: str = "${PROJECT_ROOT}/data_storage") -> str:
    bucket_line = f'bucket = "{bucket}"\n' if bucket else ""
    return (
        f'local_path = "{local_path}"\n[mlflow]\nexperiment = "test"\n'
        f'[storage]\nbackend = "s3"\n{bucket_line}prefix = "proj"\n'
        f'endpoint_url = "{endpoint}"\nretries = 2\n'
    )


def aws_ls(server: S3Server, bucket: str) -> set[str]:
    """Keys below s3://bucket/proj/ as the AWS CLI sees them (relative to the prefix)."""
    proc = subprocess.run(
        [
            AWS,
            "s3",
            "ls",
            "--recursive",
            f"s3://{bucket}/proj/",
            "--endpoint-url",
            server.endpoint_url,
        ],
        env={**os.environ, **server.env()},
        capture_output=True,
        text=True,
        check=True,
    )
    return {line.split(maxsplit=3)[3].removeprefix("proj/") for line in proc.stdout.splitlines()}


def files_below(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith(".phd_flow-")
    }


def second_machine(project: Path, config: str) -> Path:
    """A copy of the project without its local_path, with its own config."""
    other = project.parent / "machine2"
    shutil.copytree(project, other, ignore=shutil.ignore_patterns("data_storage", "__pycache__"))
    write_config(other, config)
    return other


@pytest.mark.slow
def test_a_run_is_visible_with_aws_cli_and_downloads_identically(project: Path, moto_server: S3Server) -> None:
    bucket = make_bucket(moto_server)
    write_config(project, s3_config(bucket, moto_server.endpoint_url))
    proc = cli(project, *RUN, env=moto_server.env())
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = run_dirs(project / "data_storage")
    key = run_dir.name
    record = json.loads((run_dir / "run.json").read_text())
    assert record["sync"]["state"] == "synced"
    assert record["sync"]["remote"].startswith(f"s3://{bucket}/proj")

    listed = aws_ls(moto_server, bucket)
    local = {f"{key}/{rel}" for rel in files_below(run_dir)}
    assert local <= listed, local - listed
    assert f"{key}/{MANIFEST}" in listed
    assert f"datasets/{key}/datasets.pickle" in listed  # the node's own self.storage.upload(...)

    other = second_machine(project, s3_config(bucket, moto_server.endpoint_url))
    proc = cli(other, "download", key, env=moto_server.env())
    assert proc.returncode == 0, proc.stderr
    assert files_below(other / "data_storage" / key) == files_below(run_dir)


@pytest.mark.slow
def test_missing_bucket_names_the_config_key(project: Path, moto_server: S3Server) -> None:
    write_config(project, s3_config(None, moto_server.endpoint_url))
    proc = cli(project, *RUN, env=moto_server.env())
    assert "[storage] bucket" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    (run_dir,) = run_dirs(project / "data_storage")
    record = json.loads((run_dir / "run.json").read_text())
    assert record["sync"]["state"] == "not_synced"
    assert proc.returncode == 3, proc.stderr


@pytest.mark.slow
def test_unreachable_endpoint_then_sync_later(project: Path, moto_server: S3Server) -> None:
    bucket = make_bucket(moto_server)
    write_config(project, s3_config(bucket, closed_port_url()))
    proc = cli(project, *RUN, env=moto_server.env())
    assert proc.returncode == 3, proc.stderr
    assert "endpoint_url" in proc.stderr and "Traceback" not in proc.stderr
    (run_dir,) = run_dirs(project / "data_storage")
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["sync"]["state"] == "not_synced"
    assert record["sync"]["pending"] == [f"datasets/{run_dir.name}"]
    assert (run_dir / "results.pickle").is_file()

    write_config(project, s3_config(bucket, moto_server.endpoint_url))  # the fix
    proc = cli(project, "sync", env=moto_server.env())
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run_dir / "run.json").read_text())["sync"]["state"] == "synced"
    listed = aws_ls(moto_server, bucket)
    assert {f"{run_dir.name}/{rel}" for rel in files_below(run_dir)} <= listed
    assert f"datasets/{run_dir.name}/datasets.pickle" in listed  # the node's failed upload, caught up

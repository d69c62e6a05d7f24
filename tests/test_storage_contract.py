"""The storage contract (phd_flow.testing.RemoteContract) on the local and S3 backends."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from phd_flow.storage.base import Remote
from phd_flow.storage.local import LocalRemote
from phd_flow.storage.s3 import S3Remote
from phd_flow.testing import RemoteContract
from tests import s3_fixtures
from tests.s3_fixtures import S3Server, make_bucket, moto_auth_enforced

moto_server = s3_fixtures.moto_server  # the session's S3 server fixture


class TestLocalContract(RemoteContract):
    large_file_size = 1 << 20  # no multipart here; still a file bigger than a copy buffer

    @pytest.fixture
    def remote(self, tmp_path: Path) -> Remote:
        return LocalRemote(tmp_path / "shared" / "prefix")


class SmallPartsS3Remote(S3Remote):
    """Multipart from 5 MiB (S3's minimum part size), so the contract's 9 MB file uses it."""

    multipart_threshold = 5 << 20
    multipart_chunksize = 5 << 20


class TestS3Contract(RemoteContract):
    large_file_size = 9 << 20
    credentials_hint = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    bad_secret: ClassVar[str] = "wJalrXUtnFEMI-this-is-the-wrong-secret"

    @pytest.fixture
    def remote(self, moto_server: S3Server) -> Iterator[Remote]:
        remote = SmallPartsS3Remote(make_bucket(moto_server), "team/proj", endpoint_url=moto_server.endpoint_url)
        yield remote
        remote.close()

    @pytest.fixture
    def bad_credentials_remote(self, moto_server: S3Server) -> Iterator[Remote]:
        import boto3

        bucket = make_bucket(moto_server)
        session = boto3.session.Session(
            aws_access_key_id="AKIAWRONGWRONGWRONG0",
            aws_secret_access_key=self.bad_secret,
            region_name="us-east-1",
        )
        with moto_auth_enforced():
            remote = S3Remote(bucket, "p", endpoint_url=moto_server.endpoint_url, session=session)
            yield remote
            remote.close()

    def test_large_files_are_sent_in_parts(self, remote: Remote, tmp_path: Path) -> None:
        assert isinstance(remote, S3Remote)
        source = tmp_path / "big.bin"
        source.write_bytes(b"x" * (11 << 20))
        remote.put(source, "big.bin")
        head = remote.client.head_object(Bucket=remote.bucket, Key="team/proj/big.bin")
        assert head["ETag"].strip('"').endswith("-3")  # 5 + 5 + 1 MiB
        assert remote.describe() == f"s3://{remote.bucket}/team/proj at {remote.endpoint_url}"

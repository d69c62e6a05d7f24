"""A real S3 stand-in for tests: moto's ``ThreadedMotoServer`` on 127.0.0.1 with a free port.

Import the fixtures into a test module (pytest discovers them there)::

    from tests.s3_fixtures import S3Server, make_bucket, moto_server  # noqa: F401

``moto_server`` is session-scoped: one server for the whole test session, a fresh bucket per
test via :func:`make_bucket`. Fake credentials are set in the test process's environment; CLI
subprocesses get them through :meth:`S3Server.env`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class S3Server:
    """A running moto server: its endpoint and the environment to talk to it."""

    endpoint_url: str

    def env(self) -> dict[str, str]:
        """Environment for a subprocess (phd_flow CLI, ``aws``) using the fake credentials."""
        return {
            **FAKE_CREDENTIALS,
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def client(self) -> Any:
        """A boto3 S3 client for this server (for assertions and setup)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=FAKE_CREDENTIALS["AWS_DEFAULT_REGION"],
            aws_access_key_id=FAKE_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        )


def make_bucket(server: S3Server, name: str | None = None) -> str:
    """Create a bucket (a fresh uuid-named one by default) and return its name."""
    bucket = name or f"test-{uuid.uuid4().hex[:16]}"
    server.client().create_bucket(Bucket=bucket)
    return bucket


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (for "unreachable endpoint" tests)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def moto_auth_enforced() -> Iterator[None]:
    """Make the in-process moto server check credentials (unknown access keys get a 403).

    Process-global: every moto request made inside the block is authenticated.
    """
    from moto import settings

    saved = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    try:
        yield
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = saved


@pytest.fixture(scope="session")
def moto_server() -> Iterator[S3Server]:
    """One moto S3 server for the session; fake AWS credentials in this process's env."""
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in [*FAKE_CREDENTIALS, "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"]}
    os.environ.update(S3Server("").env())
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield S3Server(f"http://{host}:{port}")
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture
def s3_bucket(moto_server: S3Server) -> str:
    """A fresh, empty bucket on the session's moto server."""
    return make_bucket(moto_server)

"""A real ``mlflow server --serve-artifacts --app-name basic-auth`` on 127.0.0.1, started once
per test session.

Import the fixture into a test module (pytest discovers it there)::

    from tests.mlflow_server_fixtures import mlflow_server, mlflow_server_launched  # noqa: F401

Add ``pytestmark = pytest.mark.usefixtures("mlflow_server_launched")`` to start the server as
soon as the module's first test runs, and request ``mlflow_server`` where it is needed.

The server uses a sqlite backend store and proxies artifacts (``mlflow-artifacts:``) into a
temporary directory; it takes 10-40 s to start, so every test shares it and isolates itself with
its own experiment. It is killed (its whole process group) at the end of the session.

It asks for a login (MLflow's basic-auth app, ``mlflow[auth]``), like a team's server: every
request needs ``MlflowServer.username``/``password``, either in the URI
(``MlflowServer.uri_with(password)``) or in ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``
(``MlflowServer.env``); a wrong password is answered 401.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

STARTUP_TIMEOUT = 120.0
#: The server's only user (MLflow's auth app creates it at the first start); test-only values.
USERNAME, PASSWORD = "admin", "phd-flow-tests-only-password"


@dataclass(frozen=True)
class MlflowServer:
    """A running MLflow tracking server with proxied artifact storage and a login."""

    tracking_uri: str  # http://127.0.0.1:PORT (no credentials)
    artifacts_dir: Path  # where --artifacts-destination puts the bytes
    startup_seconds: float
    username: str = USERNAME
    password: str = PASSWORD

    def uri_with(self, password: str) -> str:
        """The tracking URI with ``username:password@`` in it."""
        return self.tracking_uri.replace("://", f"://{self.username}:{password}@", 1)

    @property
    def env(self) -> dict[str, str]:
        """The environment variables MLflow clients log in with."""
        return {"MLFLOW_TRACKING_USERNAME": self.username, "MLFLOW_TRACKING_PASSWORD": self.password}


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, process: subprocess.Popen[bytes], log: Path, timeout: float) -> None:
    """Poll ``url/health`` until it answers OK; fail with the server's log if it dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise RuntimeError(f"mlflow server not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


@dataclass
class StartingServer:
    """An ``mlflow server`` process that was launched and may not answer yet."""

    process: subprocess.Popen[bytes]
    root: Path
    url: str
    started: float

    def ready(self) -> MlflowServer:
        """Wait until /health answers (raises with the server log if it does not)."""
        wait_healthy(self.url, self.process, self.root / "server.log", STARTUP_TIMEOUT)
        return MlflowServer(self.url, self.root / "mlartifacts", time.perf_counter() - self.started)


def launch_server(root: Path) -> StartingServer:
    """Start ``mlflow server`` with its stores in ``root`` without waiting for it."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    auth = root / "basic_auth.ini"
    auth.write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{root / 'auth.db'}\n"
        f"admin_username = {USERNAME}\nadmin_password = {PASSWORD}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 3600\n"  # one password hash per worker, not one per request
    )
    command = [
        str(Path(sys.executable).with_name("mlflow")), "server", "--app-name", "basic-auth",
        "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
        "--serve-artifacts", "--artifacts-destination", str(root / "mlartifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "MLFLOW_AUTH_CONFIG_PATH": str(auth),
        "MLFLOW_FLASK_SERVER_SECRET_KEY": "phd-flow-tests-only",  # the auth app's CSRF key
    }
    started = time.perf_counter()
    with open(root / "server.log", "wb") as out:
        process = subprocess.Popen(
            command, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    return StartingServer(process, root, f"http://127.0.0.1:{port}", started)


def stop_server(process: subprocess.Popen[bytes]) -> None:
    """Terminate the server's process group (uvicorn workers included); kill after 10 s."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="session")
def mlflow_server_launched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartingServer]:
    """Launch the session's server without waiting: request it early (``usefixtures``) so that
    its 6-15 s start overlaps with other tests."""
    starting = launch_server(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield starting
    finally:
        stop_server(starting.process)


@pytest.fixture(scope="session")
def mlflow_server(mlflow_server_launched: StartingServer) -> MlflowServer:
    """One ``mlflow server --serve-artifacts`` with a login for the whole session, ready to use."""
    server = mlflow_server_launched.ready()
    print(f"\nmlflow server {server.tracking_uri} ready after {server.startup_seconds:.1f} s")
    return server

"""Shared fixtures: clean global state around every test, a copy of the example project, the CLI."""

from __future__ import annotations

import atexit
import compileall
import contextlib
import json
import locale
import os
import shutil
import signal
import socket
import subprocess as subprocess_
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli_client import PIDFD, client_env, connect, shim

REPO = Path(__file__).resolve().parent.parent

# Before any test module imports mlflow (collection runs before fixtures): with telemetry on,
# mlflow's config-fetching thread and `mlflow.autolog`'s import hook can deadlock on the import
# lock (seen as a hang in test_tracking's autolog test). CI=true turns it off too; a laptop doesn't.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
EXAMPLES = REPO / "examples"
# Tests read MLflow right after a run: every run waits until MLflow has it ([mlflow] wait = true).
# Tests of the background feeder (test_feeder.py) pass PHD_FLOW_WAIT_MLFLOW=false to the CLI.
os.environ["PHD_FLOW_WAIT_MLFLOW"] = "true"

# Environment that would leak the developer's machine into a test.
_ENV_VARS = [
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
    "MLFLOW_RUN_ID",
    "PHD_FLOW_CONFIG",
    "B2_APPLICATION_KEY_ID",
    "B2_APPLICATION_KEY",
]


@pytest.fixture(autouse=True)
def clean_state(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Reset env vars, loguru sinks and MLflow's active run around each test."""
    for name in _ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    from loguru import logger

    yield
    logger.remove()
    logger.add(sys.stderr, level="DEBUG")
    if "mlflow" in sys.modules:
        import mlflow

        while mlflow.active_run() is not None:
            mlflow.end_run()


def write_config(project: Path, text: str) -> Path:
    """Write ``project/config/default.toml``."""
    path = project / "config" / "default.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture(scope="session")
def mlflow_db_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty MLflow sqlite DB, created and migrated once per session (worker).

    A fresh store costs ~2 core-seconds of alembic migrations; the ``project`` fixture and
    :func:`migrated_store` copy this one instead. Tests about creating a store
    (``test_fifty_processes_at_once_on_a_fresh_store``, the README's commands in test_docs) start
    without one.
    """
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    code = f"from mlflow.tracking import MlflowClient; MlflowClient('sqlite:///{path}').search_experiments()"
    subprocess_.run([sys.executable, "-c", code], check=True, env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})
    return path


@pytest.fixture
def migrated_store(mlflow_db_template: Path) -> Callable[[Path], str]:
    """``migrated_store(db)`` copies the session's empty migrated MLflow DB to ``db`` (its folder
    created) and returns its ``sqlite:///`` URI: an empty store as MLflow creates it, without the
    migrations' cost."""

    def copy(db: Path) -> str:
        db.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(mlflow_db_template, db)
        return f"sqlite:///{db}"

    return copy


@pytest.fixture
def project(tmp_path: Path, mlflow_db_template: Path) -> Path:
    """A copy of the example project (my_project + data) with a config in tmp_path, and an empty
    migrated MLflow DB in its data_storage."""
    root = tmp_path / "proj"
    shutil.copytree(EXAMPLES / "my_project", root / "my_project", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(EXAMPLES / "data", root / "data")
    write_config(root, 'local_path = "${PROJECT_ROOT}/data_storage"\n[mlflow]\nexperiment = "test"\n')
    (root / "data_storage").mkdir()
    shutil.copy(mlflow_db_template, root / "data_storage" / "mlflow.db")
    return root


def nothing_created(local_path: Path) -> bool:
    """True when no command wrote into ``local_path`` (beyond the ``project`` fixture's MLflow DB)."""
    return not local_path.exists() or {p.name for p in local_path.iterdir()} <= {"mlflow.db"}


def cli(
    project: Path,
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 180,
    subprocess: bool = False,
) -> subprocess_.CompletedProcess[str]:
    """Run ``python -m my_project ARGS`` in ``project`` like a user would.

    The call is forked from this worker's CLI fork server (tests/cli_server.py: a warm
    interpreter, the same process a user gets minus ~2 s of imports) unless ``subprocess`` asks for
    a new interpreter, or ``env`` changes a ``PYTHON*`` variable (read at interpreter start).
    ``PHD_FLOW_TESTS_CLI=subprocess pytest ...`` runs every call in a new interpreter.

    ``rm``, ``gc``, ``sync`` and ``ls --fix`` are forked from the feeder server instead, which
    has mlflow imported (:func:`tests.cli_client.server_for`).
    """
    base_env = _base_env()
    full_env = {**base_env, **(env or {})}
    command = [sys.executable, "-m", "my_project", *args]
    if not subprocess and os.environ.get("PHD_FLOW_TESTS_CLI") != "subprocess":
        server = _CliServer.get(base_env)
        if server.serves(full_env):
            return server.run(command, project, full_env, timeout)
    return subprocess_.run(
        command, cwd=project, env=full_env, capture_output=True, text=True, timeout=timeout, check=False
    )


def popen_cli(project: Path, *args: str, env: dict[str, str], **popen: Any) -> subprocess_.Popen[str]:
    """``subprocess.Popen([python, "-m", "my_project", *args], cwd=project, env=env)`` with text
    pipes for stdout and stderr (or what ``popen`` gives), forked from this worker's CLI fork
    server (a :class:`ForkedPopen`) unless ``PHD_FLOW_TESTS_CLI=subprocess`` or ``env`` changes a
    ``PYTHON*`` variable."""
    command = [sys.executable, "-m", "my_project", *args]
    kwargs: dict[str, Any] = {"cwd": project, "stdout": subprocess_.PIPE, "stderr": subprocess_.PIPE, "text": True}
    kwargs.update(popen)
    if os.environ.get("PHD_FLOW_TESTS_CLI") != "subprocess":
        server = _CliServer.get(_base_env())
        if server.serves(env):
            return ForkedPopen(command, server, env, **kwargs)
    return subprocess_.Popen(command, env=env, **kwargs)


class ForkedPopen(subprocess_.Popen[str]):
    """A ``python -m my_project`` process forked from the fork server, driven like a Popen.

    The Popen is tests/cli_client.py, which hands its stdin, stdout and stderr to the forked child
    and ends as the child ends (its return code, or killed by the same signal). Signals sent with
    :meth:`send_signal`, :meth:`terminate` and :meth:`kill` go to the child, whose pid is
    :attr:`child_pid` (``pid`` stays the client's: it is the one to wait for).
    """

    def __init__(self, command: list[str], server: _CliServer, env: dict[str, str], **kwargs: Any) -> None:
        read, write = os.pipe()
        client = [sys.executable, "-I", "-S", str(REPO / "tests" / "cli_client.py"), *command[1:]]
        env = {**env, **client_env(server.socket, server.startup), PIDFD: str(write)}
        try:
            super().__init__(client, env=env, pass_fds=(write,), **kwargs)
        finally:
            os.close(write)
        with os.fdopen(read) as pid:  # EOF once the client wrote the pid, or ended without one
            text = pid.read()
        if not text:
            self.wait(timeout=30)
            raise RuntimeError(f"the CLI fork server did not start {command}: {self.stderr and self.stderr.read()}")
        self.child_pid = int(text)

    def send_signal(self, sig: int) -> None:
        self.poll()
        if self.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.child_pid, sig)


def with_cli_shim(env: dict[str, str], directory: Path) -> dict[str, str]:
    """``env`` for a shell script whose ``python -m my_project ARGS`` calls are forked from this
    worker's CLI fork server (a ``python`` first on PATH, written to ``directory``: see
    tests/cli_client.py); ``env`` itself when ``PHD_FLOW_TESTS_CLI=subprocess``."""
    if os.environ.get("PHD_FLOW_TESTS_CLI") == "subprocess":
        return env
    server = _CliServer.get(_base_env())
    shimmed = {**env, **shim(directory, server.socket, server.startup)}
    return {**shimmed, "PATH": f"{directory}{os.pathsep}{env.get('PATH', '')}"}


def _base_env() -> dict[str, str]:
    """The environment of a CLI call before the test's own ``env``: no developer settings."""
    base = {k: v for k, v in os.environ.items() if k not in _ENV_VARS and not k.startswith("PYTEST")}
    return {**base, "MLFLOW_DISABLE_TELEMETRY": "true"}


class _CliServer:
    """This worker's fork server (tests/cli_server.py), started on the first :func:`cli` call."""

    _instance: _CliServer | None = None

    def __init__(self, env: dict[str, str]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="phd-cli-"))
        self.socket = str(self.dir / "sock")
        self.startup = {k: v for k, v in env.items() if k.startswith("PYTHON")}
        self.log = open(self.dir / "server.log", "wb")  # noqa: SIM115 (closed by stop)
        self.proc = subprocess_.Popen(
            [sys.executable, str(Path(__file__).with_name("cli_server.py")), self.socket],
            env=env,
            stdin=subprocess_.PIPE,
            stdout=subprocess_.PIPE,
            stderr=self.log,
        )
        assert self.proc.stdout is not None
        if self.proc.stdout.readline() != b"ready\n":
            self.proc.wait(timeout=30)
            raise RuntimeError(f"the CLI fork server did not start: {(self.dir / 'server.log').read_text()}")
        atexit.register(self.stop)

    @classmethod
    def get(cls, env: dict[str, str]) -> _CliServer:
        if cls._instance is None or cls._instance.proc.poll() is not None:
            cls._instance = cls(env)
        return cls._instance

    def stop(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()  # the server's signal to leave
            try:
                self.proc.wait(timeout=10)
            except subprocess_.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def serves(self, env: dict[str, str]) -> bool:
        """Whether a child of this server starts as a new interpreter with ``env`` would."""
        return {k: v for k, v in env.items() if k.startswith("PYTHON")} == self.startup

    def run(
        self, command: list[str], cwd: Path, env: dict[str, str], timeout: float
    ) -> subprocess_.CompletedProcess[str]:
        """``subprocess.run(command, capture_output=True, text=True, timeout=timeout)``, forked
        (by this server or its feeder server: :func:`tests.cli_client.server_for`)."""
        fd, out = tempfile.mkstemp(dir=self.dir, suffix=".out")
        os.close(fd)
        err = out[: -len(".out")] + ".err"
        request = {
            "package": command[2],
            "argv": command[3:],
            "env": env,
            "cwd": str(cwd),
            "stdout": out,
            "stderr": err,
        }
        deadline = time.monotonic() + timeout
        pid, code = None, None
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            connect(conn, self.socket, command[3:])
            conn.sendall(json.dumps(request).encode() + b"\n")
            try:
                for line in _lines(conn, deadline):
                    word, value = line.split()
                    if word == "pid":
                        pid = int(value)
                    else:
                        code = int(value)
            except TimeoutError:
                if pid is not None:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
                with contextlib.suppress(TimeoutError):
                    list(_lines(conn, time.monotonic() + 10))
                stdout, stderr = _read_text(out), _read_text(err)
                raise subprocess_.TimeoutExpired(command, timeout, output=stdout, stderr=stderr) from None
        if code is None:
            raise RuntimeError(f"the CLI fork server lost the call {command}: {(self.dir / 'server.log').read_text()}")
        return subprocess_.CompletedProcess(command, code, _read_text(out), _read_text(err))


def _lines(conn: socket.socket, deadline: float) -> Iterator[str]:
    """The server's answer lines until it closes the connection; TimeoutError at ``deadline``."""
    buffer = b""
    while True:
        conn.settimeout(max(deadline - time.monotonic(), 0.001))
        chunk = conn.recv(4096)  # socket.timeout is TimeoutError
        if not chunk:
            return
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        yield from (line.decode() for line in lines)


def _read_text(path: str) -> str:
    """A captured stream as ``subprocess.run(text=True)`` decodes it; the file is removed."""
    data = Path(path).read_bytes()
    Path(path).unlink()
    return data.decode(locale.getpreferredencoding(False)).replace("\r\n", "\n").replace("\r", "\n")


@pytest.fixture(autouse=True, scope="session")
def feeders_from_the_fork_server() -> Iterator[None]:
    """Feeders started by in-process runs (``Node(...).run()`` in a test) are forked from this
    worker's feeder server too, as those of :func:`cli` calls are (tests/cli_server.py)."""
    import phd_flow.feeder
    from tests.cli_server import spawn_feeder

    real = phd_flow.feeder._spawn_process

    def spawn(argv: list[str], env: dict[str, str], log: Path, lock_fd: int) -> phd_flow.feeder.Spawned:
        if os.environ.get("PHD_FLOW_TESTS_CLI") == "subprocess":
            return real(argv, env, log, lock_fd)
        server = _CliServer.get(_base_env())
        return spawn_feeder(server.socket + ".feeder", real, argv, env, log, lock_fd)  # type: ignore[no-any-return]

    phd_flow.feeder.spawn = spawn
    yield
    phd_flow.feeder.spawn = real


def run_dirs(local_path: Path) -> list[Path]:
    """Run directories (those with a run.json) directly below local_path."""
    return sorted(p for p in local_path.iterdir() if (p / "run.json").exists()) if local_path.exists() else []


def pytest_configure(config: pytest.Config) -> None:
    """Ctrl-C reaches the processes the tests start; byte-compile phd_flow and the tests' helper
    modules once, before any worker starts.

    A user's interpreter caches bytecode in ``__pycache__`` the first time; with
    ``PYTHONDONTWRITEBYTECODE`` set (as on this project's VMs) nothing is cached, so every new
    interpreter a test starts compiled each phd_flow module it imported again (~0.1 core-s each:
    the every-module-alone test took 20.5 core-s instead of 13.8). ``compileall`` writes the
    files whatever that variable says; the projects the tests copy stay uncompiled (a test that
    edits their code never meets a stale cache).
    """
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # started in the background without job control (`(pytest &)`): SIGINT is ignored, and
        # every process a test starts would inherit that, so the Ctrl-C tests' runs would never
        # see their signal. A terminal or CI starts pytest with Python's own handler.
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if not hasattr(config, "workerinput"):  # the controller (or the only process under -n 0)
        for folder in ("phd_flow", "tests"):
            compileall.compile_dir(REPO / folder, quiet=1)


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """``-n auto``: one worker more than CPUs. Part of every test is waiting (on a subprocess, a
    server, SLURM's queue); on 2 cores 3 workers took the suite from 8 min 06 s to 7 min 04 s."""
    return (os.cpu_count() or 1) + 1


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The heaviest test files first, each file's tests in their order.

    ``--dist loadfile --no-loadscope-reorder`` (pyproject.toml) hands files to the workers in this
    order, so the long ones start while every worker is free and the run does not end with one
    worker alone on the autolog stress test (xdist's own order, most tests first, started it last:
    6 min 54 s, one worker busy for the last 90 s). A file weighs what its tests announce: a
    ``timeout`` mark's seconds, else 10 for a ``slow`` test and 1 for any other.
    """
    weight: dict[Path, float] = {}
    for item in items:
        timeout = item.get_closest_marker("timeout")
        cost = float(timeout.args[0]) if timeout else 10.0 if item.get_closest_marker("slow") else 1.0
        weight[item.path] = weight.get(item.path, 0.0) + cost
    items.sort(key=lambda item: -weight[item.path])  # stable: a file's tests keep their order

"""The tests' CLI fork server: ``python -m my_project ARGS`` without a new interpreter per call.

Started once per pytest worker by :func:`tests.conftest.cli` (``python tests/cli_server.py SOCKET``),
it imports what every CLI call would import (phd_flow's CLI and run machinery, the example
project's third-party libraries) and then, per request on its Unix socket, forks a child that
becomes what ``python -m my_project ARGS`` would be: its own session, exactly the requested
environment, working directory, ``sys.path[0]``, ``sys.argv`` and ``sys.orig_argv``, stdout and
stderr on the requested files, stdin on /dev/null, Python's default signal handlers, no inherited
atexit handler, fresh random seeds, then ``runpy.run_module(package, run_name="__main__")``.

Never imported here: mlflow (a run that finds it imported takes another path, see
``phd_flow.tracking``) and the project's own modules (their code is read when a run imports them).
``phd_flow.sweeps.executors`` forks its warm sweep points the same way.

The MLflow feeders those children start (``phd_flow.feeder.spawn``) are forked the same way from
a second, *feeder* server (``SOCKET.feeder``), forked from this one at start: it has mlflow and
the sqlite store's modules imported, so a feeder is ready in ~0.1 s instead of paying a new
interpreter and ~2.5 s of imports for every test's store. The queue's locked descriptor is
passed over the socket (``SCM_RIGHTS``), as ``--lock-fd`` passes it to a real feeder. A feeder
asked for telemetry, or a feeder server that is not there, gets a real ``python -m
phd_flow.feeder`` (``phd_flow.feeder._spawn_process``).

Protocol: the client sends one JSON line ``{"argv", "env", "cwd", "stdout", "stderr"}`` (and
``"main"``, ``"append"`` for a feeder; its lock descriptor rides along; or ``"stdio": true`` with
the caller's descriptors 0, 1 and 2 riding along instead of the two paths, see tests/cli_client.py); a reporter process
forked for the request answers ``pid <child pid>`` and, when the child is gone, ``exit
<returncode>`` (``-N`` for a signal, as ``subprocess`` reports it). The servers exit when their
stdin (a pipe from the pytest worker) closes.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import gc
import importlib
import json
import os
import runpy
import selectors
import signal
import socket
import sys
import tempfile
import threading
import traceback
from typing import Any, NoReturn

from phd_flow.sweeps.executors import _WARM_MODULES

#: What a CLI call of the example project imports before it reads its arguments, or soon after
#: (not mlflow: see the module docstring).
PRELOAD = (
    "phd_flow",
    "phd_flow.cli",
    "phd_flow.cli.run",
    "phd_flow.cli.storage",
    "phd_flow.cli.runs",
    "phd_flow.cli.plot",
    "phd_flow.cli.rm",
    "phd_flow.cli.gc",
    "phd_flow.cli.logs",
    "phd_flow.cli.sweep",
    "phd_flow.cli.optimize",
    "phd_flow.project",
    "phd_flow.config",
    *_WARM_MODULES,  # what a warm sweep's driver imports before it forks its points
    "pandas",
    "sklearn.linear_model",
    "sklearn.metrics",
    "sklearn.model_selection",
)


#: What a feeder imports on top of :data:`PRELOAD`: mlflow (through phd_flow, which switches its
#: telemetry off first) and what opening a sqlite store imports.
FEEDER_PRELOAD = (
    "phd_flow.feeder",
    "mlflow.tracking",
    "mlflow.store.db.utils",
    "mlflow.store.tracking.sqlalchemy_store",
    "mlflow.store.tracking.sqlalchemy_workspace_store",
    "sqlalchemy.dialects.sqlite",
    "alembic.command",
    "alembic.config",
    "alembic.runtime.migration",
    "alembic.script",
)


def preload() -> None:
    """Import :data:`PRELOAD`; refuse to serve if that imported mlflow or started a thread."""
    for name in PRELOAD:
        importlib.import_module(name)
    if "mlflow" in sys.modules:
        raise SystemExit("cli_server: the preloaded modules imported mlflow; a forked run would find it imported")
    _frozen()


def preload_feeder() -> None:
    """Import :data:`FEEDER_PRELOAD` the way a feeder imports mlflow."""
    from phd_flow.tracking import import_mlflow

    import_mlflow()
    for name in FEEDER_PRELOAD:
        importlib.import_module(name)
    _frozen()


def _frozen() -> None:
    if threading.active_count() > 1:
        raise SystemExit(f"cli_server: threads run after the preload: {threading.enumerate()}")
    gc.collect()
    gc.freeze()  # fewer pages copied on write in each child


class ForkedFeeder:
    """A feeder forked by the feeder server, as :func:`phd_flow.feeder.wait_for` polls it."""

    def __init__(self, conn: socket.socket, pid: int, rest: bytes) -> None:
        self.conn, self.pid, self.buffer = conn, pid, rest
        self.returncode: int | None = None
        conn.setblocking(False)

    def poll(self) -> int | None:
        while self.returncode is None and b"\n" not in self.buffer:
            try:
                chunk = self.conn.recv(64)
            except BlockingIOError:
                return None
            if not chunk:
                self.returncode = -1  # the reporter is gone without a word: so is the feeder
                break
            self.buffer += chunk
        if self.returncode is None:
            self.returncode = int(self.buffer.split(b"\n")[0].split()[1])
        self.conn.close()
        return self.returncode

    def __del__(self) -> None:
        self.conn.close()


def spawn_feeder(server: str, real: Any, argv: list[str], env: dict[str, str], log: Any, lock_fd: int) -> Any:
    """``phd_flow.feeder.spawn`` in a forked CLI call: fork the feeder from the feeder server."""
    if "--telemetry" in argv:
        return real(argv, env, log, lock_fd)  # the server imported mlflow with telemetry off
    request = {"main": "phd_flow.feeder", "argv": argv[3:], "env": env, "cwd": os.getcwd()}
    request |= {"stdout": str(log), "stderr": str(log), "append": True}
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(server)
        socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [lock_fd])
        data = b""
        while b"\n" not in data:
            chunk = conn.recv(64)
            if not chunk:
                raise ConnectionError("the feeder server closed the connection")
            data += chunk
    except OSError:
        conn.close()
        return real(argv, env, log, lock_fd)
    line, rest = data.split(b"\n", 1)
    return ForkedFeeder(conn, int(line.split()[1]), rest)


def run_child(request: dict[str, Any], fds: list[int]) -> NoReturn:
    """Become ``python -m PACKAGE ARGV`` as requested (``fds``: descriptors sent along); never returns."""
    code = 1
    interrupted = False
    try:
        os.setsid()
        if request.get("stdio"):  # a shell's command (tests/cli_client.py): its own 0, 1 and 2
            for fd, sent in enumerate(fds):
                os.dup2(sent, fd)
                os.close(sent)
            fds = []
        else:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)
            mode = os.O_APPEND if request.get("append") else os.O_TRUNC
            for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
                out = os.open(path, os.O_WRONLY | os.O_CREAT | mode, 0o644)
                os.dup2(out, fd)
                os.close(out)
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.environ.clear()
        os.environ.update(request["env"])
        tracking = sys.modules.get("phd_flow.tracking")
        if tracking is not None:  # as a new interpreter: phd_flow has set no telemetry variable yet
            tracking._TELEMETRY.update(allowed=False, env_set=False)
        os.chdir(request["cwd"])
        tempfile.tempdir = None  # TMPDIR is read again, as a new process would
        argv = list(request["argv"])
        if fds:  # a feeder's lock: its number here replaces the sender's
            argv[argv.index("--lock-fd") + 1] = str(fds[0])
        package = request.get("main") or request["package"]
        sys.path[0] = os.getcwd()  # `python -m` puts the working directory first
        sys.argv = [sys.argv[0], *argv]  # runpy replaces argv[0] with the module's path
        sys.orig_argv = [sys.executable, "-m", package, *argv]
        atexit._clear()
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed()
        gc.unfreeze()
        if request.get("feeders"):
            import phd_flow.feeder

            real = phd_flow.feeder._spawn_process
            phd_flow.feeder.spawn = functools.partial(spawn_feeder, request["feeders"], real)
        if request.get("main"):  # already imported here: its main(), as `python -m` would run it
            raise SystemExit(importlib.import_module(package).main())
        runpy.run_module(package, run_name="__main__", alter_sys=True)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if not isinstance(exc.code, int) and exc.code is not None:
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        traceback.print_exc()
        interrupted = True
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        # a normal interpreter exit: wait for non-daemon threads, run atexit handlers, flush
        try:
            threading._shutdown()  # type: ignore[attr-defined]
        except BaseException:
            traceback.print_exc()
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        with contextlib.suppress(BaseException):
            sys.stdout.flush()
            sys.stderr.flush()
        if interrupted:  # the interpreter ends an uncaught KeyboardInterrupt with SIGINT
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code)


def report(conn: socket.socket, request: dict[str, Any], fds: list[int]) -> NoReturn:
    """The reporter: fork the child, tell the client its pid, then its return code."""
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            conn.close()
            run_child(request, fds)
        for fd in fds:
            os.close(fd)  # the child's copy only (a feeder's lock is released when the feeder closes it)
        conn.sendall(f"pid {pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
    finally:
        os._exit(0)


def listen(path: str) -> socket.socket:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    return listener


def serve(path: str) -> None:
    """Accept requests on the Unix socket ``path`` until stdin closes; fork the feeder server."""
    preload()
    feeders = listen(path + ".feeder")  # bound before the fork: a feeder asked for at once waits
    if os.fork() == 0:
        try:
            preload_feeder()
            accept(feeders, {})
        except BaseException:
            traceback.print_exc()  # to the server log; CLI calls then start real feeders
        finally:
            os._exit(0)
    feeders.close()
    listener = listen(path)
    print("ready", flush=True)
    accept(listener, {"feeders": path + ".feeder"})


def accept(listener: socket.socket, extra: dict[str, Any]) -> None:
    """Fork a reporter for each request on ``listener`` (``extra`` added to it) until stdin closes."""
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # reporters are reaped by the kernel
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(sys.stdin, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj is sys.stdin:
                return  # the pytest worker is gone
            conn, _ = listener.accept()
            with conn:
                data, fds = b"", []
                while not data.endswith(b"\n"):
                    chunk, received, _, _ = socket.recv_fds(conn, 65536, 4)
                    fds += received
                    if not chunk:
                        break
                    data += chunk
                if data.endswith(b"\n") and os.fork() == 0:
                    listener.close()
                    report(conn, {**json.loads(data), **extra}, fds)
                for fd in fds:
                    os.close(fd)


if __name__ == "__main__":
    serve(sys.argv[1])

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

Protocol: the client sends one JSON line ``{"argv", "env", "cwd", "stdout", "stderr"}``; a
reporter process forked for the request answers ``pid <child pid>`` and, when the child is gone,
``exit <returncode>`` (``-N`` for a signal, as ``subprocess`` reports it). The server exits when
its stdin (a pipe from the pytest worker) closes.
"""

from __future__ import annotations

import atexit
import contextlib
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
    "phd_flow.run.lifecycle",
    "phd_flow.run.active",
    "phd_flow.run.result",
    "phd_flow.run.repro",
    "phd_flow.tracking",
    "phd_flow.storage.facade",
    "pandas",
    "sklearn.linear_model",
    "sklearn.metrics",
    "sklearn.model_selection",
)


def preload() -> None:
    """Import :data:`PRELOAD`; refuse to serve if that imported mlflow or started a thread."""
    for name in PRELOAD:
        importlib.import_module(name)
    if "mlflow" in sys.modules:
        raise SystemExit("cli_server: the preloaded modules imported mlflow; a forked run would find it imported")
    if threading.active_count() > 1:
        raise SystemExit(f"cli_server: threads run after the preload: {threading.enumerate()}")
    gc.collect()
    gc.freeze()  # fewer pages copied on write in each child


def run_child(request: dict[str, Any]) -> NoReturn:
    """Become ``python -m PACKAGE ARGV`` as requested; never returns."""
    code = 1
    interrupted = False
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, set())
        os.environ.clear()
        os.environ.update(request["env"])
        os.chdir(request["cwd"])
        tempfile.tempdir = None  # TMPDIR is read again, as a new process would
        package = request["package"]
        sys.path[0] = os.getcwd()  # `python -m` puts the working directory first
        sys.argv = [sys.argv[0], *request["argv"]]  # runpy replaces argv[0] with the module's path
        sys.orig_argv = [sys.executable, "-m", package, *request["argv"]]
        atexit._clear()
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed()
        gc.unfreeze()
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


def report(conn: socket.socket, request: dict[str, Any]) -> NoReturn:
    """The reporter: fork the child, tell the client its pid, then its return code."""
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            conn.close()
            run_child(request)
        conn.sendall(f"pid {pid}\n".encode())
        _, status = os.waitpid(pid, 0)
        conn.sendall(f"exit {os.waitstatus_to_exitcode(status)}\n".encode())
    finally:
        os._exit(0)


def serve(path: str) -> None:
    """Accept requests on the Unix socket ``path`` until stdin closes."""
    preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # reporters are reaped by the kernel
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    print("ready", flush=True)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(sys.stdin, selectors.EVENT_READ)
    while True:
        for key, _ in selector.select():
            if key.fileobj is sys.stdin:
                return  # the pytest worker is gone
            conn, _ = listener.accept()
            with conn:
                data = b""
                while not data.endswith(b"\n"):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                if not data.endswith(b"\n"):
                    continue
                request = json.loads(data)
                if os.fork() == 0:
                    listener.close()
                    report(conn, request)


if __name__ == "__main__":
    serve(sys.argv[1])

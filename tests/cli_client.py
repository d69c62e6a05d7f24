"""``python -m PACKAGE ARGS`` from a shell, forked from this pytest worker's CLI fork server.

test_docs puts a ``python`` first on the doc scripts' PATH (:func:`shim`): ``python -m my_project
ARGS`` runs ``python -I -S tests/cli_client.py -m my_project ARGS`` (a bare interpreter, ~20 ms),
which sends the request with its own descriptors 0, 1 and 2 to the server (tests/cli_server.py),
forwards SIGINT and SIGTERM to the child and exits as the child did (killed by the same signal
when the child was). :class:`tests.conftest.ForkedPopen` starts it directly and signals the
child. Everything else, and any call whose ``PYTHON*`` variables differ from the server's
start-up ones (read at interpreter start, so a fork would not honour them), runs the real
interpreter.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path

SOCKET, STARTUP, REAL = "PHD_FLOW_TESTS_CLI_SOCKET", "PHD_FLOW_TESTS_CLI_STARTUP", "PHD_FLOW_TESTS_CLI_PYTHON"
#: A descriptor the client writes the child's pid to, then closes (:class:`tests.conftest.ForkedPopen`).
PIDFD = "PHD_FLOW_TESTS_CLI_PIDFD"


def client_env(server_socket: str, startup: dict[str, str]) -> dict[str, str]:
    """The variables that make the client reach ``server_socket`` (``startup``: its ``PYTHON*``)."""
    return {SOCKET: server_socket, STARTUP: json.dumps(startup), REAL: sys.executable}


def server_for(server_socket: str, argv: Sequence[str]) -> str:
    """The socket a call of ``my_project ARGV`` goes to: ``rm``, ``gc``, ``sync`` and ``ls
    --fix`` import mlflow themselves whenever MLflow holds a run they touch (deleting it, catching
    it up, marking it killed), so they are forked from the feeder server next to
    ``server_socket``, which has mlflow imported (telemetry off, as phd_flow leaves it); the same
    code runs either way, minus ~2 core-s of imports a call. One path differs: ``sync`` of a sweep
    whose MLflow run is still open closes it directly when mlflow is imported, through the feeder
    otherwise (phd_flow/sweeps/executors.py); a test of that path must use ``subprocess=True``."""
    command = argv[0] if argv else ""
    warm = command in ("rm", "gc", "sync") or (command == "ls" and "--fix" in argv)
    return server_socket + ".feeder" if warm else server_socket


def connect(conn: socket.socket, server_socket: str, argv: Sequence[str]) -> None:
    """Connect ``conn`` to :func:`server_for`'s socket, or to ``server_socket`` itself when no
    feeder server listens (its preload failed: the server's log says why)."""
    try:
        conn.connect(server_for(server_socket, argv))
    except ConnectionRefusedError:
        conn.connect(server_socket)


def shim(directory: Path, server_socket: str, startup: dict[str, str]) -> dict[str, str]:
    """Write ``directory/python`` and return the variables that make it reach ``server_socket``."""
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "python"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = -m ] && [ "$2" = my_project ]; then\n'
        f'  exec "${REAL}" -I -S {Path(__file__).resolve()} "$@"\n'
        "fi\n"
        f'exec "${REAL}" "$@"\n'
    )
    script.chmod(0o755)
    return client_env(server_socket, startup)


def main() -> None:
    env = dict(os.environ)  # the three variables above too: a nested shell call reaches the server
    python = env[REAL]
    if {k: v for k, v in env.items() if k.startswith("PYTHON")} != json.loads(os.environ[STARTUP]):
        os.execve(python, [python, *sys.argv[1:]], os.environ)
    request = {"package": sys.argv[2], "argv": sys.argv[3:], "env": env, "cwd": os.getcwd(), "stdio": True}
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connect(conn, os.environ[SOCKET], sys.argv[3:])
    socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], [0, 1, 2])
    buffer = b""
    while True:
        chunk = conn.recv(4096)
        if not chunk:
            raise SystemExit("cli_client: the CLI fork server lost the call")
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            word, value = line.decode().split()
            if word == "pid":
                pid = int(value)
                for sig in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, lambda number, _, pid=pid: os.kill(pid, number))
                if PIDFD in os.environ:
                    fd = int(os.environ[PIDFD])
                    os.write(fd, value.encode())
                    os.close(fd)
                continue
            code = int(value)
            if code < 0:  # killed by a signal: so is this process, as the shell would see it
                signal.signal(-code, signal.SIG_DFL)
                os.kill(os.getpid(), -code)
            raise SystemExit(code)


if __name__ == "__main__":
    main()

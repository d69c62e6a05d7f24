"""A fault-injecting HTTP reverse proxy for storage tests: in front of moto's S3 server it can
answer 503 SlowDown, drop connections, or stop listening and restart on the same port."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

FaultRule = Callable[[int], "int | str | None"]


# --- a fault-injecting proxy in front of moto -----------------------------------------------------

_HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "expect",
    "content-length",
}
_SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>fault-proxy</RequestId></Error>"
)


class FaultProxy:
    """A reverse proxy on 127.0.0.1 that forwards to ``upstream`` unless ``rule`` says otherwise.

    ``rule(n)`` is asked about the n-th request (1-based, counted across restarts) and returns
    None to forward it, an HTTP status (e.g. 503) to answer a ``SlowDown`` error instead, or
    ``"down"`` to stop the proxy: that request's connection is closed without an answer, every
    open connection is dropped and new ones are refused until :meth:`start` is called again
    (on the same port, so the client's endpoint URL stays valid).
    """

    def __init__(self, upstream: str, rule: FaultRule = lambda n: None) -> None:
        host, _, port = upstream.removeprefix("http://").partition(":")
        self.upstream = (host, int(port))
        self.rule = rule
        self.port = 0
        self.requests = 0  #: requests received (including refused and faulted ones)
        self.faults = 0  #: requests answered with an error status or dropped
        self.stopped = threading.Event()
        self._generation = 0
        self._down = False  # from a "down" request until start(): nothing is forwarded
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        """Listen (again) on 127.0.0.1 and the same port as before (a free one the first time)."""
        server = ThreadingHTTPServer(("127.0.0.1", self.port), _ProxyHandler)
        server.daemon_threads = True
        server.proxy = self  # type: ignore[attr-defined]
        with self._lock:
            self._server = server
            self._generation += 1
            self._down = False
            self.port = server.server_address[1]
            self.stopped.clear()
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening and drop every open connection (idempotent)."""
        with self._lock:
            server, self._server = self._server, None
            self._generation += 1  # handlers of older connections close them on their next request
        if server is not None:
            server.shutdown()
            server.server_close()
        self.stopped.set()

    def decide(self, generation: int) -> int | str | None:
        """What to do with the next request on a connection accepted in ``generation``."""
        with self._lock:
            self.requests += 1
            if self._down or generation != self._generation:
                self.faults += 1
                return "drop"
            action = self.rule(self.requests)
            if action is not None:
                self.faults += 1
            if action == "down":
                # at once: no request after this one is forwarded, not even on a connection the
                # listener accepts before stop() (in a thread, late on a busy machine) closes it
                self._down = True
        if action == "down":
            threading.Thread(target=self.stop, daemon=True).start()
            return "drop"
        return action

    def generation(self) -> int:
        with self._lock:
            return self._generation


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive and 100-continue, like a real S3 endpoint

    def setup(self) -> None:
        super().setup()
        self.proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        self.accepted_in = self.proxy.generation()

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request access log."""

    def do_GET(self) -> None:
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        body = self._read_body()
        action = self.proxy.decide(self.accepted_in)
        if action == "drop":
            self.close_connection = True  # no answer: the client sees the connection closed
            return
        if isinstance(action, int):
            self.send_response_only(action)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(_SLOW_DOWN)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(_SLOW_DOWN)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
        upstream = http.client.HTTPConnection(*self.proxy.upstream, timeout=60)
        try:
            upstream.request(self.command, self.path, body=body or None, headers=headers)
            response = upstream.getresponse()
            data = response.read()
        finally:
            upstream.close()
        self.send_response_only(response.status, response.reason)
        for name, value in response.getheaders():
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        length = response.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

"""The OTLP/HTTP listener: asyncio + the ``httptools`` parser, in a thread of its own.

Why not the API's Flask app: the werkzeug development server and Flask cost ~2-3 ms of CPU
per request (measured with ``bench/store.py``), which made the receiver's cost per span
depend on how few spans each export carries. This listener parses with ``httptools`` (the
llhttp parser uvicorn uses) on one event loop (uvloop's where available), keeps connections
alive, and hands each complete body to :class:`~mesh.otlp.intake.Intake` — no framework,
no thread per request.

It can be stopped and started again on its own (:meth:`OTLPHTTPServer.stop` closes the
listening socket and every open connection, so exporters see "connection refused") while
the API keeps serving.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

import httptools

from mesh.otlp.intake import PATHS, Intake
from mesh.tracestore.receiver import MAX_BODY_BYTES, PROTOBUF, error_answer

Access = Callable[[str, dict[bytes, bytes]], tuple[int, str] | None]
"""``(peer address, headers) -> None`` to let a request in, or ``(status, message)``."""

_REASONS = {200: b"OK", 100: b"Continue", 400: b"Bad Request", 401: b"Unauthorized"}
_REASONS.update({403: b"Forbidden", 404: b"Not Found", 405: b"Method Not Allowed"})
_REASONS.update({413: b"Payload Too Large", 415: b"Unsupported Media Type"})
_REASONS.update({503: b"Service Unavailable"})


class OTLPHTTPServer:
    """Serves ``POST /v1/{traces,logs,metrics}`` and ``GET /health`` on ``host:port``."""

    def __init__(self, intake: Intake, host: str, port: int, access: Access | None = None) -> None:
        self.intake = intake
        self.host = host
        self.port = port
        self.access = access
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[_Connection] = set()
        self._lock = threading.Lock()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        """Listen (OSError if the address is taken); a no-op when already running."""
        with self._lock:
            if self.running:
                return
            loop = _new_loop()
            try:
                self._server = loop.run_until_complete(
                    loop.create_server(
                        lambda: _Connection(self), self.host, self.port, reuse_address=True
                    )
                )
            except OSError:
                loop.close()
                raise
            if self.port == 0:
                self.port = self._server.sockets[0].getsockname()[1]
            self._loop = loop
            self._thread = threading.Thread(target=loop.run_forever, name="otlp-http", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Close the listener and every connection; a no-op when not running."""
        with self._lock:
            loop, thread = self._loop, self._thread
            if loop is None or thread is None:
                return

            def close() -> None:
                assert self._server is not None
                self._server.close()
                for conn in list(self._conns):
                    conn.transport.abort() if conn.transport else None
                loop.stop()

            loop.call_soon_threadsafe(close)
            thread.join(5)
            loop.close()
            self._loop = self._thread = self._server = None
            self._conns.clear()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is a dependency; plain asyncio works too
        return asyncio.new_event_loop()


class _Connection(asyncio.Protocol):
    """One client connection; ``httptools`` calls the ``on_*`` methods as it parses."""

    def __init__(self, server: OTLPHTTPServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.peer = ""
        self._url = b""
        self._headers: dict[bytes, bytes] = {}
        self._body: list[bytes] = []
        self._size = 0
        self._too_large = False

    # -- asyncio -------------------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.peer = peer[0] if peer else ""
        self.server._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._conns.discard(self)

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._reply(400, b"upgrade is not supported", b"text/plain", close=True)
        except httptools.HttpParserError as exc:
            self._reply(400, f"bad HTTP request: {exc}".encode(), b"text/plain", close=True)

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []
        self._size = 0
        self._too_large = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.lower()] = value

    def on_headers_complete(self) -> None:
        try:
            declared = int(self._headers.get(b"content-length", b"0"))
        except ValueError:
            declared = 0
        self._too_large = declared > MAX_BODY_BYTES
        if self._too_large:  # refuse before reading a byte of it
            answer = error_answer(413, "export too large", PROTOBUF)
            signal = PATHS.get(self._url.split(b"?", 1)[0].decode("latin-1"))
            if signal is not None:
                self.server.intake.requests.labels(signal, "rejected").inc()
            self._reply(413, answer.body, answer.content_type.encode(), close=True)
            return
        if self._headers.get(b"expect", b"").lower() == b"100-continue" and not self._too_large:
            assert self.transport is not None
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        if self._too_large:
            return
        self._size += len(body)
        if self._size > MAX_BODY_BYTES:
            self._too_large = True
            self._body = []
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        status, body, content_type = self._answer()
        self._reply(status, body, content_type, close=not self.parser.should_keep_alive())

    # -- answers -------------------------------------------------------------------------

    def _answer(self) -> tuple[int, bytes, bytes]:
        method = self.parser.get_method()
        path = self._url.split(b"?", 1)[0].decode("latin-1")
        if path == "/health" and method in (b"GET", b"HEAD"):
            return 200, b"ok\n", b"text/plain"
        signal = PATHS.get(path)
        if signal is None:
            return 404, f"no OTLP endpoint at {path}\n".encode(), b"text/plain"
        if method != b"POST":
            return 405, b"OTLP/HTTP exports are POSTed\n", b"text/plain"
        headers = self._headers
        ctype = headers[b"content-type"].decode("latin-1") if b"content-type" in headers else None
        if self.server.access is not None:
            refusal = self.server.access(self.peer, headers)
            if refusal is not None:
                answer = error_answer(refusal[0], refusal[1], PROTOBUF)
                self.server.intake.requests.labels(signal, "rejected").inc()
                return answer.status, answer.body, answer.content_type.encode()
        if self._too_large:
            answer = error_answer(413, "export too large", PROTOBUF)
            self.server.intake.requests.labels(signal, "rejected").inc()
            return answer.status, answer.body, answer.content_type.encode()
        encoding = headers.get(b"content-encoding")
        answer = self.server.intake.handle(
            signal,
            b"".join(self._body),
            ctype,
            encoding.decode("latin-1") if encoding is not None else None,
        )
        return answer.status, answer.body, answer.content_type.encode()

    def _reply(self, status: int, body: bytes, content_type: bytes, close: bool) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        head = b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n" % (
            status,
            _REASONS.get(status, b"Error"),
            content_type,
            len(body),
        )
        if close:
            head += b"Connection: close\r\n"
        self.transport.write(head + b"\r\n" + body)
        if close:
            self.transport.close()

"""Byte relays for one proxied connection: raw TCP, HTTP/1.1 (h11) and HTTP/2 (hpack).

(TLS streams have their own relay, :mod:`mesh.kubeproxy.tlsconn`: one span per connection.)

The connection is already DNATed (the endpoint chosen, the upstream socket open) when a
relay starts; relays only move bytes, counting them, and give each HTTP request its hop
span (:mod:`mesh.kubeproxy.hop`). HTTP/1 goes through llhttp (httptools);
HTTP/2 frames pass through untouched except request HEADERS, whose header block is
decoded, gets the hop's ``traceparent`` and is re-encoded with our own HPACK context.
Anything malformed ends that connection only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import struct
import time
from typing import Any

import hpack
import httptools

from mesh.cni.passthrough import TRACE_HEADERS
from mesh.cni.streams import write_eof
from mesh.kubeproxy.clienthello import looks_like_tls
from mesh.kubeproxy.hop import (
    ConnInfo,
    RequestHop,
    fail_request_span,
    finish_request_span,
    start_request_span,
    wants_span,
)

log = logging.getLogger("kube-proxy")

READ_SIZE = 65536
_TRACE_HEADER_NAMES = tuple(name.encode() for name in TRACE_HEADERS)
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HTTP1_METHODS = (b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"PATC", b"OPTI", b"CONN", b"TRAC")


def sniff(first: bytes) -> str:
    if first.startswith(H2_PREFACE[: len(first)]) and len(first) >= 3:
        return "h2"
    if first[:4] in HTTP1_METHODS:
        return "http1"
    if looks_like_tls(first):
        return "tls"
    return "tcp"


CLOSE_WAIT_SECONDS = 1.0
"""Longest wait for a closed stream's transport to go away (a peer that reset while we were
not reading may never be noticed otherwise)."""


async def _close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
        async with asyncio.timeout(CLOSE_WAIT_SECONDS):
            await writer.wait_closed()
    except (ConnectionError, OSError, TimeoutError):
        pass


async def pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: ConnInfo, direction: str
) -> None:
    try:
        while data := await reader.read(READ_SIZE):
            _count(conn, direction, len(data))
            writer.write(data)
            await writer.drain()
        write_eof(writer)
    except (ConnectionError, OSError):
        pass


def _count(conn: ConnInfo, direction: str, n: int) -> None:
    if direction == "in":
        conn.bytes_in += n
    else:
        conn.bytes_out += n


async def relay_tcp(
    first: bytes,
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    conn: ConnInfo,
) -> None:
    conn.protocol = "tcp"
    if first:
        upstream[1].write(first)
        _count(conn, "in", len(first))
    await asyncio.gather(
        pipe(client[0], upstream[1], conn, "in"), pipe(upstream[0], client[1], conn, "out")
    )


# -- HTTP/1.1 -------------------------------------------------------------------------------


SERVICE_TIME_HEADER = b"x-envoy-upstream-service-time"
"""What the callee's sidecar says its app took, in ms (Envoy's router sets it)."""
SERVICE_TIME_HEADER_STR = SERVICE_TIME_HEADER.decode()


class _HopRelay:
    """What both HTTP relays keep: the connection's two ends and the timing of each
    request's emulation share (:class:`~mesh.kubeproxy.hop.RequestHop`)."""

    def __init__(
        self,
        tracer: Any,
        conn: ConnInfo,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.tracer = tracer
        self.conn = conn
        self.client_r, self.client_w = client
        self.up_r, self.up_w = upstream
        self.fresh: list[RequestHop] = []
        """Hops whose request head is parsed but not yet handed to the endpoint."""
        self.arrived = time.perf_counter()
        """When the last bytes from the client were read."""
        self.response_arrived = self.arrived
        """When the last bytes from the endpoint were read."""
        self.setup()

    def setup(self) -> None:
        """The protocol's own parsers and bookkeeping."""

    def handed_over(self) -> None:
        """The heads parsed so far are on their way to the endpoint."""
        for hop in self.fresh:
            hop.forwarded()
        self.fresh.clear()

    def response_head(self, hop: RequestHop, service_time: str | None) -> None:
        hop.response_head(self.response_arrived, service_time)

    def finish(self, hop: RequestHop, status: int | None) -> None:
        hop.charge(time.perf_counter() - self.response_arrived)
        finish_request_span(hop, status)


class HTTP1Relay(_HopRelay):
    """HTTP/1.1 through llhttp (httptools), one hop span per request.

    Requests are re-framed: the head is rebuilt from the parsed method, target, version and
    headers (original order and case) with the hop's ``traceparent``; the body follows as
    parsed (re-chunked when the request was chunked). Responses pass through byte for byte;
    a response parser only watches them to close each request's span with its status, before
    the bytes that complete the response are relayed. An upgrade (e.g. WebSocket) turns the
    rest of the connection into an opaque TCP splice.
    """

    def setup(self) -> None:
        self.requests = httptools.HttpRequestParser(self)
        # Only a tunnelled request needs the callee's service time (the overlay's share):
        # without a tunnel no Python callback runs for each response header.
        watcher = _TunnelResponseWatcher if self.conn.tunnel is not None else _ResponseWatcher
        self.responses = httptools.HttpResponseParser(watcher(self))
        self.spans: list[RequestHop] = []
        """One per request awaiting its response (an untraced one for an unsampled request)."""
        self.methods: list[bytes] = []
        self.out = bytearray()
        self.url = bytearray()
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunked = False
        self.upgraded = False

    # httptools request callbacks --------------------------------------------------------

    def on_message_begin(self) -> None:
        self.url.clear()
        self.headers = []
        self.chunked = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        method = self.requests.get_method()
        target = bytes(self.url)
        traceparent = None
        for name_b, value_b in self.headers:
            lowered = name_b.lower()
            if lowered == b"traceparent":
                traceparent = value_b
            elif lowered == b"transfer-encoding":
                self.chunked = b"chunked" in value_b.lower()
        self.methods.append(method)
        head = bytearray(
            b"%s %s HTTP/%s\r\n" % (method, target, self.requests.get_http_version().encode())
        )
        if not wants_span(traceparent):
            self.spans.append(RequestHop.untraced(self.conn))
            for name_b, value_b in self.headers:
                head += name_b + b": " + value_b + b"\r\n"
            self.out += head + b"\r\n"
            return
        name = f"{method.decode()} {target.decode('latin-1')[:80]}"
        carrier_in = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in self.headers}
        span, carrier = start_request_span(self.tracer, self.conn, carrier_in, name, self.arrived)
        if span.is_recording():
            span.set_attributes(
                {"http.request.method": method.decode(), "url.path": target.decode("latin-1")}
            )
        self.spans.append(span)
        self.fresh.append(span)
        for name_b, value_b in self.headers:
            if name_b.lower() not in _TRACE_HEADER_NAMES:
                head += name_b + b": " + value_b + b"\r\n"
        for key, value in carrier.items():
            head += f"{key}: {value}\r\n".encode("latin-1")
        self.out += head + b"\r\n"

    def on_body(self, body: bytes) -> None:
        if self.chunked:
            self.out += b"%x\r\n%s\r\n" % (len(body), body)
        else:
            self.out += body

    def on_message_complete(self) -> None:
        if self.chunked:
            self.out += b"0\r\n\r\n"

    # relay ------------------------------------------------------------------------------

    async def run(self, first: bytes) -> None:
        self.conn.protocol = "http/1.1"
        try:
            await asyncio.gather(self._client_to_upstream(first), self._upstream_to_client())
        except httptools.HttpParserError as exc:
            self._reject(str(exc))
        except (ConnectionError, OSError):
            pass
        finally:
            for span in self.spans:
                if span is not None:
                    fail_request_span(span, "connection closed before the response completed")
            self.spans.clear()
            await _close(self.client_w)
            await _close(self.up_w)

    def _reject(self, reason: str) -> None:
        body = f"kube-proxy: malformed HTTP request: {reason}\n".encode()
        head = (
            f"HTTP/1.1 400 Bad Request\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        with contextlib.suppress(OSError):
            self.client_w.write(head.encode() + body)

    async def _client_to_upstream(self, first: bytes) -> None:
        data = first
        while data:
            self.conn.bytes_in += len(data)
            if self.upgraded:
                self.up_w.write(data)
            else:
                try:
                    self.requests.feed_data(data)
                except httptools.HttpParserUpgrade as upgrade:
                    # The head went out; the rest of the stream is not HTTP any more.
                    self.upgraded = True
                    self.out += data[upgrade.args[0] :]
                if self.out:
                    self.up_w.write(bytes(self.out))
                    self.out.clear()
                    self.handed_over()
            await self.up_w.drain()
            data = await self.client_r.read(READ_SIZE)
            self.arrived = time.perf_counter()
        if not self.upgraded and not self.spans:
            # The client is done and every response is complete: nothing more can come.
            await _close(self.up_w)
            return
        write_eof(self.up_w)

    async def _upstream_to_client(self) -> None:
        while data := await self.up_r.read(READ_SIZE):
            self.response_arrived = time.perf_counter()
            self.conn.bytes_out += len(data)
            if not self.upgraded:
                try:
                    self.responses.feed_data(data)
                except httptools.HttpParserUpgrade:
                    self.upgraded = True
                except httptools.HttpParserError as exc:
                    log.info("unparsable response; relaying as TCP", extra={"error": str(exc)})
                    self.upgraded = True
            self.client_w.write(data)
            await self.client_w.drain()
        write_eof(self.client_w)

    def response_complete(self, status: int) -> None:
        if status < 200 and status != 101:
            return  # an interim response (100 Continue); the real one follows
        if self.spans:
            span = self.spans.pop(0)
            if span is not None:
                self.finish(span, status)
        if self.methods and self.methods.pop(0) == b"HEAD":
            # A response to HEAD has no body whatever its headers say; the parser cannot
            # be told, so the rest of this connection is relayed without per-request spans.
            self.upgraded = True


class _ResponseWatcher:
    """httptools callbacks for the response direction: status and end of message only."""

    def __init__(self, relay: HTTP1Relay) -> None:
        self.relay = relay
        self.status = 0
        self.service_time: str | None = None

    def on_status(self, status: bytes) -> None:
        pass

    def on_headers_complete(self) -> None:
        self.status = self.relay.responses.get_status_code()
        spans = self.relay.spans
        if spans and spans[0] is not None and self.status >= 200:
            self.relay.response_head(spans[0], self.service_time)
        if self.relay.methods and self.relay.methods[0] == b"HEAD":
            self.relay.response_complete(self.status)

    def on_message_complete(self) -> None:
        if not (self.relay.methods and self.relay.methods[0] == b"HEAD"):
            self.relay.response_complete(self.status)


class _TunnelResponseWatcher(_ResponseWatcher):
    """Also reads the callee sidecar's ``x-envoy-upstream-service-time``."""

    def on_message_begin(self) -> None:
        self.service_time = None

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == SERVICE_TIME_HEADER:
            self.service_time = value.decode("latin-1")


# -- HTTP/2 ---------------------------------------------------------------------------------

FRAME_HEADER = struct.Struct("!BHBBI")  # 24-bit length as (high byte, low 16 bits)
HEADERS, CONTINUATION, RST_STREAM, SETTINGS, DATA = 0x1, 0x9, 0x3, 0x4, 0x0
END_STREAM, END_HEADERS, PADDED, PRIORITY = 0x1, 0x4, 0x8, 0x20
MAX_FRAME = 16384


def _frames(buf: bytearray) -> list[tuple[int, int, int, bytes, bytes]]:
    """Pop complete frames: (type, flags, stream, payload, raw bytes)."""
    out = []
    while len(buf) >= 9:
        hi, lo, ftype, flags, stream = FRAME_HEADER.unpack_from(buf)
        length = (hi << 16) | lo
        if len(buf) < 9 + length:
            break
        raw = bytes(buf[: 9 + length])
        del buf[: 9 + length]
        out.append((ftype, flags, stream & 0x7FFFFFFF, raw[9:], raw))
    return out


def _frame(ftype: int, flags: int, stream: int, payload: bytes) -> bytes:
    n = len(payload)
    return FRAME_HEADER.pack(n >> 16, n & 0xFFFF, ftype, flags, stream) + payload


def _header_fragment(flags: int, payload: bytes) -> bytes:
    start, end = 0, len(payload)
    if flags & PADDED:
        end -= payload[0]
        start = 1
    if flags & PRIORITY:
        start += 5
    return payload[start:end]


class HTTP2Relay(_HopRelay):
    """Per-stream hop spans on an HTTP/2 (gRPC) connection."""

    def setup(self) -> None:
        self.decoder_in = hpack.Decoder()
        self.encoder_in = hpack.Encoder()
        self.decoder_out = hpack.Decoder()
        self.spans: dict[int, Any] = {}
        self.statuses: dict[int, int] = {}

    async def run(self, first: bytes) -> None:
        self.conn.protocol = "h2"
        try:
            await asyncio.gather(self._client_to_upstream(first), self._upstream_to_client())
        except (hpack.HPACKError, ConnectionError, OSError, ValueError) as exc:
            log.info("h2 relay ended", extra={"conn": self.conn.id, "error": str(exc)})
        finally:
            for span in self.spans.values():
                fail_request_span(span, "connection closed before the stream ended")
            self.spans.clear()
            await _close(self.client_w)
            await _close(self.up_w)

    async def _client_to_upstream(self, first: bytes) -> None:
        buf = bytearray(first)
        self.conn.bytes_in += len(first)
        while len(buf) < len(H2_PREFACE):
            data = await self.client_r.read(READ_SIZE)
            if not data:  # gone inside the preface: nothing was sent on, end both sides
                raise ValueError("connection closed inside the HTTP/2 connection preface")
            self.conn.bytes_in += len(data)
            buf += data
        if bytes(buf[: len(H2_PREFACE)]) != H2_PREFACE:
            raise ValueError("bad HTTP/2 connection preface")
        self.up_w.write(bytes(buf[: len(H2_PREFACE)]))
        del buf[: len(H2_PREFACE)]
        pending: tuple[int, int, bytearray] | None = None  # HEADERS awaiting CONTINUATION
        while True:
            out = bytearray()
            for ftype, flags, stream, payload, raw in _frames(buf):
                if ftype == HEADERS:
                    pending = (stream, flags, bytearray(_header_fragment(flags, payload)))
                elif ftype == CONTINUATION and pending is not None:
                    pending[2].extend(payload)
                    flags = pending[1] | (flags & END_HEADERS)
                    pending = (pending[0], flags, pending[2])
                else:
                    if ftype == RST_STREAM and stream in self.spans:
                        fail_request_span(self.spans.pop(stream), "stream reset by client")
                    out += raw
                    continue
                if pending is not None and pending[1] & END_HEADERS:
                    out += self._rewrite_headers(*pending)
                    pending = None
            if out:
                self.up_w.write(bytes(out))
                self.handed_over()
                await self.up_w.drain()
            data = await self.client_r.read(READ_SIZE)
            self.arrived = time.perf_counter()
            if not data:
                write_eof(self.up_w)
                return
            self.conn.bytes_in += len(data)
            buf += data

    def _rewrite_headers(self, stream: int, flags: int, block: bytearray) -> bytes:
        headers = [(str(k), str(v)) for k, v in self.decoder_in.decode(bytes(block), raw=False)]
        names = {k for k, _ in headers}
        if ":method" in names:
            as_dict = dict(headers)
            name = f"{as_dict.get(':method', '')} {as_dict.get(':path', '')[:80]}"
            span, carrier = start_request_span(self.tracer, self.conn, as_dict, name, self.arrived)
            self.fresh.append(span)
            span.set_attributes(
                {
                    "http.request.method": as_dict.get(":method", ""),
                    "url.path": as_dict.get(":path", ""),
                    "rpc.system": "grpc"
                    if as_dict.get("content-type", "").startswith("application/grpc")
                    else "",
                }
            )
            self.spans[stream] = span
            headers = [(k, v) for k, v in headers if k not in TRACE_HEADERS]
            headers += list(carrier.items())
        encoded = self.encoder_in.encode(headers)
        keep = flags & END_STREAM
        chunks = [encoded[i : i + MAX_FRAME] for i in range(0, len(encoded), MAX_FRAME)] or [b""]
        frames = bytearray()
        for i, chunk in enumerate(chunks):
            last = END_HEADERS if i == len(chunks) - 1 else 0
            if i == 0:
                frames += _frame(HEADERS, keep | last, stream, chunk)
            else:
                frames += _frame(CONTINUATION, last, stream, chunk)
        return bytes(frames)

    async def _upstream_to_client(self) -> None:
        buf = bytearray()
        block: bytearray | None = None
        while True:
            data = await self.up_r.read(READ_SIZE)
            if not data:
                await _close(self.client_w)
                return
            self.response_arrived = time.perf_counter()
            self.conn.bytes_out += len(data)
            buf += data
            for ftype, flags, stream, payload, _raw in _frames(buf):
                if ftype == SETTINGS and not flags & 0x1:
                    self._apply_settings(payload)
                elif ftype in (HEADERS, CONTINUATION):
                    frag = _header_fragment(flags, payload) if ftype == HEADERS else payload
                    block = (block or bytearray()) + frag
                    if flags & END_HEADERS:
                        self._response_headers(stream, bytes(block))
                        block = None
                    if ftype == HEADERS and flags & END_STREAM:
                        self._end_stream(stream)
                elif ftype == DATA and flags & END_STREAM:
                    self._end_stream(stream)
                elif ftype == RST_STREAM and stream in self.spans:
                    fail_request_span(self.spans.pop(stream), "stream reset by upstream")
            # Spans of streams that just ended are closed before their last bytes go out.
            self.client_w.write(data)
            await self.client_w.drain()

    def _apply_settings(self, payload: bytes) -> None:
        for i in range(0, len(payload) - 5, 6):
            ident, value = struct.unpack_from("!HI", payload, i)
            if ident == 0x1:  # SETTINGS_HEADER_TABLE_SIZE: bounds our encoder
                self.encoder_in.header_table_size = min(value, 4096)

    def _response_headers(self, stream: int, block: bytes) -> None:
        headers = {str(k): str(v) for k, v in self.decoder_out.decode(block, raw=False)}
        if ":status" in headers:
            self.statuses[stream] = int(headers[":status"])
            if stream in self.spans:
                self.response_head(self.spans[stream], headers.get(SERVICE_TIME_HEADER_STR))
        if "grpc-status" in headers and stream in self.spans:
            self.spans[stream].set_attribute("rpc.grpc.status_code", int(headers["grpc-status"]))

    def _end_stream(self, stream: int) -> None:
        span = self.spans.pop(stream, None)
        if span is not None:
            self.finish(span, self.statuses.pop(stream, None))

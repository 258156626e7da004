"""Byte relays for one proxied connection: raw TCP, HTTP/1.1 (h11) and HTTP/2 (hpack).

The connection is already DNATed (the endpoint chosen, the upstream socket open) when a
relay starts; relays only move bytes, counting them, and give each HTTP request its hop
span (:mod:`mesh.kubeproxy.hop`). HTTP/1 is re-framed through two h11 state machines;
HTTP/2 frames pass through untouched except request HEADERS, whose header block is
decoded, gets the hop's ``traceparent`` and is re-encoded with our own HPACK context.
Anything malformed ends that connection only.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any

import h11
import hpack

from mesh.kubeproxy.hop import (
    TRACE_HEADERS,
    ConnInfo,
    fail_request_span,
    finish_request_span,
    start_request_span,
)

log = logging.getLogger("kube-proxy")

READ_SIZE = 65536
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
HTTP1_METHODS = (b"GET ", b"POST", b"PUT ", b"HEAD", b"DELE", b"PATC", b"OPTI", b"CONN", b"TRAC")


def sniff(first: bytes) -> str:
    if first.startswith(H2_PREFACE[: len(first)]) and len(first) >= 3:
        return "h2"
    if first[:4] in HTTP1_METHODS:
        return "http1"
    return "tcp"


async def _close(writer: asyncio.StreamWriter) -> None:
    try:
        writer.close()
        await writer.wait_closed()
    except (ConnectionError, OSError):
        pass


async def pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: ConnInfo, direction: str
) -> None:
    try:
        while data := await reader.read(READ_SIZE):
            _count(conn, direction, len(data))
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
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


class HTTP1Relay:
    """Re-frames requests and responses through h11, one hop span per request."""

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
        self.down = h11.Connection(h11.SERVER)
        self.up = h11.Connection(h11.CLIENT)
        self.req_wake = asyncio.Event()
        self.resp_wake = asyncio.Event()
        self.spans: list[Any] = []
        self.status: int | None = None

    async def run(self, first: bytes) -> None:
        self.conn.protocol = "http/1.1"
        self.down.receive_data(first)
        self.conn.bytes_in += len(first)
        tasks = [asyncio.create_task(self._requests()), asyncio.create_task(self._responses())]
        try:
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                if task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            await asyncio.gather(*pending)
        except (h11.ProtocolError, ConnectionError, OSError) as exc:
            for task in tasks:
                task.cancel()
            for span in self.spans:
                fail_request_span(span, f"{type(exc).__name__}: {exc}")
            self.spans.clear()
            if isinstance(exc, h11.RemoteProtocolError) and self.down.our_state in (
                h11.IDLE,
                h11.SEND_RESPONSE,
            ):
                self._reject(exc)

    def _reject(self, exc: h11.RemoteProtocolError) -> None:
        body = f"kube-proxy: malformed HTTP request: {exc}\n".encode()
        try:
            data = self.down.send(
                h11.Response(
                    status_code=exc.error_status_hint,
                    headers=[("content-length", str(len(body))), ("connection", "close")],
                )
            )
            self.client_w.write((data or b"") + (self.down.send(h11.Data(data=body)) or b""))
        except h11.LocalProtocolError:
            pass

    async def _requests(self) -> None:
        while True:
            event = self.down.next_event()
            if event is h11.NEED_DATA:
                await self.up_w.drain()
                data = await self.client_r.read(READ_SIZE)
                self.conn.bytes_in += len(data)
                self.down.receive_data(data)
                continue
            if event is h11.PAUSED:
                await self.up_w.drain()
                await self.req_wake.wait()
                self.req_wake.clear()
                continue
            if isinstance(event, h11.Request):
                headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
                name = f"{event.method.decode()} {event.target.decode('latin-1')[:80]}"
                span, carrier = start_request_span(self.tracer, self.conn, headers, name)
                span.set_attributes(
                    {
                        "http.request.method": event.method.decode(),
                        "url.path": event.target.decode("latin-1"),
                    }
                )
                self.spans.append(span)
                kept = [(k, v) for k, v in event.headers if k.decode().lower() not in TRACE_HEADERS]
                kept += [(k.encode(), v.encode()) for k, v in carrier.items()]
                self._up_send(
                    h11.Request(
                        method=event.method,
                        target=event.target,
                        headers=kept,
                        http_version=event.http_version,
                    )
                )
            elif isinstance(event, h11.Data):
                self._up_send(h11.Data(data=event.data))
            elif isinstance(event, h11.EndOfMessage):
                self._up_send(h11.EndOfMessage(headers=event.headers))
                self._next_cycle()
            elif isinstance(event, h11.ConnectionClosed):
                if self.up_w.can_write_eof():
                    self.up_w.write_eof()
                return

    def _up_send(self, event: Any) -> None:
        data = self.up.send(event)
        if data:
            self.up_w.write(data)

    async def _responses(self) -> None:
        pending = bytearray()  # written once every parsed event is handled: fewer syscalls,
        # and a request's span is closed before the client can see the end of its response
        while True:
            event = self.up.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                if pending:
                    self.client_w.write(bytes(pending))
                    pending.clear()
                    await self.client_w.drain()
                if event is h11.NEED_DATA:
                    data = await self.up_r.read(READ_SIZE)
                    self.conn.bytes_out += len(data)
                    self.up.receive_data(data)
                else:
                    await self.resp_wake.wait()
                    self.resp_wake.clear()
                continue
            if isinstance(event, h11.ConnectionClosed):
                for span in self.spans:
                    fail_request_span(span, "upstream closed the connection")
                self.spans.clear()
                if pending:
                    self.client_w.write(bytes(pending))
                await _close(self.client_w)
                return
            if isinstance(event, h11.Response):
                self.status = event.status_code
            if isinstance(event, h11.EndOfMessage) and self.spans:
                finish_request_span(self.spans.pop(0), self.status)
            out = self.down.send(event)  # type: ignore[arg-type]
            if out:
                pending += out
            if isinstance(event, h11.EndOfMessage):
                self._next_cycle()
                if self.down.our_state is h11.MUST_CLOSE:
                    self.client_w.write(bytes(pending))
                    await _close(self.client_w)
                    await _close(self.up_w)
                    return

    def _next_cycle(self) -> None:
        for c in (self.down, self.up):
            if c.our_state is h11.DONE and c.their_state is h11.DONE:
                c.start_next_cycle()
        self.req_wake.set()
        self.resp_wake.set()


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


class HTTP2Relay:
    """Per-stream hop spans on an HTTP/2 (gRPC) connection."""

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
            if not data:
                return
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
                await self.up_w.drain()
            data = await self.client_r.read(READ_SIZE)
            if not data:
                if self.up_w.can_write_eof():
                    self.up_w.write_eof()
                return
            self.conn.bytes_in += len(data)
            buf += data

    def _rewrite_headers(self, stream: int, flags: int, block: bytearray) -> bytes:
        headers = [(str(k), str(v)) for k, v in self.decoder_in.decode(bytes(block), raw=False)]
        names = {k for k, _ in headers}
        if ":method" in names:
            as_dict = dict(headers)
            name = f"{as_dict.get(':method', '')} {as_dict.get(':path', '')[:80]}"
            span, carrier = start_request_span(self.tracer, self.conn, as_dict, name)
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
        if "grpc-status" in headers and stream in self.spans:
            self.spans[stream].set_attribute("rpc.grpc.status_code", int(headers["grpc-status"]))

    def _end_stream(self, stream: int) -> None:
        span = self.spans.pop(stream, None)
        if span is not None:
            finish_request_span(span, self.statuses.pop(stream, None))

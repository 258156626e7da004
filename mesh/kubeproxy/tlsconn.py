"""A TLS connection through kube-proxy: relayed untouched, one span for the whole connection.

Between sidecars with mTLS, kube-proxy sees a ClientHello and then ciphertext: no request,
no ``traceparent``. It still DNATed the connection, so the hop is real and gets a span — one
per connection, in a trace of its own (nothing in the stream says which trace a request
belongs to). The span carries the NAT tuple and conntrack facts the HTTP hop spans carry,
the SNI, the bytes each way, :data:`~mesh.hopattributes.CONN_CLIENT` (the client's
``ip:port`` as accepted) and :data:`~mesh.hopattributes.TLS_OPAQUE`. The trace store pairs
it back into each request's trace through the caller's ``hopscope.upstream.local_address``
(:mod:`mesh.tracestore.store`), the way conntrack pairs a flow with its NAT entry.

A connection crossing nodes gets its ``cni-overlay`` span as the connection span's child,
as an HTTP request's does. The span ends when the connection closes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import SpanKind

from mesh.cni.streams import write_eof
from mesh.hopattributes import (
    CONN_BYTES_IN,
    CONN_BYTES_OUT,
    CONN_CLIENT,
    EMULATION_COST,
    TLS_OPAQUE,
    TLS_SERVER_NAME,
)
from mesh.kubeproxy.clienthello import ClientHelloReader
from mesh.kubeproxy.hop import ConnInfo, wants_span

log = logging.getLogger("kube-proxy")

READ_SIZE = 65536


class ConnectionHop:
    """The connection's span (and overlay child), with what the relay learns on the way."""

    __slots__ = ("conn", "forwarded_at", "hello", "overlay", "span")

    def __init__(self, tracer: trace.Tracer, conn: ConnInfo) -> None:
        self.conn = conn
        self.hello = ClientHelloReader()
        self.forwarded_at: float | None = None
        self.span: Any = None
        self.overlay: Any = None
        if not wants_span(None):
            return  # unsampled: relayed and counted, no span
        self.span = tracer.start_span(
            f"kube-proxy {conn.rule.namespace}/{conn.rule.name} TLS connection",
            context=Context(),  # no trace to join: the stream is encrypted
            kind=SpanKind.CLIENT,
            start_time=conn.accepted_ns or None,
        )
        attrs = conn.attributes()
        attrs.update(
            {
                "hopscope.conntrack.state": "new",
                CONN_CLIENT: conn.original_src,
                TLS_OPAQUE: True,
            }
        )
        self.span.set_attributes(attrs)
        tunnel = conn.tunnel
        if tunnel is not None:
            self.overlay = tracer.start_span(
                f"cni-overlay {tunnel.src_node} -> {tunnel.dst_node} vni {tunnel.vni}",
                context=trace.set_span_in_context(self.span),
                kind=SpanKind.INTERNAL,
                start_time=tunnel.started_ns or None,
            )
            self.overlay.set_attributes({**conn.overlay_attributes(), TLS_OPAQUE: True})

    def first_flight_sent(self) -> None:
        if self.forwarded_at is None:
            self.forwarded_at = time.perf_counter()

    def end(self) -> None:
        if self.span is None:
            return
        conn = self.conn
        attrs: dict[str, Any] = {CONN_BYTES_IN: conn.bytes_in, CONN_BYTES_OUT: conn.bytes_out}
        if self.hello.server_name:
            attrs[TLS_SERVER_NAME] = self.hello.server_name
        setup = conn.tunnel.setup_seconds if conn.tunnel is not None else 0.0
        if self.forwarded_at is not None and conn.accepted_at:
            # As for an HTTP hop: accept to the first bytes leaving for the endpoint, less
            # the client's own wait and the tunnel's set-up (the overlay's share).
            cost = self.forwarded_at - conn.accepted_at - conn.client_wait - setup
            attrs[EMULATION_COST] = round(max(cost, 0.0) * 1e6)
        self.span.set_attributes(attrs)
        if self.overlay is not None:
            self.overlay.set_attributes({**attrs, EMULATION_COST: round(setup * 1e6)})
            self.overlay.end()
        with trace.use_span(self.span, end_on_exit=True):
            log.info(
                "tls connection",
                extra={
                    "service": conn.rule.service,
                    "dnat": f"{conn.original_dst} -> {conn.translated_dst}",
                    "src": conn.original_src,
                    "endpoint_pod": conn.endpoint.pod,
                    "sni": self.hello.server_name or "",
                    "bytes_in": conn.bytes_in,
                    "bytes_out": conn.bytes_out,
                },
            )


async def _client_to_upstream(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, hop: ConnectionHop
) -> None:
    conn, hello = hop.conn, hop.hello
    try:
        while data := await reader.read(READ_SIZE):
            conn.bytes_in += len(data)
            writer.write(data)
            if not hello.done:
                hello.feed(data)
            await writer.drain()
        write_eof(writer)
    except (ConnectionError, OSError):
        pass


async def _upstream_to_client(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, conn: ConnInfo
) -> None:
    try:
        while data := await reader.read(READ_SIZE):
            conn.bytes_out += len(data)
            writer.write(data)
            await writer.drain()
        write_eof(writer)
    except (ConnectionError, OSError):
        pass


async def relay_tls(
    tracer: trace.Tracer,
    first: bytes,
    client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    conn: ConnInfo,
) -> None:
    """Splice a TLS stream both ways; the ClientHello is read on the side, never waited for."""
    conn.protocol = "tls"
    hop = ConnectionHop(tracer, conn)
    try:
        conn.bytes_in += len(first)
        upstream[1].write(first)
        hop.first_flight_sent()
        hop.hello.feed(first)
        await asyncio.gather(
            _client_to_upstream(client[0], upstream[1], hop),
            _upstream_to_client(upstream[0], client[1], conn),
        )
    finally:
        hop.end()

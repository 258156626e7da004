"""Pairing connection spans back into the traces of the requests they carried.

kube-proxy cannot read a TLS stream, so it gives such a connection one span in a trace of
its own (:mod:`mesh.kubeproxy.tlsconn`), carrying the client's ``ip:port`` as it accepted it
(:data:`~mesh.hopattributes.CONN_CLIENT`). The caller's proxy span carries the same tuple:
the address its upstream connection left from
(:data:`~mesh.hopattributes.UPSTREAM_LOCAL_ADDRESS`). Conntrack pairs a flow with its NAT
entry by that tuple; the trace store does the same when a trace is read: a connection span
whose client tuple is a proxy span's upstream local address, and whose time overlaps it, is
shown in that trace below that proxy span, with its own children (the ``cni-overlay`` hop).

The index is built at ingest (:class:`ConnectionIndex`: client tuple → the traces holding a
connection span for it, with its time), charged to the owning trace's bytes and dropped
with it, so reading a trace costs a dictionary look-up per proxy span, never a scan.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from opentelemetry.proto.trace.v1.trace_pb2 import Span

from mesh.hopattributes import CONN_CLIENT, UPSTREAM_LOCAL_ADDRESS
from mesh.tracestore.otlp import SpanRecord

ENTRY_BYTES = 450
"""Bytes one index entry costs: the key string (``ip:port`` of 17 characters), the entry
tuple with its trace id and ints, the list and dictionary slots, and the owning trace's
tuple of keys (measured with ``tracemalloc`` over 10,000 entries: 442)."""

MAX_PAIRED_TRACES = 64
"""Connection traces pulled into one view at most (a trace with more proxy spans than this
shows the first ones paired)."""


def present(value: object) -> str:
    """An Envoy tag's value, or "" when its formatter had none (``-`` or empty)."""
    text = str(value or "")
    return "" if text == "-" else text


def connection_client(span: Span) -> str:
    """The span's :data:`CONN_CLIENT`, for a root span that has one ("" otherwise)."""
    if span.parent_span_id:
        return ""
    for kv in span.attributes:
        if kv.key == CONN_CLIENT:
            return kv.value.string_value
    return ""


def _local(record: SpanRecord) -> str:
    return present(record.attributes.get(UPSTREAM_LOCAL_ADDRESS))


Entry = tuple[bytes, int, int]
"""(trace id, start ns, end ns) of one connection span."""


class ConnectionIndex:
    """Client tuple → connection spans. Not thread-safe: the store's lock guards it."""

    def __init__(self) -> None:
        self.by_client: dict[str, list[Entry]] = {}

    def add(self, client: str, trace_id: bytes, start_ns: int, end_ns: int) -> None:
        self.by_client.setdefault(client, []).append((trace_id, start_ns, end_ns))

    def drop(self, clients: tuple[str, ...], trace_id: bytes) -> None:
        for client in clients:
            entries = self.by_client.get(client)
            if entries is None:
                continue
            entries[:] = [e for e in entries if e[0] != trace_id]
            if not entries:
                del self.by_client[client]

    def matches(self, records: list[SpanRecord], own: bytes | None) -> list[tuple[str, bytes]]:
        """``(proxy span id, connection trace id)`` for each proxy span of ``records`` whose
        upstream connection has a connection span overlapping it in time."""
        if not self.by_client:
            return []
        out: list[tuple[str, bytes]] = []
        by_id = {r.span_id: r for r in records}
        for record in records:
            local = _local(record)
            if not local or local not in self.by_client:
                continue
            parent = by_id.get(record.parent_span_id)
            if parent is not None and _local(parent) == local:
                continue  # the ingress's attempt span below its server span: one request
            for trace_id, start, end in self.by_client[local]:
                if trace_id != own and start <= record.end_ns and end >= record.start_ns:
                    out.append((record.span_id, trace_id))
                    if len(out) >= MAX_PAIRED_TRACES:
                        return out
        return out


def paired_records(
    proxy: SpanRecord, connection: list[SpanRecord], copy_number: int
) -> list[SpanRecord]:
    """A connection trace's spans as shown in the trace of ``proxy``: marked paired, their
    times clipped to the request's, and (when the same connection carried several requests
    of this trace) their ids made unique in the view."""
    suffix = f"+{copy_number}" if copy_number else ""
    own_ids = {r.span_id for r in connection}
    out = []
    for record in connection:
        attributes = dict(record.attributes)
        if "hopscope.conntrack.state" in attributes:
            # As the request met it: opened for it, or already open (a pooled connection).
            opened_for_it = record.start_ns >= proxy.start_ns
            attributes["hopscope.conntrack.state"] = "new" if opened_for_it else "established"
        parent = record.parent_span_id
        out.append(
            replace(
                record,
                span_id=record.span_id + suffix,
                parent_span_id=parent + suffix if parent in own_ids else parent,
                start_ns=max(record.start_ns, proxy.start_ns),
                end_ns=max(min(record.end_ns, proxy.end_ns), max(record.start_ns, proxy.start_ns)),
                paired_with=proxy.span_id,
                lifetime_ns=(record.start_ns, record.end_ns),
                attributes=attributes,
            )
        )
    return out


def entry_bytes(client: str) -> int:
    """What indexing one connection span for ``client`` costs, in bytes."""
    return ENTRY_BYTES + max(0, len(client) - 17)


def with_pairs(
    records: list[SpanRecord],
    pairs: list[tuple[str, bytes]],
    decoded: dict[bytes, list[SpanRecord]],
) -> list[SpanRecord]:
    """``records`` plus the paired connection spans (:func:`paired_records`)."""
    if not pairs:
        return records
    by_id: dict[str, Any] = {r.span_id: r for r in records}
    copies: dict[bytes, int] = {}
    out = list(records)
    for proxy_id, trace_id in pairs:
        connection = decoded.get(trace_id)
        if not connection:
            continue
        n = copies.get(trace_id, 0)
        copies[trace_id] = n + 1
        out.extend(paired_records(by_id[proxy_id], connection, n))
    return out

"""The embedded trace store: recent traces in memory, bounded in bytes.

Local mode has no Tempo, so the control plane keeps recent traces itself; ``hopscope trace``
and the explorer read them through the control-plane API.

Memory is what bounds the store, not a trace count: a bigger app or longer traces must not
quietly mean more memory. Each span is kept the way the wire gave it — its protobuf encoding,
less the trace id the store already keys it by — and decoded into a
:class:`~mesh.tracestore.otlp.SpanRecord` only when someone reads it. A trace's spans sit in
one list, interleaved with the (interned, shared) resource they came from, so a span costs
its encoded size plus a few dozen bytes; a resource that does not fit the intern table is
charged to each trace holding it, so no sender can grow the store past its budget. When
the accounted bytes pass the budget, the traces updated longest ago go first; their ids
are remembered in a fixed-size ring so a reader can be told "evicted" rather than "not
found".

Connection spans (kube-proxy's span of a TLS stream, :mod:`mesh.tracestore.pairing`) are
indexed by client tuple as they arrive; the entry is charged to its trace's bytes and
dropped with it. :meth:`TraceStore.get` adds the connection spans paired with a trace's
proxy spans, so every view of a trace shows them.
"""

from __future__ import annotations

import heapq
import logging
import operator
import os
import re
import sys
import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from mesh.tracestore.otlp import SpanRecord, attributes, span_record
from mesh.tracestore.pairing import ConnectionIndex, connection_client, entry_bytes, with_pairs

log = logging.getLogger(__name__)

TRACE_STORE_BUDGET = "HOPSCOPE_TRACE_STORE_BUDGET"
"""Env var: the store's memory budget, in bytes or with a unit (``256MiB``, ``64MB``).
Default: :data:`DEFAULT_BUDGET_BYTES`."""

DEFAULT_BUDGET_BYTES = 256 * 2**20
"""256 MiB: about 300,000 spans of the sample shop, an hour of traffic at 3 req/s."""

MAX_SPANS_PER_TRACE = 2000
"""A runaway trace stops growing here instead of eating the budget."""

SPAN_OVERHEAD = sys.getsizeof(b"") + 8 + 7
"""Bytes a stored span costs beyond its encoding: the bytes object's header, its list
slot, and allocator rounding (measured with ``bench/store.py``)."""

TRACE_OVERHEAD = 360
"""Bytes a stored trace costs besides its spans: its key, its record and list, and its
entry in the ordered map (measured with ``bench/store.py``)."""

MIN_BUDGET_BYTES = 2**20
"""The smallest budget ``--trace-store-budget`` / ``HOPSCOPE_TRACE_STORE_BUDGET`` accept:
below 1 MiB the store would hold a handful of traces (or, with a typo like ``256``, none)."""

EVICTED_ID_BYTES = 16
RESOURCE_LIMIT = 4096
"""Distinct resources (one per process) kept interned and charged to the store as a whole;
beyond this, a new resource is kept unshared and charged to each trace that takes it."""

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 2**10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 2**20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 2**30,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """``"256MiB"`` → 268435456; plain numbers are bytes. ValueError with a readable message."""
    match = _SIZE.match(str(text))
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise ValueError(
            f"{text!r} is not a size: give bytes or a number with a unit "
            "(KiB, MiB, GiB, KB, MB, GB), e.g. 256MiB"
        )
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"{text!r}: a size must be more than 0 bytes")
    return size


def parse_budget(text: str) -> int:
    """A trace store budget from the user: a size (:func:`parse_size`) of at least
    :data:`MIN_BUDGET_BYTES`. ValueError with a readable message."""
    size = parse_size(text)
    if size < MIN_BUDGET_BYTES:
        raise ValueError(
            f"{text!r} is too small for the trace store: give at least 1MiB (e.g. 256MiB)"
        )
    return size


def budget_from_env() -> int:
    """The budget ``HOPSCOPE_TRACE_STORE_BUDGET`` asks for, or the default. The ValueError
    names the variable."""
    raw = os.environ.get(TRACE_STORE_BUDGET, "").strip()
    if not raw:
        return DEFAULT_BUDGET_BYTES
    try:
        return parse_budget(raw)
    except ValueError as exc:
        raise ValueError(f"{TRACE_STORE_BUDGET}: {exc}") from None


def format_size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= 1024
    return f"{n:.1f} GiB".replace(".0 ", " ")


class _Resource:
    """A resource's attributes, decoded once and shared by every span from that process.

    ``shared``: it is in the intern table, whose entries the store charges as a whole;
    otherwise each trace that takes it is charged its ``nbytes``."""

    __slots__ = ("__weakref__", "attributes", "nbytes", "shared")

    def __init__(self, resource: Resource, encoded: bytes, shared: bool) -> None:
        self.attributes = attributes(resource.attributes)
        self.shared = shared
        self.nbytes = _RESOURCE_OVERHEAD + _deep_size(self.attributes)
        if shared:  # the table keeps the encoding as its key, and a weak reference
            self.nbytes += sys.getsizeof(encoded) + _INTERN_ENTRY


_RESOURCE_OVERHEAD = 64
"""A ``_Resource`` object itself (four slots, a weak-reference slot, the GC header)."""

_INTERN_ENTRY = 120
"""An intern-table entry besides its key: the weak reference and the dict slot."""


def _deep_size(value: Any) -> int:
    """Bytes a decoded attribute value holds: the object and what it contains."""
    size = sys.getsizeof(value)
    if isinstance(value, dict):
        size += sum(_deep_size(k) + _deep_size(v) for k, v in value.items())
    elif isinstance(value, list):
        size += sum(_deep_size(v) for v in value)
    return size


class _Trace:
    """One trace's spans: encoded span bytes, each run preceded by its ``_Resource``."""

    __slots__ = ("clients", "first_start", "last_resource", "nbytes", "parts", "spans")

    def __init__(self, start_ns: int) -> None:
        self.parts: list[bytes | _Resource] = []
        self.clients: tuple[str, ...] = ()
        """Client tuples of this trace's connection spans (its entries in the index)."""
        self.spans = 0
        self.nbytes = TRACE_OVERHEAD
        self.first_start = start_ns
        self.last_resource: _Resource | None = None


class TraceStore:
    """Thread-safe map of trace id → spans, bounded in bytes (and spans per trace)."""

    def __init__(
        self,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        max_spans_per_trace: int = MAX_SPANS_PER_TRACE,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"the trace store budget must be positive, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.max_spans_per_trace = max_spans_per_trace
        self._traces: OrderedDict[bytes, _Trace] = OrderedDict()
        self._resources: weakref.WeakValueDictionary[bytes, _Resource] = (
            weakref.WeakValueDictionary()
        )
        self._conns = ConnectionIndex()
        """Connection spans by client tuple, to pair them into request traces on read."""
        self._lock = threading.Lock()
        self._intern_lock = threading.Lock()
        self._bytes = 0
        self._resource_bytes = 0
        self._spans = 0
        capacity = min(max(1024, budget_bytes // 4096), 2**20)
        self._evicted_ids = bytearray()
        self._evicted_capacity = capacity * EVICTED_ID_BYTES
        self._evicted_next = 0
        self.evicted_traces = 0
        self.spans_received = 0
        self.spans_rejected: dict[str, int] = {"invalid_id": 0, "trace_span_limit": 0}
        self.registry = registry or CollectorRegistry()
        """Where the store's metrics are registered (its own, unless one was given)."""
        self.registry.register(_StoreCollector(self))
        self.span_hooks: list[Callable[[list[tuple[bytes, Span]]], None]] = []
        """Called after each export with its stored spans (trace id, span), outside the
        lock: the kernel data path joins its kube-proxy hops to the sidecars' spans here."""

    # -- writing ------------------------------------------------------------------------

    def add_export(self, request: ExportTraceServiceRequest) -> tuple[int, dict[str, int]]:
        """Store every span of an export; returns how many were stored and the rejected
        ones by reason."""
        rejected = {"invalid_id": 0, "trace_span_limit": 0}
        batch: list[tuple[bytes, _Resource, Span, bytes]] = []
        for resource_spans in request.resource_spans:
            resource = self._intern(resource_spans.resource)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    trace_id = span.trace_id
                    if len(trace_id) != 16 or len(span.span_id) != 8 or not any(trace_id):
                        rejected["invalid_id"] += 1
                        continue
                    span.ClearField("trace_id")
                    batch.append((trace_id, resource, span, span.SerializeToString()))
        with self._lock:
            self.spans_received += len(batch) + rejected["invalid_id"]
            for trace_id, resource, span, data in batch:
                if not self._append(trace_id, resource, span.start_time_unix_nano, data):
                    rejected["trace_span_limit"] += 1
                elif client := connection_client(span):
                    self._index_connection(trace_id, client, span)
            for reason, n in rejected.items():
                self.spans_rejected[reason] += n
            self._evict()
        if self.span_hooks:
            stored = [(trace_id, span) for trace_id, _resource, span, _data in batch]
            for hook in self.span_hooks:
                try:
                    hook(stored)
                except Exception:  # a hook's bug must not lose the export
                    log.exception("span hook failed")
        return len(batch) - rejected["trace_span_limit"], rejected

    def _intern(self, resource: Resource) -> _Resource:
        encoded = resource.SerializeToString(deterministic=True)
        with self._intern_lock:
            found = self._resources.get(encoded)
            if found is None:
                shared = len(self._resources) < RESOURCE_LIMIT
                found = _Resource(resource, encoded, shared)
                if shared:
                    self._resources[encoded] = found
        return found

    def _append(self, trace_id: bytes, resource: _Resource, start_ns: int, data: bytes) -> bool:
        trace = self._traces.get(trace_id)
        if trace is None:
            trace = self._traces[trace_id] = _Trace(start_ns)
            self._bytes += TRACE_OVERHEAD
        elif trace.spans >= self.max_spans_per_trace:
            return False
        else:
            self._traces.move_to_end(trace_id)
            if start_ns < trace.first_start:
                trace.first_start = start_ns
        if trace.last_resource is not resource:
            trace.parts.append(resource)
            trace.last_resource = resource
            # an unshared resource is charged to every trace that takes it: several traces
            # of one export may share it, so this may count it more than once, never less
            taken = 8 if resource.shared else 8 + resource.nbytes
            trace.nbytes += taken
            self._bytes += taken
        trace.parts.append(data)
        cost = len(data) + SPAN_OVERHEAD
        trace.spans += 1
        trace.nbytes += cost
        self._bytes += cost
        self._spans += 1
        return True

    def _index_connection(self, trace_id: bytes, client: str, span: Span) -> None:
        trace = self._traces[trace_id]
        self._conns.add(client, trace_id, span.start_time_unix_nano, span.end_time_unix_nano)
        trace.clients = (*trace.clients, client)
        cost = entry_bytes(client)
        trace.nbytes += cost
        self._bytes += cost

    def _evict(self) -> None:
        interned = self._count_resources()
        while self._total_bytes() > self.budget_bytes and len(self._traces) > 1:
            trace_id, trace = self._traces.popitem(last=False)
            self._bytes -= trace.nbytes
            self._spans -= trace.spans
            if trace.clients:
                self._conns.drop(trace.clients, trace_id)
            self.evicted_traces += 1
            self._remember_evicted(trace_id)
            del trace  # its interned resources no other trace holds leave the table now
            if len(self._resources) != interned:
                interned = self._count_resources()

    def _count_resources(self) -> int:
        """Recount the interned resources' bytes; returns how many there are."""
        with self._intern_lock:
            held = list(self._resources.values())
        self._resource_bytes = sum(r.nbytes for r in held)
        return len(held)

    def _remember_evicted(self, trace_id: bytes) -> None:
        if len(self._evicted_ids) < self._evicted_capacity:
            self._evicted_ids += trace_id
            return
        at = self._evicted_next
        self._evicted_ids[at : at + EVICTED_ID_BYTES] = trace_id
        self._evicted_next = (at + EVICTED_ID_BYTES) % self._evicted_capacity

    def _total_bytes(self) -> int:
        return self._bytes + self._resource_bytes + len(self._evicted_ids)

    # -- reading ------------------------------------------------------------------------

    def get(self, trace_id: str) -> list[SpanRecord]:
        """A trace's spans, with the connection spans paired into it (:mod:`.pairing`)."""
        key = _key(trace_id)
        with self._lock:
            trace = self._traces.get(key) if key else None
            parts = list(trace.parts) if trace else []
        return self._paired(key, _records(trace_id.lower(), parts))

    def _paired(self, key: bytes | None, records: list[SpanRecord]) -> list[SpanRecord]:
        """``records`` plus the connection spans whose client tuple is the upstream local
        address of one of their proxy spans, at an overlapping time."""
        with self._lock:
            pairs = self._conns.matches(records, key)
            wanted = {tid: self._traces.get(tid) for _, tid in pairs}
            parts = {tid: list(t.parts) for tid, t in wanted.items() if t is not None}
        decoded = {tid: _records(tid.hex(), p) for tid, p in parts.items()}
        return with_pairs(records, pairs, decoded)

    def find_prefix(self, prefix: str) -> list[str]:
        """Trace ids starting with ``prefix`` (lets users type a short id, like git)."""
        prefix = prefix.lower()
        with self._lock:
            keys = list(self._traces)
        return [h for h in (k.hex() for k in keys) if h.startswith(prefix)]

    def recent(
        self, limit: int = 20, connections: bool = False
    ) -> list[tuple[str, list[SpanRecord]]]:
        """Most recently *started* traces first.

        A connection's own trace (kube-proxy's span of a TLS stream) is left out unless
        ``connections``: it is shown inside the request traces it pairs with, and listing it
        would make the newest "request" a connection opened after the request began."""
        with self._lock:
            traces = (
                self._traces.items()
                if connections
                else ((k, t) for k, t in self._traces.items() if not t.clients)
            )
            newest = heapq.nlargest(limit, traces, key=lambda kv: kv[1].first_start)
            picked = [(k, list(t.parts)) for k, t in newest]
        return [(k.hex(), self._paired(k, _records(k.hex(), parts))) for k, parts in picked]

    def was_evicted(self, trace_id: str) -> bool:
        """Whether a trace with this id (or id prefix) was held and has been evicted."""
        prefix = trace_id.lower()
        with self._lock:
            ring = bytes(self._evicted_ids)
        if len(prefix) == 32:
            key = _key(prefix)
            at = ring.find(key) if key else -1
            while at != -1 and at % EVICTED_ID_BYTES:
                at = ring.find(key, at + 1)  # type: ignore[arg-type]
            return at != -1
        text = ring.hex()
        at = text.find(prefix)
        while at != -1 and at % (2 * EVICTED_ID_BYTES):
            at = text.find(prefix, at + 1)
        return bool(prefix) and at != -1

    def missing_message(self, trace_id: str) -> str:
        """Why a trace is not here, in words: evicted (and how far back the store reaches)
        or not (yet) received."""
        if not self.was_evicted(trace_id):
            return f"trace {trace_id} not found (it may not have arrived yet)"
        stats = self.stats()
        reach = (
            f"the store now reaches back to {_clock(stats['oldest_start_ns'])}"
            if stats["oldest_start_ns"]
            else "the store is empty"
        )
        return (
            f"trace {trace_id} was evicted from the store "
            f"(budget {format_size(self.budget_bytes)}; {reach})"
        )

    def stats(self) -> dict[str, Any]:
        """What ``/api/v1/status`` shows under ``trace_store``. ``oldest_start_ns``: the
        earliest start among the traces held (how far back the store reaches)."""
        with self._lock:
            return {
                "traces": len(self._traces),
                "spans": self._spans,
                "bytes": self._total_bytes(),
                "budget_bytes": self.budget_bytes,
                "evicted_traces": self.evicted_traces,
                # one pass over the traces (a few ms for a full default store), at scrape
                # or page rate: the least recently updated trace need not be the oldest
                "oldest_start_ns": min(map(_FIRST_START, self._traces.values()), default=None),
            }

    def __len__(self) -> int:
        with self._lock:
            return len(self._traces)


_FIRST_START = operator.attrgetter("first_start")


def _key(trace_id: str) -> bytes | None:
    try:
        key = bytes.fromhex(trace_id)
    except ValueError:
        return None
    return key if len(key) == 16 else None


def _records(trace_id: str, parts: list[bytes | _Resource]) -> list[SpanRecord]:
    out: list[SpanRecord] = []
    resource: dict[str, Any] = {}
    for part in parts:
        if isinstance(part, bytes):
            out.append(span_record(trace_id, Span.FromString(part), resource))
        else:
            resource = part.attributes
    return out


def _clock(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


class _StoreCollector:
    """The store's size and flow as Prometheus metrics, read at scrape time."""

    def __init__(self, store: TraceStore) -> None:
        self.store = store

    def collect(self) -> Iterator[Metric]:
        s = self.store
        stats = s.stats()
        yield GaugeMetricFamily(
            "hopscope_tracestore_traces", "Traces held by the trace store", stats["traces"]
        )
        yield GaugeMetricFamily(
            "hopscope_tracestore_spans", "Spans held by the trace store", stats["spans"]
        )
        yield GaugeMetricFamily(
            "hopscope_tracestore_bytes",
            "Estimated resident bytes of the trace store",
            stats["bytes"],
        )
        yield GaugeMetricFamily(
            "hopscope_tracestore_budget_bytes",
            "Memory budget of the trace store; the oldest traces are evicted beyond it",
            stats["budget_bytes"],
        )
        yield CounterMetricFamily(
            "hopscope_tracestore_evicted_traces",
            "Traces evicted to stay within the budget",
            stats["evicted_traces"],
        )
        yield CounterMetricFamily(
            "hopscope_tracestore_spans_received",
            "Spans received by the trace store",
            s.spans_received,
        )
        rejected = CounterMetricFamily(
            "hopscope_tracestore_spans_rejected",
            "Spans not stored: invalid_id (trace or span id of the wrong length or zero), "
            "trace_span_limit (the trace already holds the most spans one may hold)",
            labels=["reason"],
        )
        for reason, n in sorted(s.spans_rejected.items()):
            rejected.add_metric([reason], n)
        yield rejected

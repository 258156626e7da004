"""The embedded trace store: the last N traces in memory, newest first.

Local mode has no Tempo, so the control plane keeps recent traces itself; ``hopscope trace``
and the explorer read them through the control-plane API.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from mesh.tracestore.otlp import SpanRecord

DEFAULT_MAX_TRACES = 5000
"""How many traces the store keeps before evicting the least recently updated."""

MAX_SPANS_PER_TRACE = 2000
"""A runaway trace stops growing here instead of eating memory."""


class TraceStore:
    """Thread-safe map of trace id → spans, bounded in traces and spans per trace."""

    def __init__(self, max_traces: int = DEFAULT_MAX_TRACES) -> None:
        self.max_traces = max_traces
        self._traces: OrderedDict[str, list[SpanRecord]] = OrderedDict()
        self._first_start: dict[str, int] = {}
        self._lock = threading.Lock()
        self.spans_received = 0
        self.spans_dropped = 0

    def add(self, spans: list[SpanRecord]) -> None:
        with self._lock:
            for span in spans:
                self._add_one(span)

    def _add_one(self, span: SpanRecord) -> None:
        self.spans_received += 1
        bucket = self._traces.get(span.trace_id)
        if bucket is None:
            bucket = self._traces[span.trace_id] = []
            self._first_start[span.trace_id] = span.start_ns
        if len(bucket) >= MAX_SPANS_PER_TRACE:
            self.spans_dropped += 1
            return
        bucket.append(span)
        self._first_start[span.trace_id] = min(self._first_start[span.trace_id], span.start_ns)
        self._traces.move_to_end(span.trace_id)
        while len(self._traces) > self.max_traces:
            old, _ = self._traces.popitem(last=False)
            self._first_start.pop(old, None)

    def get(self, trace_id: str) -> list[SpanRecord]:
        with self._lock:
            return list(self._traces.get(trace_id.lower(), []))

    def find_prefix(self, prefix: str) -> list[str]:
        """Trace ids starting with ``prefix`` (lets users type a short id, like git)."""
        prefix = prefix.lower()
        with self._lock:
            return [t for t in self._traces if t.startswith(prefix)]

    def recent(self, limit: int = 20) -> list[tuple[str, list[SpanRecord]]]:
        """Most recently *started* traces first."""
        with self._lock:
            ids = sorted(self._traces, key=lambda t: self._first_start[t], reverse=True)
            return [(t, list(self._traces[t])) for t in ids[:limit]]

    def __len__(self) -> int:
        with self._lock:
            return len(self._traces)

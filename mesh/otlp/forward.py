"""Forward accepted OTLP exports to the user's own endpoint, counting every item.

One worker thread posts each queued body to ``<endpoint>/v1/<signal>`` exactly as it was
received (same encoding and compression), with the user's headers
(``OTEL_EXPORTER_OTLP_HEADERS``). Like the Collector's exporters:

* the queue is bounded in bytes (:data:`DEFAULT_QUEUE_BYTES`); a body that does not fit is
  dropped at once and counted ``dropped`` — the receiver never blocks on a slow backend;
* a retryable failure (connection error, timeout, 408, 429, 502, 503, 504) is retried with
  exponential backoff (``Retry-After`` honoured) until :data:`MAX_ELAPSED_S`; then, or on
  any other answer that is not 2xx, the body's items are counted ``failed``;
* a 2xx counts them ``sent``.

Counter: ``hopscope_otlp_forwarded_items_total{signal, outcome}`` — items are spans, log
records or metric data points.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from dataclasses import dataclass
from urllib.parse import unquote

import requests
from prometheus_client import CollectorRegistry, Counter

from mesh.otlp.intake import SIGNALS

log = logging.getLogger(__name__)

DEFAULT_QUEUE_BYTES = 64 * 2**20
"""Bodies waiting to be forwarded, at most (64 MiB)."""

MAX_ELAPSED_S = 30.0
"""How long one body is retried before it counts as failed."""

INITIAL_BACKOFF_S = 0.5
MAX_BACKOFF_S = 5.0
TIMEOUT_S = 10.0
RETRYABLE = frozenset({408, 429, 502, 503, 504})
OUTCOMES = ("sent", "failed", "dropped")


def parse_headers(text: str) -> dict[str, str]:
    """``OTEL_EXPORTER_OTLP_HEADERS``: ``key=value,key2=value2``, values percent-encoded.

    Raises ValueError naming the bad entry."""
    headers: dict[str, str] = {}
    for entry in text.split(","):
        if not entry.strip():
            continue
        key, sep, value = entry.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"OTLP header {entry.strip()!r} is not key=value")
        headers[unquote(key.strip())] = unquote(value.strip())
    return headers


def check_endpoint(url: str) -> str:
    """The endpoint without a trailing slash; ValueError if it is not an http(s) URL."""
    from urllib.parse import urlsplit

    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"OTLP endpoint {url!r} must be an http:// or https:// URL")
    return url.strip().rstrip("/")


def forwarded_counter(registry: CollectorRegistry) -> Counter:
    """``hopscope_otlp_forwarded_items_total{signal, outcome}``, every series at 0 (it exists
    when nothing is forwarded too, so the loss panel always has a series)."""
    counter = Counter(
        "hopscope_otlp_forwarded_items",
        "Spans, log records and metric data points forwarded to the user's OTLP "
        "endpoint, by signal and outcome (sent, failed, dropped)",
        ["signal", "outcome"],
        registry=registry,
    )
    for signal in SIGNALS:
        for outcome in OUTCOMES:
            counter.labels(signal, outcome)
    return counter


@dataclass
class _Body:
    signal: str
    body: bytes
    content_type: str | None
    content_encoding: str | None
    items: int


class Forwarder:
    """A bounded, retrying OTLP/HTTP forwarder with counted outcomes."""

    def __init__(
        self,
        endpoint: str,
        registry: CollectorRegistry,
        headers: dict[str, str] | None = None,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        max_elapsed_s: float = MAX_ELAPSED_S,
        counter: Counter | None = None,
    ) -> None:
        self.endpoint = check_endpoint(endpoint)
        self.headers = dict(headers or {})
        self.queue_bytes = queue_bytes
        self.max_elapsed_s = max_elapsed_s
        self.items = counter if counter is not None else forwarded_counter(registry)
        self._queue: collections.deque[_Body] = collections.deque()
        self._queued_bytes = 0
        self._cond = threading.Condition()
        self._stopping = False
        self._session = requests.Session()
        self._thread = threading.Thread(target=self._run, name="otlp-forward", daemon=True)
        self._thread.start()

    def submit(
        self,
        signal: str,
        body: bytes,
        content_type: str | None,
        content_encoding: str | None,
        items: int,
    ) -> bool:
        """Queue one export; False (and counted ``dropped``) when the queue is full."""
        with self._cond:
            if self._stopping or self._queued_bytes + len(body) > self.queue_bytes:
                self.items.labels(signal, "dropped").inc(items)
                return False
            self._queue.append(_Body(signal, body, content_type, content_encoding, items))
            self._queued_bytes += len(body)
            self._cond.notify()
        return True

    def stop(self, drain_s: float = 2.0) -> None:
        """Stop accepting; give queued bodies ``drain_s`` to go, count the rest dropped."""
        deadline = time.monotonic() + drain_s
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        with self._cond:
            for item in self._queue:
                self.items.labels(item.signal, "dropped").inc(item.items)
            self._queue.clear()
            self._queued_bytes = 0

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                item = self._queue.popleft()
                self._queued_bytes -= len(item.body)
            outcome = "sent" if self._deliver(item) else "failed"
            self.items.labels(item.signal, outcome).inc(item.items)

    def _deliver(self, item: _Body) -> bool:
        url = f"{self.endpoint}/v1/{item.signal}"
        headers = {**self.headers, "Content-Type": item.content_type or "application/x-protobuf"}
        if item.content_encoding:
            headers["Content-Encoding"] = item.content_encoding
        started = time.monotonic()
        backoff = INITIAL_BACKOFF_S
        while True:
            retry_after: float | None = None
            try:
                resp = self._session.post(url, data=item.body, headers=headers, timeout=TIMEOUT_S)
            except requests.RequestException as exc:
                problem = f"{type(exc).__name__}"
            else:
                if resp.status_code < 300:
                    return True
                problem = f"HTTP {resp.status_code}"
                if resp.status_code not in RETRYABLE:
                    log.warning("forwarding %s to %s refused: %s", item.signal, url, problem)
                    return False
                retry_after = _retry_after(resp.headers.get("Retry-After"))
            wait = min(retry_after if retry_after is not None else backoff, MAX_BACKOFF_S)
            if self._stopping or time.monotonic() - started + wait > self.max_elapsed_s:
                log.warning("forwarding %s to %s failed: %s", item.signal, url, problem)
                return False
            time.sleep(wait)
            backoff = min(backoff * 2, MAX_BACKOFF_S)


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None

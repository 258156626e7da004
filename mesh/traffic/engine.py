"""Open-model load: requests start on a fixed schedule, whatever the responses do.

Request *i* is due at ``t0 + i / rps``. Its latency is measured from that intended send time,
not from when it actually went out, so a stall in the system (or in the generator) shows up
as latency instead of silently lowering the rate — the "coordinated omission" trap of
closed-loop tools. ``concurrency`` caps requests in flight; a request that has to wait for a
slot still counts its wait.

Every request is the root of a trace: a ``client`` span whose context travels in
``traceparent``. Latencies go into an HDR histogram (microseconds, 3 significant digits).
"""

from __future__ import annotations

import asyncio
import random
import resource
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from hdrh.histogram import HdrHistogram
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

PROPAGATOR = TraceContextTextMapPropagator()
MAX_LATENCY_US = 120_000_000
"""Latencies are recorded up to 120 s."""


@dataclass(frozen=True)
class Route:
    weight: float
    method: str
    path: str
    kind: str
    """What the request exercises: ``http``, ``grpc`` (behind the frontend), ``egress``…"""


SHOP_MIX = (
    Route(6, "GET", "/", "http+grpc"),
    Route(2, "GET", "/reviews/p1", "grpc"),
    Route(1, "GET", "/reviews/p2", "grpc"),
    Route(1, "GET", "/checkout", "egress"),
)
"""The sample shop's routes, weighted: the page, reviews only (gRPC), checkout (egress)."""


@dataclass
class Target:
    connect_ip: str
    connect_port: int
    host_header: str
    source_ip: str
    label: str
    fixed_path: str | None = None
    """When the target URL names a path, every request uses it (no mix)."""


@dataclass
class Outcome:
    route: str
    status: int
    """HTTP status, or 0 when no response came (connection error, timeout)."""
    latency_us: int
    trace_id: str
    error: str = ""


@dataclass
class Stats:
    """Everything the summary needs, updated as responses come in."""

    histogram: HdrHistogram = field(default_factory=lambda: HdrHistogram(1, MAX_LATENCY_US, 3))
    statuses: Counter[str] = field(default_factory=Counter)
    routes: Counter[str] = field(default_factory=Counter)
    sent: int = 0
    done: int = 0
    failed: int = 0
    waited_for_slot: int = 0
    slowest: list[tuple[int, str]] = field(default_factory=list)
    failures: list[Outcome] = field(default_factory=list)
    outcomes: list[Outcome] | None = None
    """Every outcome, when the caller asked to keep them (scenarios do; long runs do not)."""

    def record(self, outcome: Outcome) -> None:
        self.done += 1
        if self.outcomes is not None:
            self.outcomes.append(outcome)
        self.histogram.record_value(max(1, min(outcome.latency_us, MAX_LATENCY_US)))
        key = str(outcome.status) if outcome.status else (outcome.error or "error")
        self.statuses[key] += 1
        self.routes[outcome.route] += 1
        if outcome.status == 0 or outcome.status >= 500:
            self.failed += 1
            if len(self.failures) < 500:
                self.failures.append(outcome)
        self.slowest.append((outcome.latency_us, outcome.trace_id))
        if len(self.slowest) > 40:
            self.slowest.sort(reverse=True)
            del self.slowest[10:]


class Generator:
    """Sends the schedule; ``stats`` is live for a progress display."""

    def __init__(
        self,
        target: Target,
        rps: float,
        duration: float,
        concurrency: int,
        tracer: Tracer,
        mix: tuple[Route, ...] = SHOP_MIX,
        timeout: float = 30.0,
        seed: int | None = None,
        keep_outcomes: bool = False,
        reuse_connections: bool = True,
    ) -> None:
        if rps <= 0 or duration <= 0 or concurrency <= 0:
            raise ValueError("rps, duration and concurrency must be positive")
        self.target = target
        self.rps = rps
        self.duration = duration
        self.concurrency = concurrency
        self.tracer = tracer
        self.mix = mix
        self.timeout = timeout
        self.rng = random.Random(seed)
        self.stats = Stats(outcomes=[] if keep_outcomes else None)
        self.reuse_connections = reuse_connections
        """False: a new connection for every request (``Connection: close``), as curl in a
        loop — what per-connection balancing and session affinity are about."""
        self.started: float | None = None
        self.finished: float | None = None
        self._cpu_start = 0.0

    @property
    def total(self) -> int:
        return int(self.rps * self.duration)

    def _pick(self) -> Route:
        if self.target.fixed_path is not None:
            return Route(1, "GET", self.target.fixed_path, "url")
        return self.rng.choices(self.mix, weights=[r.weight for r in self.mix])[0]

    async def run(self, on_tick: Callable[[Stats], None] | None = None) -> Stats:
        connector = _TaggingConnector(
            limit=self.concurrency,
            local_addr=(self.target.source_ip, 0),
            force_close=not self.reuse_connections,
            ttl_dns_cache=None,
        )
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        slots = asyncio.Semaphore(self.concurrency)
        tasks: set[asyncio.Task[None]] = set()
        self._cpu_start = _cpu_seconds()
        async with aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False
        ) as session:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            self.started = time.time()
            try:
                for i in range(self.total):
                    due = t0 + i / self.rps
                    delay = due - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    task = asyncio.ensure_future(self._one(session, slots, due))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                    self.stats.sent += 1
                    if on_tick is not None and i % max(1, int(self.rps / 10)) == 0:
                        on_tick(self.stats)
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                for task in tasks:
                    task.cancel()
                self.finished = time.time()
        return self.stats

    async def _one(
        self, session: aiohttp.ClientSession, slots: asyncio.Semaphore, due: float
    ) -> None:
        route = self._pick()
        loop = asyncio.get_running_loop()
        if slots.locked():
            self.stats.waited_for_slot += 1
        async with slots:
            span = self.tracer.start_span(
                f"client {route.method} {route.path}", kind=SpanKind.CLIENT
            )
            span.set_attributes(
                {
                    "hopscope.hop": "client",
                    "hopscope.traffic.route": route.path,
                    "hopscope.traffic.kind": route.kind,
                    "http.request.method": route.method,
                    "url.path": route.path,
                    "client.address": self.target.source_ip,
                    "server.address": self.target.connect_ip,
                    "server.port": self.target.connect_port,
                    "hopscope.upstream.address": (
                        f"{self.target.connect_ip}:{self.target.connect_port}"
                    ),
                }
            )
            trace_id = format(span.get_span_context().trace_id, "032x")
            headers = {"Host": self.target.host_header}
            PROPAGATOR.inject(headers, context=trace.set_span_in_context(span))
            url = f"http://{self.target.connect_ip}:{self.target.connect_port}{route.path}"
            status, error = 0, ""
            try:
                async with session.request(route.method, url, headers=headers) as resp:
                    await resp.read()
                    status = resp.status
            except TimeoutError:
                error = "timeout"
            except aiohttp.ClientError as exc:
                error = _short_error(exc)
            local = _TaggingConnector.local_of(session, headers)
            if local:
                span.set_attribute("hopscope.upstream.local_address", local)
            latency_us = int((loop.time() - due) * 1_000_000)
            if status:
                span.set_attribute("http.response.status_code", status)
            if status == 0 or status >= 500:
                span.set_status(Status(StatusCode.ERROR, error or str(status)))
            span.set_attribute("hopscope.traffic.latency_from_schedule_ms", latency_us / 1000)
            span.end()
        self.stats.record(Outcome(route.path, status, latency_us, trace_id, error))

    def cpu_cores(self) -> float:
        """Average cores the generator used (user + system CPU over wall time)."""
        if self.started is None:
            return 0.0
        wall = (self.finished or time.time()) - self.started
        return (_cpu_seconds() - self._cpu_start) / wall if wall > 0 else 0.0


class _TaggingConnector(aiohttp.TCPConnector):
    """Remembers each request's connection's local address, by its ``traceparent``: the
    client span carries it beside its destination, as Envoy tags its upstream calls, and the
    kernel data path joins the node's conntrack entry by it."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.local: dict[str, str] = {}

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        conn = await super().connect(req, traces, timeout)
        transport = conn.transport
        local = transport.get_extra_info("sockname") if transport is not None else None
        key = req.headers.get("traceparent")
        if local and key:
            self.local[key] = f"{local[0]}:{local[1]}"
        return conn

    @staticmethod
    def local_of(session: aiohttp.ClientSession, headers: dict[str, str]) -> str | None:
        connector = session.connector
        if not isinstance(connector, _TaggingConnector):
            return None
        return connector.local.pop(headers.get("traceparent", ""), None)


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _short_error(exc: BaseException) -> str:
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connection refused" if "refused" in str(exc).lower() else "connect error"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "server disconnected"
    return type(exc).__name__


def summarize(
    gen: Generator,
    blame: Callable[[list[Outcome]], dict[str, int]] | None = None,
    interrupted: bool = False,
) -> dict[str, Any]:
    """The end-of-run summary as a JSON-ready dict."""
    stats = gen.stats
    h = stats.histogram
    wall = ((gen.finished or time.time()) - gen.started) if gen.started else 0.0

    def ms(value: float) -> float:
        return round(value / 1000, 3)

    slowest = sorted(stats.slowest, reverse=True)[:5]
    return {
        "target": gen.target.label,
        "interrupted": interrupted,
        "requested_rps": gen.rps,
        "duration_s": round(wall, 3),
        "requests": stats.done,
        "sent": stats.sent,
        "achieved_rps": round(stats.done / wall, 1) if wall else 0.0,
        "status_codes": dict(sorted(stats.statuses.items())),
        "routes": dict(sorted(stats.routes.items())),
        "failures": stats.failed,
        "failures_by_hop": blame(stats.failures) if blame and stats.failures else {},
        "waited_for_slot": stats.waited_for_slot,
        "latency_ms": {
            "p50": ms(h.get_value_at_percentile(50)) if stats.done else None,
            "p90": ms(h.get_value_at_percentile(90)) if stats.done else None,
            "p99": ms(h.get_value_at_percentile(99)) if stats.done else None,
            "max": ms(h.get_max_value()) if stats.done else None,
        },
        "slowest_traces": [{"trace_id": t, "latency_ms": ms(v)} for v, t in slowest],
        "failing_traces": [
            {"trace_id": o.trace_id, "status": o.status or o.error, "route": o.route}
            for o in stats.failures[:10]
        ],
        "generator_cpu_cores": round(gen.cpu_cores(), 3),
    }

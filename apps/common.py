"""What every sample app shares: its pod identity, telemetry set-up, and the ``app`` hop.

The runtime hands a pod its identity through environment variables (``HOPSCOPE_POD_*``,
like the downward API). Each app exports traces over OTLP, logs JSON lines with the trace
id, serves Prometheus metrics on ``<pod IP>:9464`` and marks its server span as the ``app``
hop of the hop contract.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from opentelemetry import trace
from prometheus_client import Counter, Histogram, start_http_server

from mesh import addresses
from mesh.dns.resolver import PodResolver
from telemetry.logs import setup_json_logging
from telemetry.tracing import setup_tracing

REQUESTS = Counter(
    "hopscope_requests",
    "Requests served by the app, by route and status",
    ["service", "route", "code"],
)
LATENCY = Histogram(
    "hopscope_request_duration_seconds",
    "Time the app took to answer, by route",
    ["service", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)


def observe_latency(app: str, route: str, seconds: float) -> None:
    """Record a request's duration with the current span's trace id as the exemplar.

    Exemplars are exposed only in the OpenMetrics format, which the metrics endpoint serves
    to a scraper that asks for it (``Accept: application/openmetrics-text``).
    """
    histogram = LATENCY.labels(app, route)
    context = trace.get_current_span().get_span_context()
    if context.is_valid and context.trace_flags.sampled:
        histogram.observe(seconds, {"trace_id": format(context.trace_id, "032x")})
    else:
        histogram.observe(seconds)


@dataclass(frozen=True)
class PodIdentity:
    name: str
    namespace: str
    node: str
    ip: str
    app: str
    listen_port: int
    """Where the app itself listens (``containerPort + APP_PORT_OFFSET``)."""
    container_port: int
    """The port the pod exposes (the sidecar owns it)."""
    metrics_port: int
    sidecar_outbound: str
    dns_server: tuple[str, int]
    dns_search: list[str]
    ndots: int

    @classmethod
    def from_env(cls, app: str) -> PodIdentity:
        env = os.environ
        listen = int(env.get("HOPSCOPE_APP_PORT", "18080"))
        dns_host, _, dns_port = env.get(
            "HOPSCOPE_DNS_SERVER", f"{addresses.DNS_SERVICE_IP}:{addresses.DNS_PORT}"
        ).rpartition(":")
        namespace = env.get("HOPSCOPE_POD_NAMESPACE", "default")
        default_search = f"{namespace}.svc.cluster.local svc.cluster.local cluster.local"
        return cls(
            name=env.get("HOPSCOPE_POD_NAME", app),
            namespace=namespace,
            node=env.get("HOPSCOPE_NODE_NAME", ""),
            ip=env.get("HOPSCOPE_POD_IP", "127.0.0.1"),
            app=app,
            listen_port=listen,
            container_port=int(
                env.get("HOPSCOPE_CONTAINER_PORT", str(listen - addresses.APP_PORT_OFFSET))
            ),
            metrics_port=int(env.get("HOPSCOPE_METRICS_PORT", str(addresses.APP_METRICS_PORT))),
            sidecar_outbound=env.get(
                "HOPSCOPE_SIDECAR_OUTBOUND", f"127.0.0.1:{addresses.SIDECAR_OUTBOUND_PORT}"
            ),
            dns_server=(dns_host, int(dns_port)),
            dns_search=env.get("HOPSCOPE_DNS_SEARCH", default_search).split(),
            ndots=int(env.get("HOPSCOPE_DNS_NDOTS", "5")),
        )

    def resolver(self) -> PodResolver:
        """The pod's stub resolver, as its resolv.conf would configure glibc."""
        return PodResolver(
            self.dns_server, self.dns_search, self.ndots, self.name, self.namespace, self.ip
        )

    def k8s_attributes(self) -> dict[str, str]:
        return {
            "k8s.pod.name": self.name,
            "k8s.namespace.name": self.namespace,
            "k8s.node.name": self.node,
        }


def start_telemetry(pod: PodIdentity) -> None:
    """Tracing, JSON logs and the metrics endpoint for one app process."""
    setup_tracing(pod.app, {**pod.k8s_attributes(), "k8s.pod.ip": pod.ip})
    setup_json_logging({"service": pod.app, "pod": pod.name})
    start_http_server(pod.metrics_port, addr=pod.ip)
    logging.getLogger(pod.app).info(
        "starting", extra={"listen": f"{pod.ip}:{pod.listen_port}", "node": pod.node}
    )


def mark_app_span(
    pod: PodIdentity, span: Any = None, peer: str | None = None, peer_port: Any = None
) -> None:
    """Tag the current server span as this pod's ``app`` hop (with the connection's peer:
    for a pod without a sidecar, what the kernel data path joins its conntrack entry by)."""
    span = span or trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attributes(
        {
            "hopscope.hop": "app",
            **pod.k8s_attributes(),
            "server.address": pod.ip,
            "server.port": pod.container_port,
        }
    )
    if peer:
        span.set_attribute("network.peer.address", peer)
    if peer_port and str(peer_port).isdigit():
        span.set_attribute("network.peer.port", int(peer_port))


@dataclass(frozen=True)
class Faults:
    """Faults a scenario injects through the Deployment's env, as a chaos tool would.

    ``HOPSCOPE_FAULT_DELAY_MS`` — every request waits this long before being handled;
    ``HOPSCOPE_FAULT_ERROR_RATE`` — this share of requests (0..1) fail: HTTP 500, or gRPC
    ``INTERNAL``. Health checks are never affected.
    """

    delay_ms: float = 0.0
    error_rate: float = 0.0

    @classmethod
    def from_env(cls) -> Faults:
        def number(key: str, high: float) -> float:
            try:
                return min(max(float(os.environ.get(key, "0") or 0), 0.0), high)
            except ValueError:
                logging.getLogger(__name__).error("ignoring bad %s", key)
                return 0.0

        return cls(
            delay_ms=number("HOPSCOPE_FAULT_DELAY_MS", 600_000),
            error_rate=number("HOPSCOPE_FAULT_ERROR_RATE", 1.0),
        )

    def apply(self) -> bool:
        """Sleep the delay; return True when this request must fail."""
        import random
        import time

        if self.delay_ms:
            time.sleep(self.delay_ms / 1000)
        return bool(self.error_rate) and random.random() < self.error_rate


def instrument_flask(app: Any, pod: PodIdentity) -> None:
    """Trace every request (probes excluded), mark the app hop, count RED metrics."""
    import time

    from flask import g, request
    from opentelemetry.instrumentation.flask import FlaskInstrumentor

    def request_hook(span: Any, environ: dict[str, Any]) -> None:
        mark_app_span(pod, span, environ.get("REMOTE_ADDR"), environ.get("REMOTE_PORT"))

    FlaskInstrumentor().instrument_app(app, request_hook=request_hook, excluded_urls="healthz")
    log = logging.getLogger(pod.app)

    faults = Faults.from_env()

    @app.before_request
    def _start() -> Any:
        g.hopscope_start = time.perf_counter()
        if request.path != "/healthz" and faults.apply():
            log.error("injected fault", extra={"fault": "error", "path": request.path})
            return {"error": "injected fault (HOPSCOPE_FAULT_ERROR_RATE)", "pod": pod.name}, 500
        return None

    @app.after_request
    def _count(response: Any) -> Any:
        route = request.url_rule.rule if request.url_rule else "unmatched"
        if route != "/healthz":
            elapsed = time.perf_counter() - g.get("hopscope_start", time.perf_counter())
            REQUESTS.labels(pod.app, route, str(response.status_code)).inc()
            observe_latency(pod.app, route, elapsed)
            log.info(
                "request",
                extra={
                    "method": request.method,
                    "path": request.path,
                    "status": response.status_code,
                    "peer": request.remote_addr,
                    "duration_ms": round(elapsed * 1000, 3),
                },
            )
        return response


def run_http_app(app: str, create_app: Callable[[PodIdentity], Any]) -> None:
    """An HTTP app's process: its pod identity from the env, telemetry, then serve."""
    pod = PodIdentity.from_env(app)
    start_telemetry(pod)
    serve_flask(create_app(pod), pod)


def run_grpc_app(app: str, register: Callable[[Any, PodIdentity], None]) -> None:
    """A gRPC app's process: ``register(server, pod)`` adds its servicers."""
    pod = PodIdentity.from_env(app)
    start_telemetry(pod)
    serve_grpc(lambda server: register(server, pod), pod)


APP_SERVER_THREADS = 32
"""Worker threads of an app's HTTP server: requests beyond this many at once queue, as on a
real app server with a bounded pool."""


def serve_flask(app: Any, pod: PodIdentity) -> None:
    """Serve on the pod's app port with waitress until SIGTERM.

    waitress speaks HTTP/1.1 with keep-alive, so the sidecar reuses its connections to the
    app instead of opening one per request (the cost the development server had).
    """
    import signal

    from waitress import create_server

    server = create_server(
        app,
        host=pod.ip,
        port=pod.listen_port,
        threads=APP_SERVER_THREADS,
        ident=pod.app,
        # The sidecar may hold idle keep-alive connections; they are local and cheap. It
        # drops them after 60 s idle, before this server would (no request meets a close).
        connection_limit=1000,
        channel_timeout=300,
        asyncore_use_poll=True,
        clear_untrusted_proxy_headers=False,
    )
    signal.signal(signal.SIGTERM, _stop_serving)
    server.run()


def _stop_serving(*_: Any) -> None:
    # waitress's loop ends on SystemExit and drains its worker threads.
    raise SystemExit(0)


def serve_grpc(register: Any, pod: PodIdentity) -> None:
    """A gRPC server with tracing (health checks excluded) and the standard health service."""
    import signal
    import threading
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc
    from opentelemetry.instrumentation.grpc import filters, server_interceptor

    interceptor = server_interceptor(filter_=filters.negate(filters.health_check()))
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), interceptors=[interceptor])
    register(server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    server.add_insecure_port(f"{pod.ip}:{pod.listen_port}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=1).wait()


def grpc_peer(context: Any) -> str:
    """``ipv4:1.2.3.4:5678`` → ``1.2.3.4``."""
    peer = str(context.peer() or "")
    if peer.startswith("ipv4:"):
        return peer[5:].rsplit(":", 1)[0]
    return peer


def app_rpc(route: str) -> Any:
    """Decorate a servicer method (whose servicer has ``self.pod``): app hop, RED, log line."""
    import functools
    import time

    faults = Faults.from_env()

    def decorate(fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(self: Any, request: Any, context: Any) -> Any:
            import grpc

            pod: PodIdentity = self.pod
            start = time.perf_counter()
            mark_app_span(pod, peer=grpc_peer(context))
            code = "OK"
            try:
                if faults.apply():
                    code = "INTERNAL"
                    context.abort(grpc.StatusCode.INTERNAL, "injected fault")
                return fn(self, request, context)
            except Exception:
                code = "ERROR" if code == "OK" else code
                raise
            finally:
                elapsed = time.perf_counter() - start
                REQUESTS.labels(pod.app, route, code).inc()
                observe_latency(pod.app, route, elapsed)
                logging.getLogger(pod.app).info(
                    "rpc",
                    extra={"method": route, "code": code, "duration_ms": round(elapsed * 1000, 3)},
                )

        return wrapper

    return decorate

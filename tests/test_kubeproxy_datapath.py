"""The kube-proxy emulator's data path with real sockets on loopback addresses.

Two HTTP backends stand in for pods; the proxier listens on a VIP and must DNAT to a ready
backend, keep the client's source address, emit one span per request (with the caller's
trace as parent), and refuse connections at once when no endpoint is ready.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from werkzeug.test import Client

from mesh.kubeproxy.daemon import admin_app
from mesh.kubeproxy.proxier import Proxier
from mesh.kubeproxy.rules import IptablesRandom
from mesh.model.types import (
    ClusterState,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    NetworkPolicy,
    Pod,
    Service,
    ServicePort,
)
from mesh.policy_metrics import PolicyEnforcementMetrics
from tests.e2e_support import QuietHandler

VIP, PORT = "127.96.250.1", 18081
BACKENDS = {"pod-a": "127.244.250.2", "pod-b": "127.244.250.3"}
BACKEND_PORT = 18082
CLIENT_IP = "127.100.250.1"
PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class _Echo(QuietHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = json.dumps(
            {
                "pod": self.server.pod_name,  # type: ignore[attr-defined]
                "peer": self.client_address[0],
                "traceparent": self.headers.get("traceparent"),
                "via": self.headers.get("x-hopscope-via"),
            }
        ).encode()
        self.answer(body)


def _state(ready: dict[str, bool]) -> ClusterState:
    endpoints = [
        Endpoint([ip], ready[pod], ready[pod], False, pod, "node-a") for pod, ip in BACKENDS.items()
    ]
    return ClusterState(
        resource_version=1,
        services=[
            Service("web", "demo", cluster_ip=VIP, ports=[ServicePort(PORT, "http", "http")])
        ],
        endpoint_slices=[
            EndpointSlice("web-x", "demo", "web", endpoints, [EndpointPort(BACKEND_PORT, "http")])
        ],
    )


@pytest.fixture(scope="module")
def backends() -> Iterator[None]:
    servers = []
    for pod, ip in BACKENDS.items():
        server = ThreadingHTTPServer((ip, BACKEND_PORT), _Echo)
        server.pod_name = pod  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield
    for server in servers:
        server.shutdown()
        server.server_close()


class _Running:
    def __init__(
        self,
        exporter: InMemorySpanExporter,
        proxier: Proxier,
        loop: Any,
        registry: CollectorRegistry,
    ) -> None:
        self.exporter, self.proxier, self.loop = exporter, proxier, loop
        self.registry = registry
        """Where the proxier's NetworkPolicy metrics are registered."""
        self.errors: list[str] = []
        """What reached the event loop's exception handler (unhandled task errors)."""
        loop.set_exception_handler(lambda _loop, ctx: self.errors.append(str(ctx)))

    def sync(self, state: ClusterState) -> None:
        asyncio.run_coroutine_threadsafe(self.proxier.sync(state), self.loop).result(5)


@pytest.fixture()
def proxy(backends: None) -> Iterator[_Running]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    registry = CollectorRegistry()
    proxier = Proxier(
        provider.get_tracer("test"),
        IptablesRandom(),
        policy_metrics=PolicyEnforcementMetrics(registry),
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    running = _Running(exporter, proxier, loop, registry)
    running.sync(_state({"pod-a": True, "pod-b": True}))
    yield running
    asyncio.run_coroutine_threadsafe(_stop(proxier), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


async def _stop(proxier: Proxier) -> None:
    for server in proxier.listeners.values():
        server.close()
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _get(conn: http.client.HTTPConnection, headers: dict[str, str] | None = None) -> dict[str, Any]:
    conn.request("GET", "/", headers=headers or {})
    resp = conn.getresponse()
    assert resp.status == 200
    return json.loads(resp.read())  # type: ignore[no-any-return]


def _conn() -> http.client.HTTPConnection:
    return http.client.HTTPConnection(VIP, PORT, timeout=5, source_address=(CLIENT_IP, 0))


def test_request_is_dnated_keeps_its_source_and_gets_a_child_span(proxy: _Running) -> None:
    conn = _conn()
    reply = _get(conn, {"traceparent": PARENT})
    conn.close()
    assert reply["peer"] == CLIENT_IP  # DNAT only: the pod sees the client address
    (span,) = proxy.exporter.get_finished_spans()
    a = span.attributes or {}
    assert span.parent is not None and format(span.parent.span_id, "016x") == PARENT[36:52]
    assert format(span.context.trace_id, "032x") == PARENT[3:35]
    assert a["hopscope.hop"] == "kube-proxy"
    assert a["hopscope.endpoint.pod"] == reply["pod"]
    assert a["hopscope.nat.original.dst"] == f"{VIP}:{PORT}"
    assert a["hopscope.nat.translated.dst"] == f"{BACKENDS[reply['pod']]}:{BACKEND_PORT}"
    assert str(a["hopscope.nat.translated.src"]).startswith(CLIENT_IP + ":")
    assert a["hopscope.lb.mode"] == "iptables" and a["http.response.status_code"] == 200
    # The pod's request carries the caller's context unchanged (its sidecar pairs with the
    # caller's CLIENT span) and names the kube-proxy span it came through.
    assert reply["traceparent"] == PARENT
    assert reply["via"] == format(span.context.span_id, "016x")
    assert span.kind.name == "CLIENT" and a["peer.service"] == "web"


def test_keep_alive_requests_ride_one_connection_and_one_endpoint(proxy: _Running) -> None:
    conn = _conn()
    pods = {_get(conn)["pod"] for _ in range(5)}
    conn.close()
    assert len(pods) == 1
    states = [s.attributes["hopscope.conntrack.state"] for s in proxy.exporter.get_finished_spans()]  # type: ignore[index]
    assert states == ["new"] + ["established"] * 4


def test_new_connections_spread_over_ready_endpoints(proxy: _Running) -> None:
    pods = set()
    for _ in range(30):
        conn = _conn()
        pods.add(_get(conn)["pod"])
        conn.close()
    assert pods == set(BACKENDS)
    proxy.sync(_state({"pod-a": False, "pod-b": True}))
    for _ in range(10):
        conn = _conn()
        assert _get(conn)["pod"] == "pod-b"
        conn.close()


def _connect_error() -> tuple[type[BaseException] | None, float]:
    """What a plain ``connect()`` to the VIP gets, and how long it took."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(2)
    sock.bind((CLIENT_IP, 0))
    started = time.perf_counter()
    try:
        sock.connect((VIP, PORT))
    except OSError as exc:
        return type(exc), time.perf_counter() - started
    finally:
        sock.close()
    return None, time.perf_counter() - started


def test_no_ready_endpoints_refuses_connect_at_once_like_reject(proxy: _Running) -> None:
    proxy.sync(_state({"pod-a": False, "pod-b": False}))
    error, took = _connect_error()
    assert error is ConnectionRefusedError, error  # not accepted, then reset
    assert took < 0.05
    assert proxy.proxier.rejecting() == [f"{VIP}:{PORT} (demo/web)"]
    # The first ready endpoint opens the address again.
    proxy.sync(_state({"pod-a": True, "pod-b": False}))
    conn = _conn()
    assert _get(conn)["pod"] == "pod-a"
    conn.close()
    assert proxy.proxier.rejecting() == []


def test_clients_that_reset_at_once_or_mid_stream_leave_no_traceback(
    proxy: _Running, caplog: pytest.LogCaptureFixture
) -> None:
    rng = random.Random(7)
    for i in range(60):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((CLIENT_IP, 0))
        sock.connect((VIP, PORT))
        if i % 3 == 1:
            sock.sendall(bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300))))
        elif i % 3 == 2:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
            if i % 2:
                time.sleep(0.01)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST
    time.sleep(0.3)
    conn = _conn()
    assert _get(conn)["pod"] in BACKENDS
    conn.close()
    failures = [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert not failures, [r.getMessage() for r in failures]
    errors = [e for e in proxy.errors if e]
    assert not errors, errors


def test_malformed_http_gets_400_and_the_proxy_keeps_serving(proxy: _Running) -> None:
    sock = socket.create_connection((VIP, PORT), timeout=5, source_address=(CLIENT_IP, 0))
    sock.sendall(b"GET / HTTP/1.1\r\nBad Header Without Colon\r\n\r\n")
    assert sock.recv(100).startswith(b"HTTP/1.1 400")
    sock.close()
    conn = _conn()
    assert _get(conn)["pod"] in BACKENDS
    conn.close()


def test_connection_denied_by_network_policy_is_reset_and_counted(proxy: _Running) -> None:
    state = _state({"pod-a": True, "pod-b": True})
    state.pods = [
        Pod(pod, "demo", {"app": "web"}, "node-a", ip, [], phase="Running", ready=True)
        for pod, ip in BACKENDS.items()
    ]
    state.network_policies = [
        NetworkPolicy("deny-web", "demo", {"podSelector": {"matchLabels": {"app": "web"}}})
    ]
    proxy.sync(state)
    conn = _conn()
    with pytest.raises((ConnectionResetError, http.client.RemoteDisconnected)):
        _get(conn)
    conn.close()
    counted = {
        pod: proxy.registry.get_sample_value(
            "hopscope_networkpolicy_denied_connections_total",
            {"namespace": "demo", "pod": pod, "policy": "demo/deny-web", "side": "ingress"},
        )
        for pod in BACKENDS
    }
    assert sum(v or 0 for v in counted.values()) == 1, counted


def test_hop_spans_carry_the_emulators_own_share_of_their_time(proxy: _Running) -> None:
    """``hopscope.emulation.cost_us``: the relay's own work, within the span's duration;
    the request that opened the connection starts at the accept and carries its set-up."""
    conn = _conn()
    for _ in range(3):
        _get(conn, {"traceparent": PARENT})
    conn.close()
    spans = sorted(proxy.exporter.get_finished_spans(), key=lambda s: s.start_time or 0)
    assert [(s.attributes or {})["hopscope.conntrack.state"] for s in spans] == [
        "new",
        "established",
        "established",
    ]
    for span in spans:
        cost_us = (span.attributes or {})["hopscope.emulation.cost_us"]
        duration_us = ((span.end_time or 0) - (span.start_time or 0)) / 1000
        assert isinstance(cost_us, int) and 0 < cost_us <= duration_us, (cost_us, duration_us)


def test_admin_metrics_serve_the_registry_the_policy_metrics_are_on() -> None:
    registry = CollectorRegistry()
    proxier = Proxier(
        TracerProvider().get_tracer("test"), policy_metrics=PolicyEnforcementMetrics(registry)
    )
    client = Client(admin_app(proxier, registry))
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "# TYPE hopscope_networkpolicy_denied_connections_total counter" in metrics
    health = client.get("/healthz")
    assert health.status_code == 503 and health.json is not None  # no rules synced yet
    assert health.json["healthy"] is False
    assert client.get("/nope").status_code == 404

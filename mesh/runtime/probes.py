"""Readiness probes, run the way a mesh-aware kubelet runs them.

The kubelet probes the app on its own port (``containerPort + APP_PORT_OFFSET``), not
through the sidecar — as Istio rewrites probes — so probes neither need the mesh nor fill
the trace store with noise. A pod is ready when its app probe passes *and* its sidecar's
``/ready`` answers 200.
"""

from __future__ import annotations

import http.client
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import quote

from mesh import addresses
from mesh.model.types import Pod, Probe

PROBE_TIMEOUT = 1.0
"""Seconds a single probe may take (Kubernetes' default timeoutSeconds is 1)."""


@dataclass
class ProbeTracker:
    """Consecutive successes/failures of one pod, turned into ready/not ready."""

    ready: bool = False
    successes: int = 0
    failures: int = 0
    last_probe: float = 0.0
    first_ready_at: float | None = None
    started: float = field(default_factory=time.monotonic)

    def record(self, ok: bool, probe: Probe | None) -> bool:
        """Record one result; return whether readiness changed."""
        success_threshold = probe.success_threshold if probe else 1
        failure_threshold = probe.failure_threshold if probe else 3
        self.last_probe = time.monotonic()
        before = self.ready
        if ok:
            self.successes, self.failures = self.successes + 1, 0
            if self.successes >= success_threshold:
                self.ready = True
                self.first_ready_at = self.first_ready_at or time.monotonic()
        else:
            self.failures, self.successes = self.failures + 1, 0
            if self.failures >= failure_threshold or not self.first_ready_at:
                self.ready = False
        return before != self.ready

    def due(self, probe: Probe | None) -> bool:
        """Probe quickly until first ready (a startup probe), then every period."""
        period = probe.period_seconds if probe else 1.0
        if self.first_ready_at is None:
            delay = probe.initial_delay_seconds if probe else 0.0
            return time.monotonic() - self.started >= delay and self._since_last() >= 0.2
        return self._since_last() >= period

    def _since_last(self) -> float:
        return time.monotonic() - self.last_probe


def probe_pod(pod: Pod) -> tuple[bool, str]:
    """Run the pod's readiness probe(s) and its sidecar check; ``(ok, error)``."""
    if pod.has_sidecar:
        ok, error = _http_ok(pod.ip, addresses.SIDECAR_ADMIN_PORT, "/ready")
        if not ok:
            return False, f"sidecar not ready: {error}"
    for container in pod.containers:
        probe = container.readiness_probe
        if probe is None:
            continue
        port = container.port_number(probe.port)
        if port is None:
            return False, f"probe port {probe.port!r} is not a port of container {container.name}"
        ok, error = run_probe(probe, pod.ip, port + pod.app_port_offset)
        if not ok:
            return False, f"{container.name}: {error}"
    return True, ""


def run_probe(probe: Probe, ip: str, port: int) -> tuple[bool, str]:
    if probe.kind == "http":
        return _http_ok(ip, port, probe.path)
    if probe.kind == "grpc":
        return _grpc_ok(ip, port)
    return _tcp_ok(ip, port)


PROBE_USER_AGENT = "kube-probe/1.31"
"""What the kubelet's HTTP prober sends as User-Agent (its minor version)."""


def _http_ok(host: str, port: int, path: str) -> tuple[bool, str]:
    """One GET on a fresh connection, closed after the answer, as the kubelet probes.

    A path without a leading ``/`` gets one, and characters a request line cannot carry are
    percent-encoded (the kubelet builds its probe URL the same way)."""
    target = quote(path if path.startswith("/") else f"/{path}", safe="/:@!$&'()*+,;=?%~")
    conn = None
    try:
        conn = http.client.HTTPConnection(host, port, timeout=PROBE_TIMEOUT)
        conn.request("GET", target, headers={"User-Agent": PROBE_USER_AGENT, "Connection": "close"})
        status = conn.getresponse().status
    except (OSError, http.client.HTTPException, ValueError) as exc:
        return False, type(exc).__name__
    finally:
        if conn is not None:
            conn.close()
    if 200 <= status < 400:
        return True, ""
    return False, f"HTTP {status}"


def _tcp_ok(ip: str, port: int) -> tuple[bool, str]:
    try:
        with socket.create_connection((ip, port), timeout=PROBE_TIMEOUT):
            return True, ""
    except OSError as exc:
        return False, exc.strerror or str(exc)


def _grpc_ok(ip: str, port: int) -> tuple[bool, str]:
    try:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc
    except ImportError:
        return _tcp_ok(ip, port)
    with grpc.insecure_channel(f"{ip}:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=PROBE_TIMEOUT)
        except grpc.RpcError as exc:
            return False, str(exc.code())
    if reply.status == health_pb2.HealthCheckResponse.SERVING:
        return True, ""
    return False, f"health status {reply.status}"

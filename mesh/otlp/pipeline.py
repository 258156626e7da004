"""The control plane's telemetry pipeline: receiver, optional forwarder, metrics bridge.

``hopscope up --otlp-endpoint URL`` (or ``OTEL_EXPORTER_OTLP_ENDPOINT`` in the environment of
``hopscope up``) hands the control plane :data:`FORWARD_ENDPOINT` (and
:data:`FORWARD_HEADERS`). The control plane does not read ``OTEL_EXPORTER_OTLP_ENDPOINT``
itself: in the compose stack that variable says where *pods* send, and forwarding there too
would deliver everything twice.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry

from mesh import addresses
from mesh.otlp import OTLP_HTTP_PORT
from mesh.otlp.forward import Forwarder, check_endpoint, forwarded_counter, parse_headers
from mesh.otlp.grpc_logs import OTLP_GRPC_PORT, GrpcLogsReceiver
from mesh.otlp.intake import Intake
from mesh.otlp.prom_bridge import PrometheusBridge, Target, targets_from_sd
from mesh.otlp.server import Access, OTLPHTTPServer
from mesh.tracestore.store import TraceStore

FORWARD_ENDPOINT = "HOPSCOPE_OTLP_FORWARD_ENDPOINT"
"""Base URL of the user's OTLP/HTTP endpoint (``/v1/<signal>`` is appended). Default: unset,
nothing is forwarded."""

FORWARD_HEADERS = "HOPSCOPE_OTLP_FORWARD_HEADERS"
"""Headers for the forwarded requests, in ``OTEL_EXPORTER_OTLP_HEADERS`` syntax. Default: none."""

LOGS_ENV = "HOPSCOPE_OTLP_LOGS"
"""``1`` in a component's environment: ship its log records over OTLP too."""


def system_targets(api_url: str) -> list[Target]:
    """The control plane and the node components, as Prometheus scrapes them. On the kernel
    data path kube-proxy serves in the cluster host's namespace (at the host address of
    node-a, local there too) and its page carries the CNI's series: there is no CNI daemon."""
    dns = f"{addresses.DNS_METRICS_IP}:{addresses.DNS_METRICS_PORT}"
    targets = [
        Target(f"{api_url}/metrics", "controlplane", api_url.split("://", 1)[-1]),
        Target(f"http://{dns}/metrics", "cluster-dns", dns),
    ]
    kernel = addresses.PLAN == "kernel"
    node = addresses.HOST_NODE_IPS["node-a"] if kernel else addresses.NODE_IPS["node-a"]
    pages = [("kube-proxy", addresses.KUBE_PROXY_METRICS_PORT)]
    if not kernel:
        pages.append(("cni", addresses.CNI_METRICS_PORT))
    for job, port in pages:
        targets.append(Target(f"http://{node}:{port}/metrics", job, f"{node}:{port}"))
    return targets


def guard_access(guard: Any) -> Access:
    """The API guard's OTLP policy for the receiver's own listener: ``Host`` must be one of
    ours; then telemetry from the cluster itself (loopback bind: anyone local; else loopback
    peers and pods) or with the API/OTLP token (``Authorization: Bearer …``)."""

    def check(peer: str, headers: dict[bytes, bytes]) -> tuple[int, str] | None:
        host = headers.get(b"host", b"").decode("latin-1")
        if not guard.host_allowed(host):
            return 403, f"Host {host!r} is not an address of this receiver"
        if guard.loopback_only or _is_loopback(peer) or guard.is_pod_ip(peer):
            return None
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and guard.token_ok(token.strip(), otlp=True):
            return None
        return 401, "missing or wrong OTLP token"

    return check


def _is_loopback(peer: str) -> bool:
    try:
        return ipaddress.ip_address(peer).is_loopback
    except ValueError:
        return False


class TelemetryPipeline:
    """Receiver (own listener), intake, forwarder and metrics bridge of one control plane."""

    def __init__(
        self,
        store: TraceStore,
        registry: CollectorRegistry,
        host: str = addresses.CONTROL_PLANE_IP,
        port: int = OTLP_HTTP_PORT,
        access: Access | None = None,
        forward_endpoint: str | None = None,
        forward_headers: dict[str, str] | None = None,
        targets: Callable[[], list[Target]] | None = None,
    ) -> None:
        counter = forwarded_counter(registry)
        self.forwarder = (
            Forwarder(forward_endpoint, registry, forward_headers, counter=counter)
            if forward_endpoint
            else None
        )
        self.intake = Intake(store, registry, self.forwarder)
        self.server = OTLPHTTPServer(self.intake, host, port, access)
        self.bridge = (
            PrometheusBridge(targets, self.forwarder)
            if self.forwarder is not None and targets is not None
            else None
        )
        self.grpc_logs = (
            GrpcLogsReceiver(self.intake, self.forwarder, host, OTLP_GRPC_PORT if port else 0)
            if self.forwarder is not None
            else None
        )

    @classmethod
    def from_env(
        cls,
        store: TraceStore,
        registry: CollectorRegistry,
        guard: Any = None,
        sd_groups: Callable[[], list[dict[str, Any]]] | None = None,
        api_url: str = "",
    ) -> TelemetryPipeline:
        """The pipeline ``hopscope up`` asked for (:data:`FORWARD_ENDPOINT`); ValueError on
        a bad endpoint or header list."""
        endpoint = os.environ.get(FORWARD_ENDPOINT, "").strip() or None
        headers = parse_headers(os.environ.get(FORWARD_HEADERS, ""))
        if endpoint:
            check_endpoint(endpoint)

        def targets() -> list[Target]:
            found = targets_from_sd(sd_groups()) if sd_groups is not None else []
            return found + (system_targets(api_url) if api_url else [])

        return cls(
            store,
            registry,
            access=guard_access(guard) if guard is not None else None,
            forward_endpoint=endpoint,
            forward_headers=headers,
            targets=targets,
        )

    @property
    def url(self) -> str:
        """Where components send OTLP/HTTP (their ``OTEL_EXPORTER_OTLP_ENDPOINT``)."""
        return self.server.url

    @property
    def forwarding(self) -> bool:
        return self.forwarder is not None

    @property
    def log_sink(self) -> str | None:
        """``host:port`` of the OTLP/gRPC logs service Envoy ships access logs to, when
        forwarding (the embedded store keeps no logs)."""
        return self.grpc_logs.address if self.grpc_logs is not None else None

    def start(self) -> None:
        self.server.start()
        if self.grpc_logs is not None:
            self.grpc_logs.start()
        if self.bridge is not None:
            self.bridge.start()

    def set_running(self, running: bool) -> None:
        """Start or stop the receiver alone (the API's ``/v1/traces`` answers 503 meanwhile)."""
        self.intake.accepting = running
        if running:
            self.server.start()
            if self.grpc_logs is not None:
                self.grpc_logs.start()
        else:
            self.server.stop()
            if self.grpc_logs is not None:
                self.grpc_logs.stop()

    def status(self) -> dict[str, Any]:
        return {
            "running": self.server.running,
            "url": self.url,
            "forward_endpoint": self.forwarder.endpoint if self.forwarder else None,
        }

    def stop(self) -> None:
        if self.bridge is not None:
            self.bridge.stop()
        self.server.stop()
        if self.grpc_logs is not None:
            self.grpc_logs.stop()
        if self.forwarder is not None:
            self.forwarder.stop()

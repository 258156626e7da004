"""The kube-proxy emulator as a process: the proxier, its state source and its admin server.

:func:`run` builds a :class:`~mesh.kubeproxy.proxier.Proxier`, feeds it the cluster state
(a watch on the control plane's API, or a fixed state file for benchmarks), and serves the
admin endpoints kube-proxy has (``/metrics``, ``/healthz``) plus the emulator's own
(``/conntrack``, ``/rules``, ``/debug/sync``) until SIGTERM or SIGINT.
``python -m mesh.kubeproxy`` parses the command line into :class:`KubeProxySettings`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import REGISTRY, CollectorRegistry, make_wsgi_app

from mesh.kubeproxy import hop
from mesh.kubeproxy.proxier import Proxier
from mesh.model.types import ClusterState
from mesh.model.watch import StateWatcher
from mesh.policy_metrics import PolicyEnforcementMetrics
from mesh.signals import wait_for_stop_signal
from telemetry.logs import setup_json_logging
from telemetry.tracing import setup_tracing

log = logging.getLogger("kube-proxy")


@dataclass(frozen=True)
class KubeProxySettings:
    """What ``python -m mesh.kubeproxy`` was asked to do."""

    api: str | None
    """Control-plane API URL to watch; None with :attr:`state_file`."""
    state_file: Path | None
    """A fixed ``ClusterState`` (JSON) to serve instead of watching (benchmarks)."""
    metrics_address: str
    metrics_port: int
    hop_telemetry: bool = True
    """Per-request kube-proxy spans (parses HTTP); off, connections are spliced as TCP."""
    trace_sample_ratio: float = 1.0
    """Share of new traces sampled (a sampled caller's requests are always traced)."""
    min_sync_period: float = 0.0
    """Seconds between rule syncs at most (KubeProxyConfiguration ``minSyncPeriod``)."""
    event_loop: str = "uvloop"
    """``uvloop`` (libuv, roughly twice the data path's throughput) or ``asyncio``."""


def main(settings: KubeProxySettings) -> None:
    """Run kube-proxy in this process until SIGTERM or SIGINT."""
    setup_json_logging({"component": "kube-proxy"})
    if settings.event_loop == "uvloop":
        import uvloop

        uvloop.run(run(settings))
    else:
        asyncio.run(run(settings))


async def run(settings: KubeProxySettings, registry: CollectorRegistry = REGISTRY) -> None:
    """Proxy, serve the admin endpoints (metrics of ``registry``) and follow the state."""
    provider = setup_tracing(
        "kube-proxy", {"hopscope.component": "kube-proxy"}, sample_ratio=settings.trace_sample_ratio
    )
    hop.ROOT_SAMPLE_RATIO = settings.trace_sample_ratio
    proxier = Proxier(
        provider.get_tracer("hopscope.kubeproxy"),
        min_sync_period=settings.min_sync_period,
        telemetry=settings.hop_telemetry,
        policy_metrics=PolicyEnforcementMetrics(registry),
    )
    proxier.loop = asyncio.get_running_loop()
    server = make_server(
        settings.metrics_address,
        settings.metrics_port,
        admin_app(proxier, registry),
        server_class=_ThreadingWSGIServer,
        handler_class=_QuietHandler,
    )
    threading.Thread(target=server.serve_forever, name="admin", daemon=True).start()
    watcher: StateWatcher | None = None
    if settings.state_file is not None:
        state = ClusterState.from_dict(json.loads(settings.state_file.read_text()))
        await proxier.sync(state)
    elif settings.api:
        watcher = StateWatcher(settings.api, proxier.on_state)
        watcher.start()
    log.info("kube-proxy started", extra={"mode": "iptables", "metrics": settings.metrics_port})
    await wait_for_stop_signal()
    if watcher is not None:
        watcher.stop()
    server.shutdown()


class _QuietHandler(WSGIRequestHandler):
    """No access line per scrape or probe."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    """One daemon thread per request, so a slow client never holds up a probe."""

    daemon_threads = True
    block_on_close = False


def admin_app(
    proxier: Proxier, registry: CollectorRegistry = REGISTRY
) -> Callable[..., Iterable[bytes]]:
    """/metrics (Prometheus), /healthz (rules synced), /conntrack, /rules, /debug/sync (JSON)."""
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            ok = proxier.synced_at is not None
            status = "200 OK" if ok else "503 Service Unavailable"
            return _json(start_response, status, _health(proxier))
        if path == "/debug/sync":
            # POST ?paused=true|false: emulate kube-proxy losing (or regaining) the API server
            if environ.get("REQUEST_METHOD") == "POST":
                proxier.set_paused("paused=true" in environ.get("QUERY_STRING", ""))
            body = {"paused": proxier.paused, "lastUpdated": proxier.synced_at}
            return _json(start_response, "200 OK", body)
        if path == "/conntrack":
            return _json(start_response, "200 OK", proxier.conntrack_entries())
        if path == "/rules":
            return _json(start_response, "200 OK", _rules(proxier))
        return _json(start_response, "404 Not Found", {"error": f"no such path {path}"})

    return app


def _health(proxier: Proxier) -> dict[str, Any]:
    """The body of ``/healthz``: kube-proxy's fields plus the emulator's sync state."""
    return {
        "lastUpdated": proxier.synced_at,
        "synced_version": proxier.rules.version if proxier.synced_at is not None else None,
        "currentTime": time.time(),
        "healthy": proxier.synced_at is not None and not proxier.paused,
        "syncPaused": proxier.paused,
        "bindErrors": proxier.bind_errors,
        "rejecting": proxier.rejecting(),
    }


def _rules(proxier: Proxier) -> list[dict[str, Any]]:
    """The body of ``/rules``: each Service address and its endpoints."""
    return [
        {
            "service": r.service,
            "vip": f"{r.vip}:{r.port}",
            "endpoints": [
                {"address": e.address, "pod": e.pod, "ready": e.ready} for e in r.endpoints
            ],
        }
        for r in proxier.rules.rules.values()
    ]


def _json(start_response: Callable[..., Any], status: str, body: Any) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]

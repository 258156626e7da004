"""``python -m mesh.kubeproxy --api URL``: run the kube-proxy emulator."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app

from mesh import addresses
from mesh.kubeproxy import hop
from mesh.kubeproxy.proxier import Proxier
from mesh.model.types import ClusterState
from mesh.model.watch import StateWatcher
from telemetry.logs import setup_json_logging
from telemetry.tracing import setup_tracing

log = logging.getLogger("kube-proxy")

HEALTHZ_STALE_SECONDS = 60.0


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ThreadingWSGIServer(WSGIServer):
    daemon_threads = True

    def process_request(self, request: Any, client_address: Any) -> None:
        threading.Thread(target=self._handle, args=(request, client_address), daemon=True).start()

    def _handle(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        finally:
            self.shutdown_request(request)


def admin_app(proxier: Proxier) -> Callable[..., Iterable[bytes]]:
    """/metrics (Prometheus), /healthz (rules synced), /conntrack (JSON)."""
    metrics = make_wsgi_app()

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return metrics(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            synced = proxier.synced_at
            ok = synced is not None
            body = {
                "lastUpdated": synced,
                "currentTime": time.time(),
                "healthy": ok and not proxier.paused,
                "syncPaused": proxier.paused,
                "bindErrors": proxier.bind_errors,
                "rejecting": proxier.rejecting(),
            }
            status = "200 OK" if ok else "503 Service Unavailable"
            return _json(start_response, status, body)
        if path == "/debug/sync":
            # POST ?paused=true|false: emulate kube-proxy losing (or regaining) the API server
            if environ.get("REQUEST_METHOD") == "POST":
                query = environ.get("QUERY_STRING", "")
                proxier.set_paused("paused=true" in query)
            return _json(
                start_response,
                "200 OK",
                {"paused": proxier.paused, "lastUpdated": proxier.synced_at},
            )
        if path == "/conntrack":
            return _json(start_response, "200 OK", proxier.conntrack_entries())
        if path == "/rules":
            rules = [
                {
                    "service": r.service,
                    "vip": f"{r.vip}:{r.port}",
                    "endpoints": [
                        {"address": e.address, "pod": e.pod, "ready": e.ready} for e in r.endpoints
                    ],
                }
                for r in proxier.rules.rules.values()
            ]
            return _json(start_response, "200 OK", rules)
        return _json(start_response, "404 Not Found", {"error": f"no such path {path}"})

    return app


def _json(start_response: Callable[..., Any], status: str, body: Any) -> list[bytes]:
    data = json.dumps(body).encode()
    start_response(
        status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))]
    )
    return [data]


async def run(args: argparse.Namespace) -> None:
    provider = setup_tracing(
        "kube-proxy", {"hopscope.component": "kube-proxy"}, sample_ratio=args.trace_sample_ratio
    )
    tracer = provider.get_tracer("hopscope.kubeproxy")
    hop.ROOT_SAMPLE_RATIO = args.trace_sample_ratio
    proxier = Proxier(
        tracer, min_sync_period=args.min_sync_period, telemetry=args.hop_telemetry == "on"
    )
    proxier.loop = asyncio.get_running_loop()
    server = make_server(
        args.metrics_address,
        args.metrics_port,
        admin_app(proxier),
        server_class=_ThreadingWSGIServer,
        handler_class=_QuietHandler,
    )
    threading.Thread(target=server.serve_forever, name="admin", daemon=True).start()
    watcher: StateWatcher | None = None
    if args.state_file:
        state = ClusterState.from_dict(json.loads(args.state_file.read_text()))
        await proxier.sync(state)
    else:
        watcher = StateWatcher(args.api, proxier.on_state)
        watcher.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    log.info("kube-proxy started", extra={"mode": "iptables", "metrics": args.metrics_port})
    await stop.wait()
    if watcher is not None:
        watcher.stop()
    server.shutdown()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mesh.kubeproxy", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--api", help="control-plane API URL to watch")
    source.add_argument(
        "--state-file", type=Path, help="serve a fixed ClusterState (JSON) instead (benchmarks)"
    )
    parser.add_argument(
        "--hop-telemetry",
        choices=["on", "off"],
        default="on",
        help="per-request kube-proxy spans (parses HTTP); off splices connections as plain TCP",
    )
    parser.add_argument(
        "--event-loop",
        choices=["uvloop", "asyncio"],
        default="uvloop",
        help="uvloop (libuv) roughly doubles the data path's throughput",
    )
    parser.add_argument(
        "--trace-sample-ratio",
        type=float,
        default=1.0,
        help="share of new traces sampled (a sampled caller's requests are always traced)",
    )
    parser.add_argument("--metrics-address", default=addresses.NODE_IPS["node-a"])
    parser.add_argument("--metrics-port", type=int, default=addresses.KUBE_PROXY_METRICS_PORT)
    parser.add_argument(
        "--min-sync-period",
        type=float,
        default=0.0,
        help="seconds between rule syncs at most (KubeProxyConfiguration minSyncPeriod)",
    )
    args = parser.parse_args(argv)
    setup_json_logging({"component": "kube-proxy"})
    if args.event_loop == "uvloop":
        import uvloop

        uvloop.run(run(args))
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()

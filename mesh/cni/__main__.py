"""``python -m mesh.cni --api URL``: the CNI emulator's data path on every node.

Runs, per node, the overlay tunnel endpoint (``node-ip:8472``) and the egress SNAT gateway
(``node-ip:15080``), and follows the ``kube-system/hopscope-cni`` settings (VNI, overlay
delay, egress IPs) from the control plane. Prometheus metrics on ``node-a-ip:9091``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from prometheus_client import start_http_server

from mesh import addresses
from mesh.cni.gateway import NetworkView, NodeGateway
from mesh.cni.vtep import DELAY, OverlaySettings, Vtep
from mesh.model.controllers import default_egress_ips
from mesh.model.policy import PolicyEngine
from mesh.model.types import ClusterState
from mesh.model.watch import StateWatcher
from telemetry.logs import setup_json_logging
from telemetry.tracing import setup_tracing

log = logging.getLogger("cni")


class CniDaemon:
    def __init__(self, tracer: object, settings: OverlaySettings) -> None:
        self.tracer = tracer
        self.settings = settings
        self.vteps = [Vtep(node, settings) for node in addresses.NODE_IPS]
        self.gateways: dict[str, NodeGateway] = {}
        self.view = NetworkView()
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self, egress_ips: dict[str, str]) -> None:
        for vtep in self.vteps:
            await vtep.start()
        for node, ip in egress_ips.items():
            await self._start_gateway(node, ip)

    async def _start_gateway(self, node: str, ip: str) -> None:
        if node not in addresses.NODE_IPS:
            log.error("egress IP for an unknown node", extra={"node": node, "egress_ip": ip})
            return
        old = self.gateways.pop(node, None)
        if old is not None:
            old.close()
        gateway = NodeGateway(node, ip, self.tracer, self.view)
        try:
            await gateway.start()
        except OSError as exc:
            log.error("cannot start egress gateway", extra={"node": node, "error": str(exc)})
            return
        self.gateways[node] = gateway

    def on_state(self, state: ClusterState) -> None:
        if self.loop is not None:
            asyncio.run_coroutine_threadsafe(self.apply(state), self.loop)

    async def apply(self, state: ClusterState) -> None:
        net = state.network
        self.view.config = net
        self.view.policy = PolicyEngine(state)
        changed = (net.vni, net.overlay_delay_ms) != (self.settings.vni, self.settings.delay_ms)
        self.settings.vni = net.vni
        self.settings.delay_ms = net.overlay_delay_ms
        DELAY.set(net.overlay_delay_ms / 1000)
        if changed:
            log.info(
                "overlay configured",
                extra={"vni": net.vni, "delay_ms": net.overlay_delay_ms, "backend": net.backend},
            )
        for node, ip in net.egress_ips.items():
            gateway = self.gateways.get(node)
            if gateway is None or gateway.egress_ip != ip:
                await self._start_gateway(node, ip)


async def run(args: argparse.Namespace) -> None:
    provider = setup_tracing("cni", {"hopscope.component": "cni"})
    settings = OverlaySettings(port=args.vtep_port)
    daemon = CniDaemon(provider.get_tracer("hopscope.cni"), settings)
    daemon.loop = asyncio.get_running_loop()
    state = ClusterState()
    await daemon.start(default_egress_ips())
    start_http_server(args.metrics_port, addr=args.metrics_address)
    watcher = StateWatcher(args.api, daemon.on_state) if args.api else None
    if watcher is not None:
        watcher.start()
    else:
        await daemon.apply(state)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    log.info(
        "cni started",
        extra={"vteps": [f"{v.ip}:{args.vtep_port}" for v in daemon.vteps], "threads": 1},
    )
    await stop.wait()
    if watcher is not None:
        watcher.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mesh.cni", description=__doc__)
    parser.add_argument("--api", help="control-plane API URL to watch (omit: defaults only)")
    parser.add_argument("--vtep-port", type=int, default=addresses.VTEP_PORT)
    parser.add_argument("--metrics-address", default=addresses.NODE_IPS["node-a"])
    parser.add_argument("--metrics-port", type=int, default=addresses.CNI_METRICS_PORT)
    args = parser.parse_args(argv)
    setup_json_logging({"component": "cni"})
    import uvloop

    uvloop.run(run(args))


if __name__ == "__main__":
    main()

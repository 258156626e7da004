"""The CNI emulator as a process: both nodes' VTEPs and egress gateways, following the state.

:class:`CniDaemon` runs, per node, the overlay tunnel endpoint (:class:`~mesh.cni.vtep.Vtep`
on ``node-ip:8472``) and the pod-network gateway (:class:`~mesh.cni.gateway.NodeGateway` on
``node-ip:15080``), and applies the ``kube-system/hopscope-cni`` settings (VNI, overlay
delay, egress IPs) and the NetworkPolicies of every new cluster state. :func:`run` wires it
to the control plane's watch and serves its Prometheus metrics.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry, start_http_server

from mesh import addresses
from mesh.cni.gateway import NetworkView, NodeGateway
from mesh.cni.vtep import DELAY, OverlaySettings, Vtep
from mesh.model.controllers import default_egress_ips
from mesh.model.policy import PolicyEngine
from mesh.model.types import ClusterState
from mesh.model.watch import StateWatcher
from mesh.policy_metrics import PolicyEnforcementMetrics
from mesh.signals import wait_for_stop_signal
from telemetry.logs import setup_json_logging
from telemetry.tracing import setup_tracing

log = logging.getLogger("cni")


class CniDaemon:
    """The VTEPs and egress gateways of every node, reconfigured on each state."""

    def __init__(
        self, tracer: object, settings: OverlaySettings, policy_metrics: PolicyEnforcementMetrics
    ) -> None:
        self.tracer = tracer
        self.settings = settings
        self.policy_metrics = policy_metrics
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
        gateway = NodeGateway(node, ip, self.tracer, self.view, self.policy_metrics)
        try:
            await gateway.start()
        except OSError as exc:
            log.error("cannot start egress gateway", extra={"node": node, "error": str(exc)})
            return
        self.gateways[node] = gateway

    def on_state(self, state: ClusterState) -> None:
        """Called from the watch thread with each new state."""
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


@dataclass(frozen=True)
class CniSettings:
    """What ``python -m mesh.cni`` was asked to do."""

    api: str | None
    """Control-plane API URL to watch; None runs with the default settings only."""
    vtep_port: int
    metrics_address: str
    metrics_port: int


def main(settings: CniSettings) -> None:
    """Run the CNI emulator in this process until SIGTERM or SIGINT."""
    setup_json_logging({"component": "cni"})
    import uvloop

    uvloop.run(run(settings))


async def run(settings: CniSettings, registry: CollectorRegistry = REGISTRY) -> None:
    """Start the VTEPs and gateways, serve ``registry`` on the metrics port, follow the state."""
    provider = setup_tracing("cni", {"hopscope.component": "cni"})
    daemon = CniDaemon(
        provider.get_tracer("hopscope.cni"),
        OverlaySettings(port=settings.vtep_port),
        PolicyEnforcementMetrics(registry),
    )
    daemon.loop = asyncio.get_running_loop()
    await daemon.start(default_egress_ips())
    start_http_server(settings.metrics_port, addr=settings.metrics_address, registry=registry)
    watcher = StateWatcher(settings.api, daemon.on_state) if settings.api else None
    if watcher is not None:
        watcher.start()
    else:
        await daemon.apply(ClusterState())
    log.info(
        "cni started",
        extra={"vteps": [f"{v.ip}:{settings.vtep_port}" for v in daemon.vteps], "threads": 1},
    )
    await wait_for_stop_signal()
    if watcher is not None:
        watcher.stop()

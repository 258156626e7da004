"""The data-path seam: what moves packets between pods, Services and the outside.

A :class:`DataPath` starts kube-proxy (Service VIPs and NodePorts) and the CNI (the
cross-node overlay, egress SNAT, NetworkPolicy) and returns them as system components.
Both runtimes take one. :class:`UserspaceDataPath` is the one that exists: relays in
Python processes, like kube-proxy's historical userspace mode. A kernel data path
(namespaces, veth, netfilter rules, a conntrack observer) would be a second
implementation started the same way.
"""

from __future__ import annotations

from typing import Protocol

from mesh import addresses
from mesh.runtime.base import SystemComponent
from mesh.runtime.system import SystemProcesses


class DataPath(Protocol):
    def start(self, system: SystemProcesses) -> list[SystemComponent]:
        """Start the data path's components as system processes; return them."""
        ...


class UserspaceDataPath:
    """kube-proxy and the CNI emulator as relay processes (``mesh.kubeproxy``,
    ``mesh.cni``); they serve both nodes from the first node's address."""

    def start(self, system: SystemProcesses) -> list[SystemComponent]:
        node_ip = addresses.NODE_IPS["node-a"]
        system.start_module("kube-system/kube-proxy", "mesh.kubeproxy")
        system.start_module("kube-system/cni", "mesh.cni")
        return [
            SystemComponent(
                "kube-proxy",
                "kube-proxy",
                f"http://{node_ip}:{addresses.KUBE_PROXY_METRICS_PORT}/healthz",
                "kube-system/kube-proxy",
            ),
            SystemComponent(
                "cni", "cni", f"http://{node_ip}:{addresses.CNI_METRICS_PORT}/", "kube-system/cni"
            ),
        ]

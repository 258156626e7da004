"""The kernel data path's runtime: pods in network namespaces behind real nodes.

``hopscope up --dataplane kernel`` runs the control plane in the *cluster host* namespace
(:func:`enter_cluster_host`): the machine on the nodes' underlay network that holds the
control plane, cluster DNS, the ingress controller and the playground internet, and
routes each pod CIDR to its node (compose's control-plane container plays the same part).
Each node is a namespace with ``cni0``, the VXLAN device and kube-proxy's netfilter rules;
each pod is a namespace on its node's bridge, and its app and Envoy sidecar run inside it
(``ip netns exec``) exactly as in the local runtime otherwise.

kube-proxy is :mod:`mesh.kernel.kubeproxy` (iptables mode, loading rules into the nodes);
the overlay and egress SNAT are the kernel's. A forwarder gives the user's namespace the
addresses it knows from the local plan: the API and explorer (127.10.0.254:8001), the OTLP
receiver (:4318) and the ingress (127.200.0.1:8080/8443); another lets pods reach the API
and the OTLP receiver at the cluster host's underlay address.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from mesh import addresses
from mesh.kernel.rootless import forward_args
from mesh.kernel.topology import KernelNetwork, KernelNetworkError, NodeNet, kernel_support
from mesh.model.types import ClusterState, Pod
from mesh.otlp import OTLP_HTTP_PORT
from mesh.runtime.base import SystemComponent
from mesh.runtime.environment import process_env
from mesh.runtime.local import LocalRuntime
from mesh.runtime.system import SystemProcesses

log = logging.getLogger(__name__)

PREFIX = "hopscope"
"""Every namespace the kernel data path creates is named ``hopscope-…``."""
FORWARD_PROCESS = "kube-system/host-forward"
KUBE_PROXY_PROCESS = "kube-system/kube-proxy"
KUBE_PROXY_METRICS_IP = "127.10.0.1"
"""kube-proxy's /healthz and /metrics, on the cluster host's loopback."""


class KernelSetupError(RuntimeError):
    """The kernel data path cannot start here; the message says why, in one line."""


def enter_cluster_host(prefix: str = PREFIX) -> KernelNetwork:
    """Remove what a previous run left, create the underlay and the cluster host, and move
    this process into the cluster host's namespace (call it before any thread starts:
    threads and children inherit the namespace of the thread that made them)."""
    from mesh.kernel import rootless
    from mesh.kernel.forward import enter_netns

    if addresses.PLAN != "kernel":
        raise KernelSetupError("the kernel data path needs HOPSCOPE_ADDRESS_PLAN=kernel")
    reason = kernel_support()
    if reason:
        raise KernelSetupError(f"the kernel data path cannot run here: {reason}")
    is_rootless = rootless.broker_socket() is not None
    if is_rootless:  # names only this user namespace sees, gone with it
        try:
            rootless.private_namespace_dirs()
        except rootless.RootlessError as exc:
            raise KernelSetupError(f"cannot set up the rootless cluster: {exc}") from None
    network = KernelNetwork(prefix=prefix)
    network.cleanup()
    try:
        network.create_host(
            addresses.CLUSTER_HOST_IP,
            (
                addresses.DNS_SERVICE_IP,
                *addresses.EXTERNAL_HOSTS.values(),
                addresses.KERNEL_CLIENT_CIDR,
            ),
            name_root=not is_rootless,
        )
        enter_netns(network.host_netns)
    except (KernelNetworkError, OSError) as exc:
        network.cleanup()
        raise KernelSetupError(f"cannot create the cluster host: {exc}") from None
    return network


FLOWS_SOCKET = "kernel-flows.sock"
"""In the state directory: where kube-proxy sends the nodes' conntrack flows."""


class KernelDataPath:
    """kube-proxy in iptables mode, loading the rules into the node namespaces and
    reporting their conntrack flows to the control plane (:mod:`mesh.kernel.hops`)."""

    def __init__(self, prefix: str = PREFIX, flows_socket: Path | None = None) -> None:
        self.prefix = prefix
        self.flows_socket = flows_socket

    def start(self, system: SystemProcesses) -> list[SystemComponent]:
        argv = [
            sys.executable, "-m", "mesh.kernel.kubeproxy", "--api", system.api_url,
            "--prefix", self.prefix, "--metrics-address", KUBE_PROXY_METRICS_IP,
        ]  # fmt: skip
        if self.flows_socket is not None:
            argv += ["--flows-socket", str(self.flows_socket)]
        # its own log records go over OTLP too, where the cluster ships logs (as the relays')
        env = {**process_env(), "OTEL_EXPORTER_OTLP_ENDPOINT": system.otlp_endpoint}
        system.processes.start(KUBE_PROXY_PROCESS, argv, env)
        url = f"http://{KUBE_PROXY_METRICS_IP}:{addresses.KUBE_PROXY_METRICS_PORT}/healthz"
        return [SystemComponent("kube-proxy", "kube-proxy", url, KUBE_PROXY_PROCESS)]


class KernelRuntime(LocalRuntime):
    """The local runtime with every pod in its own network namespace on a real node."""

    def __init__(
        self,
        state_dir: Path,
        api_url: str,
        network: KernelNetwork,
        log_sink: str | None = None,
        backend: str = "vxlan",
    ) -> None:
        self.network = network
        network.backend = backend
        self.flows_socket = state_dir / FLOWS_SOCKET
        """Where the node's conntrack flows (kube-proxy) and the load balancers' connections
        (the forwarder) reach the control plane's hop joiner."""
        self.host_log_sink = log_sink
        pod_sink = None
        if log_sink is not None:  # pods reach the control plane's gRPC logs service here
            pod_sink = f"{addresses.CLUSTER_HOST_IP}:{log_sink.rsplit(':', 1)[1]}"
        super().__init__(
            state_dir,
            api_url,
            f"http://{addresses.CLUSTER_HOST_IP}:{OTLP_HTTP_PORT}",
            data_path=KernelDataPath(network.prefix, self.flows_socket),
            log_sink=pod_sink,
        )
        try:
            for name, node_ip in addresses.NODE_IPS.items():
                network.add_node(NodeNet(name, node_ip, addresses.POD_CIDRS[name]))
            network.connect_nodes()
            network.route_host(addresses.SERVICE_CIDR)
            for name, node_ip in addresses.NODE_IPS.items():
                network.egress_snat(name, addresses.CLUSTER_CIDRS, node_ip)
        except KernelNetworkError as exc:
            network.cleanup()
            raise KernelSetupError(f"cannot create the nodes: {exc}") from None

    # -- pods -----------------------------------------------------------------------------

    def start_pod(self, pod: Pod, state: ClusterState, files: Path | None = None) -> None:
        if (pod.namespace, pod.name) not in self.network.pods:
            self.network.add_pod(pod.namespace, pod.name, pod.node, pod.ip, _resolv_conf(pod))
        super().start_pod(pod, state, files)

    def in_pod(self, pod: Pod | None, argv: list[str]) -> list[str]:
        if pod is None:
            return argv
        return self.network.exec_argv(self.network.pod_netns(pod.namespace, pod.name), argv)

    def stop_pod(self, pod: Pod) -> None:
        super().stop_pod(pod)
        self.network.remove_pod(pod.namespace, pod.name)

    # -- system components ----------------------------------------------------------------

    def start_system_components(self) -> list[SystemComponent]:
        return [self._start_forwarders(), *super().start_system_components()]

    def _start_forwarders(self) -> SystemComponent:
        api = f"{addresses.CONTROL_PLANE_CLIENT_HOST}:{addresses.CONTROL_PLANE_PORT}"
        otlp = f"{addresses.CONTROL_PLANE_CLIENT_HOST}:{OTLP_HTTP_PORT}"
        root, host = self.network.root_netns, addresses.CLUSTER_HOST_IP
        admin = f"{KUBE_PROXY_METRICS_IP}:{addresses.KUBE_PROXY_METRICS_PORT}"
        dns_metrics = f"{addresses.DNS_METRICS_IP}:{addresses.DNS_METRICS_PORT}"
        dns_metrics_host = f"{addresses.HOST_DNS_SERVICE_IP}:{addresses.DNS_METRICS_PORT}"
        ingress_admin = f"{addresses.INGRESS_IP}:{addresses.INGRESS_ADMIN_PORT}"
        rules = [
            f"{root}/{api}={api}",
            f"{root}/{otlp}={otlp}",
            *(
                f"{root}/{addresses.INGRESS_IP}:{port}={addresses.INGRESS_IP}:{port}"
                for port in (addresses.INGRESS_PORT, addresses.INGRESS_TLS_PORT)
            ),
            # kube-proxy's /healthz, /metrics and /debug/sync, the DNS metrics and the
            # ingress's Envoy admin where the host expects them (as in local mode)
            f"{root}/{admin}={admin}",
            f"{root}/{dns_metrics_host}={dns_metrics}",
            f"{root}/{ingress_admin}={ingress_admin}",
            f"{host}:{addresses.CONTROL_PLANE_PORT}={api}",
            f"{host}:{OTLP_HTTP_PORT}={otlp}",
        ]
        if self.host_log_sink is not None:
            port = self.host_log_sink.rsplit(":", 1)[1]
            rules.append(f"{host}:{port}={self.host_log_sink}")
        rules += self._users_endpoint(root)
        argv = [sys.executable, "-m", "mesh.kernel.forward", *forward_args(root), *rules]
        # the ingress sees which outside client it serves (127.100.0.N as 10.100.0.N), as
        # behind a load balancer that keeps the client's address
        for edge in (addresses.INGRESS_PORT, addresses.INGRESS_TLS_PORT):
            argv += ["--clients", f"{root}/{addresses.INGRESS_IP}:{edge}"]
        # NodePorts and LoadBalancer addresses follow the Services (clients keep their address)
        argv += ["--services", f"http://{api}", "--host-netns", root]
        # which connections a load balancer address carried, for the kube-proxy hop joiner
        argv += ["--flows-socket", str(self.flows_socket)]
        self.processes.start(FORWARD_PROCESS, argv, process_env())
        # ready once the pods' side answers: the forwarder is up and relays to the API
        url = f"http://{host}:{addresses.CONTROL_PLANE_PORT}/metrics"
        return SystemComponent("host-forward", "forward", url, FORWARD_PROCESS)

    def _users_endpoint(self, root: str) -> list[str]:
        """The forwarding rule that lets the control plane, in the cluster host's namespace,
        reach the user's ``--otlp-endpoint`` (a Tempo or Collector on the user's machine,
        typically ``127.0.0.1:4318``): the same address answers in the cluster host's
        namespace and is relayed to the user's. Nothing when there is no endpoint."""
        import ipaddress
        import os
        import socket
        import urllib.parse

        from mesh.otlp.pipeline import FORWARD_ENDPOINT

        url = os.environ.get(FORWARD_ENDPOINT, "").strip()
        if not url:
            return []
        parts = urllib.parse.urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            ip = socket.gethostbyname(parts.hostname or "")
        except OSError as exc:
            log.warning(
                "the OTLP endpoint's name does not resolve here: nothing is forwarded",
                extra={"endpoint": url, "error": str(exc)},
            )
            return []
        if not ipaddress.ip_address(ip).is_loopback:
            # local in the cluster host's namespace too, so the relay there can take it
            self.network.add_host_address(ip)
        return [f"{ip}:{port}={root}/{ip}:{port}"]

    def shutdown(self) -> None:
        super().shutdown()
        self.network.cleanup()


def _resolv_conf(pod: Pod) -> str:
    """The resolv.conf a kubelet writes for a ``ClusterFirst`` pod."""
    search = f"{pod.namespace}.svc.cluster.local svc.cluster.local cluster.local"
    return f"search {search}\nnameserver {addresses.DNS_SERVICE_IP}\noptions ndots:5\n"

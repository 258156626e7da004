"""The local-mode address plan (see docs/design.md and ARCHITECTURE.md).

All of 127.0.0.0/8 is local on Linux, so every node, pod and Service VIP gets its
own loopback address and binds its real port numbers without root.
"""

from __future__ import annotations

import functools
import ipaddress
import os

PLAN = os.environ.get("HOPSCOPE_ADDRESS_PLAN", "local")
"""``local`` (every address on 127/8, one machine), ``compose`` (container networks) or
``kernel`` (network namespaces: the kernel data path)."""

NODE_IPS: dict[str, str] = {"node-a": "127.10.0.1", "node-b": "127.10.0.2"}
"""Node name → node IP."""

POD_CIDRS: dict[str, str] = {"node-a": "127.244.1.0/24", "node-b": "127.244.2.0/24"}
"""Node name → the pod CIDR its IPAM allocates from."""

SERVICE_CIDR = "127.96.0.0/16"
"""ClusterIPs are allocated from here (10.96.0.0/16 in compose)."""

DNS_SERVICE_IP = "127.96.0.10"
"""The cluster DNS Service VIP (kube-dns)."""

DNS_PORT = 10053
"""Cluster DNS listens on an unprivileged port in local mode (53 in compose)."""

DNS_METRICS_PORT = 9153
"""CoreDNS's conventional Prometheus port."""

CONTROL_PLANE_IP = "127.10.0.254"
"""Where the hopscope control plane (API, OTLP receiver, explorer) listens."""

CONTROL_PLANE_PORT = 8001
"""Port of the control-plane HTTP API, OTLP/HTTP receiver (``/v1/traces``) and explorer."""

KUBE_PROXY_METRICS_PORT = 10249
"""kube-proxy's conventional metrics port, bound on the first node IP."""

INGRESS_IP = "127.200.0.1"
"""The address an external load balancer gives the ingress controller."""

INGRESS_PORT = 8080
"""HTTP port of the ingress controller (unprivileged)."""

INGRESS_TLS_PORT = 8443
"""HTTPS port of the ingress controller (TLS terminated or passed through by SNI)."""

INGRESS_NODE = "node-a"
"""The node the ingress controller runs on (where its traffic enters the pod network)."""

INGRESS_ADMIN_PORT = 15000
"""Envoy admin port of the ingress controller (on ``INGRESS_IP``)."""

CLIENT_CIDR = "127.100.0.0/24"
"""External clients (``hopscope curl`` without ``--from``) send from here."""

EXTERNAL_CLIENT_IP = "127.100.0.1"
"""The default external client address."""

LB_IP = "127.200.0.1"
"""The ingress controller's LoadBalancer address."""

LB_POOL_CIDR = "127.200.0.0/24"
"""LoadBalancer Services get addresses from here, from .2 up (.1 is the ingress)."""

KUBERNETES_SERVICE_IP = "127.96.0.1"
"""``kubernetes.default``: the first address of the Service CIDR, as in every cluster."""

EXTERNAL_CIDR = "127.50.0.0/16"
"""The playground's "internet": addresses outside every cluster range."""

EXTERNAL_HOSTS: dict[str, str] = {"payments.example.net.": "127.50.0.10"}
"""Public names the cluster DNS resolves as an upstream resolver would (others: NXDOMAIN)."""

EGRESS_POOL_CIDR = "127.60.0.0/24"
"""Egress SNAT addresses: pod traffic leaving the cluster appears to come from here."""

CLUSTER_CIDRS: tuple[str, ...] = (
    "127.244.0.0/16",
    "127.96.0.0/16",
    "127.10.0.0/24",
    "127.200.0.0/24",
)
"""Pods, Services, nodes (and control plane), load balancers: everything else is outside,
so a pod reaching it leaves through egress SNAT."""

VTEP_PORT = 8472
"""Each node's overlay tunnel endpoint (flannel's VXLAN port), on the node IP."""

EGRESS_GATEWAY_PORT = 15080
"""Each node's egress SNAT gateway, on the node IP."""

CNI_METRICS_PORT = 9091
"""The CNI emulator's Prometheus endpoint (on the first node IP), like calico-node's."""

NODE_PORT_RANGE = (30000, 32767)
"""Inclusive NodePort range."""

# Ports inside every pod (pod IP is the pod's network identity).
SIDECAR_ADMIN_PORT = 15000
"""Envoy sidecar admin (``/ready``, ``/stats/prometheus``), as in Istio."""

SIDECAR_OUTBOUND_PORT = 15001
"""Envoy sidecar outbound listener the app sends its Service calls to, as in Istio."""

APP_PORT_OFFSET = 10000
"""With no iptables redirect in local mode, the sidecar owns each containerPort on the
pod IP and the app binds ``containerPort + APP_PORT_OFFSET`` (its "localhost" port)."""

APP_METRICS_PORT = 9464
"""Every app exposes Prometheus metrics on the pod IP at this port."""

ORIGINAL_DST_HEADER = "x-envoy-original-dst-host"
"""Header carrying the ``ip:port`` the app resolved; stands in for SO_ORIGINAL_DST."""


@functools.lru_cache(maxsize=4096)
def node_for_ip(ip: str) -> str | None:
    """The node whose pod CIDR or node IP holds ``ip``, if any (kube-proxy asks for every
    connection; the plan is fixed at import)."""
    addr = ipaddress.ip_address(ip)
    for node, cidr in POD_CIDRS.items():
        if addr in ipaddress.ip_network(cidr):
            return node
    for node, node_ip in NODE_IPS.items():
        if node_ip == ip:
            return node
    return None


HOST_NODE_IPS: dict[str, str] = dict(NODE_IPS)
"""Node name → the address the user's machine reaches that node's NodePorts at: the node IP
itself, except on the kernel data path, whose node IPs exist only inside its namespaces and
whose forwarder answers here instead."""

HOST_DNS_SERVICE_IP = DNS_SERVICE_IP
"""Where the user's machine reaches cluster DNS's metrics (:data:`DNS_METRICS_PORT`): the
local plan's address, forwarded into the cluster host on the kernel data path."""

HOST_CLIENT_CIDR = CLIENT_CIDR
"""External clients' addresses on the user's machine (``hopscope curl``, scenarios)."""

KERNEL_CLIENT_CIDR = "10.100.0.0/24"
"""On the kernel data path, external clients enter the cluster from here: the host's
forwarder connects from ``10.100.0.N`` for a client at ``127.100.0.N`` (keeping its port),
so pods see one address per client, as they would behind a load balancer that keeps the
client's IP. (Loopback addresses cannot leave a namespace.)"""
KERNEL_NODE_IPS: dict[str, str] = {"node-a": "10.10.0.1", "node-b": "10.10.0.2"}
"""The nodes' addresses on the kernel data path's underlay (:data:`NODE_IPS` there)."""

POD_NETWORK_CIDR = "127.244.0.0/16"
"""The cluster's pod network (``--cluster-cidr``); each node gets a /24 of it."""

CONTROL_PLANE_CLIENT_HOST = CONTROL_PLANE_IP
"""Where clients (CLI, emulators) reach the API; differs from the bind address in compose."""

if PLAN == "compose":
    # Containers: one bridge network per node holds that node's pods; the control-plane
    # container sits on both as the node (x.x.x.254), owns the Service range through a
    # local route, and routes between the nodes' pod networks. See docs/design.md.
    NODE_IPS = {"node-a": "10.244.1.254", "node-b": "10.244.2.254"}
    POD_CIDRS = {"node-a": "10.244.1.0/24", "node-b": "10.244.2.0/24"}
    POD_NETWORK_CIDR = "10.244.0.0/16"
    SERVICE_CIDR = "10.96.0.0/16"
    DNS_SERVICE_IP = "10.96.0.10"
    DNS_PORT = 53
    KUBERNETES_SERVICE_IP = "10.96.0.1"
    CONTROL_PLANE_IP = "0.0.0.0"
    CONTROL_PLANE_CLIENT_HOST = "127.0.0.1"
    INGRESS_IP = "10.244.1.253"
    LB_IP = INGRESS_IP
    LB_POOL_CIDR = "10.200.0.0/24"
    CLIENT_CIDR = "0.0.0.0/32"
    EXTERNAL_CLIENT_IP = "0.0.0.0"
    EXTERNAL_CIDR = "10.50.0.0/24"
    EXTERNAL_HOSTS = {"payments.example.net.": "10.50.0.10"}
    EGRESS_POOL_CIDR = "10.50.0.0/24"
    CLUSTER_CIDRS = ("10.244.0.0/16", "10.96.0.0/16", "10.200.0.0/24")
    HOST_NODE_IPS = dict(NODE_IPS)

CLUSTER_HOST_IP = CONTROL_PLANE_IP
"""Where pods reach the control plane (its API, OTLP receivers) from their namespaces."""

if PLAN == "kernel":
    # The kernel data path: nodes and pods are network namespaces (mesh.kernel.topology).
    # Nodes sit on an underlay network with the cluster host (control plane, DNS, ingress,
    # the playground internet) at its .254, which also routes each pod CIDR to its node.
    # Host-facing addresses (API, ingress, clients) stay those of the local plan: the host
    # reaches them through forwarders. See docs/design.md.
    NODE_IPS = dict(KERNEL_NODE_IPS)
    POD_CIDRS = {"node-a": "10.244.1.0/24", "node-b": "10.244.2.0/24"}
    POD_NETWORK_CIDR = "10.244.0.0/16"
    SERVICE_CIDR = "10.96.0.0/16"
    DNS_SERVICE_IP = "10.96.0.10"
    DNS_PORT = 53
    KUBERNETES_SERVICE_IP = "10.96.0.1"
    CLUSTER_HOST_IP = "10.10.0.254"
    EXTERNAL_CIDR = "10.50.0.0/24"
    EXTERNAL_HOSTS = {"payments.example.net.": "10.50.0.10"}
    EGRESS_POOL_CIDR = "10.10.0.0/24"
    LB_POOL_CIDR = "127.200.0.0/24"
    CLUSTER_CIDRS = ("10.244.0.0/16", "10.96.0.0/16", "10.10.0.0/24", "127.200.0.0/24")

INGRESS_SOURCE_IP = CLUSTER_HOST_IP if PLAN == "kernel" else INGRESS_IP
"""The source address of the ingress controller's upstream connections: its own address,
or in the kernel plan the cluster host's (loopback addresses never leave a namespace)."""

UNDERLAY_PREFIXLEN = 24
"""The kernel plan's underlay: node IPs and the cluster host share one /24."""

DNS_METRICS_IP = NODE_IPS["node-a"] if PLAN == "compose" else DNS_SERVICE_IP
"""Where cluster DNS serves /metrics (a node address in compose, reachable by Prometheus)."""

RESERVED_POD_IPS: set[str] = set()
if PLAN == "kernel":
    RESERVED_POD_IPS = {"10.244.1.1", "10.244.2.1"}
    """Each pod CIDR's first address is its node bridge's (the pods' gateway)."""
if PLAN == "compose":
    RESERVED_POD_IPS = {f"10.244.{n}.{host}" for n in (1, 2) for host in range(250, 255)}
"""Pod-network addresses IPAM never hands out: in compose, .250-.254 of each node network
hold the node (control plane), the ingress, the Collector and Prometheus."""

COMPOSE_EGRESS_IP = "10.50.0.254"
"""In compose, the control-plane container's address on the ``internet`` network."""


def kernel_client_address(host_ip: str) -> str:
    """Where an external client at ``host_ip`` appears inside the kernel data path's
    namespaces (``127.100.0.N`` → ``10.100.0.N``); other addresses are returned unchanged."""
    try:
        addr = ipaddress.ip_address(host_ip)
    except ValueError:
        return host_ip
    host, inside = ipaddress.ip_network(HOST_CLIENT_CIDR), ipaddress.ip_network(KERNEL_CLIENT_CIDR)
    if addr not in host:
        return host_ip
    return str(inside.network_address + (int(addr) - int(host.network_address)))


def cluster_side(address: str) -> str:
    """``ip:port`` as seen from the user's machine → as seen inside the cluster: on the kernel
    data path a client address (:func:`kernel_client_address`) or a node's host address
    (:data:`HOST_NODE_IPS`) maps to its inner one; elsewhere the address is the same."""
    if PLAN != "kernel":
        return address
    ip, sep, port = address.rpartition(":")
    if not sep:
        return address
    for node, host_ip in HOST_NODE_IPS.items():
        if ip == host_ip:
            return f"{NODE_IPS[node]}:{port}"
    return f"{kernel_client_address(ip)}:{port}"


def prefix_regex(cidrs: tuple[str, ...] | list[str]) -> str:
    """An RE2 prefix matching ``ip:port`` strings inside ``cidrs`` (octet-aligned only)."""
    alternatives = []
    for cidr in cidrs:
        net = ipaddress.ip_network(cidr)
        octets = str(net.network_address).split(".")[: net.prefixlen // 8]
        alternatives.append(r"\.".join(octets) + r"\.")
    return "^(" + "|".join(alternatives) + ")"

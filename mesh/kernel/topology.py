"""Nodes and pods as network namespaces, wired the way a flannel cluster is.

Shape, for nodes ``node-a`` and ``node-b`` (namespace names carry a prefix, ``hopscope-``)::

    underlay ns:  bridge ``underlay0`` ── ul-node-a ┐           ┌ ul-node-b
                                                   veth        veth
    node-a ns:    eth0 10.10.0.1/24                 │           │   node-b ns: eth0 10.10.0.2/24
                  cni0 10.244.1.1/24 (bridge, the pods' gateway)
                  flannel.1 10.244.1.0/32 (VXLAN, VNI 1, UDP 8472 on eth0)
                  route 10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink
                  neigh 10.244.2.0 lladdr <node-b VTEP MAC>; fdb <MAC> dst 10.10.0.2
    pod ns:       eth0 10.244.1.5/24, default via 10.244.1.1; its peer vethXXXXXXXX in cni0
                  (hairpin mode on, so a pod can reach itself through its own Service)
    every node:   default via 10.10.0.254 (the underlay's router address)

``backend="host-gw"`` replaces the VXLAN device with plain routes (``10.244.2.0/24 via
10.10.0.2``), as flannel's host-gw backend does. Every object lives inside a namespace this
module creates, so removing the namespaces removes everything: :meth:`KernelNetwork.cleanup`
deletes every namespace with the prefix, also the ones a crashed run left behind.

Programs run inside a namespace through :meth:`KernelNetwork.exec_argv` (``ip netns exec``);
rule documents are loaded with :meth:`KernelNetwork.restore`.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VXLAN_DEVICE = "flannel.1"
"""flannel's VXLAN device name (``flannel.<VNI>``)."""
VXLAN_ID = 1
VXLAN_PORT = 8472
"""flannel's (and the Linux kernel's historical) VXLAN UDP port."""
VXLAN_MTU = 1450
"""1500 minus the 50 bytes of outer Ethernet, IP, UDP and VXLAN headers."""
BRIDGE = "cni0"
EGRESS_CHAIN = "HOPSCOPE-EGRESS"
ETC_NETNS = Path("/etc/netns")
"""``ip netns exec NAME`` bind-mounts the files of /etc/netns/NAME over /etc."""
UNDERLAY_BRIDGE = "underlay0"
BACKENDS = ("vxlan", "host-gw")
RTPROT_BOOT = 3
"""Routes as ``ip route add`` and flannel's daemon install them (shown without ``proto``)."""

NODE_SYSCTLS = {
    "net.ipv4.ip_forward": "1",
    # Pods on one bridge answer each other at layer 2; without this the reply to a DNATed
    # (hairpin or same-node) connection skips conntrack's reverse NAT, as kube-proxy warns.
    "net.bridge.bridge-nf-call-iptables": "1",
    # Conntrack entries carry their start time: the kernel's clock for the kube-proxy hop.
    "net.netfilter.nf_conntrack_timestamp": "1",
    # ...and their packet and byte counts: kube-proxy's per-endpoint byte metrics.
    "net.netfilter.nf_conntrack_acct": "1",
}


def node_netns_name(prefix: str, node: str) -> str:
    """The network namespace of a node (``ip netns`` name)."""
    return f"{prefix}-{node}"


def pod_netns_name(prefix: str, namespace: str, name: str) -> str:
    """The network namespace of a pod."""
    return f"{prefix}-pod-{namespace}-{name}"


def host_netns_name(prefix: str) -> str:
    """The cluster host's namespace: control plane, DNS, ingress and the forwarders' far end."""
    return f"{prefix}-host"


class KernelNetworkError(RuntimeError):
    """A namespace, link or rule could not be created; the message names which."""


@dataclass(frozen=True)
class NodeNet:
    name: str
    node_ip: str
    """The node's address on the underlay (the VXLAN outer source)."""
    pod_cidr: str

    @property
    def gateway(self) -> str:
        """The bridge's address: the first host of the pod CIDR, every pod's default route."""
        return str(ipaddress.ip_network(self.pod_cidr).network_address + 1)

    @property
    def bridge_mac(self) -> str:
        """``cni0``'s MAC, fixed from its address (``0a:58`` and the gateway's four bytes, as
        the CNI bridge plugin derives it). A bridge left to itself takes the lowest MAC of its
        ports: a pod with a lower one changes it on arrival and again on leaving, and every
        other pod's ARP entry for the gateway then points at an address nobody answers
        until it is probed again (kubernetes/kubernetes#30783)."""
        octets = ipaddress.ip_address(self.gateway).packed
        return ":".join(f"{b:02x}" for b in (0x0A, 0x58, *octets))

    @property
    def vtep_address(self) -> str:
        """The VXLAN device's address: the pod CIDR's network address, as flannel assigns."""
        return str(ipaddress.ip_network(self.pod_cidr).network_address)

    @property
    def vtep_mac(self) -> str:
        """A stable, locally administered MAC for the node's VXLAN device (flannel keeps a
        random one in the Node's annotations; a derived one needs no lookup)."""
        digest = hashlib.sha256(self.name.encode()).digest()
        return ":".join(f"{b:02x}" for b in (0x0A, 0x58, *digest[:4]))


@dataclass(frozen=True)
class PodNet:
    namespace: str
    name: str
    node: str
    ip: str
    netns: str
    host_veth: str
    """The veth end in the node's namespace, enslaved to ``cni0``."""


@dataclass
class KernelNetwork:
    """Creates, wires and removes the namespaces of one cluster."""

    prefix: str = "hopscope"
    backend: str = "vxlan"
    underlay_prefixlen: int = 24
    nodes: dict[str, NodeNet] = field(default_factory=dict)
    pods: dict[tuple[str, str], PodNet] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise KernelNetworkError(
                f"unknown overlay backend {self.backend!r} (one of: {', '.join(BACKENDS)})"
            )

    # -- names ---------------------------------------------------------------------------

    @property
    def underlay_netns(self) -> str:
        return f"{self.prefix}-underlay"

    def node_netns(self, node: str) -> str:
        return node_netns_name(self.prefix, node)

    def pod_netns(self, namespace: str, name: str) -> str:
        return pod_netns_name(self.prefix, namespace, name)

    # -- life cycle ----------------------------------------------------------------------

    def cleanup(self) -> list[str]:
        """Remove every namespace carrying the prefix (this run's or a crashed one's)."""
        from pyroute2 import netns

        removed = []
        for name in sorted(netns.listnetns()):
            if name.startswith(f"{self.prefix}-"):
                netns.remove(name)
                removed.append(name)
        if ETC_NETNS.is_dir():
            for etc in ETC_NETNS.glob(f"{self.prefix}-*"):
                shutil.rmtree(etc, ignore_errors=True)
        self.nodes.clear()
        self.pods.clear()
        return removed

    def add_node(self, node: NodeNet) -> None:
        """Create the node's namespace, its underlay link, ``cni0`` and its sysctls."""
        if node.name in self.nodes:
            raise KernelNetworkError(f"node {node.name} exists already")
        if not self._exists(self.underlay_netns):
            self._create_underlay()
        ns = self.node_netns(node.name)
        self._create_netns(ns)
        self._plug_into_underlay(ns, f"ul-{node.name}"[:15], node.node_ip)
        with self._ns(ns) as ipr:
            eth0 = _index(ipr, "eth0")
            # A node has a default route (here: the cluster host). Without one, a Service
            # address with no rule is "network unreachable" instead of REJECTed.
            ipr.route("add", dst="0.0.0.0/0", gateway=self._router_ip(node), proto=RTPROT_BOOT)
            ipr.link("add", ifname=BRIDGE, kind="bridge", address=node.bridge_mac)
            bridge = _index(ipr, BRIDGE)
            prefixlen = ipaddress.ip_network(node.pod_cidr).prefixlen
            ipr.addr("add", index=bridge, address=node.gateway, prefixlen=prefixlen)
            ipr.link("set", index=bridge, state="up")
            if self.backend == "vxlan":
                ipr.link(
                    "add",
                    ifname=VXLAN_DEVICE,
                    kind="vxlan",
                    vxlan_id=VXLAN_ID,
                    vxlan_port=VXLAN_PORT,
                    vxlan_local=node.node_ip,
                    vxlan_link=eth0,
                    vxlan_learning=0,
                    address=node.vtep_mac,
                    mtu=VXLAN_MTU,
                )
                vtep = _index(ipr, VXLAN_DEVICE)
                ipr.addr("add", index=vtep, address=node.vtep_address, prefixlen=32)
                ipr.link("set", index=vtep, state="up")
        for key, value in NODE_SYSCTLS.items():
            self.sysctl(ns, key, value)
        self.nodes[node.name] = node

    def connect_nodes(self) -> None:
        """Program every node's routes to every other node's pod CIDR (and, for VXLAN, the
        neighbour and FDB entries flannel's daemon writes from the Node annotations)."""
        for node in self.nodes.values():
            with self._ns(self.node_netns(node.name)) as ipr:
                for peer in self.nodes.values():
                    if peer.name != node.name:
                        self._route_to(ipr, peer)

    def _route_to(self, ipr: Any, peer: NodeNet) -> None:
        network = ipaddress.ip_network(peer.pod_cidr)
        if self.backend == "host-gw":
            _route(ipr, network, peer.node_ip)
            return
        vtep = _index(ipr, VXLAN_DEVICE)
        ipr.neigh(
            "replace", dst=peer.vtep_address, lladdr=peer.vtep_mac, ifindex=vtep, state=0x80
        )  # NUD_PERMANENT
        ipr.fdb(
            "replace", ifindex=vtep, lladdr=peer.vtep_mac, dst=peer.node_ip, state=0x80, flags=2
        )  # NUD_PERMANENT, NTF_SELF: the VXLAN device's own forwarding table
        _route(ipr, network, peer.vtep_address, oif=vtep, flags=4)  # RTNH_F_ONLINK

    def add_pod(
        self, namespace: str, name: str, node: str, ip: str, resolv_conf: str | None = None
    ) -> PodNet:
        """Create the pod's namespace and its veth into the node's bridge; ``resolv_conf``
        is the pod's ``/etc/resolv.conf`` (``ip netns exec`` mounts it over the host's, as
        the kubelet gives each pod one naming the cluster DNS)."""
        if node not in self.nodes:
            raise KernelNetworkError(f"pod {namespace}/{name}: unknown node {node!r}")
        if (namespace, name) in self.pods:
            raise KernelNetworkError(f"pod {namespace}/{name} exists already")
        spec = self.nodes[node]
        network = ipaddress.ip_network(spec.pod_cidr)
        if ipaddress.ip_address(ip) not in network:
            raise KernelNetworkError(f"pod {namespace}/{name}: {ip} is outside {spec.pod_cidr}")
        netns_name = self.pod_netns(namespace, name)
        host_veth = "veth" + hashlib.sha256(f"{namespace}/{name}".encode()).hexdigest()[:8]
        self._create_netns(netns_name)
        with self._ns(self.node_netns(node)) as ipr:
            ipr.link(
                "add",
                ifname=host_veth,
                kind="veth",
                peer={"ifname": "eth0", "net_ns_fd": netns_name},
            )
            port = _index(ipr, host_veth)
            ipr.link("set", index=port, master=_index(ipr, BRIDGE), state="up")
            # Hairpin mode (the bridge CNI plugin's ``hairpinMode: true``): a pod reaching
            # itself through its Service is DNATed on the bridge and must be sent back out
            # of the port it came in on, which a bridge port refuses by default.
            ipr.brport("set", index=port, mode=1)
        with self._ns(netns_name) as pod:
            pod.link("set", index=_index(pod, "lo"), state="up")
            eth0 = _index(pod, "eth0")
            pod.addr("add", index=eth0, address=ip, prefixlen=network.prefixlen)
            pod.link("set", index=eth0, state="up")
            pod.route("add", dst="0.0.0.0/0", gateway=spec.gateway, proto=RTPROT_BOOT)
        if resolv_conf is not None:
            etc = ETC_NETNS / netns_name
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "resolv.conf").write_text(resolv_conf)
        pod_net = PodNet(namespace, name, node, ip, netns_name, host_veth)
        self.pods[(namespace, name)] = pod_net
        return pod_net

    def remove_pod(self, namespace: str, name: str) -> None:
        """Delete the pod's namespace (its veth pair goes with it)."""
        from pyroute2 import netns

        pod = self.pods.pop((namespace, name), None)
        netns_name = pod.netns if pod else self.pod_netns(namespace, name)
        if netns_name in netns.listnetns():
            netns.remove(netns_name)
        shutil.rmtree(ETC_NETNS / netns_name, ignore_errors=True)

    # -- inside the namespaces -------------------------------------------------------------

    @staticmethod
    def exec_argv(netns_name: str, argv: list[str]) -> list[str]:
        """``argv`` run inside the namespace (its network only; files and users are the host's)."""
        return ["ip", "netns", "exec", netns_name, *argv]

    def sysctl(self, netns_name: str, key: str, value: str) -> None:
        path = "/proc/sys/" + key.replace(".", "/")
        done = subprocess.run(
            self.exec_argv(netns_name, ["sh", "-c", f'echo {value} > "$1"', "sh", path]),
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise KernelNetworkError(
                f"{netns_name}: cannot set {key}={value}: {done.stderr.strip()}"
            )

    def restore(self, node: str, argv: tuple[str, ...], document: str) -> None:
        """Load one rule document into the node's namespace atomically (all or nothing)."""
        done = subprocess.run(
            self.exec_argv(self.node_netns(node), list(argv)),
            input=document,
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise KernelNetworkError(
                f"{node}: {' '.join(argv)} refused the document: {done.stderr.strip()}"
            )

    def save(self, node: str, table: str) -> str:
        """``iptables-save -t TABLE`` of the node's namespace."""
        done = subprocess.run(
            self.exec_argv(self.node_netns(node), ["iptables-save", "-t", table]),
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise KernelNetworkError(f"{node}: iptables-save failed: {done.stderr.strip()}")
        return done.stdout

    def link_stats(self, node: str, ifname: str) -> dict[str, int]:
        """The device's kernel counters (``rx_packets``, ``tx_packets``, ``rx_bytes``, …)."""
        with self._ns(self.node_netns(node)) as ipr:
            link = ipr.get_links(_index(ipr, ifname))[0]
            stats = link.get_attr("IFLA_STATS64")
            return {k: int(v) for k, v in stats.items() if isinstance(v, int)}

    # -- helpers ---------------------------------------------------------------------------

    def _create_underlay(self) -> None:
        self._create_netns(self.underlay_netns)
        with self._ns(self.underlay_netns) as ul:
            ul.link("set", index=_index(ul, "lo"), state="up")
            ul.link("add", ifname=UNDERLAY_BRIDGE, kind="bridge")
            ul.link("set", index=_index(ul, UNDERLAY_BRIDGE), state="up")

    def _plug_into_underlay(self, netns_name: str, end: str, address: str) -> None:
        """A veth from the underlay bridge to ``eth0`` of ``netns_name``, at ``address``."""
        with self._ns(self.underlay_netns) as ul:
            ul.link(
                "add", ifname=end, kind="veth", peer={"ifname": "eth0", "net_ns_fd": netns_name}
            )
            ul.link("set", index=_index(ul, end), master=_index(ul, UNDERLAY_BRIDGE), state="up")
        with self._ns(netns_name) as ipr:
            ipr.link("set", index=_index(ipr, "lo"), state="up")
            eth0 = _index(ipr, "eth0")
            ipr.addr("add", index=eth0, address=address, prefixlen=self.underlay_prefixlen)
            ipr.link("set", index=eth0, state="up")

    def _router_ip(self, node: NodeNet) -> str:
        """The underlay's gateway, every node's default route: the network's last host."""
        network = ipaddress.ip_interface(f"{node.node_ip}/{self.underlay_prefixlen}").network
        return str(network.broadcast_address - 1)

    @staticmethod
    def _exists(name: str) -> bool:
        from pyroute2 import netns

        return name in netns.listnetns()

    # -- the cluster host: where the control plane and the node-level services run --------

    @property
    def host_netns(self) -> str:
        return host_netns_name(self.prefix)

    @property
    def root_netns(self) -> str:
        """A name for the namespace ``hopscope up`` ran in (the user's): forwarders listen
        there. Removing the name leaves the namespace itself alone."""
        return f"{self.prefix}-root"

    def create_host(
        self, host_ip: str, local_addresses: tuple[str, ...] = (), name_root: bool = True
    ) -> None:
        """The cluster host on the underlay at ``host_ip`` (every node's default gateway),
        with ``local_addresses`` (on ``lo``, /32 unless given: the DNS VIP, the
        playground's internet hosts, the external clients' range) and, if ``name_root``, a
        name for the caller's own namespace (a rootless cluster's caller is not in the
        user's namespace: its port broker is)."""
        if not self._exists(self.underlay_netns):
            self._create_underlay()
        self._create_netns(self.host_netns)
        self._plug_into_underlay(self.host_netns, "ul-host", host_ip)
        with self._ns(self.host_netns) as ipr:
            lo = _index(ipr, "lo")
            for address in local_addresses:  # a prefix on lo is local as a whole (AnyIP)
                ip, _, prefixlen = address.partition("/")
                ipr.addr("add", index=lo, address=ip, prefixlen=int(prefixlen or 32))
        if not name_root:
            return
        done = subprocess.run(
            ["ip", "netns", "attach", self.root_netns, str(os.getpid())],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise KernelNetworkError(f"cannot name the host namespace: {done.stderr.strip()}")

    def route_host(self, service_cidr: str | None = None) -> None:
        """Routes of the cluster host: each pod CIDR via its node (a cloud route table), and
        the Service range via the first node (the host's clients are load balancers)."""
        with self._ns(self.host_netns) as ipr:
            for node in self.nodes.values():
                net = ipaddress.ip_network(node.pod_cidr)
                _route(ipr, net, node.node_ip)
            if service_cidr and self.nodes:
                net = ipaddress.ip_network(service_cidr)
                first = next(iter(self.nodes.values()))
                _route(ipr, net, first.node_ip)

    def add_host_address(self, ip: str) -> None:
        """Make ``ip`` local on the cluster host's ``lo`` (a /32): an address of the user's
        network the control plane reaches through a forwarder listening there."""
        with self._ns(self.host_netns) as ipr:
            try:
                ipr.addr("add", index=_index(ipr, "lo"), address=ip, prefixlen=32)
            except Exception as exc:  # NetlinkError: exists already
                if getattr(exc, "code", None) != 17:  # EEXIST
                    raise KernelNetworkError(f"cannot add {ip} to the cluster host: {exc}") from exc

    def egress_snat(self, node: str, cluster_cidrs: tuple[str, ...], to_source: str) -> None:
        """Pod traffic leaving the cluster is SNATed to ``to_source`` on its node (flannel's
        ``--ip-masq``); traffic to any cluster range keeps the pod's address."""
        spec = self.nodes[node]
        lines = [
            "*nat",
            f":{EGRESS_CHAIN} - [0:0]",
            f'-A POSTROUTING -m comment --comment "hopscope egress SNAT" -j {EGRESS_CHAIN}',
            *(f"-A {EGRESS_CHAIN} -d {cidr} -j RETURN" for cidr in cluster_cidrs),
            f"-A {EGRESS_CHAIN} -s {spec.pod_cidr} -j SNAT --to-source {to_source}",
            "COMMIT",
            "",
        ]
        self.restore(node, ("iptables-restore", "--noflush"), "\n".join(lines))

    @staticmethod
    def _create_netns(name: str) -> None:
        from pyroute2 import netns

        if name in netns.listnetns():
            raise KernelNetworkError(
                f"network namespace {name} exists already (another hopscope cluster, or a "
                "crashed one: `hopscope down` removes it)"
            )
        netns.create(name)

    @staticmethod
    def _ns(name: str) -> Any:
        from pyroute2 import NetNS

        return NetNS(name)


def _route(ipr: Any, network: Any, gateway: str, **extra: Any) -> None:
    """``ip route replace NETWORK via GATEWAY`` (as ``ip route`` adds it: proto boot)."""
    dst, dst_len = str(network.network_address), network.prefixlen
    ipr.route("replace", dst=dst, dst_len=dst_len, gateway=gateway, proto=RTPROT_BOOT, **extra)


def _index(ipr: Any, ifname: str) -> int:
    found = ipr.link_lookup(ifname=ifname)
    if not found:
        raise KernelNetworkError(f"no link {ifname}")
    return int(found[0])


def kernel_support() -> str | None:
    """Why the kernel data path cannot run here, in one line; None when it can."""
    import os
    import sys

    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        from mesh.kernel.rootless import userns_support

        reason = userns_support()
        if reason:
            return f"not root, and {reason}"
    for tool in ("ip", "iptables", "iptables-restore"):
        if not shutil.which(tool):
            return f"{tool} is not installed (apt install iproute2 iptables)"
    try:
        import pyroute2  # noqa: F401
    except ImportError:
        return "the pyroute2 package is not installed"
    return None

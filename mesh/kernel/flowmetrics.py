"""The data path's metrics on the kernel path, counted from the nodes' conntrack.

The userspace relays count the connections they carry; here the kernel carries them, and
the kube-proxy observer counts the same series (:mod:`mesh.datapath_metrics`) from what
each node's conntrack reports, so the dashboards' kube-proxy and overlay panels read the
same names on both paths:

- a ``NEW`` event of a DNATed flow to a Service is a connection to its endpoint
  (``hopscope_kubeproxy_connections_total``), open (``hopscope_kubeproxy_active_connections``)
  until a dump finds it closing (``FIN_WAIT``, ``TIME_WAIT``, …) or its ``DESTROY`` event;
- a flow a node's pod opened to a pod on another node (directly or after DNAT) crossed the
  VXLAN overlay; one to a pod on the same node stayed on the bridge
  (``hopscope_cni_pod_connections_total{path}``); one SNATed to an address outside the
  cluster left through egress SNAT;
- bytes are conntrack's own counts (``nf_conntrack_acct=1``, IP packet bytes), taken from
  the destroy event and, for connections still open, from a table dump every
  :data:`REFRESH_S` seconds, so a long-lived keep-alive connection's bytes show up while
  it lives;
- whether a connection was answered (overlay and SNAT ``result``, and kube-proxy's
  ``endpoint-unreachable`` refusals) is the entry's ``SEEN_REPLY`` bit, read when a dump
  first sees it set or when the entry is destroyed.

A packet a node's NetworkPolicy rules dropped (NFLOG, prefix ``deny <side> <ns>/<pod>``)
counts once per connection (its SYN retransmits are not new connections) in
``hopscope_networkpolicy_denied_connections_total``, with the first policy of the model's
verdict, as the relays count theirs.

A Service without endpoints is REJECTed before conntrack confirms anything: those
connections leave no event, as on the userspace path when the kernel refuses them; the
``no-ready-endpoints`` series exists for every Service address that rejects.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import REGISTRY, CollectorRegistry

from mesh import addresses
from mesh.datapath_metrics import KubeProxyMetrics, NodeRoutingMetrics, OverlayMetrics
from mesh.kernel.conntrack import IPS_SEEN_REPLY, Flow, Logged
from mesh.kernel.policy import read_nflog_prefix
from mesh.kubeproxy.rules import RuleSet
from mesh.model.types import ClusterState
from mesh.policy_metrics import PolicyEnforcementMetrics

REFRESH_S = 5.0
"""How often open connections' byte counts are read from the nodes' tables."""
CLOSING = frozenset({"FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT", "CLOSE"})
"""TCP states of an entry whose connection is closing or closed (conntrack keeps it a while)."""
RETRANSMIT_WINDOW_S = 120.0
"""A dropped SYN sent again within this long is the same connection (TCP gives up sooner)."""


@dataclass
class _Open:
    """What one open conntrack entry was counted as, and the bytes counted so far."""

    service: tuple[str, str, str] | None  # namespace, Service, endpoint pod
    overlay: tuple[str, str] | None  # encapsulating node, destination node
    egress: tuple[str, str, str] | None  # node, egress address, destination
    bytes_in: int = 0
    bytes_out: int = 0
    settled: bool = False
    """Whether the connection's result (answered or not) has been counted."""
    closing: bool = False
    """A dump saw it closing (FIN_WAIT, TIME_WAIT, …): no longer an open connection."""
    answered: bool = False


class FlowMetrics:
    """Counts conntrack flows of every node into the data path's metric families."""

    def __init__(
        self,
        rules: Callable[[], RuleSet | None],
        overlay_delay_s: Callable[[], float] = lambda: 0.0,
        registry: CollectorRegistry = REGISTRY,
        state: Callable[[], ClusterState | None] = lambda: None,
    ) -> None:
        self.rules = rules
        self.state = state
        self.policy = PolicyEnforcementMetrics(registry)
        self._denied: OrderedDict[tuple[str, str], float] = OrderedDict()
        self.kube_proxy = KubeProxyMetrics.build(registry)
        self.overlay = OverlayMetrics.build(registry)
        self.routing = NodeRoutingMetrics.build(registry)
        self.overlay.delay.set_function(overlay_delay_s)
        self._pod_cidrs = {
            node: ipaddress.ip_network(cidr) for node, cidr in addresses.POD_CIDRS.items()
        }
        self._cluster = [ipaddress.ip_network(c) for c in addresses.CLUSTER_CIDRS]
        self._open: dict[tuple[str, int], _Open] = {}
        self._rejecting: set[tuple[str, str, str]] = set()
        self._lock = threading.Lock()

    # -- rules ---------------------------------------------------------------------------

    def on_rules(self, rules: RuleSet) -> None:
        """After a sync: how many Service addresses there are, which ones REJECT."""
        self.kube_proxy.rules.set(len(rules.rules))
        rejecting: dict[tuple[str, str, str], int] = {}
        for rule in rules.rules.values():
            if not rule.ready_endpoints:
                labels = (rule.namespace, rule.name, rule.kind)
                rejecting[labels] = rejecting.get(labels, 0) + 1
        with self._lock:
            for labels, count in rejecting.items():
                self.kube_proxy.rejecting.labels(*labels).set(count)
                self.kube_proxy.rejected.labels(labels[0], labels[1], "no-ready-endpoints")
            for gone in self._rejecting - rejecting.keys():
                self.kube_proxy.rejecting.remove(*gone)
            self._rejecting = set(rejecting)

    # -- flows ---------------------------------------------------------------------------

    def observe(self, node: str, flows: list[Flow]) -> None:
        """The events one node's conntrack sent."""
        with self._lock:
            for flow in flows:
                key = (node, flow.id)
                if flow.event == "new":
                    if key not in self._open and (counted := self._classify(node, flow)):
                        self._open[key] = counted
                elif flow.event == "destroy":
                    counted = self._open.pop(key, None)
                    if counted is not None:
                        self._close(counted, flow)

    def refresh(self, node: str, table: list[Flow]) -> None:
        """A dump of one node's table: open connections' bytes and answers so far."""
        with self._lock:
            for flow in table:
                counted = self._open.get((node, flow.id))
                if counted is not None:
                    self._count(counted, flow, final=False)

    def denied(self, logged: Logged) -> None:
        """A packet a NetworkPolicy rule dropped: a denied connection, unless it is a
        retransmit of one already counted."""
        parts = read_nflog_prefix(logged.prefix)
        if parts is None:
            return
        side, namespace, pod = parts
        now = time.monotonic()
        key = (logged.src, logged.dst)
        with self._lock:
            while self._denied and next(iter(self._denied.values())) < now - RETRANSMIT_WINDOW_S:
                self._denied.popitem(last=False)
            if key in self._denied:
                return
            self._denied[key] = now
        from mesh.model.policy import PolicyEngine

        state = self.state()
        if state is None:
            return
        dst_ip, _, port = logged.dst.rpartition(":")
        verdict = PolicyEngine.for_state(state).check(
            logged.src.rsplit(":", 1)[0], dst_ip, int(port), logged.protocol.upper()
        )
        if verdict.allowed:  # the rules were older than the state: count what dropped it
            self.policy.denied.labels(namespace, pod, "", side).inc()
            return
        # the connection's destination pod (an egress drop names the sender in its prefix)
        target_pod = next((p for p in state.pods if p.ip == dst_ip), None)
        if target_pod is not None:
            namespace, pod = target_pod.namespace, target_pod.name
        self.policy.count_denied(namespace, pod, verdict)

    def _classify(self, node: str, flow: Flow) -> _Open | None:
        src = _ip(flow.original_src)
        dst = _ip(flow.translated_dst)
        if src is None or dst is None:
            return None
        service = None
        if flow.dnat:
            service = self._service(flow)
            if service is None:
                return None  # a DNAT of no Service (not kube-proxy's)
            self.kube_proxy.connections.labels(*service).inc()
            self.kube_proxy.active.labels(service[0], service[1]).inc()
        overlay = None
        dst_node = next((n for n, net in self._pod_cidrs.items() if dst in net), None)
        from_here = src in self._pod_cidrs[node] if node in self._pod_cidrs else False
        if dst_node is not None and (from_here or service is not None):
            if dst_node != node:
                overlay = (node, dst_node)
                self.overlay.active.inc()
            if service is None:
                self.routing.pods.labels(node, "overlay" if overlay else "local").inc()
        egress = None
        if flow.snat and not flow.dnat and not any(dst in net for net in self._cluster):
            egress = (node, flow.translated_src.rsplit(":", 1)[0], flow.original_dst)
        if service is None and overlay is None and egress is None:
            return None
        return _Open(service, overlay, egress)

    def _service(self, flow: Flow) -> tuple[str, str, str] | None:
        rules = self.rules()
        if rules is None:
            return None
        vip, _, port = flow.original_dst.rpartition(":")
        rule = rules.rules.get((vip, int(port)))
        if rule is None:
            return None
        ip, _, eport = flow.translated_dst.rpartition(":")
        pod = next(
            (e.pod for e in rule.endpoints if e.ip == ip and e.port == int(eport)), "unknown"
        )
        return rule.namespace, rule.name, pod

    def _close(self, counted: _Open, flow: Flow) -> None:
        self._count(counted, flow, final=True)
        self._no_longer_open(counted)
        if counted.service is not None and not counted.answered:
            namespace, name, _ = counted.service
            self.kube_proxy.rejected.labels(namespace, name, "endpoint-unreachable").inc()

    def _no_longer_open(self, counted: _Open) -> None:
        """Out of the open-connection gauges (once: closing, then destroyed)."""
        if counted.closing:
            return
        counted.closing = True
        if counted.service is not None:
            self.kube_proxy.active.labels(*counted.service[:2]).dec()
        if counted.overlay is not None:
            self.overlay.active.dec()

    def _count(self, counted: _Open, flow: Flow, final: bool) -> None:
        """Add the bytes since the last count; settle the result once it is known."""
        if flow.state in CLOSING:
            self._no_longer_open(counted)
        total_in, total_out = flow.bytes_orig or 0, flow.bytes_reply or 0
        more_in = max(0, total_in - counted.bytes_in)
        more_out = max(0, total_out - counted.bytes_out)
        counted.bytes_in = max(total_in, counted.bytes_in)
        counted.bytes_out = max(total_out, counted.bytes_out)
        if counted.service is not None:
            if more_in:
                self.kube_proxy.bytes.labels(*counted.service, "in").inc(more_in)
            if more_out:
                self.kube_proxy.bytes.labels(*counted.service, "out").inc(more_out)
        if counted.overlay is not None and more_in + more_out:
            self.overlay.bytes.labels(*counted.overlay).inc(more_in + more_out)
        if counted.settled:
            return
        answered = bool(flow.status & IPS_SEEN_REPLY)
        if not (answered or final):
            return  # no reply yet: decided by a later dump, or when the entry goes
        counted.settled, counted.answered = True, answered
        result = "ok" if answered else "unreachable"
        if counted.overlay is not None:
            self.overlay.tunnels.labels(*counted.overlay, result).inc()
        if counted.egress is not None:
            self.routing.snat.labels(*counted.egress, result).inc()

    def open_ids(self) -> dict[str, set[int]]:
        """The conntrack ids of the open counted connections, by node: the entries a
        refresh reads from those nodes' tables. One a dump saw closing (``TIME_WAIT`` for
        two minutes, most of a busy table) is left to its destroy event's final count."""
        by_node: dict[str, set[int]] = {}
        with self._lock:
            for (node, flow_id), counted in self._open.items():
                if not counted.closing:
                    by_node.setdefault(node, set()).add(flow_id)
        return by_node


def _ip(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(address.rsplit(":", 1)[0])
    except ValueError:
        return None

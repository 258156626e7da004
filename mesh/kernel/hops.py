"""The kube-proxy hop on the kernel data path: from a conntrack entry and the sidecar spans.

The kernel does the DNAT; nothing in it knows about traces. The hop is rebuilt in the
control plane from three things that meet there:

1. **Flows.** kube-proxy (:mod:`mesh.kernel.kubeproxy`, a process of its own) watches each
   node's conntrack events and sends every NATed TCP connection here over a Unix datagram
   socket: the tuple as sent (``pod-ip:port -> VIP:port``) and the tuple of the reply
   (``endpoint-ip:port -> pod-ip:port``). A table dump at its start seeds the index with
   connections opened before it watched.
2. **The caller's ``sidecar-outbound`` span.** Envoy tags it with the upstream connection's
   local address (``hopscope.upstream.local_address``) and its destination
   (``hopscope.upstream.address``): together, the flow's original tuple.
3. **The callee's ``sidecar-inbound`` span**, a child of the caller's span (the trace
   context crosses the NAT unchanged), tagged with the address it accepted from
   (``hopscope.downstream.remote_address``): the flow's reply destination.

When the three match, a ``kube-proxy`` CLIENT span is added to the trace below the caller's
span, with the attributes of the userspace hop (``ARCHITECTURE.md``): Service, original
and translated tuples, endpoint pod, ``hopscope.conntrack.state``, plus the chains the
packet went through. It spans the callee's request; for the request that opened the
connection it starts when the kernel confirmed the connection. Its own time is what the
kernel and the wire added, microseconds, not a relay's milliseconds.

A plain client (curl with a ``traceparent``, no span of its own) gives no caller span: after
:data:`PLAIN_CLIENT_WAIT_S` the callee's span is joined to the flow whose reply goes to the
address it accepted from, and the hop hangs below the span id the client sent; the host's
forwarder reports which of those connections came through a LoadBalancer address.

Where it cannot join: a connection the watcher never saw (its ``NEW`` event lost to a full
socket buffer and gone from the table by the time of the dump) gives no hop; a request
whose callee never answered (no inbound span within :data:`JOIN_WAIT_S`) gets a hop that
spans the caller's attempt; a Service without endpoints is REJECTed before conntrack
confirms anything, so its hop is derived from the caller's refused connect, as on the
userspace path.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import os
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from prometheus_client import REGISTRY, CollectorRegistry, Counter

from mesh import addresses
from mesh.datapath_metrics import request_duration
from mesh.envoy.common import CONNECT_TIMEOUT_S
from mesh.hopattributes import DATAPLANE, UPSTREAM_FAILURE
from mesh.kernel.conntrack import (
    IPS_DST_NAT,
    IPS_SEEN_REPLY,
    Flow,
    Logged,
    rule_attributes,
    service_flow_attributes,
)
from mesh.kernel.iptables import NO_LOCAL_PREFIX
from mesh.kernel.policy import read_nflog_prefix
from mesh.kernel.renderer import ProxyNode
from mesh.kernel.topology import EGRESS_CHAIN, VXLAN_DEVICE, VXLAN_ID, VXLAN_PORT
from mesh.kubeproxy.rules import RuleSet
from mesh.model.types import ClusterState
from mesh.tracestore.otlp import add_key_values
from mesh.tracestore.tlsverdict import read_tls_error

log = logging.getLogger("kernel-hops")

JOIN_WAIT_S = 5.0
"""How long a caller's span waits for its flow and its callee's span before it is settled."""
FLOW_RETENTION_S = 60.0
"""How long a closed connection's flow stays joinable (spans arrive in batches, late)."""
MAX_FLOWS = 200_000
QUEUED_SLACK_NS = 250_000_000
"""How far a queued request's end may lie from its connection attempt's connect timeout."""
PLAIN_CLIENT_WAIT_S = 2.0
"""How long a callee's span waits for a caller span before it is taken as a plain client's
(curl, a script: a ``traceparent`` but no span of its own), joined to its flow alone."""
FORGET_EVERY_S = 1.0
"""How often closed flows past their retention and unclaimed callee spans are dropped."""
MAX_TUNNELS = 20_000
"""VXLAN packets kept for their outer tuple (one per connection that crossed nodes)."""
UPSTREAM_LOCAL = "hopscope.upstream.local_address"
UPSTREAM = "hopscope.upstream.address"
DOWNSTREAM_REMOTE = "hopscope.downstream.remote_address"
DOWNSTREAM_LOCAL = "hopscope.downstream.local_address"


@dataclass
class _NodeFlow:
    node: str
    flow: Flow
    closed_at: float | None = None
    answered: bool = False
    """A reply came (its destroy event has ``SEEN_REPLY``, or a callee span joined it):
    it cannot be the attempt a queued request timed out on."""
    plain_requests: int = 0
    """Requests of a plain client joined to it so far (the first one opened it)."""


@dataclass
class _Outbound:
    trace_id: bytes
    span_id: bytes
    start_ns: int
    end_ns: int
    local: str
    upstream: str
    failed: bool
    kind: str
    """``service`` (a ClusterIP: kube-proxy), ``pod`` (another node's pod: the overlay) or
    ``external`` (outside every cluster range: egress SNAT)."""
    arrived: float = field(default_factory=time.monotonic)
    answered: bool = False
    """The connect failed in TLS (Envoy's transport failure reason is a TLS error): the SYN
    was answered and the connection opened; the handshake above it failed."""
    opened: bool | None = None
    """Whether this request opened its connection, where the joiner knows it apart from
    the span's timing (a plain client: the first request a flow's callee answered)."""
    timed_out: bool = False
    """A sidecar's or the ingress's upstream connection failure (``UF``) with no transport
    failure reason: Envoy's connect timeout (a refused connect says ``delayed connect
    error``, a handshake its TLS error)."""
    queued: bool = False
    """Its hop's flow is another request's attempt, which this one queued on."""
    load_balancer: tuple[str, str] | None = None
    """For an outside client's call to a LoadBalancer address: that address and the node
    the load balancer (the host's forwarder) sent it to; ``upstream`` is the node's
    NodePort then."""


@dataclass(frozen=True)
class _Inbound:
    start_ns: int
    end_ns: int
    remote: str
    arrived: float = field(default_factory=time.monotonic)


class KernelHopJoiner:
    """Watches the nodes' conntrack tables and adds a kube-proxy hop to each trace."""

    def __init__(
        self,
        add_export: Callable[[ExportTraceServiceRequest], object],
        rules: Callable[[], RuleSet | None],
        flows_socket: Path,
        state: Callable[[], ClusterState | None] = lambda: None,
        registry: CollectorRegistry = REGISTRY,
    ) -> None:
        self.add_export = add_export
        self.rules = rules
        self.state = state
        self._flows: OrderedDict[tuple[str, str], _NodeFlow] = OrderedDict()
        """(original src, original dst) -> the newest flow with that tuple."""
        self._tunnels: OrderedDict[tuple[str, str], Logged] = OrderedDict()
        """(inner src, inner dst) -> the VXLAN packet that carried the connection's SYN."""
        self._attempts: dict[tuple[str, str], deque[_NodeFlow]] = {}
        """(client IP, original destination) -> its newest flows: a caller whose connect
        failed knows no local port, only when it tried."""
        self._denies: OrderedDict[str, tuple[str, Logged]] = OrderedDict()
        self._denies_by_ip: dict[str, deque[tuple[str, Logged]]] = {}
        """Source ``ip:port`` -> the node and packet its policy rules dropped."""
        self._pending: dict[tuple[bytes, bytes], _Outbound] = {}
        self._settled: OrderedDict[tuple[bytes, bytes], None] = OrderedDict()
        """Caller spans already given their hops (a re-sent export is not joined twice)."""
        self._inbound: dict[tuple[bytes, bytes], list[_Inbound]] = {}
        """(trace id, parent span id) -> inbound spans below that caller span."""
        self._by_callee_view: OrderedDict[str, _NodeFlow] = OrderedDict()
        """Source address as the callee saw it (the reply's destination) -> the newest DNAT
        flow with it: how a plain client's request finds its connection."""
        self._load_balanced: OrderedDict[str, tuple[str, str]] = OrderedDict()
        """Client ``ip:port`` -> the LoadBalancer address and node the forwarder sent it
        through (:class:`mesh.kernel.forward.LoadBalancerReport`)."""
        self._closed: deque[tuple[tuple[str, str], _NodeFlow]] = deque()
        """Flows as they closed, oldest first: what :meth:`_forget` drops once retained
        long enough, without walking every flow."""
        self._forgotten_at = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # Bound now, read once started: flows kube-proxy sends meanwhile wait in the buffer.
        flows_socket.unlink(missing_ok=True)
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self._socket.bind(str(flows_socket))
        self.flows_socket = flows_socket
        self._threads = [
            threading.Thread(target=self._receive, name="kernel-flows", daemon=True),
            threading.Thread(target=self._settle_loop, name="kernel-hops", daemon=True),
        ]
        self.hops = Counter(
            "hopscope_kernel_hops",
            "Hops written from the nodes' conntrack flows, by how they were joined",
            ["result"],
            registry=registry,
        )
        self.request_duration = request_duration(registry)
        """The relay's per-Service request histogram, timed by the kernel hop (its span)."""
        self.flows_received = Counter(
            "hopscope_kernel_flows_received",
            "Conntrack flows kube-proxy reported from the node namespaces",
            ["node", "event"],
            registry=registry,
        )

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._socket.close()
        self.flows_socket.unlink(missing_ok=True)

    def _settle_loop(self) -> None:
        while not self._stop.wait(0.1):
            self.settle(time.monotonic())

    def _receive(self) -> None:
        """Flows from kube-proxy: one JSON list of flow records per datagram."""
        while not self._stop.is_set():
            try:
                data = self._socket.recv(1 << 20)
            except OSError:
                return  # closed by stop()
            try:
                records = json.loads(data)
                for record in records:
                    node = record.pop("node")
                    kind = record.pop("kind", "flow")
                    if kind == "deny":
                        self.add_deny(node, Logged(**record))
                    elif kind == "vxlan":
                        self.add_tunnel(Logged(**record))
                    elif kind == "lb":
                        self.add_load_balanced(str(record["client"]), str(record["address"]), node)
                    else:
                        self.add_flow(node, Flow(**record))
            except (ValueError, TypeError, KeyError, AttributeError) as exc:
                log.warning("bad flow record", extra={"error": str(exc)})

    # -- inputs --------------------------------------------------------------------------

    def add_flow(self, node: str, flow: Flow) -> None:
        self.flows_received.labels(node, flow.event).inc()
        key = (flow.original_src, flow.original_dst)
        with self._lock:
            if flow.event == "destroy":
                known = self._flows.get(key)
                if known is not None and known.flow.id == flow.id:
                    known.closed_at = time.monotonic()
                    known.answered = known.answered or bool(flow.status & IPS_SEEN_REPLY)
                    self._closed.append((key, known))
                return
            if flow.protocol != "tcp" or not (flow.dnat or flow.snat):
                return
            self._flows[key] = known = _NodeFlow(node, flow)
            self._flows.move_to_end(key)
            if flow.dnat:
                self._by_callee_view[flow.translated_src] = known
                self._by_callee_view.move_to_end(flow.translated_src)
                while len(self._by_callee_view) > MAX_FLOWS:
                    self._by_callee_view.popitem(last=False)
            if flow.event == "new" and flow.dnat:
                attempt = (flow.original_src.rsplit(":", 1)[0], flow.original_dst)
                self._attempts.setdefault(attempt, deque(maxlen=32)).append(known)
            while len(self._flows) > MAX_FLOWS:
                self._flows.popitem(last=False)

    def _attempt_near(self, out: _Outbound) -> _NodeFlow | None:
        """For a caller whose connect failed: the flow its SYN opened meanwhile (DNATed to an
        endpoint that never answered), else the attempt already under way when the request
        came (Envoy queues a request on a connection that is still opening, and fails it
        with that connection)."""
        if not out.local.endswith(":0"):
            return None
        margin = 5_000_000
        attempts = self._attempts.get((out.local[:-2], out.upstream), ())
        for known in reversed(attempts):
            if out.start_ns - margin <= known.flow.seen_ns <= out.end_ns + margin:
                return known
        if not out.timed_out:
            return None  # refused, or a handshake: on the request's own connection
        # queued: it failed when that attempt's connect timeout ran out (the closest such
        # attempt that was never answered)
        timeout = CONNECT_TIMEOUT_S * 1_000_000_000
        candidates = [
            (abs(out.end_ns - known.flow.seen_ns - timeout), known)
            for known in attempts
            if known.flow.seen_ns < out.start_ns and not known.answered
        ]
        if not candidates:
            return None
        slack, closest = min(candidates, key=lambda c: c[0])
        if slack > QUEUED_SLACK_NS:
            return None
        out.queued = True
        return closest

    def _deny_near(self, out: _Outbound, rules: RuleSet | None) -> tuple[str, Logged] | None:
        """For a caller whose connect failed (no local port known): a packet dropped by
        policy from its pod, to the endpoint it was sent to, while it was trying."""
        if not out.local.endswith(":0"):
            return None
        wanted = {out.upstream}  # a pod, or a node's NodePort kube-proxy dropped
        if out.kind == "service" and rules is not None:
            vip, port = out.upstream.rsplit(":", 1)
            rule = rules.rules.get((vip, int(port)))
            wanted |= {e.address for e in rule.endpoints} if rule is not None else set()
        margin = 5_000_000
        for node, logged in reversed(self._denies_by_ip.get(out.local[:-2], ())):
            if (
                logged.dst in wanted
                and out.start_ns - margin <= logged.seen_ns <= out.end_ns + margin
            ):
                return node, logged
        return None

    def _load_balancer(self, upstream: str) -> tuple[str, str] | None:
        """For a LoadBalancer address: the node the load balancer sends to and that
        node's NodePort (:func:`~mesh.kernel.forward.load_balancer_target`), else None."""
        from mesh.kernel.forward import load_balancer_target

        state = self.state()
        found = load_balancer_target(state, upstream) if state is not None else None
        return (found[1], found[2]) if found is not None else None

    def add_load_balanced(self, client: str, address: str, node: str) -> None:
        """A connection the host's forwarder carried from a LoadBalancer ``address`` to
        ``node``'s NodePort, from ``client`` (its ``ip:port`` there): a plain client's
        trace gets the load-balancer hop from it (:meth:`_plain_clients`)."""
        with self._lock:
            self._load_balanced[client] = (address, node)
            self._load_balanced.move_to_end(client)
            while len(self._load_balanced) > MAX_FLOWS:
                self._load_balanced.popitem(last=False)

    def add_tunnel(self, logged: Logged) -> None:
        """A VXLAN packet that carried a connection's SYN: its outer tuple, by inner tuple."""
        if logged.inner_src is None or logged.inner_dst is None:
            return
        with self._lock:
            key = (logged.inner_src, logged.inner_dst)
            self._tunnels[key] = logged
            self._tunnels.move_to_end(key)
            while len(self._tunnels) > MAX_TUNNELS:
                self._tunnels.popitem(last=False)

    def add_deny(self, node: str, logged: Logged) -> None:
        """A packet a node's policy rules dropped, keyed by its source (a SYN: the caller's
        upstream connection)."""
        with self._lock:
            self._denies[logged.src] = (node, logged)
            ip = logged.src.rsplit(":", 1)[0]
            self._denies_by_ip.setdefault(ip, deque(maxlen=256)).append((node, logged))
            self._denies.move_to_end(logged.src)
            while len(self._denies) > MAX_FLOWS:
                self._denies.popitem(last=False)

    def on_spans(self, spans: list[tuple[bytes, Span]]) -> None:
        """Called with each stored export's spans (trace id, span)."""
        found = False
        for trace_id, span in spans:
            attrs = _string_attributes(span)
            hop = attrs.get("hopscope.hop")
            client = hop == "client" and span.kind == Span.SPAN_KIND_CLIENT
            caller = (
                client
                or hop == "sidecar-outbound"
                or (
                    hop == "ingress" and span.kind == Span.SPAN_KIND_CLIENT  # its upstream attempt
                )
            )
            if caller and attrs.get(UPSTREAM):
                load_balancer: tuple[str, str] | None = None
                lb_address = ""
                failed = span.status.code == Status.STATUS_CODE_ERROR
                local = attrs.get(UPSTREAM_LOCAL, "")
                upstream = attrs[UPSTREAM]
                if client:
                    # an external client (NodePort, LoadBalancer) through the host's
                    # forwarder, which keeps its port: its addresses inside the cluster
                    if not local and failed and attrs.get("client.address"):
                        local = f"{attrs['client.address']}:0"
                    local, upstream = (
                        addresses.cluster_side(local),
                        addresses.cluster_side(upstream),
                    )
                    load_balancer = self._load_balancer(upstream)
                    if load_balancer is not None:
                        lb_address = upstream
                        upstream = load_balancer[1]
                elif not local and failed:
                    # the connect failed, so Envoy has no local address: the pod's, port 0
                    listener = attrs.get(DOWNSTREAM_LOCAL, "")
                    local = f"{listener.rsplit(':', 1)[0]}:0" if listener else ""
                kind = _destination_kind(local, upstream) if local else None
                if kind is None or (kind == "pod-local" and not failed):
                    # the bridge alone carried it: no hop, unless policy dropped it; its
                    # callee's span is not a plain client's (_plain_clients)
                    with self._lock:
                        self._mark_settled((trace_id, span.span_id))
                        self._inbound.pop((trace_id, span.span_id), None)
                    continue
                out = _Outbound(
                    trace_id, span.span_id, span.start_time_unix_nano, span.end_time_unix_nano,
                    local, upstream, failed, kind,
                )  # fmt: skip
                if client and load_balancer is not None:
                    out.load_balancer = (lb_address, load_balancer[0])
                if failed:
                    failure = attrs.get(UPSTREAM_FAILURE, "")
                    flags = attrs.get("response_flags", "").split(",")
                    out.answered = read_tls_error(failure) is not None
                    out.timed_out = not client and "UF" in flags and failure in ("", "-")
                key = (trace_id, span.span_id)
                with self._lock:
                    if key in self._pending or key in self._settled:
                        continue  # an export sent twice (an exporter's retry)
                    self._pending[key] = out
                found = True
            elif span.parent_span_id and (remote := _callee_remote(hop, attrs, span)):
                inbound = _Inbound(span.start_time_unix_nano, span.end_time_unix_nano, remote)
                key = (trace_id, span.parent_span_id)
                with self._lock:
                    if key in self._settled:
                        continue  # its caller was settled first: no hop waits for it
                    self._inbound.setdefault(key, []).append(inbound)
                found = True
        if found:
            self.settle(time.monotonic(), only_complete=True)

    # -- joining -------------------------------------------------------------------------

    def settle(self, now: float, only_complete: bool = False) -> None:
        """Write the hops whose flow and callee span are known; give up waiting on the
        others after :data:`JOIN_WAIT_S`."""
        rules = self.rules()
        ready: list[
            tuple[_Outbound, _NodeFlow | None, _Inbound | None, tuple[str, Logged] | None]
        ] = []
        with self._lock:
            for key, out in list(self._pending.items()):
                flow = self._flows.get((out.local, out.upstream))
                inbound = None
                if out.kind != "external":
                    remote = flow.flow.translated_src if flow is not None else out.local
                    inbound = next(
                        (i for i in self._inbound.get(key, []) if i.remote == remote), None
                    )
                deny = None
                if out.failed:
                    deny = self._denies.get(out.local) or self._deny_near(out, rules)
                    if flow is None and deny is None and out.kind == "service":
                        flow = self._attempt_near(out)
                complete = (
                    deny is not None
                    or (out.failed and flow is not None and out.local.endswith(":0"))
                    or {
                        "service": flow is not None and inbound is not None,
                        "pod": inbound is not None,
                        "pod-local": False,  # only a policy drop makes a hop of it
                        "external": flow is not None,
                    }[out.kind]
                )
                expired = now - out.arrived > JOIN_WAIT_S
                if complete or (expired and not only_complete):
                    del self._pending[key]
                    self._mark_settled(key)
                    self._inbound.pop(key, None)
                    if flow is not None and inbound is not None:
                        flow.answered = True  # a callee took it: no queued request's attempt
                    ready.append((out, flow, inbound, deny))
            if not only_complete:
                ready.extend(self._plain_clients(now))
            if not only_complete and now - self._forgotten_at >= FORGET_EVERY_S:
                self._forgotten_at = now
                self._forget(now)
        if not ready or rules is None:
            return
        request = ExportTraceServiceRequest()
        by_node: dict[tuple[str, str], Any] = {}
        for out, flow, inbound, deny in ready:
            if deny is not None:
                spans, node, result = self._denied(out, deny, rules)
            else:
                spans, node, result = self._hops(out, flow, inbound, rules)
            self.hops.labels(result).inc()
            if not spans:
                continue
            if (node, out.kind) not in by_node:
                rs = request.resource_spans.add()
                for k, v in (
                    ("service.name", "kube-proxy" if out.kind == "service" else "cni"),
                    ("hopscope.component", "kube-proxy" if out.kind == "service" else "cni"),
                    ("hopscope.dataplane", "kernel"),
                    ("k8s.node.name", node),
                ):
                    rs.resource.attributes.add(key=k, value=AnyValue(string_value=v))
                by_node[node, out.kind] = rs.scope_spans.add()
                by_node[node, out.kind].scope.name = "hopscope.kernel"
            by_node[node, out.kind].spans.extend(spans)
        if by_node:
            self.add_export(request)

    def _mark_settled(self, key: tuple[bytes, bytes]) -> None:
        """Remember a caller span as handled (the lock held); the oldest go past
        :data:`MAX_FLOWS`."""
        self._settled[key] = None
        while len(self._settled) > MAX_FLOWS:
            self._settled.popitem(last=False)

    def _plain_clients(
        self, now: float
    ) -> list[tuple[_Outbound, _NodeFlow | None, _Inbound | None, None]]:
        """Callee spans below a caller span that never came (:data:`PLAIN_CLIENT_WAIT_S`)
        whose connection kube-proxy DNATed: a client that sends ``traceparent`` but exports
        no span. Each gets the hop from its flow alone, below the span id it was sent (the
        journey nests the callee under the hop by the pod address it was DNATed to). The
        first request a flow carries opened it; later ones rode it (``established``).
        Called with the lock held."""
        found: list[tuple[_Outbound, _NodeFlow | None, _Inbound | None, None]] = []
        for key, spans in list(self._inbound.items()):
            if key in self._pending or key in self._settled:
                continue
            if now - min(i.arrived for i in spans) < PLAIN_CLIENT_WAIT_S:
                continue
            joined = [(i, self._by_callee_view.get(i.remote)) for i in spans]
            if not any(known is not None for _, known in joined):
                continue  # no NAT on the way (a pod's own call): nothing of kube-proxy's
            del self._inbound[key]
            self._mark_settled(key)
            for inbound, known in sorted(joined, key=lambda j: j[0].start_ns):
                if known is None:
                    continue
                flow = known.flow
                opened = known.plain_requests == 0
                known.plain_requests += 1
                known.answered = True
                start = min(flow.seen_ns, inbound.start_ns) if opened else inbound.start_ns
                out = _Outbound(
                    key[0], key[1], start, inbound.end_ns, flow.original_src,
                    flow.original_dst, False, "service", opened=opened,
                )  # fmt: skip
                out.load_balancer = self._load_balanced.get(flow.original_src)
                found.append((out, known, inbound, None))
        return found

    def _forget(self, now: float) -> None:
        """Drop closed flows past their retention and callee spans nobody waits for."""
        while self._closed and now - (self._closed[0][1].closed_at or now) > FLOW_RETENTION_S:
            key, known = self._closed.popleft()
            if self._flows.get(key) is known:  # not replaced by a newer flow on that tuple
                del self._flows[key]
            reply = known.flow.translated_src
            if self._by_callee_view.get(reply) is known:
                del self._by_callee_view[reply]
        stale = now - 2 * JOIN_WAIT_S
        for attempt, recent in list(self._attempts.items()):
            closed = recent[-1].closed_at
            if closed is not None and now - closed > FLOW_RETENTION_S:
                del self._attempts[attempt]
        for span_key, spans in list(self._inbound.items()):
            if span_key not in self._pending and spans[-1].arrived < stale:
                del self._inbound[span_key]

    def _hops(
        self, out: _Outbound, known: _NodeFlow | None, inbound: _Inbound | None, rules: RuleSet
    ) -> tuple[list[Span], str, str]:
        """The spans one caller's request gets, the node they belong to, and the outcome."""
        if out.kind == "pod":
            return self._pod_to_pod(out, inbound)
        if out.kind == "pod-local":
            return [], "", "no_flow"
        if out.kind == "external":
            return self._egress(out, known)
        if known is None:
            # A Service without endpoints is REJECTed before conntrack confirms anything;
            # the journey derives that hop from the caller's refused connect, as on the
            # userspace path (mesh.tracestore.hops._with_refusals). Count it apart.
            vip, port = out.upstream.rsplit(":", 1)
            rule = rules.rules.get((vip, int(port)))
            refused = out.failed and rule is not None and not rule.ready_endpoints
            return [], "", "rejected" if refused else "no_flow"
        flow = known.flow
        proxy_node = ProxyNode(known.node, cluster_cidr=addresses.POD_NETWORK_CIDR)
        attrs = service_flow_attributes(flow, rules, proxy_node)
        if attrs is None:
            return [], known.node, "no_service"
        opened = (
            out.opened
            if out.opened is not None
            else out.start_ns - 1_000_000 <= flow.seen_ns <= out.end_ns
        )
        attrs["hopscope.conntrack.state"] = "new" if opened else "established"
        attrs["k8s.node.name"] = known.node
        attrs[DATAPLANE] = "kernel"
        unreachable = (
            out.failed and inbound is None and out.local.endswith(":0") and not out.answered
        )
        if inbound is not None:
            start = inbound.start_ns
            if opened:  # the connection's first packet went through the node before
                start = max(out.start_ns, min(flow.seen_ns, inbound.start_ns))
            end = max(inbound.end_ns, start)
            result = "joined"
        elif out.answered and inbound is None:
            # the connection opened (kube-proxy's part done); the TLS handshake above it failed
            attrs["hopscope.decision"] = "DNAT; the connection opened, its TLS handshake failed"
            start, end, result = max(out.start_ns, flow.seen_ns), out.end_ns, "handshake_failed"
        elif unreachable:
            # DNATed, then nothing answered: a pod gone while the rules still name it
            attrs["error.type"] = "endpoint-unreachable"
            attrs["hopscope.conntrack.state"] = "new"  # SYN_SENT, whoever's request opened it
            start, end, result = max(out.start_ns, flow.seen_ns), out.end_ns, "unreachable"
        else:
            start, end, result = out.start_ns, out.end_ns, "no_callee_span"
        name = f"kube-proxy {attrs['k8s.namespace.name']}/{attrs['k8s.service.name']}"
        hop = _span(
            out, name, start, end, attrs, out.failed and inbound is None and not out.answered
        )
        self.request_duration.labels(
            attrs["k8s.namespace.name"], attrs["k8s.service.name"]
        ).observe((end - start) / 1e9, {"trace_id": out.trace_id.hex()})
        if unreachable:
            hop.status.message = (
                f"DNAT to {flow.translated_dst} "
                f"({attrs.get('hopscope.endpoint.pod') or 'no pod has that address now'}): "
                "the SYN was never answered"
            )
            if out.queued:
                waited = (out.start_ns - flow.seen_ns) / 1e6
                hop.status.message += (
                    f" (this request queued on a connection attempt begun {waited:.0f} ms "
                    "before it)"
                )
        spans = [hop]
        if out.load_balancer is not None:
            lb = self._load_balancer_hop(out, rules, hop, start, end)
            if lb is not None:
                hop.parent_span_id = lb.span_id
                spans.insert(0, lb)
        dst_node = str(attrs.get("hopscope.endpoint.node") or "")
        if dst_node and dst_node != known.node:
            overlay = self._overlay(
                out, hop.span_id, known.node, dst_node, flow.translated_src,
                flow.translated_dst, str(attrs.get("hopscope.endpoint.pod", "")), start, end,
            )  # fmt: skip
            spans.append(overlay)
        return spans, known.node, result

    def _load_balancer_hop(
        self, out: _Outbound, rules: RuleSet, hop: Span, start: int, end: int
    ) -> Span | None:
        """The cloud load balancer in front of a NodePort: the host's forwarder sent the
        outside client's connection to a node's NodePort (the hop below it)."""
        assert out.load_balancer is not None
        address, node = out.load_balancer
        ip, _, port = address.rpartition(":")
        rule = rules.rules.get((ip, int(port)))
        if rule is None:
            return None
        local = any(e.node == node and e.ready for e in rule.endpoints)
        attrs = {
            **rule_attributes(rule),
            "hopscope.hop": "load-balancer",
            "hopscope.nat.original.src": out.local,
            "hopscope.nat.original.dst": address,
            "hopscope.nat.translated.dst": out.upstream,
            "hopscope.lb.node": node,
            "hopscope.decision": (
                f"to {node}'s NodePort {out.upstream}"
                + (
                    " (its health check node port reports a local endpoint)"
                    if rule.external_traffic_policy == "Local" and local
                    else ""
                )
            ),
            "network.peer.address": out.local.rsplit(":", 1)[0],
            "server.address": ip,
            "server.port": int(port),
            "peer.service": rule.name,
            DATAPLANE: "kernel",
        }
        name = f"load-balancer {rule.namespace}/{rule.name}"
        return _span(out, name, min(start, hop.start_time_unix_nano), end, attrs, out.failed)

    def _pod_to_pod(self, out: _Outbound, inbound: _Inbound | None) -> tuple[list[Span], str, str]:
        """A pod's call to another node's pod (no Service): only the overlay carried it."""
        src_node = addresses.node_for_ip(out.local.rsplit(":", 1)[0]) or ""
        dst_node = addresses.node_for_ip(out.upstream.rsplit(":", 1)[0]) or ""
        if inbound is None:
            start, end, result = out.start_ns, out.end_ns, "no_callee_span"
        else:
            start, end, result = inbound.start_ns, inbound.end_ns, "joined"
        overlay = self._overlay(
            out, out.span_id, src_node, dst_node, out.local, out.upstream, "", start, end
        )
        return [overlay], src_node, result

    def _overlay(
        self, out: _Outbound, parent: bytes, src_node: str, dst_node: str, inner_src: str,
        inner_dst: str, pod: str, start: int, end: int,
    ) -> Span:  # fmt: skip
        """The ``cni-overlay`` hop: the packet crossed nodes inside VXLAN. The outer source
        port is the kernel's hash of the inner flow: known from the logged packet that
        carried the connection's SYN, else left out (the node address alone)."""
        outer_src = addresses.NODE_IPS.get(src_node, "")
        outer_dst = f"{addresses.NODE_IPS.get(dst_node, '')}:{VXLAN_PORT}"
        with self._lock:
            carried = self._tunnels.get((inner_src, inner_dst))
        if carried is not None:
            outer_src, outer_dst = carried.src, carried.dst
        attrs: dict[str, Any] = {
            "hopscope.hop": "cni-overlay",
            "k8s.node.name": src_node,
            "hopscope.overlay.backend": "vxlan",
            "hopscope.overlay.device": VXLAN_DEVICE,
            "hopscope.overlay.vni": VXLAN_ID,
            "hopscope.overlay.src_node": src_node,
            "hopscope.overlay.dst_node": dst_node,
            "hopscope.overlay.outer.src": outer_src,
            "hopscope.overlay.outer.dst": outer_dst,
            "hopscope.overlay.delay_ms": self._overlay_delay_ms(),
            "hopscope.nat.original.src": inner_src,
            "hopscope.nat.original.dst": inner_dst,
            "hopscope.nat.translated.src": outer_src,
            "hopscope.nat.translated.dst": outer_dst,
            "network.peer.address": inner_src.rsplit(":", 1)[0],
            DATAPLANE: "kernel",
        }
        if pod:
            attrs["hopscope.endpoint.pod"] = pod
        name = f"cni-overlay {src_node} -> {dst_node} vni {VXLAN_ID}"
        span = _span(out, name, start, end, attrs, False, kind=Span.SPAN_KIND_INTERNAL)
        span.parent_span_id = parent
        return span

    def _egress(self, out: _Outbound, known: _NodeFlow | None) -> tuple[list[Span], str, str]:
        """A pod's call outside the cluster: the node's SNAT rule rewrote its source."""
        if known is None or not known.flow.snat:
            return [], "", "no_flow"
        flow = known.flow
        attrs: dict[str, Any] = {
            "hopscope.hop": "egress-snat",
            "k8s.node.name": known.node,
            "hopscope.nat.original.src": flow.original_src,
            "hopscope.nat.original.dst": flow.original_dst,
            "hopscope.nat.translated.src": flow.translated_src,
            "hopscope.nat.translated.dst": flow.translated_dst,
            "hopscope.nat.snat": True,
            "hopscope.egress.ip": flow.translated_src.rsplit(":", 1)[0],
            "hopscope.rule.chains": ["POSTROUTING", EGRESS_CHAIN],
            "hopscope.conntrack.id": flow.id,
            "network.peer.address": flow.original_src.rsplit(":", 1)[0],
            "server.address": flow.original_dst.rsplit(":", 1)[0],
            "server.port": int(flow.original_dst.rsplit(":", 1)[1]),
            DATAPLANE: "kernel",
        }
        name = f"egress-snat {known.node} -> {flow.original_dst}"
        span = _span(
            out, name, out.start_ns, out.end_ns, attrs, out.failed, Span.SPAN_KIND_INTERNAL
        )
        return [span], known.node, "joined"

    def _denied(
        self, out: _Outbound, deny: tuple[str, Logged], rules: RuleSet
    ) -> tuple[list[Span], str, str]:
        """The caller's connection was dropped by a node's NetworkPolicy rules: the
        kube-proxy hop that translated it (a Service call), then the policy hop."""
        node, logged = deny
        if logged.prefix.startswith(NO_LOCAL_PREFIX):
            return self._no_local_endpoints(out, node, logged, rules)
        spans: list[Span] = []
        parent = out.span_id
        if out.kind == "service":
            flow = Flow(
                id=0, event="new", protocol=logged.protocol, original_src=logged.src,
                original_dst=out.upstream, reply_src=logged.dst, reply_dst=logged.src,
                status=IPS_DST_NAT, seen_ns=logged.seen_ns,
            )  # fmt: skip
            proxy_node = ProxyNode(node, cluster_cidr=addresses.POD_NETWORK_CIDR)
            attrs = service_flow_attributes(flow, rules, proxy_node)
            if attrs is not None:
                attrs.pop("hopscope.conntrack.id", None)
                attrs["hopscope.conntrack.state"] = "new"
                attrs["hopscope.decision"] = "DNAT; the SYN was then dropped, never confirmed"
                attrs.update(self._verdict(logged))  # as the relay's hop carries it
                attrs["k8s.node.name"] = node
                attrs[DATAPLANE] = "kernel"
                name = f"kube-proxy {attrs['k8s.namespace.name']}/{attrs['k8s.service.name']}"
                hop = _span(out, name, out.start_ns, out.end_ns, attrs, False)
                spans.append(hop)
                parent = hop.span_id
        verdict = self._verdict(logged)
        dst_ip, port = logged.dst.rsplit(":", 1)
        attrs = {
            "hopscope.hop": "network-policy",
            "k8s.node.name": node,
            "hopscope.nat.original.src": logged.src,
            "hopscope.nat.original.dst": logged.dst,
            "network.peer.address": logged.src.rsplit(":", 1)[0],
            "server.address": dst_ip,
            "server.port": int(port),
            "error.type": "network-policy-denied",
            "hopscope.policy.nflog_prefix": logged.prefix,
            "hopscope.rule.chains": ["FORWARD", "HOPSCOPE-POLICY"],
            DATAPLANE: "kernel",
            **verdict,
        }
        pod = self._pod_at(dst_ip)
        if pod:
            attrs["hopscope.endpoint.pod"] = pod
        name = f"network-policy deny {logged.src} -> {logged.dst}"
        span = _span(out, name, out.start_ns, out.end_ns, attrs, True, Span.SPAN_KIND_INTERNAL)
        span.parent_span_id = parent
        span.status.message = str(verdict.get("hopscope.policy.reason", "denied"))
        return [*spans, span], node, "denied"

    def _no_local_endpoints(
        self, out: _Outbound, node: str, logged: Logged, rules: RuleSet
    ) -> tuple[list[Span], str, str]:
        """External traffic to a node without a local endpoint of an
        ``externalTrafficPolicy: Local`` Service: kube-proxy's filter rule dropped the SYN."""
        ip, port = logged.dst.rsplit(":", 1)
        rule = rules.rules.get((ip, int(port)))
        if rule is None:
            return [], node, "no_service"
        attrs: dict[str, Any] = {
            **rule_attributes(rule),
            "k8s.node.name": node,
            "hopscope.nat.original.src": logged.src,
            "hopscope.nat.original.dst": logged.dst,
            "network.peer.address": logged.src.rsplit(":", 1)[0],
            "network.protocol.name": logged.protocol,
            "server.address": ip,
            "server.port": int(port),
            "error.type": "no-local-endpoints",
            "hopscope.decision": f"{node} has no ready local endpoint: DROP",
            "hopscope.rule.chains": ["INPUT", "KUBE-EXTERNAL-SERVICES"],
            "hopscope.rule.nflog_prefix": logged.prefix,
            DATAPLANE: "kernel",
        }
        name = f"kube-proxy {rule.namespace}/{rule.name} DROP (no local endpoints)"
        span = _span(out, name, out.start_ns, out.end_ns, attrs, True)
        span.status.message = (
            f"Service {rule.namespace}/{rule.name} has no local endpoints on {node} "
            "(externalTrafficPolicy: Local): the SYN was dropped"
        )
        return [span], node, "dropped"

    def _verdict(self, logged: Logged) -> dict[str, Any]:
        """The model's verdict for the dropped packet: which policies, which side, why."""
        from mesh.model.policy import PolicyEngine

        state = self.state()
        if state is None:
            return {"hopscope.policy.verdict": "deny"}
        dst_ip, port = logged.dst.rsplit(":", 1)
        verdict = PolicyEngine.for_state(state).check(
            logged.src.rsplit(":", 1)[0], dst_ip, int(port), logged.protocol.upper()
        )
        attrs = verdict.attributes()
        attrs["hopscope.policy.verdict"] = "deny"  # the kernel dropped it
        if verdict.allowed:
            # the node's rules were behind the objects (a pod just created, a policy just
            # changed): the drop is the kernel's, the side is in the rule's NFLOG prefix;
            # the policies the model names now are those that allow it, not the drop's
            attrs.pop("hopscope.policy.names", None)
            parts = read_nflog_prefix(logged.prefix)
            if parts is not None:
                attrs["hopscope.policy.side"] = parts[0]
            attrs["hopscope.policy.reason"] = (
                "the node's policy rules had not caught up with the cluster yet "
                "(the policies allow this connection now)"
            )
        return attrs

    def _overlay_delay_ms(self) -> float:
        """The delay the CNI ConfigMap puts on the VXLAN devices (netem, by kube-proxy)."""
        state = self.state()
        return state.network.overlay_delay_ms if state is not None else 0.0

    def _pod_at(self, ip: str) -> str:
        state = self.state()
        for pod in state.pods if state is not None else []:
            if pod.ip == ip:
                return pod.name
        return ""


def _span(
    out: _Outbound,
    name: str,
    start: int,
    end: int,
    attrs: dict[str, Any],
    error: bool,
    kind: Any = Span.SPAN_KIND_CLIENT,
) -> Span:
    span = Span(
        trace_id=out.trace_id,
        span_id=os.urandom(8),
        parent_span_id=out.span_id,
        name=name,
        kind=kind,
        start_time_unix_nano=start,
        end_time_unix_nano=end,
    )
    add_key_values(span.attributes, attrs)
    if error:
        span.status.code = Status.STATUS_CODE_ERROR
    return span


def _callee_remote(hop: str | None, attrs: dict[str, str], span: Span) -> str | None:
    """The address a callee accepted its connection from: a sidecar's, or (a pod without
    a sidecar) its app's peer."""
    if hop == "sidecar-inbound":
        return attrs.get(DOWNSTREAM_REMOTE) or None
    if hop != "app" or span.kind != Span.SPAN_KIND_SERVER:
        return None
    peer = attrs.get("network.peer.address", "")
    if not peer or peer == attrs.get("server.address"):
        return None  # no peer, or the pod's own sidecar: nothing the kernel translated
    port = next((kv.value.int_value for kv in span.attributes if kv.key == "network.peer.port"), 0)
    return f"{peer}:{port}" if port else None


_JOIN_KEYS = frozenset(
    {
        "hopscope.hop",
        UPSTREAM,
        UPSTREAM_LOCAL,
        UPSTREAM_FAILURE,
        DOWNSTREAM_LOCAL,
        DOWNSTREAM_REMOTE,
        "client.address",
        "response_flags",
        "network.peer.address",
        "server.address",
    }
)
"""The string attributes :meth:`KernelHopJoiner.on_spans` reads of a span."""


def _string_attributes(span: Span) -> dict[str, str]:
    """The attributes the joiner reads (:data:`_JOIN_KEYS`) as strings; a value of another
    type reads as "", as if absent. Every stored span passes here: reading only these
    names' values halves its cost."""
    return {kv.key: kv.value.string_value for kv in span.attributes if kv.key in _JOIN_KEYS}


_SERVICES = ipaddress.ip_network(addresses.SERVICE_CIDR)
_PODS = ipaddress.ip_network(addresses.POD_NETWORK_CIDR)
_CLUSTER = [ipaddress.ip_network(c) for c in addresses.CLUSTER_CIDRS]
_NODE_IPS = frozenset(addresses.NODE_IPS.values())


def _destination_kind(local: str, upstream: str) -> str | None:
    """What the kernel does to a caller's connection from ``local`` to ``upstream``:
    ``service`` (DNAT), ``pod`` (VXLAN to another node), ``pod-local`` (the node's bridge:
    only its policy rules can say anything about it), ``external`` (SNAT), or None."""
    return _address_kind(local.rsplit(":", 1)[0], upstream.rsplit(":", 1)[0])


@functools.lru_cache(maxsize=4096)
def _address_kind(local_ip: str, upstream_ip: str) -> str | None:
    """:func:`_destination_kind` by addresses (a pair of pods or a pod and a Service
    repeats: parsed once)."""
    try:
        src = ipaddress.ip_address(local_ip)
        dst = ipaddress.ip_address(upstream_ip)
    except ValueError:
        return None
    if dst in _SERVICES or str(dst) in _NODE_IPS:
        return "service"  # a ClusterIP, or a NodePort
    if dst in _PODS:
        src_node = addresses.node_for_ip(str(src))
        dst_node = addresses.node_for_ip(str(dst))
        if not (src_node and dst_node):
            return None
        return "pod" if src_node != dst_node else "pod-local"
    if src in _PODS and not any(dst in net for net in _CLUSTER):
        return "external"
    return None

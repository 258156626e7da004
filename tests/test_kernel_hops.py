"""The kernel hop joiner: conntrack flows + the sidecars' spans -> kube-proxy, overlay and
policy hops in the trace store, read back through the journey a user sees.

Flows and spans are given as the kernel and Envoy produce them (the tuples of a real DNAT,
the attributes Envoy's span tags set); the hops are checked in a real ``TraceStore``.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from prometheus_client import CollectorRegistry

from mesh.kernel.conntrack import IPS_DST_NAT, IPS_SEEN_REPLY, IPS_SRC_NAT, Flow, Logged
from mesh.kernel.hops import (
    FLOW_RETENTION_S,
    JOIN_WAIT_S,
    PLAIN_CLIENT_WAIT_S,
    KernelHopJoiner,
)
from mesh.kubeproxy.rules import EndpointTarget, RuleSet, ServiceRule
from mesh.model.types import ClusterState
from mesh.tracestore.hops import trace_view
from mesh.tracestore.otlp import key_values
from mesh.tracestore.store import TraceStore

VIP, CALLER, ENDPOINT = "127.96.0.12:8080", "127.244.1.2:40000", "127.244.2.3:8080"
"""The local plan's addresses (the joiner reads whichever plan the process has)."""


def _rules() -> RuleSet:
    ep = EndpointTarget("127.244.2.3", 8080, "catalog-b", "node-b", True, True, False)
    rule = ServiceRule(
        "shop", "catalog", "http", "127.96.0.12", 8080, "TCP", "ClusterIP", None, (ep,)
    )
    return RuleSet(1, {rule.key: rule}, {})


def _export(trace_id: bytes, spans: list[tuple[Span, dict[str, Any]]]) -> ExportTraceServiceRequest:
    request = ExportTraceServiceRequest()
    scope = request.resource_spans.add().scope_spans.add()
    for span, attrs in spans:
        span.trace_id = trace_id
        span.attributes.extend(key_values(attrs))
        scope.spans.append(span)
    return request


def _outbound(
    start: int, failed: bool = False, local: str | None = CALLER
) -> tuple[Span, dict[str, Any]]:
    span = Span(
        span_id=b"\x01" * 8, parent_span_id=b"\x09" * 8, name="out", kind=Span.SPAN_KIND_CLIENT
    )
    span.start_time_unix_nano, span.end_time_unix_nano = start, start + 10_000_000
    if failed:
        span.status.code = Status.STATUS_CODE_ERROR
    attrs = {
        "hopscope.hop": "sidecar-outbound",
        "hopscope.upstream.address": VIP,
        "hopscope.downstream.local_address": "127.244.1.2:15001",
        "response_flags": "UF" if failed else "-",  # an upstream connection failure
    }
    if local:
        attrs["hopscope.upstream.local_address"] = local
    return span, attrs


def _inbound(start: int) -> tuple[Span, dict[str, Any]]:
    span = Span(
        span_id=b"\x02" * 8, parent_span_id=b"\x01" * 8, name="in", kind=Span.SPAN_KIND_SERVER
    )
    span.start_time_unix_nano, span.end_time_unix_nano = start, start + 8_000_000
    attrs = {
        "hopscope.hop": "sidecar-inbound",
        "hopscope.downstream.remote_address": CALLER,
        "hopscope.downstream.local_address": ENDPOINT,
        "k8s.pod.name": "catalog-b",
    }
    return span, attrs


def _joiner(tmp_path: Path) -> tuple[KernelHopJoiner, TraceStore]:
    store = TraceStore(registry=CollectorRegistry())
    joiner = KernelHopJoiner(
        store.add_export, _rules, tmp_path / "flows.sock", registry=CollectorRegistry()
    )
    store.span_hooks.append(joiner.on_spans)
    return joiner, store


def _flow(seen_ns: int) -> Flow:
    return Flow(1, "new", "tcp", CALLER, VIP, ENDPOINT, CALLER, IPS_DST_NAT, seen_ns)


def test_a_dnat_flow_becomes_the_kube_proxy_hop_with_its_overlay(tmp_path: Path) -> None:
    joiner, store = _joiner(tmp_path)
    trace_id = os.urandom(16)
    t0 = time.time_ns()
    joiner.add_flow("node-a", _flow(t0 + 500_000))
    store.add_export(_export(trace_id, [_outbound(t0), _inbound(t0 + 1_000_000)]))
    view = store.get(trace_id.hex())
    assert view is not None
    spans = {s.attributes.get("hopscope.hop"): s for s in view}
    proxy, overlay = spans["kube-proxy"], spans["cni-overlay"]
    assert proxy.parent_span_id == "01" * 8
    assert proxy.attributes["hopscope.conntrack.state"] == "new"
    assert proxy.attributes["hopscope.nat.translated.dst"] == ENDPOINT
    assert proxy.attributes["hopscope.endpoint.pod"] == "catalog-b"
    # it starts when conntrack confirmed the connection and spans the callee's request
    assert proxy.start_ns == t0 + 500_000 and proxy.end_ns == t0 + 9_000_000
    assert overlay.parent_span_id == proxy.span_id
    assert overlay.attributes["hopscope.overlay.outer.dst"] == "127.10.0.2:8472"
    joiner.stop()


def test_a_later_request_on_the_connection_is_established(tmp_path: Path) -> None:
    joiner, store = _joiner(tmp_path)
    trace_id = os.urandom(16)
    t0 = time.time_ns()
    joiner.add_flow("node-a", _flow(t0 - 5_000_000_000))  # opened by an earlier request
    store.add_export(_export(trace_id, [_outbound(t0), _inbound(t0 + 1_000_000)]))
    [proxy] = [
        s
        for s in store.get(trace_id.hex()) or []
        if s.attributes.get("hopscope.hop") == "kube-proxy"
    ]
    assert proxy.attributes["hopscope.conntrack.state"] == "established"
    assert proxy.start_ns == t0 + 1_000_000  # nothing of its own: the kernel's DNAT
    joiner.stop()


def test_a_policy_drop_is_matched_to_the_failed_connect(tmp_path: Path) -> None:
    joiner, store = _joiner(tmp_path)
    trace_id = os.urandom(16)
    t0 = time.time_ns()
    joiner.add_deny(
        "node-b",
        Logged("deny ingress shop/catalog-b", "tcp", "127.244.1.2:41000", ENDPOINT, t0 + 100),
    )
    store.add_export(_export(trace_id, [_outbound(t0, failed=True, local=None)]))
    hops = {s.attributes.get("hopscope.hop"): s for s in store.get(trace_id.hex()) or []}
    deny = hops["network-policy"]
    assert deny.parent_span_id == hops["kube-proxy"].span_id
    assert deny.attributes["hopscope.nat.original.src"] == "127.244.1.2:41000"
    assert deny.attributes["hopscope.policy.verdict"] == "deny"
    assert hops["kube-proxy"].attributes["hopscope.nat.translated.dst"] == ENDPOINT
    joiner.stop()


def test_a_drop_by_rules_behind_the_objects_says_so(tmp_path: Path) -> None:
    """The node's rules dropped what the policies (now) allow: a pod just created, its
    address not yet in the rules. The trace names the side and why, not empty fields."""
    store = TraceStore(registry=CollectorRegistry())
    joiner = KernelHopJoiner(
        store.add_export,
        _rules,
        tmp_path / "flows.sock",
        state=ClusterState,
        registry=CollectorRegistry(),
    )
    store.span_hooks.append(joiner.on_spans)
    trace_id, t0 = os.urandom(16), time.time_ns()
    joiner.add_deny(
        "node-a",
        Logged("deny egress shop/frontend-a", "tcp", "127.244.1.2:41000", ENDPOINT, t0 + 100),
    )
    store.add_export(_export(trace_id, [_outbound(t0, failed=True, local=None)]))
    spans = store.get(trace_id.hex()) or []
    [deny] = [s for s in spans if s.attributes.get("hopscope.hop") == "network-policy"]
    assert deny.attributes["hopscope.policy.side"] == "egress"
    assert "had not caught up" in deny.status_message
    verdict = trace_view(trace_id.hex(), spans)["verdict"]
    assert "NetworkPolicy denied the connection (egress side: the node's policy rules" in str(
        verdict
    ), verdict
    joiner.stop()


def test_without_a_flow_nothing_is_invented(tmp_path: Path) -> None:
    joiner, store = _joiner(tmp_path)
    trace_id = os.urandom(16)
    t0 = time.time_ns()
    store.add_export(_export(trace_id, [_outbound(t0), _inbound(t0 + 1_000_000)]))
    joiner.settle(time.monotonic() + 60)
    hops = [s.attributes.get("hopscope.hop") for s in store.get(trace_id.hex()) or []]
    assert "kube-proxy" not in hops
    joiner.stop()


def test_closed_flows_are_forgotten_after_their_retention_not_a_newer_one_on_the_tuple(
    tmp_path: Path,
) -> None:
    joiner, _store = _joiner(tmp_path)
    t0 = time.time_ns()
    first = _flow(t0)
    joiner.add_flow("node-a", first)
    joiner.add_flow("node-a", dataclasses.replace(first, event="destroy", status=IPS_DST_NAT))
    key = (CALLER, VIP)
    assert joiner._flows[key].closed_at is not None
    # the client reuses the port: a new flow on the same tuple, still open
    joiner.add_flow("node-a", dataclasses.replace(first, id=2, seen_ns=t0 + 1))
    later = time.monotonic() + FLOW_RETENTION_S + 1
    joiner.settle(later)
    assert joiner._flows[key].flow.id == 2  # the first's retention ended; the newer one stays
    joiner.add_flow("node-a", dataclasses.replace(first, id=2, event="destroy"))
    joiner.settle(later + 0.5)  # within the forget period: nothing is walked yet
    assert key in joiner._flows
    joiner.settle(time.monotonic() + 2 * FLOW_RETENTION_S + 3)
    assert key not in joiner._flows and not joiner._closed
    joiner.stop()


def test_snat_flows_are_kept_for_egress_hops() -> None:
    flow = Flow(
        2, "new", "tcp", CALLER, "127.50.0.10:8080", "127.50.0.10:8080", "127.10.0.1:40000",
        IPS_SRC_NAT, 0,
    )  # fmt: skip
    assert flow.snat and not flow.dnat and flow.translated_src == "127.10.0.1:40000"


def test_an_export_sent_twice_is_joined_once(tmp_path: Path) -> None:
    joiner, store = _joiner(tmp_path)
    trace_id = os.urandom(16)
    t0 = time.time_ns()
    joiner.add_flow("node-a", _flow(t0 + 500_000))
    for _ in range(2):  # an exporter's retry sends the same spans again
        store.add_export(_export(trace_id, [_outbound(t0), _inbound(t0 + 1_000_000)]))
    hops = [s.attributes.get("hopscope.hop") for s in store.get(trace_id.hex())]
    assert hops.count("kube-proxy") == 1, hops
    joiner.stop()


NODE_A_PORT, NODE_B_PORT, CLIENT = "127.10.0.1:30090", "127.10.0.2:30090", "127.100.0.1"
ECHO = "127.244.1.5:8080"


def _node_port_rules() -> RuleSet:
    """echo-local: NodePort 30090, externalTrafficPolicy Local, its one pod on node-a."""
    ep = EndpointTarget("127.244.1.5", 8080, "echo-a", "node-a", True, True, False)
    rules = {}
    for node, address in (("node-a", NODE_A_PORT), ("node-b", NODE_B_PORT)):
        ip, port = address.split(":")
        rule = ServiceRule(
            "lab", "echo-local", None, ip, int(port), "TCP", "NodePort", None, (ep,),
            kind="node-port", node=node, external_traffic_policy="Local",
        )  # fmt: skip
        rules[rule.key] = rule
    return RuleSet(1, rules, {})


def _client(start: int, upstream: str, local: str | None) -> tuple[Span, dict[str, Any]]:
    """The traffic generator's span, as it tags its connection."""
    span = Span(span_id=b"\x05" * 8, name="client GET /", kind=Span.SPAN_KIND_CLIENT)
    span.start_time_unix_nano, span.end_time_unix_nano = start, start + 10_000_000
    attrs = {
        "hopscope.hop": "client",
        "client.address": CLIENT,
        "hopscope.upstream.address": upstream,
    }
    if local:
        attrs["hopscope.upstream.local_address"] = local
    else:
        span.status.code = Status.STATUS_CODE_ERROR
    return span, attrs


def test_an_external_client_through_a_node_port_is_joined_at_a_pod_without_sidecar(
    tmp_path: Path,
) -> None:
    store = TraceStore(registry=CollectorRegistry())
    joiner = KernelHopJoiner(
        store.add_export, _node_port_rules, tmp_path / "f.sock", registry=CollectorRegistry()
    )
    store.span_hooks.append(joiner.on_spans)
    trace_id, t0 = os.urandom(16), time.time_ns()
    local = f"{CLIENT}:50000"
    joiner.add_flow(
        "node-a", Flow(7, "new", "tcp", local, NODE_A_PORT, ECHO, local, IPS_DST_NAT, t0 + 300_000)
    )
    app = Span(span_id=b"\x06" * 8, parent_span_id=b"\x05" * 8, kind=Span.SPAN_KIND_SERVER)
    app.start_time_unix_nano, app.end_time_unix_nano = t0 + 1_000_000, t0 + 2_000_000
    app_attrs = {"hopscope.hop": "app", "network.peer.address": CLIENT, "network.peer.port": 50000}
    store.add_export(_export(trace_id, [_client(t0, NODE_A_PORT, local), (app, app_attrs)]))
    [hop] = [
        s
        for s in store.get(trace_id.hex()) or []
        if s.attributes.get("hopscope.hop") == "kube-proxy"
    ]
    assert hop.parent_span_id == "05" * 8
    assert hop.attributes["hopscope.rule.kind"] == "node-port"
    assert hop.attributes["hopscope.nat.snat"] is False  # Local: the pod sees the client
    assert "KUBE-NODEPORTS" in hop.attributes["hopscope.rule.chains"]
    assert hop.attributes["hopscope.endpoint.pod"] == "echo-a"
    joiner.stop()


def test_a_plain_clients_requests_get_their_hop_from_the_flow_alone(tmp_path: Path) -> None:
    """curl through a NodePort with a ``traceparent``: no client span, only the callee's. Its
    kept-alive connection's first request opened the flow, the second rode it."""
    store = TraceStore(registry=CollectorRegistry())
    joiner = KernelHopJoiner(
        store.add_export, _node_port_rules, tmp_path / "f.sock", registry=CollectorRegistry()
    )
    store.span_hooks.append(joiner.on_spans)
    t0, local = time.time_ns(), f"{CLIENT}:50001"
    flow = Flow(8, "new", "tcp", local, NODE_A_PORT, ECHO, local, IPS_DST_NAT, t0)
    joiner.add_flow("node-a", flow)
    traces = []
    for start in (t0 + 400_000, t0 + 50_000_000):
        trace_id = os.urandom(16)
        span = Span(span_id=os.urandom(8), parent_span_id=b"\xab" * 8, kind=Span.SPAN_KIND_SERVER)
        span.start_time_unix_nano, span.end_time_unix_nano = start, start + 2_000_000
        attrs = {
            "hopscope.hop": "sidecar-inbound",
            "hopscope.downstream.remote_address": local,
            "hopscope.downstream.local_address": ECHO,
        }
        store.add_export(_export(trace_id, [(span, attrs)]))
        traces.append(trace_id)
    joiner.settle(time.monotonic())  # a caller span may still come: nothing yet
    # the client closed the connection before the joiner gave up waiting for a caller span
    closed = dataclasses.replace(flow, event="destroy", status=IPS_DST_NAT | IPS_SEEN_REPLY)
    joiner.add_flow("node-a", closed)
    assert all(len(store.get(t.hex()) or []) == 1 for t in traces)
    joiner.settle(time.monotonic() + PLAIN_CLIENT_WAIT_S + 0.1)
    states = []
    for trace_id in traces:
        [hop] = [
            s
            for s in store.get(trace_id.hex()) or []
            if s.attributes.get("hopscope.hop") == "kube-proxy"
        ]
        assert hop.parent_span_id == "ab" * 8  # the span id the client sent
        assert hop.attributes["hopscope.nat.original.dst"] == NODE_A_PORT
        assert hop.attributes["hopscope.endpoint.pod"] == "echo-a"
        states.append(hop.attributes["hopscope.conntrack.state"])
    assert states == ["new", "established"]
    view = trace_view(traces[0].hex(), store.get(traces[0].hex()) or [])
    assert [h["hop"] for h in view["hops"]] == ["kube-proxy", "sidecar-inbound"]
    assert view["hops"][1]["parent_hop_id"] == view["hops"][0]["span_id"]  # the way it went
    # a caller span arriving after all is not joined a second time
    store.add_export(_export(traces[0], [_client(t0, NODE_A_PORT, local)]))
    hops = [
        s
        for s in store.get(traces[0].hex()) or []
        if s.attributes.get("hopscope.hop") == "kube-proxy"
    ]
    assert len(hops) == 1
    joiner.stop()


def test_a_plain_client_of_a_load_balancer_gets_the_load_balancer_hop_above(
    tmp_path: Path,
) -> None:
    """The forwarder reports the connections a load balancer address carried: the flow
    itself shows only the node's NodePort."""
    lb = "127.200.0.9:8080"

    def rules() -> RuleSet:
        base = _node_port_rules()
        node_ip, node_port_number = NODE_A_PORT.split(":")
        node_port = base.rules[node_ip, int(node_port_number)]
        ip, port = lb.split(":")
        lb_rule = dataclasses.replace(
            node_port, vip=ip, port=int(port), kind="load-balancer", node=None
        )
        return RuleSet(1, {**base.rules, lb_rule.key: lb_rule}, {})

    store = TraceStore(registry=CollectorRegistry())
    joiner = KernelHopJoiner(
        store.add_export, rules, tmp_path / "f.sock", registry=CollectorRegistry()
    )
    store.span_hooks.append(joiner.on_spans)
    t0, local = time.time_ns(), f"{CLIENT}:50002"
    joiner.add_load_balanced(local, lb, "node-a")
    joiner.add_flow(
        "node-a", Flow(9, "new", "tcp", local, NODE_A_PORT, ECHO, local, IPS_DST_NAT, t0)
    )
    trace_id = os.urandom(16)
    span = Span(span_id=os.urandom(8), parent_span_id=b"\xcd" * 8, kind=Span.SPAN_KIND_SERVER)
    span.start_time_unix_nano, span.end_time_unix_nano = t0 + 300_000, t0 + 2_000_000
    attrs = {
        "hopscope.hop": "sidecar-inbound",
        "hopscope.downstream.remote_address": local,
        "hopscope.downstream.local_address": ECHO,
    }
    store.add_export(_export(trace_id, [(span, attrs)]))
    joiner.settle(time.monotonic() + PLAIN_CLIENT_WAIT_S + 0.1)
    view = trace_view(trace_id.hex(), store.get(trace_id.hex()) or [])
    assert [h["hop"] for h in view["hops"]] == ["load-balancer", "kube-proxy", "sidecar-inbound"]
    lb_hop = next(
        s
        for s in store.get(trace_id.hex()) or []
        if s.attributes.get("hopscope.hop") == "load-balancer"
    )
    assert lb_hop.parent_span_id == "cd" * 8
    assert lb_hop.attributes["hopscope.nat.original.dst"] == lb
    joiner.stop()


def test_a_callee_span_without_nat_on_its_way_gets_no_hop(tmp_path: Path) -> None:
    joiner, store = _joiner(tmp_path)
    trace_id = os.urandom(16)
    span, attrs = _inbound(time.time_ns())
    attrs["hopscope.downstream.remote_address"] = "127.244.2.9:41000"  # no flow has it
    store.add_export(_export(trace_id, [(span, attrs)]))
    joiner.settle(time.monotonic() + PLAIN_CLIENT_WAIT_S + 0.1)
    assert [s.attributes.get("hopscope.hop") for s in store.get(trace_id.hex()) or []] == [
        "sidecar-inbound"
    ]
    joiner.stop()


def test_a_node_without_a_local_endpoint_drops_and_the_trace_says_so(tmp_path: Path) -> None:
    store = TraceStore(registry=CollectorRegistry())
    joiner = KernelHopJoiner(
        store.add_export, _node_port_rules, tmp_path / "f.sock", registry=CollectorRegistry()
    )
    store.span_hooks.append(joiner.on_spans)
    trace_id, t0 = os.urandom(16), time.time_ns()
    prefix = "drop no-local-endpoints lab/echo-local"
    joiner.add_deny("node-b", Logged(prefix, "tcp", f"{CLIENT}:50001", NODE_B_PORT, t0 + 100))
    store.add_export(_export(trace_id, [_client(t0, NODE_B_PORT, None)]))
    [hop] = [
        s
        for s in store.get(trace_id.hex()) or []
        if s.attributes.get("hopscope.hop") == "kube-proxy"
    ]
    assert hop.attributes["error.type"] == "no-local-endpoints"
    assert hop.attributes["k8s.node.name"] == "node-b"
    assert hop.status == "error" and "no local endpoints on node-b" in hop.status_message
    joiner.stop()


@pytest.mark.parametrize(
    ("syn_at_ms", "queued"),
    [(0.0002, False), (-3, False), (-990, True)],
    ids=["its-own-attempt", "its-own-just-before-its-span", "queued-on-an-attempt-under-way"],
)
def test_a_connect_to_an_endpoint_that_is_gone_is_endpoint_unreachable(
    tmp_path: Path, syn_at_ms: float, queued: bool
) -> None:
    """Its own SYN, or (Envoy queues a request on a connection still opening) the SYN
    another request sent before it, whose connect timeout (1 s) ended both."""
    joiner, store = _joiner(tmp_path)
    trace_id, t0 = os.urandom(16), time.time_ns()
    gone = "127.244.2.99:8080"  # stale rules: DNAT to a pod that no longer exists
    caller = "127.244.1.2:41000"
    seen = t0 + int(syn_at_ms * 1e6)
    joiner.add_flow("node-a", Flow(9, "new", "tcp", caller, VIP, gone, caller, IPS_DST_NAT, seen))
    store.add_export(_export(trace_id, [_outbound(t0, failed=True, local=None)]))
    [hop] = [
        s
        for s in store.get(trace_id.hex()) or []
        if s.attributes.get("hopscope.hop") == "kube-proxy"
    ]
    assert hop.attributes["error.type"] == "endpoint-unreachable"
    assert hop.attributes["hopscope.nat.translated.dst"] == gone
    assert hop.attributes["hopscope.conntrack.state"] == "new"
    assert "never answered" in hop.status_message
    assert ("queued on a connection attempt begun 990 ms" in hop.status_message) is queued
    assert hop.start_ns == max(t0, seen)  # this request's wait, not the other's
    joiner.stop()


def test_a_failed_tls_handshake_is_not_an_unreachable_endpoint(tmp_path: Path) -> None:
    """Envoy gives no local address when the handshake fails either; its TLS error says
    the SYN was answered: kube-proxy's hop is a good DNAT, and no earlier attempt is taken."""
    joiner, store = _joiner(tmp_path)
    trace_id, t0 = os.urandom(16), time.time_ns()
    caller = "127.244.1.2:41000"
    earlier = Flow(8, "new", "tcp", "127.244.1.2:40999", VIP, ENDPOINT, caller, IPS_DST_NAT, t0)
    joiner.add_flow("node-a", earlier)
    own = Flow(9, "new", "tcp", caller, VIP, ENDPOINT, caller, IPS_DST_NAT, t0 + 900_000_000)
    joiner.add_flow("node-a", own)
    span, attrs = _outbound(t0 + 899_000_000, failed=True, local=None)
    attrs["hopscope.upstream.failure"] = (
        "TLS_error:|268435581:SSL_routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:"
        "verify_cert_failed:_certificate_has_expired:TLS_error_end"
    )
    store.add_export(_export(trace_id, [(span, attrs)]))
    spans = store.get(trace_id.hex()) or []
    [hop] = [s for s in spans if s.attributes.get("hopscope.hop") == "kube-proxy"]
    assert "error.type" not in hop.attributes
    assert hop.status != "error"
    assert hop.attributes["hopscope.nat.original.src"] == caller
    assert "TLS handshake failed" in hop.attributes["hopscope.decision"]
    joiner.stop()


@pytest.mark.parametrize(
    ("opened_ms", "failure", "flags"),
    [
        (-1500, "", "UF"),
        (-990, "delayed_connect_error:_111", "UF"),
        (-990, "", "UO"),
        (-990, "TLS_error:|268435581:SSL_routines:OPENSSL_internal:WRONG_VERSION_NUMBER", "UF"),
    ],
    ids=["older-than-a-connect-timeout", "refused", "circuit-breaker-overflow", "tls-handshake"],
)
def test_an_earlier_attempt_that_did_not_fail_this_request_is_not_its_hop(
    tmp_path: Path, opened_ms: int, failure: str, flags: str
) -> None:
    """An attempt whose connect timeout did not end with the request, or a request that
    failed otherwise (a REJECT's refusal, an overflow that never connected, a handshake on
    a connection of its own) takes no earlier flow."""
    joiner, store = _joiner(tmp_path)
    trace_id, t0 = os.urandom(16), time.time_ns()
    caller, gone = "127.244.1.2:41000", "127.244.2.99:8080"
    joiner.add_flow(
        "node-a",
        Flow(9, "new", "tcp", caller, VIP, gone, caller, IPS_DST_NAT, t0 + opened_ms * 10**6),
    )
    span, attrs = _outbound(t0, failed=True, local=None)
    attrs["response_flags"] = flags
    if failure:
        attrs["hopscope.upstream.failure"] = failure
    store.add_export(_export(trace_id, [(span, attrs)]))
    joiner.settle(time.monotonic() + JOIN_WAIT_S + 1)
    hops = [
        s
        for s in store.get(trace_id.hex()) or []
        if s.attributes.get("hopscope.hop") == "kube-proxy"
    ]
    assert hops == []
    joiner.stop()


def test_a_queued_request_takes_the_unanswered_attempt_whose_timeout_ended_it(
    tmp_path: Path,
) -> None:
    """Of the caller's earlier attempts, not a newer one that was answered (its destroy
    event has SEEN_REPLY), and of the rest the one whose connect timeout fits best."""
    joiner, store = _joiner(tmp_path)
    trace_id, t0 = os.urandom(16), time.time_ns()
    gone, live = "127.244.2.99:8080", ENDPOINT

    def attempt(ct_id: int, port: int, endpoint: str, at_ms: int) -> Flow:
        src = f"127.244.1.2:{port}"
        return Flow(ct_id, "new", "tcp", src, VIP, endpoint, src, IPS_DST_NAT, t0 + at_ms * 10**6)

    stale, near, answered = (
        attempt(7, 41007, gone, -960),  # its connect timeout ends 30 ms from the request's
        attempt(8, 41008, gone, -1150),  # within the slack, but a worse fit
        attempt(9, 41009, live, -1008),  # the best fit, but a reply came
    )
    for flow in (near, stale, answered):
        joiner.add_flow("node-a", flow)
    joiner.add_flow(
        "node-a",
        dataclasses.replace(answered, event="destroy", status=IPS_DST_NAT | IPS_SEEN_REPLY),
    )
    store.add_export(_export(trace_id, [_outbound(t0, failed=True, local=None)]))
    [hop] = [
        s
        for s in store.get(trace_id.hex()) or []
        if s.attributes.get("hopscope.hop") == "kube-proxy"
    ]
    assert hop.attributes["hopscope.nat.original.src"] == stale.original_src
    assert "queued on a connection attempt begun 960 ms" in hop.status_message
    joiner.stop()


def test_recent_list_counts_tell_a_new_client_from_a_sticky_one() -> None:
    """``/proc/net/xt_recent/NAME`` as the kernel prints it: one timestamp per --set."""
    from mesh.kernel.conntrack import recent_hits

    lists = {
        "KUBE-SEP-AAAA": "src=10.100.0.1 ttl: 64 last_seen: 4295 oldest_pkt: 3 4290, 4293, 4295\n"
        "src=10.100.0.2 ttl: 64 last_seen: 4296 oldest_pkt: 1 4296\n",
        "KUBE-SEP-BBBB": "src=10.100.0.12 ttl: 64 last_seen: 4297 oldest_pkt: 1 4297\n",
    }
    assert recent_hits(lists, "10.100.0.1") == {"KUBE-SEP-AAAA": 3}
    assert recent_hits(lists, "10.100.0.2") == {"KUBE-SEP-AAAA": 1}  # not 10.100.0.12's
    assert recent_hits(lists, "10.100.0.9") == {}


def test_the_overlay_hop_carries_the_outer_tuple_of_the_logged_vxlan_packet(
    tmp_path: Path,
) -> None:
    joiner, store = _joiner(tmp_path)
    trace_id, t0 = os.urandom(16), time.time_ns()
    joiner.add_flow("node-a", _flow(t0 + 500_000))
    syn = Logged("vxlan", "udp", "127.10.0.1:43210", "127.10.0.2:8472", t0, 1, CALLER, ENDPOINT)
    joiner.add_tunnel(syn)
    store.add_export(_export(trace_id, [_outbound(t0), _inbound(t0 + 1_000_000)]))
    [overlay] = [
        s
        for s in store.get(trace_id.hex()) or []
        if s.attributes.get("hopscope.hop") == "cni-overlay"
    ]
    assert overlay.attributes["hopscope.overlay.outer.src"] == "127.10.0.1:43210"
    assert overlay.attributes["hopscope.nat.translated.src"] == "127.10.0.1:43210"
    assert overlay.attributes["hopscope.overlay.outer.dst"] == "127.10.0.2:8472"
    joiner.stop()

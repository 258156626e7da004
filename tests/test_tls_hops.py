"""TLS in the hop view: connection spans paired back into request traces, the ``tls`` column,
and verdicts that name a failed handshake.

Spans are hand-built OTLP exports, fed through the real receiver into a real
:class:`TraceStore` and read back through the control plane's API and explorer.

Address plan: pod frontend-1 127.244.1.5 (node-a) calls Service shop/catalog
127.96.0.12:80; its sidecar's upstream connection leaves from 127.244.1.5:41000; kube-proxy
DNATs it to pod catalog-1 127.244.2.3:8080 on node-b through the overlay (VTEPs
127.10.0.1 → 127.10.0.2).
"""

from __future__ import annotations

import io
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.resource.v1.resource_pb2 import Resource
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, ScopeSpans, Span, Status
from rich.console import Console
from werkzeug.test import Client

from mesh.cli import trace_cmds
from mesh.controlplane.api import create_app
from mesh.tracestore.hops import build_hops, trace_view
from mesh.tracestore.pairing import ENTRY_BYTES
from mesh.tracestore.receiver import receive
from mesh.tracestore.store import TraceStore
from mesh.tracestore.tlsverdict import read_tls_error

REQUEST = "a" * 32
CONNECTION = "b" * 32
LATER_CONNECTION = "c" * 32
CLIENT_TUPLE = "127.244.1.5:41000"
POD = "127.244.2.3:8080"
FRONTEND_ID = "spiffe://cluster.local/ns/shop/sa/frontend"
CATALOG_ID = "spiffe://cluster.local/ns/shop/sa/catalog"
SNI = "outbound_.80_._.catalog.shop.svc.cluster.local"
EXPIRED = (
    "TLS_error:|268435581:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:"
    "verify cert failed: X509_verify_cert: certificate verification error at depth 0: "
    "certificate has expired:TLS_error_end"
)
ENVOY_EXPIRED = (  # as Envoy 1.40's span tag has it: spaces written as underscores
    "TLS_error:|268435581:SSL_routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:"
    "verify_cert_failed:_X509_verify_cert:_certificate_verification_error_at_depth_0:"
    "_certificate_has_expired:TLS_error_end"
)
PEER_ALERT = (
    "TLS_error:|268436501:SSL routines:OPENSSL_internal:SSLV3_ALERT_CERTIFICATE_EXPIRED:"
    "SSL alert number 45:TLS_error_end"
)

SpanSpec = tuple[str, str, int, int, dict[str, Any]]
"""(span id tag, parent tag, start µs, end µs, attributes)."""


def _sid(tag: str) -> bytes:
    """An 8-byte span id spelling the tag (right-aligned, zero-padded)."""
    return tag.encode().rjust(8, b"\0")[-8:]


def sid(tag: str) -> str:
    return _sid(tag).hex()


def _value(v: Any) -> AnyValue:
    if isinstance(v, bool):
        return AnyValue(bool_value=v)
    if isinstance(v, int):
        return AnyValue(int_value=v)
    return AnyValue(string_value=str(v))


def _export(
    trace_id: str, service: str, spans: list[SpanSpec], error: frozenset[str] = frozenset()
) -> bytes:
    out = []
    for tag, parent, start, end, attrs in spans:
        span = Span(
            trace_id=bytes.fromhex(trace_id),
            span_id=_sid(tag),
            parent_span_id=_sid(parent) if parent else b"",
            name=tag,
            kind=Span.SPAN_KIND_CLIENT,
            start_time_unix_nano=1_700_000_000_000_000_000 + 1000 * start,
            end_time_unix_nano=1_700_000_000_000_000_000 + 1000 * end,
            attributes=[KeyValue(key=k, value=_value(v)) for k, v in attrs.items()],
            status=Status(
                code=Status.STATUS_CODE_ERROR if tag in error else Status.STATUS_CODE_UNSET
            ),
        )
        out.append(span)
    labels = {"service.name": service, "k8s.pod.name": f"{service}-1"}
    resource = Resource(attributes=[KeyValue(key=k, value=_value(v)) for k, v in labels.items()])
    request = ExportTraceServiceRequest(
        resource_spans=[
            ResourceSpans(
                resource=resource,
                scope_spans=[ScopeSpans(spans=out)],
            )
        ]
    )
    return request.SerializeToString()


def _feed(
    store: TraceStore,
    trace_id: str,
    service: str,
    spans: list[SpanSpec],
    error: frozenset[str] = frozenset(),
) -> None:
    answer = receive(
        store, _export(trace_id, service, spans, error), "application/x-protobuf", None
    )
    assert answer.status == 200, answer.body


def _outbound(extra: dict[str, Any] | None = None, local: str = CLIENT_TUPLE) -> dict[str, Any]:
    return {
        "hopscope.hop": "sidecar-outbound",
        "k8s.service.name": "catalog",
        "hopscope.upstream.address": "127.96.0.12:80",
        "hopscope.upstream.local_address": local,
        "hopscope.tls.mode": "mtls",
        "hopscope.upstream.tls_version": "TLSv1.3",
        "hopscope.upstream.peer_identity": CATALOG_ID,
        "hopscope.mtls.peer_mode": "STRICT",
        "hopscope.mtls.peer_policy": "PeerAuthentication shop/default",
        "hopscope.mtls.peer_namespace": "shop",
        "hopscope.mtls.origination": "automatic mTLS",
        "hopscope.upstream.failure": "-",
        "http.response.status_code": 200,
        "response_flags": "-",
        **(extra or {}),
    }


def _inbound(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "hopscope.hop": "sidecar-inbound",
        "hopscope.downstream.local_address": POD,
        "hopscope.downstream.remote_address": CLIENT_TUPLE,
        "hopscope.tls.mode": "mtls",
        "tls.protocol.version": "TLSv1.3",
        "hopscope.tls.peer_identity": FRONTEND_ID,
        "hopscope.mtls.mode": "STRICT",
        "hopscope.mtls.policy": "PeerAuthentication shop/default",
        "http.response.status_code": 200,
        **(extra or {}),
    }


CONN_SPAN = {
    "hopscope.hop": "kube-proxy",
    "k8s.service.name": "catalog",
    "k8s.namespace.name": "shop",
    "hopscope.endpoint.pod": "catalog-1",
    "hopscope.nat.original.src": CLIENT_TUPLE,
    "hopscope.nat.original.dst": "127.96.0.12:80",
    "hopscope.nat.translated.src": CLIENT_TUPLE,
    "hopscope.nat.translated.dst": POD,
    "hopscope.conntrack.state": "new",
    "hopscope.conn.client": CLIENT_TUPLE,
    "hopscope.tls.opaque": True,
    "tls.client.server_name": SNI,
    "hopscope.conn.bytes_in": 4200,
    "hopscope.conn.bytes_out": 9100,
}
OVERLAY_SPAN = {
    "hopscope.hop": "cni-overlay",
    "k8s.node.name": "node-a",
    "hopscope.overlay.vni": 1,
    "hopscope.overlay.outer.src": "127.10.0.1:4000",
    "hopscope.overlay.outer.dst": "127.10.0.2:8472",
    "hopscope.nat.original.src": CLIENT_TUPLE,
    "hopscope.nat.original.dst": POD,
    "hopscope.nat.translated.src": "127.10.0.1:4000",
    "hopscope.nat.translated.dst": "127.10.0.2:8472",
    "hopscope.tls.opaque": True,
}


def _pooled_journey(store: TraceStore) -> None:
    """Two calls to catalog in one request ride one pooled TLS connection (opened before
    the request, closed long after); a later connection reuses the client port."""
    _feed(
        store,
        REQUEST,
        "frontend",
        [
            ("out1", "", 1000, 2000, _outbound()),
            ("out2", "", 2500, 3000, _outbound()),
        ],
    )
    _feed(
        store,
        REQUEST,
        "catalog",
        [
            ("in1", "out1", 1300, 1800, _inbound()),
            ("app1", "in1", 1400, 1700, {"hopscope.hop": "app", "http.response.status_code": 200}),
            ("in2", "out2", 2600, 2900, _inbound()),
        ],
    )
    _feed(
        store,
        CONNECTION,
        "kube-proxy",
        [("conn", "", 500, 10_000, CONN_SPAN), ("ovl", "conn", 600, 10_000, OVERLAY_SPAN)],
    )
    _feed(store, LATER_CONNECTION, "kube-proxy", [("conn9", "", 20_000, 30_000, CONN_SPAN)])


def test_a_connection_span_is_paired_below_each_request_it_carried() -> None:
    store = TraceStore()
    _pooled_journey(store)
    spans = store.get(REQUEST)
    paired = [s for s in spans if s.paired_with]
    assert {(s.name, s.paired_with, s.trace_id) for s in paired} == {
        ("conn", sid("out1"), CONNECTION),
        ("ovl", sid("out1"), CONNECTION),
        ("conn", sid("out2"), CONNECTION),
        ("ovl", sid("out2"), CONNECTION),
    }  # the later connection on the same port does not overlap: not paired
    view = trace_view(REQUEST, spans)
    hops = view["hops"]
    assert [(h["hop"], h["paired_by"]) for h in hops] == [
        ("sidecar-outbound", ""),
        ("kube-proxy", "connection"),
        ("cni-overlay", "connection"),
        ("sidecar-inbound", ""),
        ("app", ""),
        ("sidecar-outbound", ""),
        ("kube-proxy", "connection"),
        ("cni-overlay", "connection"),
        ("sidecar-inbound", ""),
    ]
    out1, kp1, ov1, in1, _app, out2, kp2, ov2, in2 = hops
    # Each copy nests where the packet went: outbound → kube-proxy → overlay → inbound.
    assert kp1["parent_hop_id"] == out1["span_id"] and kp2["parent_hop_id"] == out2["span_id"]
    assert ov1["parent_hop_id"] == kp1["span_id"] and ov2["parent_hop_id"] == kp2["span_id"]
    assert in1["parent_hop_id"] == ov1["span_id"] and in2["parent_hop_id"] == ov2["span_id"]
    assert len({h["span_id"] for h in hops}) == len(hops)
    # The pooled connection is drawn within each request it carried.
    assert kp1["duration_ms"] == 1.0 and kp2["duration_ms"] == 0.5
    assert kp1["tls"] == f"TLS (opaque) SNI {SNI}" and ov1["tls"] == "TLS (opaque)"
    # Opened before the request (pooled): the request met an established flow.
    assert kp1["conntrack"] == kp2["conntrack"] == "established"
    assert out1["tls"] == f"mTLS TLSv1.3 peer {CATALOG_ID}"
    assert in1["tls"] == f"mTLS TLSv1.3 peer {FRONTEND_ID}"
    assert view["verdict"]["ok"] is True
    assert [r["stage"] for r in view["packet_walk"]][:3] == [
        "proxied",
        "after kube-proxy",
        "encapsulated",
    ]
    # The connection's own trace still reads on its own, unpaired.
    alone = build_hops(store.get(CONNECTION))
    assert [(h["hop"], h["paired_by"]) for h in alone] == [("kube-proxy", ""), ("cni-overlay", "")]


def test_pairing_is_shown_by_the_api_the_cli_and_the_explorer() -> None:
    store = TraceStore()
    _pooled_journey(store)
    app = create_app(_NoCluster(), store, status=lambda: {"ready": True})
    client = Client(app)
    doc = client.get(f"/api/v1/traces/{REQUEST}").get_json()
    kp = doc["hops"][1]
    assert kp["paired_by"] == "connection" and kp["tls"].startswith("TLS (opaque)")
    buffer = io.StringIO()
    trace_cmds.out = Console(file=buffer, width=400, highlight=False)
    trace_cmds.render_waterfall(doc)
    text = buffer.getvalue()
    assert "(paired by connection)" in text and "conntrack pairs a flow" in text
    assert f"mTLS TLSv1.3 peer {CATALOG_ID}" in text
    page = client.get(f"/traces/{REQUEST}").get_data(as_text=True)
    assert "paired by connection" in page and f"peer {FRONTEND_ID}" in page
    assert "TLS (opaque) SNI" in page
    listed = client.get("/api/v1/traces").get_json()
    # Connection traces are read inside the requests they carried, not listed as requests
    # (the newest trace, `hopscope trace --last`, stays the request).
    assert [t["trace_id"] for t in listed] == [REQUEST]
    assert listed[0]["hops"].count("kube-proxy") == 2
    assert {k for k, _ in store.recent(10, connections=True)} == {
        REQUEST,
        CONNECTION,
        LATER_CONNECTION,
    }


class _NoCluster:
    def snapshot(self) -> dict[str, Any]:
        return {"resource_version": 0}


def test_a_dash_from_envoy_is_absent() -> None:
    store = TraceStore()
    _feed(store, CONNECTION, "kube-proxy", [("conn", "", 500, 10_000, CONN_SPAN)])
    _feed(
        store,
        REQUEST,
        "frontend",
        [
            (
                "out1",
                "",
                1000,
                2000,
                _outbound({"hopscope.upstream.peer_identity": "-"}, local="-"),
            ),
            ("in1", "out1", 1300, 1800, _inbound({"hopscope.tls.peer_identity": ""})),
        ],
    )
    hops = build_hops(store.get(REQUEST))
    assert [h["hop"] for h in hops] == ["sidecar-outbound", "sidecar-inbound"]
    assert hops[0]["tls"] == "mTLS TLSv1.3" and hops[1]["tls"] == "mTLS TLSv1.3"


def test_the_index_is_charged_to_its_trace_and_dropped_with_it() -> None:
    plain = TraceStore()
    indexed = TraceStore()
    no_client = {k: v for k, v in CONN_SPAN.items() if k != "hopscope.conn.client"}
    _feed(plain, CONNECTION, "kube-proxy", [("conn", "", 500, 10_000, no_client)])
    _feed(indexed, CONNECTION, "kube-proxy", [("conn", "", 500, 10_000, CONN_SPAN)])
    extra = indexed.stats()["bytes"] - plain.stats()["bytes"]
    assert ENTRY_BYTES <= extra < ENTRY_BYTES + 100  # the attribute's bytes and the entry
    assert indexed._conns.by_client
    small = TraceStore(budget_bytes=20_000)
    _feed(small, CONNECTION, "kube-proxy", [("conn", "", 500, 10_000, CONN_SPAN)])
    for i in range(40):
        _feed(small, f"{i + 1:032x}", "x", [("s", "", 0, 1, {"pad": "x" * 400})])
    assert small.was_evicted(CONNECTION)
    assert not small._conns.by_client


# -- verdicts ---------------------------------------------------------------------------------


def _failed_call(outbound: dict[str, Any], kube_proxy_http: bool = False) -> dict[str, Any]:
    store = TraceStore()
    spans: list[SpanSpec] = [("out1", "", 1000, 2000, outbound)]
    if kube_proxy_http:  # a plaintext call: kube-proxy read it, the callee hung up
        kp = {
            **{k: v for k, v in CONN_SPAN.items() if "tls" not in k and "conn." not in k},
            "error.type": "connection closed before the response completed",
        }
        spans.append(("kp", "out1", 1100, 1900, kp))
    _feed(store, REQUEST, "frontend", spans, error=frozenset({"out1", "kp"}))
    return trace_view(REQUEST, store.get(REQUEST))["verdict"]


def test_verdict_names_a_plaintext_call_refused_by_strict_mtls() -> None:
    verdict = _failed_call(
        _outbound(
            {
                "hopscope.tls.mode": "plaintext",
                "hopscope.mtls.origination": "DestinationRule shop/catalog tls.mode DISABLE",
                "http.response.status_code": 503,
                "response_flags": "UC",
                "hopscope.upstream.tls_version": "-",
                "hopscope.upstream.peer_identity": "-",
            }
        ),
        kube_proxy_http=True,
    )
    assert verdict["ok"] is False
    assert verdict["produced_by"] == "sidecar-inbound"
    assert verdict["origin"] == verdict["reported_by"] == "sidecar-outbound"
    assert (
        "the catalog sidecar refused a plaintext connection: STRICT mTLS in namespace shop "
        "(PeerAuthentication shop/default)" in verdict["reason"]
    )
    assert "503 UC" in verdict["reason"]
    assert "because of DestinationRule shop/catalog tls.mode DISABLE" in verdict["reason"]


def test_verdict_names_the_caller_rejecting_an_expired_certificate() -> None:
    verdict = _failed_call(
        _outbound(
            {
                "http.response.status_code": 503,
                "response_flags": "UF,URX",
                "hopscope.upstream.failure": ENVOY_EXPIRED,
                "hopscope.upstream.tls_version": "-",
                "hopscope.upstream.peer_identity": "-",
            }
        )
    )
    assert verdict["produced_by"] == "sidecar-outbound"
    assert (
        "the frontend sidecar rejected catalog's certificate: certificate has expired"
        in (verdict["reason"])
    )
    assert verdict["group"] == "mTLS: callee certificate rejected (certificate has expired)"


def test_verdict_names_the_callee_rejecting_the_callers_certificate() -> None:
    verdict = _failed_call(
        _outbound(
            {
                "http.response.status_code": 503,
                "response_flags": "UF",
                "hopscope.upstream.failure": PEER_ALERT,
            }
        )
    )
    assert verdict["produced_by"] == "sidecar-inbound"
    assert (
        "the catalog sidecar rejected frontend's certificate: certificate has expired"
        in (verdict["reason"])
    )


def test_a_refused_connect_is_not_read_as_tls() -> None:
    verdict = _failed_call(
        _outbound(
            {
                "http.response.status_code": 503,
                "response_flags": "UF,URX",
                "hopscope.upstream.failure": "delayed connect error: 111, Connection refused",
            }
        )
    )
    assert "certificate" not in verdict["reason"] and "TLS" not in verdict["reason"]
    assert "REJECT" in verdict["reason"] or "refused" in verdict["reason"]


@pytest.mark.parametrize(
    ("text", "side", "words"),
    [
        (EXPIRED, "local", "certificate has expired"),
        (ENVOY_EXPIRED, "local", "certificate has expired"),
        (
            "TLS_error:|268435581:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:"
            "TLS_error_end",
            "local",
            "certificate verification failed",
        ),
        (
            "TLS_error:|268435581:SSL routines:OPENSSL_internal:CERTIFICATE_VERIFY_FAILED:"
            "verify cert failed: verify SAN list:TLS_error_end",
            "local",
            "its identity (SAN) is not the one expected",
        ),
        (PEER_ALERT, "peer", "certificate has expired"),
        (
            "TLS_error:|268436552:SSL routines:OPENSSL_internal:TLSV1_ALERT_UNKNOWN_CA:"
            "TLS_error_end",
            "peer",
            "certificate signed by an unknown CA",
        ),
        (
            "TLS_error:|268435526:SSL routines:OPENSSL_internal:TLSV1_CERTIFICATE_REQUIRED:"
            "TLS_error_end",
            "peer",
            "no client certificate presented",
        ),
        (
            "TLS_error:|268436464:SSL routines:OPENSSL_internal:SSLV3_ALERT_HANDSHAKE_FAILURE:"
            "TLS_error_end",
            "peer-refused",
            "handshake failure",
        ),
        (
            "TLS_error:|268435703:SSL routines:OPENSSL_internal:WRONG_VERSION_NUMBER:TLS_error_end",
            "plaintext-peer",
            "the peer did not answer in TLS",
        ),
    ],
)
def test_boringssl_errors_are_read_for_which_side_refused(text: str, side: str, words: str) -> None:
    error = read_tls_error(text)
    assert error is not None and (error.side, error.words) == (side, words)


@pytest.mark.parametrize("text", ["", "-", "delayed connect error: 111, Connection refused"])
def test_other_failures_are_not_tls_errors(text: str) -> None:
    assert read_tls_error(text) is None


def test_verdict_says_a_generic_handshake_failure_in_words() -> None:
    verdict = _failed_call(
        _outbound(
            {
                "http.response.status_code": 503,
                "response_flags": "UF",
                "hopscope.upstream.failure": "TLS_error:|268435610:SSL routines:"
                "OPENSSL_internal:DECODE_ERROR:TLS_error_end",
            }
        )
    )
    assert (
        "the TLS handshake between the frontend sidecar and catalog failed: decode error"
        in (verdict["reason"])
    )


def test_an_app_error_behind_a_healthy_mtls_hop_is_not_read_as_tls() -> None:
    """The callee answered 503 itself: the proxies passed it up; no TLS story to tell."""
    store = TraceStore()
    _feed(
        store,
        REQUEST,
        "frontend",
        [
            (
                "out1",
                "",
                1000,
                2000,
                _outbound({"http.response.status_code": 503, "hopscope.tls.mode": "plaintext"}),
            )
        ],
    )
    _feed(
        store,
        REQUEST,
        "catalog",
        [
            ("in1", "out1", 1300, 1800, _inbound({"http.response.status_code": 503})),
            ("app1", "in1", 1400, 1700, {"hopscope.hop": "app", "http.response.status_code": 503}),
        ],
    )
    verdict = trace_view(REQUEST, store.get(REQUEST))["verdict"]
    assert verdict["produced_by"] == "app"
    assert "mTLS" not in verdict["reason"] and "plaintext" not in verdict["reason"]

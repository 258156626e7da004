"""The embedded OTLP receiver, trace store and hop view, over a real HTTP server.

Spans are produced by the real OpenTelemetry SDK and shipped by its real OTLP/HTTP exporter,
so the decoding path is the one Envoy and the apps use.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from google.rpc.status_pb2 import Status as RpcStatus
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from werkzeug.serving import make_server

from mesh.controlplane.api import create_app
from mesh.tracestore.store import TraceStore


class _NoCluster:
    def snapshot(self) -> dict[str, Any]:
        return {"resource_version": 0}


@pytest.fixture()
def api() -> Iterator[tuple[str, TraceStore]]:
    store = TraceStore(budget_bytes=64 * 2**10)
    app = create_app(_NoCluster(), store, status=lambda: {"ready": True})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", store
    server.shutdown()


def _provider(base: str, pod: str) -> TracerProvider:
    provider = TracerProvider(resource=Resource.create({"service.name": "t", "k8s.pod.name": pod}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{base}/v1/traces")))
    return provider


def _journey(base: str, fail_flags: str | None = None) -> str:
    """client → ingress → kube-proxy → sidecar-inbound → app, the way the real hops nest."""
    tracer = _provider(base, "frontend-abc").get_tracer("t")
    with tracer.start_as_current_span("client", kind=SpanKind.CLIENT) as root:
        root.set_attribute("hopscope.hop", "client")
        with tracer.start_as_current_span("ingress") as ing:
            ing.set_attributes(
                {
                    "hopscope.hop": "ingress",
                    "http.status_code": "200",
                    "peer.address": "127.100.0.1",
                    "upstream_address": "127.96.0.11:80",
                }
            )
            with tracer.start_as_current_span("kube-proxy") as kp:
                kp.set_attributes(
                    {
                        "hopscope.hop": "kube-proxy",
                        "k8s.service.name": "frontend",
                        "k8s.namespace.name": "shop",
                        "hopscope.endpoint.pod": "frontend-abc",
                        "hopscope.nat.original.src": "127.200.0.1:40000",
                        "hopscope.nat.original.dst": "127.96.0.11:80",
                        "hopscope.nat.translated.src": "127.200.0.1:40000",
                        "hopscope.nat.translated.dst": "127.244.1.2:8080",
                    }
                )
                with tracer.start_as_current_span("inbound") as sc:
                    sc.set_attributes(
                        {
                            "hopscope.hop": "sidecar-inbound",
                            "http.status_code": "503" if fail_flags else "200",
                        }
                    )
                    if fail_flags:
                        sc.set_attribute("response_flags", fail_flags)
                        sc.set_status(Status(StatusCode.ERROR))
                    else:
                        with tracer.start_as_current_span("app", kind=SpanKind.SERVER) as app:
                            app.set_attributes(
                                {"hopscope.hop": "app", "http.response.status_code": 200}
                            )
        return format(root.get_span_context().trace_id, "032x")


def test_spans_arrive_decoded_and_normalized(api: tuple[str, TraceStore]) -> None:
    base, store = api
    trace_id = _journey(base)
    spans = store.get(trace_id)
    assert len(spans) == 5
    ingress = next(s for s in spans if s.attributes["hopscope.hop"] == "ingress")
    # Envoy's OpenTracing-era names gain their semantic-convention twins.
    assert ingress.attributes["http.response.status_code"] == 200
    assert ingress.attributes["network.peer.address"] == "127.100.0.1"
    assert ingress.attributes["k8s.pod.name"] == "frontend-abc"  # from the resource


def test_hop_order_nat_and_verdict(api: tuple[str, TraceStore]) -> None:
    base, _ = api
    trace_id = _journey(base)
    view = requests.get(f"{base}/api/v1/traces/{trace_id}", timeout=5).json()
    assert [h["hop"] for h in view["hops"]] == [
        "client",
        "ingress",
        "kube-proxy",
        "sidecar-inbound",
        "app",
    ]
    kp = view["hops"][2]
    assert kp["nat"] == "DNAT 127.96.0.11:80 → 127.244.1.2:8080"
    assert kp["src"] == "127.200.0.1:40000" and kp["dst"] == "127.96.0.11:80"
    assert view["verdict"]["ok"] is True
    # short ids work like git's
    assert (
        requests.get(f"{base}/api/v1/traces/{trace_id[:10]}", timeout=5).json()["trace_id"]
        == trace_id
    )


def test_verdict_blames_the_proxy_that_produced_the_failure(api: tuple[str, TraceStore]) -> None:
    base, _ = api
    trace_id = _journey(base, fail_flags="UH")
    view = requests.get(f"{base}/api/v1/traces/{trace_id}", timeout=5).json()
    verdict = view["verdict"]
    assert verdict["ok"] is False
    assert verdict["origin"] == "sidecar-inbound"
    assert "503 UH" in verdict["reason"] and "no healthy upstream" in verdict["reason"]


def test_bad_otlp_body_is_rejected_and_server_keeps_serving(api: tuple[str, TraceStore]) -> None:
    base, store = api
    resp = requests.post(
        f"{base}/v1/traces",
        data=b"\xff\x00garbage",
        headers={"Content-Type": "application/x-protobuf"},
        timeout=5,
    )
    assert resp.status_code == 400
    assert "not an OTLP trace export" in RpcStatus.FromString(resp.content).message
    assert _journey(base) in {t for t, _ in store.recent(10)}


def test_overlay_and_policy_hops_read_in_words() -> None:
    from mesh.tracestore.hops import trace_view
    from mesh.tracestore.otlp import SpanRecord

    def span(sid: str, parent: str, attrs: dict[str, object], status: str = "unset") -> SpanRecord:
        return SpanRecord("t" * 32, sid, parent, sid, "internal", 1, 2, attrs, status=status)

    spans = [
        span("a", "", {"hopscope.hop": "sidecar-outbound", "http.response.status_code": 503}),
        span(
            "b",
            "a",
            {
                "hopscope.hop": "cni-overlay",
                "k8s.node.name": "node-a",
                "hopscope.overlay.vni": 1,
                "hopscope.overlay.outer.src": "127.10.0.1:4000",
                "hopscope.overlay.outer.dst": "127.10.0.2:8472",
                "hopscope.nat.original.src": "127.244.1.2:5000",
                "hopscope.nat.original.dst": "127.244.2.3:8080",
            },
        ),
        span(
            "c",
            "b",
            {
                "hopscope.hop": "network-policy",
                "k8s.node.name": "node-a",
                "hopscope.policy.verdict": "deny",
                "hopscope.policy.side": "ingress",
                "hopscope.policy.names": "shop/default-deny",
                "hopscope.policy.reason": "no ingress rule lets it in",
            },
            status="error",
        ),
    ]
    view = trace_view("t" * 32, spans)
    overlay = next(h for h in view["hops"] if h["hop"] == "cni-overlay")
    assert overlay["nat"] == "encap vni 1: outer 127.10.0.1:4000 → 127.10.0.2:8472"
    assert (overlay["src"], overlay["dst"]) == ("127.244.1.2:5000", "127.244.2.3:8080")
    assert view["verdict"]["origin"] == "network-policy"
    assert "NetworkPolicy denied" in view["verdict"]["reason"]
    assert "shop/default-deny" in view["verdict"]["reason"]


def test_explorer_shows_the_emulation_share_hatched_with_an_explanation(
    api: tuple[str, TraceStore],
) -> None:
    base, _ = api
    tracer = _provider(base, "ingress-abc").get_tracer("t")
    with tracer.start_as_current_span("ingress", kind=SpanKind.SERVER) as ingress:
        ingress.set_attributes({"hopscope.hop": "ingress", "http.response.status_code": 200})
        with tracer.start_as_current_span("kube-proxy", kind=SpanKind.CLIENT) as kp:
            kp.set_attributes(
                {
                    "hopscope.hop": "kube-proxy",
                    "k8s.service.name": "catalog",
                    "k8s.namespace.name": "shop",
                    "hopscope.nat.original.src": "127.100.0.1:40000",
                    "hopscope.nat.original.dst": "127.96.0.12:80",
                    "hopscope.nat.translated.src": "127.10.0.1:40000",
                    "hopscope.nat.translated.dst": "127.244.2.3:8080",
                    "hopscope.emulation.cost_us": 1734,
                }
            )
        trace_id = format(ingress.get_span_context().trace_id, "032x")
    page = requests.get(f"{base}/traces/{trace_id}", timeout=5)
    assert page.status_code == 200, page.text
    html = page.text
    assert 'class="hop hop-kube-proxy emulated"' in html
    assert "1.7 of it emulation" in html and 'class="emu-share"' in html
    assert 'id="emulation"' in html and "not Kubernetes" in html
    assert ".hop-kube-proxy { background: #fff3d6; }" in html
    doc = requests.get(f"{base}/api/v1/traces/{trace_id}", timeout=5).json()
    assert {h["hop"]: h["emulation_ms"] for h in doc["hops"]} == {
        "ingress": None,
        "kube-proxy": 1.73,
    }


def test_explorer_draws_a_reject_derived_from_the_callers_span(api: tuple[str, TraceStore]) -> None:
    """The REJECT hop kube-proxy never saw has no span of its own; the page still renders."""
    base, _ = api
    tracer = _provider(base, "frontend-abc").get_tracer("t")
    with tracer.start_as_current_span("outbound", kind=SpanKind.CLIENT) as out:
        out.set_attributes(
            {
                "hopscope.hop": "sidecar-outbound",
                "http.response.status_code": 503,
                "response_flags": "UF,URX",
                "hopscope.upstream.failure": "delayed connect error: 111, Connection refused",
                "hopscope.upstream.address": "127.96.0.14:80",
            }
        )
        out.set_status(Status(StatusCode.ERROR))
        trace_id = format(out.get_span_context().trace_id, "032x")
    page = requests.get(f"{base}/traces/{trace_id}", timeout=5)
    assert page.status_code == 200, page.text
    assert 'data-hop="kube-proxy"' in page.text and "REJECT" in page.text
    assert "emulation" not in page.text.replace("emulates", "")

"""The hop-kind table, and the emulation share of a hop's time.

Spans are hand-built :class:`SpanRecord`s: only the hop view is under test here. The
explorer page, fed over OTLP/HTTP by the real SDK, is tested in ``test_tracestore.py``.
"""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from mesh.cli import trace_cmds
from mesh.hopattributes import EMULATION_COST
from mesh.tracestore.hopkinds import KINDS, OTHER, badge_css, kind_of
from mesh.tracestore.hops import build_hops, trace_view
from mesh.tracestore.otlp import SpanRecord

TRACE = "e" * 32

# Address plan of the hand-built journeys: client 127.0.0.1, ingress 127.100.0.1, Service
# shop/catalog 127.96.0.12:80, pod catalog-1 127.244.2.3:8080 on node-b, overlay VTEPs
# 127.10.0.1 (node-a) → 127.10.0.2 (node-b).
KUBE_PROXY = {
    "hopscope.hop": "kube-proxy",
    "k8s.service.name": "catalog",
    "k8s.namespace.name": "shop",
    "hopscope.endpoint.pod": "catalog-1",
    "hopscope.nat.original.src": "127.100.0.1:40000",
    "hopscope.nat.original.dst": "127.96.0.12:80",
    "hopscope.nat.translated.src": "127.10.0.1:40000",
    "hopscope.nat.translated.dst": "127.244.2.3:8080",
}
OVERLAY = {
    "hopscope.hop": "cni-overlay",
    "k8s.node.name": "node-a",
    "hopscope.overlay.vni": 1,
    "hopscope.overlay.outer.src": "127.10.0.1:4000",
    "hopscope.overlay.outer.dst": "127.10.0.2:8472",
    "hopscope.nat.original.src": "127.10.0.1:40000",
    "hopscope.nat.original.dst": "127.244.2.3:8080",
    "hopscope.nat.translated.src": "127.10.0.1:4000",
    "hopscope.nat.translated.dst": "127.10.0.2:8472",
}


def _span(
    sid: str, parent: str, attrs: dict[str, Any], start_us: int, end_us: int, status: str = "unset"
) -> SpanRecord:
    return SpanRecord(
        TRACE,
        sid,
        parent,
        sid,
        "internal",
        1_000 * start_us,
        1_000 * end_us,
        attrs,
        resource={"service.name": sid, "k8s.pod.name": f"{sid}-pod"},
        status=status,
    )


def _journey(kube_proxy_cost: object = 1734, overlay_cost: object = 250) -> list[SpanRecord]:
    """ingress → kube-proxy (1.9 ms) → cni-overlay (1.0 ms) → sidecar-inbound → app."""
    return [
        _span(
            "ingress", "", {"hopscope.hop": "ingress", "http.response.status_code": 200}, 0, 5000
        ),
        _span("kp", "ingress", {**KUBE_PROXY, EMULATION_COST: kube_proxy_cost}, 100, 2000),
        _span("ov", "ingress", {**OVERLAY, EMULATION_COST: overlay_cost}, 200, 1200),
        _span(
            "inbound",
            "ingress",
            {
                "hopscope.hop": "sidecar-inbound",
                "http.response.status_code": 200,
                "hopscope.via.span_id": "ov",
            },
            300,
            1100,
        ),
        _span(
            "app", "inbound", {"hopscope.hop": "app", "http.response.status_code": 200}, 400, 900
        ),
    ]


def test_every_kind_is_declared_once_and_the_emulated_ones_are_marked() -> None:
    assert all(name == kind.name for name, kind in KINDS.items())
    assert list(KINDS) == [
        "client",
        "dns",
        "ingress",
        "sidecar-outbound",
        "sidecar-inbound",
        "kube-proxy",
        "load-balancer",
        "cni-overlay",
        "egress-snat",
        "network-policy",
        "app",
    ]
    emulated = {name for name, kind in KINDS.items() if kind.emulated}
    assert emulated == {
        "kube-proxy",
        "load-balancer",
        "cni-overlay",
        "egress-snat",
        "network-policy",
    }
    css = badge_css()
    for kind in KINDS.values():
        assert f".hop-{kind.name} {{ background: {kind.colour}; }}" in css
    assert ".hop-other" in css


@pytest.mark.parametrize("name", [*KINDS, "a-kind-from-elsewhere"])
def test_every_kind_renders_and_reads_in_words_when_it_fails(name: str) -> None:
    """A failing hop of each kind, alone and below an ingress: a view, a verdict naming
    it, a packet walk, and a style — for a kind from a foreign span too."""
    spans = [
        _span("ingress", "", {"hopscope.hop": "ingress", "http.response.status_code": 503}, 0, 900),
        _span("x", "ingress", {"hopscope.hop": name, "k8s.node.name": "node-a"}, 10, 800, "error"),
    ]
    view = trace_view(TRACE, spans)
    assert [h["hop"] for h in view["hops"]] == ["ingress", name]
    assert view["verdict"]["ok"] is False and view["verdict"]["origin"] == name
    assert view["verdict"]["reason"] and view["verdict"]["group"]
    assert isinstance(view["packet_walk"], list)
    assert kind_of(name) is KINDS.get(name, OTHER)


def test_unknown_kind_reads_with_its_own_name() -> None:
    spans = [
        _span("x", "", {"hopscope.hop": "mesh-gateway", "k8s.node.name": "n1"}, 0, 10, "error")
    ]
    view = trace_view(TRACE, spans)
    assert view["verdict"]["reason"] == "the mesh-gateway hop at x-pod failed: error"
    assert view["verdict"]["group"] == "x mesh-gateway error"
    assert kind_of("mesh-gateway").css_class == "hop-other"


def test_emulation_cost_is_a_hop_field_apart_from_its_duration() -> None:
    hops = {h["hop"]: h for h in build_hops(_journey())}
    assert hops["kube-proxy"]["duration_ms"] == 1.9
    assert hops["kube-proxy"]["emulation_ms"] == 1.73
    assert hops["cni-overlay"]["emulation_ms"] == 0.25
    for kind in ("ingress", "sidecar-inbound", "app"):
        assert hops[kind]["emulation_ms"] is None
    public = trace_view(TRACE, _journey())["hops"]
    assert [h["emulation_ms"] for h in public] == [None, 1.73, 0.25, None, None]


@pytest.mark.parametrize("bad", ["1734", -5, True, float("nan"), None])
def test_a_malformed_emulation_cost_is_ignored(bad: object) -> None:
    hops = {h["hop"]: h for h in build_hops(_journey(kube_proxy_cost=bad))}
    assert hops["kube-proxy"]["emulation_ms"] is None
    assert hops["cni-overlay"]["emulation_ms"] == 0.25


def test_emulation_does_not_change_the_verdict_or_the_packet_walk() -> None:
    with_cost, without = trace_view(TRACE, _journey()), trace_view(TRACE, _journey(None, None))
    assert (
        with_cost["verdict"]
        == without["verdict"]
        == {
            "ok": True,
            "origin": None,
            "produced_by": None,
            "reason": "every hop succeeded",
        }
    )
    assert with_cost["packet_walk"] == without["packet_walk"]


def test_trace_cli_states_the_emulation_share_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    spans = _journey()
    view = {**trace_view(TRACE, spans), "spans": [s.to_dict() for s in spans]}
    buf = io.StringIO()
    monkeypatch.setattr(trace_cmds, "out", Console(file=buf, width=250, highlight=False))
    trace_cmds.render_waterfall(view)
    text = buf.getvalue()
    kube_proxy = text[text.index("kube-proxy") :]
    assert kube_proxy.index("1.9") < kube_proxy.index("(1.7 emulation)")
    assert "(0.2 emulation)" in text  # the overlay's 250 µs
    assert "not Kubernetes'" in text
    assert "░" in text  # the emulation share of the kube-proxy bar


def test_trace_cli_without_emulation_shows_plain_durations(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    spans = _journey(None, None)
    view = {**trace_view(TRACE, spans), "spans": [s.to_dict() for s in spans]}
    buf = io.StringIO()
    monkeypatch.setattr(trace_cmds, "out", Console(file=buf, width=250, highlight=False))
    trace_cmds.render_waterfall(view)
    assert "emulation" not in buf.getvalue() and "░" not in buf.getvalue()


def test_malformed_attributes_and_looping_links_still_render(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A foreign span's scalars where arrays belong, an infinite cost and spans naming each
    other as the hop they came through: the view, the verdict and the table still render."""
    spans = [
        _span("client", "", {"hopscope.hop": "client"}, 0, 900, status="error"),
        _span(
            "dns",
            "client",
            {"hopscope.hop": "dns", "hopscope.dns.answer": 5, "hopscope.dns.rcodes": 7},
            10,
            20,
            status="error",
        ),
        _span(
            "a",
            "client",
            {**KUBE_PROXY, EMULATION_COST: float("inf"), "hopscope.via.span_id": "b"},
            30,
            800,
            status="error",
        ),
        _span("b", "a", {**OVERLAY, "hopscope.via.span_id": "a"}, 40, 700, status="error"),
    ]
    view = {**trace_view(TRACE, spans), "spans": [s.to_dict() for s in spans]}
    assert {h["hop"] for h in view["hops"]} >= {"client", "dns", "kube-proxy", "cni-overlay"}
    assert all(h["emulation_ms"] is None for h in view["hops"])
    assert view["verdict"]["ok"] is False
    buf = io.StringIO()
    monkeypatch.setattr(trace_cmds, "out", Console(file=buf, width=250, highlight=False))
    trace_cmds.render_waterfall(view)
    assert "kube-proxy" in buf.getvalue()

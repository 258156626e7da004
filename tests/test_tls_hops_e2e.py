"""End to end: with mTLS between sidecars, kube-proxy's hop is still in every trace.

Real Envoy sidecars originate TLS to the Service VIP; the kube-proxy emulator sees only a
TLS stream and gives the connection one span of its own, which the trace store pairs back
below the caller's outbound span. The verdicts of failed handshakes name the side that
refused. Each test puts the shop back as shipped (no policy).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e_support import (
    CATALOG_PLAINTEXT_RULE,
    SHOP_STRICT,
    api_get,
    apply_manifest,
    dataplane,
    dump,
    hopscope,
    poll_until,
    trace_json,
)

pytestmark = pytest.mark.e2e


@pytest.fixture
def strict(cluster: dict[str, str], tmp_path: Path) -> Iterator[Path]:
    path = apply_manifest(cluster, tmp_path, "strict", SHOP_STRICT)
    try:
        yield path
    finally:
        hopscope("delete", "-f", str(path), env=cluster)


def _frontend() -> str:
    pods = api_get("/api/v1/state")["pods"]
    return str(next(p["name"] for p in pods if p["name"].startswith("frontend") and p["ready"]))


def _call(env: dict[str, str]) -> dict[str, Any]:
    url = "http://catalog:8080/items"
    proc = hopscope("curl", "--json", "--from", f"shop/{_frontend()}", url, env=env, check=False)
    return json.loads(proc.stdout) if proc.stdout.strip() else {"status": None}


def _outbound_to_catalog(view: dict[str, Any]) -> dict[str, Any] | None:
    """The frontend sidecar's mTLS call to catalog (under STRICT, catalog's own call to its
    cache is an mTLS outbound hop too, and it has no kube-proxy below it)."""
    return next(
        (
            h
            for h in view["hops"]
            if h["hop"] == "sidecar-outbound"
            and h["where"].startswith("frontend")
            and h["tls"].startswith("mTLS TLSv1.")
        ),
        None,
    )


def _failing_call_verdict(env: dict[str, str], words: str) -> dict[str, Any]:
    """Call until a request fails with 503 and its trace's verdict reason says ``words``:
    the verdict, with the outbound spans' TLS failure reasons. Each attempt raises what it
    saw, so a poll that gives up says how far it got."""

    def attempt() -> dict[str, Any]:
        doc = _call(env)
        if doc["status"] != 503:
            raise AssertionError(f"status {doc['status']}, trace {doc.get('trace_id')}")

        def named() -> dict[str, Any]:
            # the sidecars' spans come in batches: read the trace until they are in
            view = trace_json(doc["trace_id"])
            failures = [
                s["attributes"].get("hopscope.upstream.failure")
                for s in view["spans"]
                if s["attributes"].get("hopscope.hop") == "sidecar-outbound"
            ]
            verdict = {**view["verdict"], "failures": failures}
            if words not in verdict["reason"]:
                raise AssertionError(dump(verdict))
            return verdict

        return poll_until(named, timeout=5, interval=0.5)

    return poll_until(attempt, timeout=45, interval=0.5)


def test_the_kube_proxy_hop_of_an_mtls_call_is_paired_into_its_trace(
    cluster: dict[str, str], strict: Path
) -> None:
    """The relay cannot read an mTLS request, so it pairs its connection span into the
    trace; on the kernel path the hop comes from conntrack whatever the payload is."""
    kernel = dataplane() == "kernel"

    def paired_view(trace_id: str) -> dict[str, Any] | None:
        # whole once the catalog call's kube-proxy hop is in (on the userspace path: paired
        # by its connection, whose span comes when the connection closes)
        view = trace_json(trace_id)
        out = _outbound_to_catalog(view)
        below = [h for h in view["hops"] if out and h["parent_hop_id"] == out["span_id"]]
        # catalog's own inbound hop (each Envoy exports on its own: cache-1's, one call
        # further, may come first)
        whole = any(
            h["hop"] == "kube-proxy" and (kernel or h["paired_by"] == "connection") for h in below
        ) and any(
            h["hop"] == "sidecar-inbound" and h["where"].startswith("catalog") for h in view["hops"]
        )
        # a call that met the sidecars' switch to STRICT (a connection of catalog's call to
        # its cache cut: UC) is not the one this test is about: the next one is
        return view if whole and view["verdict"]["ok"] else None

    def paired() -> dict[str, Any] | None:
        doc = _call(cluster)
        if doc["status"] != 200:
            return None
        # The connection span is exported when the connection closes: poll the trace.
        return poll_until(lambda: paired_view(doc["trace_id"]), timeout=10)

    view = poll_until(paired, timeout=40, interval=0.5)
    hops = {h["span_id"]: h for h in view["hops"]}
    out = _outbound_to_catalog(view)
    assert out is not None, dump(view["hops"])
    assert "spiffe://cluster.local/ns/shop/sa/" in out["tls"], dump(out)
    (kp,) = [
        h for h in view["hops"] if h["hop"] == "kube-proxy" and h["parent_hop_id"] == out["span_id"]
    ]
    if not kernel:
        assert kp["paired_by"] == "connection" and kp["tls"].startswith("TLS (opaque)"), kp
    inbound = [
        h
        for h in view["hops"]
        if h["hop"] == "sidecar-inbound" and h["where"].startswith("catalog")
    ]
    assert inbound, dump(view["hops"])
    # The callee's sidecar nests below the paired hop that delivered to it (kube-proxy, or
    # its overlay child when the pod is on the other node).
    below = hops[inbound[0]["parent_hop_id"]]
    if kernel:
        assert below["span_id"] == kp["span_id"] or (
            below["hop"] == "cni-overlay" and below["parent_hop_id"] == kp["span_id"]
        ), dump(view["hops"])
    else:
        assert below["paired_by"] == "connection", dump(view["hops"])
    assert inbound[0]["tls"].startswith("mTLS TLSv1."), dump(inbound[0])
    assert view["verdict"]["ok"] is True, dump(view["verdict"])


def test_a_plaintext_call_to_strict_is_named_in_the_verdict(
    cluster: dict[str, str], strict: Path, tmp_path: Path
) -> None:
    poll_until(lambda: _call(cluster)["status"] == 200, timeout=20, interval=0.5)
    rule = apply_manifest(cluster, tmp_path, "rule", CATALOG_PLAINTEXT_RULE)
    try:
        verdict = _failing_call_verdict(cluster, "refused a plaintext connection")
        assert verdict["produced_by"] == "sidecar-inbound", dump(verdict)
        assert (
            "the catalog sidecar refused a plaintext connection: STRICT mTLS in namespace shop "
            "(PeerAuthentication shop/default)" in verdict["reason"]
        ), dump(verdict)
    finally:
        hopscope("delete", "-f", str(rule), env=cluster)


def test_an_expired_callee_certificate_is_named_in_the_verdict(
    cluster: dict[str, str], strict: Path
) -> None:
    poll_until(lambda: _call(cluster)["status"] == 200, timeout=20, interval=0.5)
    names = [p["name"] for p in api_get("/api/v1/state")["pods"] if p["name"].startswith("catalog")]
    for name in names:  # every catalog replica, whichever kube-proxy picks
        hopscope("cert", "pod", name, "--expire", "-o", "json", env=cluster)
    try:
        verdict = _failing_call_verdict(cluster, "certificate")
        assert verdict["produced_by"] == "sidecar-outbound", dump(verdict)
        assert (
            "sidecar rejected catalog's certificate: certificate has expired" in (verdict["reason"])
        ), dump(verdict)
    finally:
        for name in names:
            hopscope("cert", "pod", name, "--renew", env=cluster)

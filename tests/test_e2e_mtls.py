"""End to end: mutual TLS between sidecars, set by PeerAuthentication and DestinationRule.

Real Envoy sidecars, real handshakes with the cluster CA's workload certificates: the
sidecars' spans must say what TLS did, a plaintext client against STRICT must be refused
(and the refusal logged), and a certificate swapped in by the control plane must reach the
running sidecar without a restart. Each test puts the shop back as shipped (no policy).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

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


IDENTITY = "spiffe://cluster.local/ns/shop/sa/default"


@pytest.fixture
def strict(cluster: dict[str, str], tmp_path: Path) -> Iterator[Path]:
    path = apply_manifest(cluster, tmp_path, "strict", SHOP_STRICT)
    try:
        yield path
    finally:
        hopscope("delete", "-f", str(path), env=cluster)


def _pod(prefix: str) -> dict[str, Any]:
    state = api_get("/api/v1/state")
    return next(p for p in state["pods"] if p["name"].startswith(prefix) and p["ready"])


def _call(env: dict[str, str], url: str = "http://catalog:8080/items") -> dict[str, Any]:
    frontend = _pod("frontend")["name"]
    proc = hopscope("curl", "--json", "--from", f"shop/{frontend}", url, env=env, check=False)
    if proc.stdout.strip():
        return json.loads(proc.stdout)  # type: ignore[no-any-return]
    return {"status": None, "error": proc.stderr.strip()[-500:]}


def _until_status(env: dict[str, str], status: int) -> dict[str, Any]:
    """A frontend → catalog call once one answers ``status`` (the sidecars took a change)."""

    def answered() -> dict[str, Any] | None:
        doc = _call(env)
        return doc if doc["status"] == status else None

    return poll_until(answered, timeout=20, interval=0.5)


def _spans(trace_id: str, hop: str, count: int = 1, pod: str = "frontend") -> list[dict[str, Any]]:
    """The trace's spans of one hop kind in pods named ``pod…``, once ``count`` of them
    have arrived (each Envoy exports in batches of its own, so other pods' spans of the
    same kind may come first)."""

    def found() -> list[dict[str, Any]] | None:
        spans = [
            s
            for s in trace_json(trace_id)["spans"]
            if s["attributes"].get("hopscope.hop") == hop
            and str(s["attributes"].get("k8s.pod.name", "")).startswith(pod)
        ]
        return spans if len(spans) >= count else None

    return poll_until(found, timeout=10)


def _mtls_call(env: dict[str, str]) -> dict[str, Any]:
    """A frontend → catalog call once the sidecars run the policy (files reach Envoy
    within a moment of the apply)."""

    def settled() -> dict[str, Any]:
        doc = _call(env)
        if doc["status"] != 200:  # kept as poll_until's last error if it never settles
            raise AssertionError(f"frontend -> catalog: {doc.get('status')} {doc.get('error', '')}")
        (out,) = _spans(doc["trace_id"], "sidecar-outbound")[:1]
        mode = out["attributes"].get("hopscope.tls.mode")
        if mode != "mtls":
            raise AssertionError(f"frontend -> catalog went {mode}, not mtls (yet)")
        return doc

    return poll_until(settled, timeout=20, interval=0.5)


def test_strict_gives_every_sidecar_hop_mtls_with_identities(
    cluster: dict[str, str], strict: Path
) -> None:
    # once the catalog's sidecar has the policy too, its cache calls go over mTLS as well
    # (each sidecar reads its files on its own: they settle a moment apart)
    doc = poll_until(
        lambda: (
            (d := _mtls_call(cluster))
            and json.loads(d["body"] or "{}").get("cache") in ("hit", "miss")
            and d
        ),
        timeout=20,
    )
    (out,) = _spans(doc["trace_id"], "sidecar-outbound")[:1]
    a = out["attributes"]
    assert a["hopscope.upstream.peer_identity"] == IDENTITY, dump(a)
    assert str(a["hopscope.upstream.tls_version"]).startswith("TLSv1."), dump(a)
    assert a["hopscope.mtls.peer_mode"] == "STRICT", dump(a)
    assert a["hopscope.mtls.peer_policy"] == "PeerAuthentication shop/default", dump(a)
    inbound = [s["attributes"] for s in _spans(doc["trace_id"], "sidecar-inbound", pod="catalog")]
    assert inbound, dump(trace_json(doc["trace_id"])["hops"])
    b = inbound[0]
    assert b["hopscope.tls.mode"] == "mtls" and b["hopscope.mtls.mode"] == "STRICT", dump(b)
    assert b["hopscope.tls.peer_identity"] == IDENTITY, dump(b)
    assert str(b["tls.protocol.version"]).startswith("TLSv1."), dump(b)
    # catalog reaches its cache pods by pod IP (headless): through the node's gateway, which
    # tunnels the encrypted connection (CONNECT) — the cache answered, over mTLS.
    assert doc["body"] and json.loads(doc["body"])["cache"] in ("hit", "miss"), dump(doc)


def test_a_plaintext_client_is_refused_under_strict_and_the_sidecar_logs_why(
    cluster: dict[str, str], strict: Path
) -> None:
    _mtls_call(cluster)
    catalog = _pod("catalog")
    if dataplane() == "userspace":
        # The host is outside the mesh: no sidecar, no certificate.
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://{catalog['ip']}:8080/items", timeout=5)
    else:
        # Pod addresses exist inside the cluster only, behind the shop's policies: a
        # frontend pod's own process (its sidecar left out) calls in plaintext.
        frontend = _pod("frontend")
        script = (
            "import http.client as h\n"
            f"c = h.HTTPConnection('{catalog['ip']}', 8080, timeout=5)\n"
            "try:\n c.request('GET', '/items'); print(c.getresponse().status)\n"
            "except (OSError, h.HTTPException) as e:\n print('refused', type(e).__name__)\n"
        )
        run = hopscope(
            "exec", "--pod", f"shop/{frontend['name']}", "--", sys.executable, "-c", script,
            env=cluster,
        )  # fmt: skip
        assert run.stdout.startswith("refused"), run.stdout
    log = Path(cluster["HOPSCOPE_HOME"]) / "logs" / f"shop_{catalog['name']}_envoy.log"

    def refused() -> dict[str, Any] | None:
        for line in log.read_text().splitlines():
            if '"connection refused' in line:
                record: dict[str, Any] = json.loads(line)
                return record
        return None

    record = poll_until(refused, timeout=10)
    assert record["mtls_mode"] == "STRICT", record
    assert record["mtls_policy"] == "PeerAuthentication shop/default", record
    assert record["response_flags"] == "NR", record


def test_a_destination_rule_sending_plaintext_to_strict_fails_with_both_sides_named(
    cluster: dict[str, str], strict: Path, tmp_path: Path
) -> None:
    _mtls_call(cluster)
    rule = apply_manifest(cluster, tmp_path, "rule", CATALOG_PLAINTEXT_RULE)
    try:
        doc = _until_status(cluster, 503)
        (out,) = _spans(doc["trace_id"], "sidecar-outbound")[:1]
        a = out["attributes"]
        assert a["hopscope.tls.mode"] == "plaintext", dump(a)
        assert a["hopscope.mtls.peer_mode"] == "STRICT", dump(a)
        assert a["hopscope.mtls.origination"].startswith("DestinationRule shop/catalog"), dump(a)
    finally:
        hopscope("delete", "-f", str(rule), env=cluster)


def test_an_expired_certificate_fails_the_handshake_and_a_renewal_needs_no_restart(
    cluster: dict[str, str], strict: Path
) -> None:
    _mtls_call(cluster)
    catalog = _pod("catalog")
    other = [
        p
        for p in api_get("/api/v1/state")["pods"]
        if p["name"].startswith("catalog") and p["name"] != catalog["name"]
    ]
    names = [catalog["name"], *(p["name"] for p in other)]
    for name in names:  # every catalog replica, whichever kube-proxy picks
        shown = json.loads(
            hopscope("cert", "pod", name, "--expire", "-o", "json", env=cluster).stdout
        )
        assert shown["expired"] is True and shown["identity"] == IDENTITY, shown
    try:
        doc = _until_status(cluster, 503)
        (out,) = _spans(doc["trace_id"], "sidecar-outbound")[:1]
        a = out["attributes"]
        assert "CERTIFICATE_VERIFY_FAILED" in str(a.get("hopscope.upstream.failure")), dump(a)
    finally:
        for name in names:
            hopscope("cert", "pod", name, "--renew", env=cluster)
    doc = _until_status(cluster, 200)
    assert doc["status"] == 200
    restarts = {p["name"]: p["restarts"] for p in api_get("/api/v1/state")["pods"]}
    assert all(restarts[name] == 0 for name in names), restarts


def test_get_lists_the_policies_kubectl_style(cluster: dict[str, str], strict: Path) -> None:
    table = hopscope("get", "peerauthentications", "-n", "shop", env=cluster).stdout
    assert "default" in table and "STRICT" in table and "<namespace>" in table, table
    doc = json.loads(
        hopscope("get", "pa", "default", "-n", "shop", "-o", "json", env=cluster).stdout
    )
    assert doc["apiVersion"] == "security.istio.io/v1" and doc["kind"] == "PeerAuthentication"
    assert doc["spec"] == {"mtls": {"mode": "STRICT"}} and doc["metadata"]["uid"], doc
    listed = json.loads(hopscope("get", "destinationrules", "-o", "json", env=cluster).stdout)
    assert listed["kind"] == "List" and listed["items"] == [], listed
    bad = hopscope("get", "peerauthentication", "nosuch", env=cluster, check=False)
    assert bad.returncode == 1 and "not found" in bad.stderr

"""End to end: cluster DNS, the overlay between nodes, egress SNAT and NetworkPolicy.

The sample cluster the e2e modules share (tests/conftest.py). Tests that change policy or
CNI settings put the shipped manifests back before they finish, so they do not leak into
each other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from mesh import addresses
from tests.e2e_support import (
    api_get,
    dataplane,
    dump,
    hopscope,
    node_metrics,
    plan,
    poll_until,
    trace_json,
)

pytestmark = pytest.mark.e2e

MANIFESTS = Path(__file__).resolve().parents[1] / "apps" / "manifests"
KUBE_PROXY_METRICS = f"http://{addresses.NODE_IPS['node-a']}:{addresses.KUBE_PROXY_METRICS_PORT}"


def _curl(env: dict[str, str], path: str = "/") -> tuple[int, str]:
    doc = json.loads(hopscope("curl", "--json", f"http://shop.local{path}", env=env).stdout)
    return doc["status"], doc["trace_id"]


def _spans(trace_id: str, wanted: set[str], timeout: float = 15) -> list[dict[str, Any]]:
    """The trace's spans once every hop kind in ``wanted`` has arrived."""

    def ready() -> list[dict[str, Any]] | None:
        spans = trace_json(trace_id)["spans"]
        kinds = {s["attributes"].get("hopscope.hop") for s in spans}
        return spans if wanted <= kinds else None

    try:
        return poll_until(ready, timeout=timeout)
    except AssertionError:
        raise AssertionError(dump(trace_json(trace_id)["hops"])) from None


def _spans_with(trace_id: str, attribute: str, value: str) -> list[dict[str, Any]]:
    """The trace's spans whose ``attribute`` is ``value``, once there is one (10 s at most)."""

    def matching() -> list[dict[str, Any]]:
        spans = trace_json(trace_id)["spans"]
        return [s for s in spans if s["attributes"].get(attribute) == value]

    return poll_until(matching, timeout=10)


def _apply(env: dict[str, str], tmp_path: Path, docs: list[dict[str, Any]]) -> None:
    path = tmp_path / "change.yaml"
    path.write_text(yaml.safe_dump_all(docs))
    hopscope("apply", "-f", str(path), env=env)


def _shipped(file: str, kind: str, name: str) -> dict[str, Any]:
    for doc in yaml.safe_load_all((MANIFESTS / file).read_text()):
        if doc["kind"] == kind and doc["metadata"]["name"] == name:
            return doc  # type: ignore[no-any-return]
    raise KeyError(name)


def _pods() -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in api_get("/api/v1/state")["pods"]}


def _children(spans: list[dict[str, Any]], span_id: str) -> list[dict[str, Any]]:
    return [s for s in spans if s["parent_span_id"] == span_id]


# -- overlay --------------------------------------------------------------------------------


def test_cross_node_legs_cross_the_overlay_and_same_node_legs_do_not(
    cluster: dict[str, str],
) -> None:
    pods = _pods()
    pod_nodes = {p["ip"]: p["node"] for p in pods.values()}
    before = node_metrics()
    node_ips = plan()["NODE_IPS"]  # the underlay: where VXLAN packets go
    crossed = same = 0
    for _ in range(12):
        _, trace_id = _curl(cluster)
        spans = poll_until(lambda t=trace_id: _complete_shop_trace(t), timeout=15)
        for kp in (s for s in spans if s["attributes"].get("hopscope.hop") == "kube-proxy"):
            a = kp["attributes"]
            src_ip = a["hopscope.nat.original.src"].split(":")[0]
            src_node = pod_nodes.get(src_ip, addresses.INGRESS_NODE)
            dst_node = a["hopscope.endpoint.node"]
            overlay = [
                c
                for c in _children(spans, kp["span_id"])
                if c["attributes"].get("hopscope.hop") == "cni-overlay"
            ]
            if src_node == dst_node:
                same += 1
                assert not overlay, a
                continue
            crossed += 1
            assert len(overlay) == 1, dump(a)
            o = overlay[0]["attributes"]
            assert o["hopscope.overlay.outer.src"].split(":")[0] == node_ips[src_node]
            assert o["hopscope.overlay.outer.dst"] == f"{node_ips[dst_node]}:{addresses.VTEP_PORT}"
            assert o["hopscope.overlay.vni"] == 1
            assert o["hopscope.nat.original.dst"] == a["hopscope.nat.translated.dst"]
            # the pod behind the tunnel served it, and saw the inner (pod) source
            # (trace context passes the tunnel unchanged; the sidecar names the overlay hop)
            if dataplane() == "userspace":
                inbound = [
                    s
                    for s in spans
                    if s["attributes"].get("hopscope.via.span_id") == overlay[0]["span_id"]
                ]
            else:  # the callee's sidecar accepted the connection the kernel translated
                inbound = [
                    s
                    for s in spans
                    if s["attributes"].get("hopscope.hop") == "sidecar-inbound"
                    and s["attributes"].get("hopscope.downstream.remote_address")
                    == a["hopscope.nat.translated.src"]
                ]
            assert inbound and inbound[0]["attributes"]["k8s.node.name"] == dst_node
        if crossed >= 2 and same >= 2:
            break
    assert crossed >= 2 and same >= 1, (crossed, same)
    # (on the kernel path a connection counts once conntrack has seen it answered: at the
    # next table dump, every few seconds, or when it closes)
    overlays = "hopscope_cni_overlay_connections_total"
    poll_until(lambda: _metric_sum(node_metrics(), overlays) > _metric_sum(before, overlays))


def _complete_shop_trace(trace_id: str) -> list[dict[str, Any]] | None:
    spans = trace_json(trace_id)["spans"]
    services = {
        s["attributes"].get("k8s.service.name")
        for s in spans
        if s["attributes"].get("hopscope.hop") == "kube-proxy"
    }
    apps = [s for s in spans if s["attributes"].get("hopscope.hop") == "app"]
    return (
        spans
        if services >= {"frontend", "catalog", "reviews", "ratings"} and len(apps) >= 5
        else None
    )


def _metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_overlay_delay_makes_cross_node_legs_slower(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    config = _shipped("cni.yaml", "ConfigMap", "hopscope-cni")
    slow = json.loads(json.dumps(config))
    slow["data"]["overlayDelay"] = "40ms"
    _apply(cluster, tmp_path, [slow])
    try:
        if dataplane() == "kernel":  # a netem qdisc on the VXLAN devices, where there is one
            health = poll_until(
                lambda: (
                    (h := requests.get(f"{KUBE_PROXY_METRICS}/healthz", timeout=5).json())
                    and (h.get("overlayDelayMs") == 40 or h.get("overlayDelayError"))
                    and h
                )
            )
            if health.get("overlayDelayError"):
                pytest.skip(health["overlayDelayError"])
        found = None
        for _ in range(10):
            _, trace_id = _curl(cluster)
            spans = poll_until(lambda t=trace_id: _complete_shop_trace(t), timeout=15)
            found = next(
                (
                    s
                    for s in spans
                    if s["attributes"].get("hopscope.hop") == "cni-overlay"
                    and s["attributes"]["hopscope.overlay.delay_ms"] == 40
                ),
                None,
            )
            if found:
                break
        assert found is not None, "no cross-node leg with the new delay in 10 requests"
        # one-way delay each way: a request and its response cost at least 2 x 40 ms
        assert found["duration_ms"] >= 80, found["duration_ms"]
    finally:
        _apply(cluster, tmp_path, [config])


# -- egress ---------------------------------------------------------------------------------


def test_external_name_and_egress_snat(cluster: dict[str, str]) -> None:
    status, trace_id = _curl(cluster, "/checkout")
    assert status == 200
    spans = _spans(trace_id, {"egress-snat", "dns", "app"})  # the app span names the pod
    egress = next(s for s in spans if s["attributes"].get("hopscope.hop") == "egress-snat")
    a = egress["attributes"]
    frontend = _pods()[
        next(
            s["attributes"]["k8s.pod.name"]
            for s in spans
            if s["attributes"].get("hopscope.hop") == "app"
        )
    ]
    egress_ip = api_get("/api/v1/state")["network"]["egress_ips"][frontend["node"]]
    assert a["hopscope.nat.original.src"].split(":")[0] == frontend["ip"]
    assert a["hopscope.nat.translated.src"].split(":")[0] == egress_ip
    payments = plan()["EXTERNAL_HOSTS"]["payments.example.net."]
    assert a["hopscope.nat.original.dst"] == f"{payments}:8080"
    if dataplane() == "userspace":  # the relay read the reply; the kernel's SNAT does not
        assert a["http.response.status_code"] == 200
    dns = next(s for s in spans if s["attributes"].get("hopscope.hop") == "dns")
    assert dns["attributes"]["hopscope.dns.answer"] == [payments]
    # and the external server really saw the egress IP, not the pod
    doc = json.loads(hopscope("curl", "--json", "http://shop.local/checkout", env=cluster).stdout)
    seen_by_payments = json.loads(doc["body"])["payment"]["client_address"]
    assert seen_by_payments in set(api_get("/api/v1/state")["network"]["egress_ips"].values())


# -- NetworkPolicy --------------------------------------------------------------------------


def test_get_netpol_lists_the_shipped_policies(cluster: dict[str, str]) -> None:
    doc = json.loads(hopscope("get", "netpol", "-o", "json", env=cluster).stdout)
    # v1 objects (metadata.namespace/name) or hopscope's flat summary
    names = {"{namespace}/{name}".format(**p.get("metadata", p)) for p in doc["items"]}
    assert names >= {"shop/default-deny", "shop/allow-dns", "shop/frontend", "shop/catalog"}


def test_policy_deny_through_a_service_is_in_the_trace_metrics_and_logs(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    shipped = _shipped("shop-netpol.yaml", "NetworkPolicy", "catalog")
    locked = json.loads(json.dumps(shipped))
    locked["spec"]["ingress"][0]["from"] = [{"podSelector": {"matchLabels": {"app": "admin"}}}]
    _apply(cluster, tmp_path, [locked])
    try:
        status, trace_id = _curl(cluster)
        assert status == 502
        spans = _spans(trace_id, {"kube-proxy", "sidecar-outbound"})
        # The relay refuses the connection itself: its kube-proxy hop carries the verdict.
        # On the kernel path kube-proxy DNATs and the node's filter rules drop the SYN: a
        # network-policy hop below the kube-proxy hop, as a real node does it.
        blamed = "kube-proxy" if dataplane() == "userspace" else "network-policy"
        denied = [
            s
            for s in _spans_with(trace_id, "hopscope.policy.verdict", "deny")
            if s["attributes"]["hopscope.hop"] == blamed
        ]
        a = denied[0]["attributes"]
        if blamed == "network-policy":
            parent = next(s for s in spans if s["span_id"] == denied[0]["parent_span_id"])
            a = {**parent["attributes"], **a}
        assert a["k8s.service.name"] == "catalog", dump(a)
        assert a["hopscope.policy.side"] == "ingress"
        assert "shop/catalog" in a["hopscope.policy.names"]
        # once every span is in, the deepest failing hop is the one to blame
        try:
            view = poll_until(
                lambda: (v := trace_json(trace_id))["verdict"]["origin"] == blamed and v,
                timeout=10,
            )
        except AssertionError:
            raise AssertionError(trace_json(trace_id)["verdict"]) from None
        assert "NetworkPolicy" in view["verdict"]["reason"]
        metrics = poll_until(
            lambda: (
                (t := requests.get(f"{KUBE_PROXY_METRICS}/metrics", timeout=5).text)
                and 'hopscope_networkpolicy_denied_connections_total{namespace="shop"' in t
                and t
            )
        )
        assert 'policy="shop/catalog"' in metrics or 'policy="shop/default-deny"' in metrics
        log = Path(cluster["HOPSCOPE_HOME"]) / "logs" / "kube-system_kube-proxy.log"
        if blamed == "kube-proxy":  # the relay's refusal log line carries the trace
            poll_until(
                lambda: trace_id in log.read_text() and "denied by NetworkPolicy" in log.read_text()
            )
        else:  # the node's drop: the packet's tuple, with the catalog pod's address
            catalog_ips = {p["ip"] for p in _pods().values() if p["name"].startswith("catalog")}
            poll_until(
                lambda: any(
                    "dropped by NetworkPolicy" in line and ip in line
                    for line in log.read_text().splitlines()
                    for ip in catalog_ips
                )
            )
    finally:
        _apply(cluster, tmp_path, [shipped])
    assert poll_until(lambda: _curl(cluster)[0] == 200, timeout=10)


def test_policy_deny_of_direct_pod_traffic(cluster: dict[str, str], tmp_path: Path) -> None:
    """catalog → cache goes pod to pod (headless): the node gateway enforces it."""
    shipped = _shipped("shop-netpol.yaml", "NetworkPolicy", "cache")
    locked = json.loads(json.dumps(shipped))
    locked["spec"]["ingress"][0]["from"] = [{"podSelector": {"matchLabels": {"app": "admin"}}}]
    _apply(cluster, tmp_path, [locked])
    try:
        _status, trace_id = _curl(cluster)  # the catalog serves without its cache
        denied = _spans_with(trace_id, "hopscope.hop", "network-policy")
        a = denied[0]["attributes"]
        assert a["hopscope.policy.verdict"] == "deny" and a["hopscope.policy.side"] == "ingress"
        assert a["hopscope.endpoint.pod"].startswith("cache-")
        assert "shop/cache" in a["hopscope.policy.names"]
    finally:
        _apply(cluster, tmp_path, [shipped])


def test_direct_pod_ip_traffic_is_checked_on_both_sides(cluster: dict[str, str]) -> None:
    """Straight to a pod IP (no Service): allowed where a rule allows, denied at egress else."""
    pods = _pods()
    frontend = next(p for p in pods.values() if p["name"].startswith("frontend"))
    catalog = next(p for p in pods.values() if p["name"].startswith("catalog"))
    ok = hopscope(
        "curl",
        "--json",
        "--from",
        f"shop/{frontend['name']}",
        f"http://{catalog['ip']}:8080/items",
        env=cluster,
    )
    assert json.loads(ok.stdout)["status"] == 200
    # catalog may only call its cache: calling a frontend pod is refused at catalog's egress
    denied = hopscope(
        "curl",
        "--json",
        "--from",
        f"shop/{catalog['name']}",
        f"http://{frontend['ip']}:8080/",
        env=cluster,
        check=False,
    )
    doc = json.loads(denied.stdout)
    assert doc["status"] == 503, doc
    spans = _spans_with(doc["trace_id"], "hopscope.hop", "network-policy")
    a = spans[0]["attributes"]
    assert a["hopscope.policy.side"] == "egress" and "shop/catalog" in a["hopscope.policy.names"]
    assert a["hopscope.nat.original.src"].split(":")[0] == catalog["ip"]


# -- DNS ------------------------------------------------------------------------------------


def test_dig_answers_like_dig(cluster: dict[str, str]) -> None:
    def dig(*args: str) -> dict[str, Any]:
        return json.loads(hopscope("dig", *args, "--json", env=cluster).stdout)  # type: ignore[no-any-return]

    cache = dig("cache.shop.svc.cluster.local")
    assert cache["status"] == "NOERROR"
    cache_ips = {p["ip"] for p in _pods().values() if p["name"].startswith("cache-")}
    assert {r["data"] for r in cache["answer"]} == cache_ips
    assert all(r["ttl"] == 5 for r in cache["answer"])
    missing = dig("nosuch.shop.svc.cluster.local")
    assert missing["status"] == "NXDOMAIN" and missing["answer"] == []
    frontend = next(p for p in _pods().values() if p["name"].startswith("frontend"))
    external = dig("payments", "--from", f"shop/{frontend['name']}")
    assert [r["type"] for r in external["answer"]] == ["CNAME", "A"]
    assert external["answer"][-1]["data"] == plan()["EXTERNAL_HOSTS"]["payments.example.net."]
    costly = dig("api.example.com", "--from", f"shop/{frontend['name']}")
    assert [q["status"] for q in costly["queries"]] == ["NXDOMAIN"] * 4
    assert costly["queries"][0]["name"] == "api.example.com.shop.svc.cluster.local."
    srv = dig("_grpc._tcp.reviews.shop.svc.cluster.local", "SRV", "--tcp")
    assert srv["protocol"] == "TCP" and srv["answer"][0]["type"] == "SRV"
    text = hopscope("dig", "kubernetes.default.svc.cluster.local", env=cluster).stdout
    assert "status: NOERROR" in text and plan()["KUBERNETES_SERVICE_IP"] in text

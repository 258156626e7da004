"""``hopscope up --dataplane kernel``: the sample shop on real namespaces, rules and conntrack.

A cluster of its own (tests/conftest.py's pool), as root: nodes and pods are network
namespaces, kube-proxy's rules are loaded into the nodes, and the kube-proxy hops in the
traces are written from the nodes' conntrack tables. The tests check what the kernel did
(the endpoint that served, the tuples, the VXLAN counters, the live rules and conntrack
entries) against what the trace says, and that nothing is left behind.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from mesh.kernel.iptables import endpoint_chain, service_chain
from mesh.kernel.topology import kernel_support
from tests.e2e_support import (
    ClusterPool,
    ClusterSpec,
    api_get,
    dump,
    hopscope,
    poll_until,
    trace_json,
    traced_shop_requests,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(kernel_support() is not None, reason=str(kernel_support())),
]

SPEC = ClusterSpec(up_args=("--dataplane", "kernel"))


@pytest.fixture(scope="module")
def kernel_cluster(cluster_pool: ClusterPool) -> Iterator[dict[str, str]]:
    with cluster_pool.exclusive(SPEC, __name__) as cluster:
        yield cluster.env
    assert _leftovers() == [], "hopscope down left namespaces behind"


def _leftovers() -> list[str]:
    from pyroute2 import netns

    names = [n for n in netns.listnetns() if n.startswith("hopscope-")]
    etc = Path("/etc/netns")
    if etc.is_dir():
        names += [str(p) for p in etc.glob("hopscope-*")]
    return names


def _children(view: dict[str, Any], span_id: str) -> list[dict[str, Any]]:
    return [s for s in view["spans"] if s["parent_span_id"] == span_id]


def test_status_names_the_kernel_data_path(kernel_cluster: dict[str, str]) -> None:
    status = api_get("/api/v1/status")
    assert status["dataplane"] == "kernel" and status["ready"], dump(status)
    names = {c["name"] for c in status["components"]}
    assert {"kube-proxy", "host-forward", "cluster-dns", "ingress-envoy"} <= names
    assert "cni" not in names  # the overlay is the kernel's


def test_kube_proxy_hops_come_from_the_kernel_with_the_hop_contract(
    kernel_cluster: dict[str, str],
) -> None:
    pods = {p["name"]: p for p in api_get("/api/v1/status")["pods"]}
    ips = {p["ip"]: name for name, p in pods.items()}
    for view in traced_shop_requests(4):
        by_id = {s["span_id"]: s for s in view["spans"]}
        for span in view["spans"]:
            a = span["attributes"]
            if a.get("hopscope.hop") != "kube-proxy":
                continue
            assert a["hopscope.dataplane"] == "kernel", a
            assert a["hopscope.conntrack.state"] in ("new", "established"), a
            # the caller's span is the parent; its upstream connection is the original tuple
            caller = by_id[span["parent_span_id"]]["attributes"]
            assert a["hopscope.nat.original.src"] == caller["hopscope.upstream.local_address"]
            assert a["hopscope.nat.original.dst"] == caller["hopscope.upstream.address"]
            # the request reached the pod the kernel translated to
            served = a["hopscope.nat.translated.dst"]
            assert ips[served.rsplit(":", 1)[0]] == a["hopscope.endpoint.pod"], a
            callee = [
                s
                for s in _children(view, span["parent_span_id"])
                if s["attributes"].get("hopscope.hop") == "sidecar-inbound"
            ]
            assert len(callee) == 1, dump(callee)
            inbound = callee[0]["attributes"]
            assert inbound["k8s.pod.name"] == a["hopscope.endpoint.pod"]
            assert inbound["hopscope.downstream.remote_address"] == a["hopscope.nat.translated.src"]
            name = f"shop/{a['k8s.service.name']}:{'grpc' if a['server.port'] == 50051 else 'http'}"
            assert a["hopscope.rule.chains"][-2:] == [
                service_chain(name),
                endpoint_chain(name, "tcp", served),
            ], a
            if a["k8s.service.name"] != "frontend":  # pod to ClusterIP: DNAT only
                assert a["hopscope.nat.translated.src"] == a["hopscope.nat.original.src"], a
                assert a["hopscope.nat.snat"] is False
            else:  # from the ingress (outside the cluster CIDR): masqueraded on the node
                assert a["hopscope.nat.snat"] is True
            # the hop spans its callee; what it adds is the kernel's and the wire's
            self_ns = (callee[0]["start_ns"] - span["start_ns"]) + max(
                0, span["end_ns"] - callee[0]["end_ns"]
            )
            assert span["start_ns"] <= callee[0]["start_ns"] and self_ns < 5_000_000, (span, callee)


def test_grpc_calls_ride_an_established_conntrack_entry(kernel_cluster: dict[str, str]) -> None:
    states = [
        s["attributes"]["hopscope.conntrack.state"]
        for view in traced_shop_requests(4)
        for s in view["spans"]
        if s["attributes"].get("hopscope.hop") == "kube-proxy"
        and s["attributes"]["k8s.service.name"] in ("reviews", "ratings")
    ]
    assert states.count("established") >= 6, states


def test_the_verdict_and_packet_walk_read_the_kernel_hops(kernel_cluster: dict[str, str]) -> None:
    [view] = traced_shop_requests(1)
    assert view["verdict"]["ok"] is True, dump(view["verdict"])
    stages = [row["stage"] for row in view["packet_walk"]]
    assert "after kube-proxy" in stages and "reply after conntrack" in stages, stages


def test_live_rules_and_conntrack_entries_are_the_kernels(kernel_cluster: dict[str, str]) -> None:
    traced_shop_requests(1)
    saved = hopscope("iptables-save", "--node", "node-a", "-t", "nat", env=kernel_cluster).stdout
    assert saved.startswith("# Generated by iptables-save"), saved[:200]
    assert f":{service_chain('shop/catalog:http')} - " in saved
    entries = json.loads(hopscope("conntrack", "-o", "json", env=kernel_cluster).stdout)
    catalog = [e for e in entries if e["service"] == "shop/catalog:http"]
    assert catalog and all(e["dnat"] for e in catalog), dump(entries)
    assert {e["node"] for e in entries} <= {"node-a", "node-b"}
    table = hopscope("conntrack", env=kernel_cluster).stdout
    assert "shop/catalog:http" in table and "DNAT" in table
    # entries of no Service (egress SNAT) in the table do not trip the filter
    only = hopscope("conntrack", "-o", "json", "--service", "catalog", env=kernel_cluster)
    assert {e["service"] for e in json.loads(only.stdout)} == {"shop/catalog:http"}


def test_vxlan_carries_the_cross_node_calls(kernel_cluster: dict[str, str]) -> None:
    def counters() -> dict[str, int]:
        out = hopscope(
            "exec",
            "--node",
            "node-b",
            "--",
            "ip",
            "-j",
            "-s",
            "link",
            "show",
            "flannel.1",
            env=kernel_cluster,
        ).stdout
        stats = json.loads(out)[0]["stats64"]
        return {"rx": stats["rx"]["packets"], "tx": stats["tx"]["packets"]}

    before = counters()
    views = traced_shop_requests(4)
    crossing = [
        s
        for v in views
        for s in v["spans"]
        if s["attributes"].get("hopscope.hop") == "kube-proxy"
        and s["attributes"]["k8s.node.name"] != s["attributes"]["hopscope.endpoint.node"]
    ]
    after = counters()
    assert crossing, "no call crossed nodes in 4 requests"
    assert after["rx"] > before["rx"] and after["tx"] > before["tx"], (before, after)
    node_ips = {"node-a": "10.10.0.1", "node-b": "10.10.0.2"}
    for view in views:
        hops = {h["span_id"]: h for h in view["hops"]}
        for span in view["spans"]:
            a = span["attributes"]
            if (
                a.get("hopscope.hop") != "kube-proxy"
                or a["k8s.node.name"] == a["hopscope.endpoint.node"]
            ):
                continue
            [overlay] = [
                s
                for s in _children(view, span["span_id"])
                if s["attributes"].get("hopscope.hop") == "cni-overlay"
            ]
            o = overlay["attributes"]
            assert o["hopscope.overlay.vni"] == 1 and o["hopscope.overlay.device"] == "flannel.1"
            assert (
                o["hopscope.overlay.outer.dst"] == f"{node_ips[a['hopscope.endpoint.node']]}:8472"
            )
            # the outer source port: the kernel's hash, read from the logged encapsulated SYN
            outer_ip, _, outer_port = o["hopscope.overlay.outer.src"].partition(":")
            assert outer_ip == node_ips[a["k8s.node.name"]], o
            assert outer_port.isdigit() and 0 < int(outer_port) < 65536, o
            assert o["hopscope.nat.original.dst"] == a["hopscope.nat.translated.dst"]
            # the journey: the callee's sidecar below the overlay, the overlay below kube-proxy
            callee = [h for h in hops.values() if h["parent_hop_id"] == overlay["span_id"]]
            assert [h["hop"] for h in callee] == ["sidecar-inbound"], dump(view["hops"])
            assert hops[overlay["span_id"]]["parent_hop_id"] == span["span_id"]


def test_exec_runs_in_the_pods_network_with_the_cluster_dns(kernel_cluster: dict[str, str]) -> None:
    pod = next(p for p in api_get("/api/v1/status")["pods"] if p["name"].startswith("frontend-"))
    addrs = hopscope(
        "exec",
        "--pod",
        f"shop/{pod['name']}",
        "--",
        "ip",
        "-4",
        "-o",
        "addr",
        "show",
        "eth0",
        env=kernel_cluster,
    ).stdout
    assert f"inet {pod['ip']}/24" in addrs, addrs
    resolv = hopscope(
        "exec", "--pod", pod["name"], "--", "cat", "/etc/resolv.conf", env=kernel_cluster
    ).stdout
    assert "nameserver 10.96.0.10" in resolv and "search shop.svc.cluster.local" in resolv
    bad = hopscope("exec", "--node", "node-z", "--", "true", env=kernel_cluster, check=False)
    assert bad.returncode != 0 and "node 'node-z' not found" in bad.stderr
    both = hopscope(
        "exec",
        "--node",
        "node-a",
        "--pod",
        pod["name"],
        "--",
        "true",
        env=kernel_cluster,
        check=False,
    )
    assert both.returncode == 2 and "exactly one of --node or --pod" in both.stderr


def test_network_policy_drops_are_kernel_rules_named_in_the_trace(
    kernel_cluster: dict[str, str],
) -> None:
    """The shop's own policies are loaded as filter rules; the netpol-deny scenario's drops
    come back from NFLOG as network-policy hops naming the policies, and the verdict says so."""
    saved = hopscope("iptables-save", "--node", "node-a", "-t", "filter", env=kernel_cluster).stdout
    assert '-A FORWARD -m comment --comment "hopscope network policies" -j HOPSCOPE-POLICY' in saved
    assert "--nflog-group 5" in saved and "-j DROP" in saved
    run = hopscope("scenario", "run", "netpol-deny", "--json", env=kernel_cluster, timeout=180)
    result = json.loads(run.stdout)
    assert result["ok"] is True, dump(result)
    trace_id = result["trace_ids"][0]
    view = trace_json(trace_id)
    [deny] = [s for s in view["spans"] if s["attributes"].get("hopscope.hop") == "network-policy"]
    a = deny["attributes"]
    assert a["hopscope.policy.verdict"] == "deny" and a["hopscope.policy.side"] == "ingress"
    assert "shop/catalog" in a["hopscope.policy.names"]
    assert a["hopscope.policy.nflog_prefix"].startswith("deny ingress shop/catalog-")
    assert a["hopscope.dataplane"] == "kernel" and deny["status"] == "error"
    parent = next(s for s in view["spans"] if s["span_id"] == deny["parent_span_id"])
    assert parent["attributes"]["hopscope.hop"] == "kube-proxy"
    assert parent["attributes"]["hopscope.nat.translated.dst"] == a["hopscope.nat.original.dst"]
    assert view["verdict"]["produced_by"] == "network-policy", dump(view["verdict"])


def test_a_service_without_endpoints_is_refused_and_blamed_on_kube_proxy(
    kernel_cluster: dict[str, str],
) -> None:
    run = hopscope("scenario", "run", "no-endpoints", "--json", env=kernel_cluster, timeout=180)
    result = json.loads(run.stdout)
    assert result["ok"] is True, dump(result)


@pytest.mark.parametrize(
    "scenario",
    ["stale-kube-proxy", "outlier-ejection", "external-traffic-local", "session-affinity"],
)
def test_scenarios_that_need_the_nodes_own_rules_pass_on_the_kernel(
    kernel_cluster: dict[str, str], scenario: str
) -> None:
    """Paused rule sync (stale DNAT to pods that are gone), sidecar admin pages read through
    the API's pod proxy, NodePorts reached from the host with the client's identity kept,
    and ClientIP affinity read from the ``recent`` lists."""
    run = hopscope("scenario", "run", scenario, "--json", env=kernel_cluster, timeout=240)
    result = json.loads(run.stdout)
    assert result["ok"] is True, dump(result)


def test_node_ports_answer_on_the_hosts_node_addresses_with_the_clients_address(
    kernel_cluster: dict[str, str],
) -> None:
    """The lab's NodePorts on 127.10.0.1/2 (the host's node addresses): through node-a the
    echo pod sees the client's inner address and the trace's kube-proxy hop names the
    NodePort chains; node-b has no local endpoint and its rule drops, named in the trace."""
    lab = Path(__file__).resolve().parents[1] / "mesh" / "scenarios" / "manifests" / "lab.yaml"
    hopscope("apply", "-f", str(lab), env=kernel_cluster)
    try:
        poll_until(
            lambda: [
                p
                for p in api_get("/api/v1/status")["pods"]
                if p["name"].startswith("echo-local") and p["ready"]
            ],
            timeout=60,
        )
        done = poll_until(
            lambda: (lambda r: r if r.returncode == 0 else None)(
                hopscope(
                    "curl", "--json", "http://127.10.0.1:30090/", env=kernel_cluster, check=False
                )
            ),
            timeout=30,
        )
        reply = json.loads(done.stdout)
        assert reply["status"] == 200, reply
        assert json.loads(reply["body"])["peer"] == "10.100.0.1", reply  # 127.100.0.1 inside

        def node_port_hop() -> dict[str, Any] | None:
            view = trace_json(reply["trace_id"])
            hops = [s for s in view["spans"] if s["attributes"].get("hopscope.hop") == "kube-proxy"]
            return hops[0]["attributes"] if hops else None

        hop = poll_until(node_port_hop, timeout=20)
        assert hop["hopscope.rule.kind"] == "node-port" and hop["hopscope.nat.snat"] is False
        assert "KUBE-NODEPORTS" in hop["hopscope.rule.chains"], hop
        saved = hopscope("iptables-save", "--node", "node-b", "-t", "filter", env=kernel_cluster)
        assert "has no local endpoints" in saved.stdout and "-j DROP" in saved.stdout
    finally:
        hopscope("delete", "-f", str(lab), env=kernel_cluster, check=False)


def test_curl_from_a_pod_runs_in_its_namespace(kernel_cluster: dict[str, str]) -> None:
    pod = next(p for p in api_get("/api/v1/status")["pods"] if p["name"].startswith("frontend-"))
    done = hopscope(
        "curl",
        "--json",
        "--from",
        f"shop/{pod['name']}",
        "http://catalog:8080/items",
        env=kernel_cluster,
    )
    reply = json.loads(done.stdout)
    assert reply["status"] == 200, reply

    def with_kube_proxy_hop() -> dict[str, Any] | None:
        view = trace_json(reply["trace_id"])
        hops = {s["attributes"].get("hopscope.hop") for s in view["spans"]}
        return view if "kube-proxy" in hops else None

    view = poll_until(with_kube_proxy_hop, timeout=20)
    attrs = {s["attributes"].get("hopscope.hop"): s["attributes"] for s in view["spans"]}
    assert attrs["dns"]  # resolved by the cluster DNS, from the pod, with its search path
    proxy = attrs["kube-proxy"]
    assert proxy["hopscope.nat.original.src"].startswith(f"{pod['ip']}:"), proxy
    assert proxy["k8s.service.name"] == "catalog"


def test_a_crashed_control_plane_leaves_nothing_on_the_next_up(
    kernel_cluster: dict[str, str],
) -> None:
    pid = api_get("/api/v1/status")["pid"]
    os.kill(pid, signal.SIGKILL)
    poll_until(
        lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", timeout=10
    )
    assert any(n.endswith("-node-a") for n in _leftovers())  # the crash left them
    hopscope(
        "up",
        "--dataplane",
        "kernel",
        "--detach",
        "--timeout",
        "120",
        env=kernel_cluster,
        timeout=180,
    )
    [view] = traced_shop_requests(1)
    assert view["verdict"]["ok"] is True
    # every pod namespace belongs to a pod of the new cluster
    pods = {p["name"] for p in api_get("/api/v1/status")["pods"]}
    stale = [n for n in _leftovers() if "-pod-" in n and not any(n.endswith(p) for p in pods)]
    assert stale == [], stale
    time.sleep(0)  # the fixture's `hopscope down` then checks that nothing is left

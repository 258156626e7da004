"""The kernel data path's network: node and pod namespaces, VXLAN, kube-proxy's rules, conntrack.

Everything runs in namespaces these tests create (prefix ``hstest``) and removes;
nothing is sent anywhere else. Needs root (named namespaces under /run/netns), as the
kernel data path itself does. Pods run :mod:`tests.kernel_probe` as their program.

Plan inside the namespaces:

=========================  ===============================================
underlay (node IPs)        node-a 10.10.0.1, node-b 10.10.0.2
pod CIDRs                  node-a 10.244.1.0/24, node-b 10.244.2.0/24
pods                       a1 10.244.1.5, a2 10.244.1.6 (node-a); b1 10.244.2.7 (node-b)
Services                   web 10.96.0.20:80 -> b1:8080; self 10.96.0.21:80 -> a1:8080;
                           empty 10.96.0.30:80 (no endpoints); old 10.96.0.40:80 -> b1
=========================  ===============================================
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mesh.kernel import ProxyNode, endpoint_chain, service_chain
from mesh.kernel.conntrack import ConntrackWatcher, Flow, dump, service_flow_attributes, table
from mesh.kernel.proxier import KernelProxier
from mesh.kernel.topology import KernelNetwork, KernelNetworkError, NodeNet, kernel_support
from mesh.kubeproxy.rules import EndpointTarget, RuleSet, ServiceRule

REPO = Path(__file__).resolve().parent.parent
PREFIX = "hstest"
NODES = (
    NodeNet("node-a", "10.10.0.1", "10.244.1.0/24"),
    NodeNet("node-b", "10.10.0.2", "10.244.2.0/24"),
)
PODS = {
    "a1": ("node-a", "10.244.1.5"),
    "a2": ("node-a", "10.244.1.6"),
    "b1": ("node-b", "10.244.2.7"),
}
CLUSTER_CIDR = "10.244.0.0/16"
WEB, SELF, EMPTY, OLD = "10.96.0.20", "10.96.0.21", "10.96.0.30", "10.96.0.40"

UNAVAILABLE = kernel_support()
pytestmark = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))


def _endpoint(pod: str) -> EndpointTarget:
    node, ip = PODS[pod]
    return EndpointTarget(ip, 8080, pod, node, True, True, False)


def _service(name: str, vip: str, *pods: str) -> ServiceRule:
    eps = tuple(_endpoint(p) for p in pods)
    return ServiceRule("shop", name, "http", vip, 80, "TCP", "ClusterIP", None, eps)


def _rules(version: int, *services: ServiceRule) -> RuleSet:
    return RuleSet(version, {s.key: s for s in services}, {})


class Cluster:
    """Two nodes, three pods each serving on 8080, kube-proxy's rules synced on both nodes."""

    def __init__(self, backend: str) -> None:
        self.net = KernelNetwork(prefix=PREFIX, backend=backend)
        self.servers: list[subprocess.Popen[str]] = []
        self.proxiers: dict[str, KernelProxier] = {}

    def start(self) -> None:
        self.net.cleanup()
        for node in NODES:
            self.net.add_node(node)
        self.net.connect_nodes()
        for pod, (node, ip) in PODS.items():
            self.net.add_pod("shop", pod, node, ip)
            self.servers.append(self._serve(pod))
        for node in NODES:
            proxy_node = ProxyNode(node.name, cluster_cidr=CLUSTER_CIDR)
            self.proxiers[node.name] = KernelProxier(self.net, proxy_node)
        self.sync(
            _rules(
                1,
                _service("web", WEB, "b1"),
                _service("self", SELF, "a1"),
                _service("empty", EMPTY),
                _service("old", OLD, "b1"),
            )
        )

    def _serve(self, pod: str) -> subprocess.Popen[str]:
        argv = self.net.exec_argv(
            self.net.pod_netns("shop", pod),
            [sys.executable, "-m", "tests.kernel_probe", "serve", "8080"],
        )
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=REPO)
        assert proc.stdout is not None
        assert json.loads(proc.stdout.readline()) == {"listening": 8080}
        return proc

    def sync(self, rules: RuleSet) -> None:
        for proxier in self.proxiers.values():
            proxier.sync(rules)

    def connect(self, pod: str, ip: str, port: int = 80, count: int = 1) -> list[dict[str, Any]]:
        argv = self.net.exec_argv(
            self.net.pod_netns("shop", pod),
            [sys.executable, "-m", "tests.kernel_probe", "connect", ip, str(port), str(count)],
        )
        done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        return [json.loads(line) for line in done.stdout.splitlines()]

    def node_run(self, node: str, *argv: str) -> str:
        done = subprocess.run(
            self.net.exec_argv(self.net.node_netns(node), list(argv)),
            capture_output=True,
            text=True,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def stop(self) -> None:
        for proc in self.servers:
            proc.kill()
            proc.wait()
        self.net.cleanup()


@pytest.fixture(scope="module", params=["vxlan", "host-gw"])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    c = Cluster(request.param)
    try:
        c.start()
        yield c
    finally:
        c.stop()
    assert not [n for n in _netns() if n.startswith(PREFIX)]


def _netns() -> list[str]:
    from pyroute2 import netns

    return list(netns.listnetns())


def test_pods_reach_pods_on_the_other_node_with_their_own_address(cluster: Cluster) -> None:
    before = _overlay_packets(cluster)
    [reply] = cluster.connect("a1", PODS["b1"][1], 8080)
    assert reply["peer"] == reply["local"], reply  # no NAT between pods
    assert reply["local"].startswith("10.244.1.5:")
    after = _overlay_packets(cluster)
    if cluster.net.backend == "vxlan":
        # the handshake, the answer and the close crossed as VXLAN packets, both ways
        assert after["node-a", "tx_packets"] - before["node-a", "tx_packets"] >= 3
        assert after["node-b", "rx_packets"] - before["node-b", "rx_packets"] >= 3
        assert after["node-b", "tx_packets"] - before["node-b", "tx_packets"] >= 2
    else:
        assert not after  # host-gw: no tunnel device, plain routes
        routes = cluster.node_run("node-a", "ip", "route")
        assert "10.244.2.0/24 via 10.10.0.2 dev eth0" in routes, routes


def test_the_bridge_keeps_its_mac_while_pods_come_and_go(cluster: Cluster) -> None:
    """A pod whose veth has a lower MAC than the bridge joins node-a and leaves: ``cni0``
    keeps the MAC derived from its address, so a1's ARP entry for its gateway stays right
    and its next packets are not sent to a MAC nobody answers."""
    node = NODES[0]

    def bridge_mac() -> str:
        return cluster.node_run("node-a", "cat", "/sys/class/net/cni0/address").strip()

    assert bridge_mac() == node.bridge_mac
    cluster.connect("a1", PODS["b1"][1], 8080)  # a1 has an ARP entry for its gateway now
    pod = cluster.net.add_pod("shop", "low-mac", "node-a", "10.244.1.9")
    try:
        cluster.node_run(
            "node-a", "ip", "link", "set", pod.host_veth, "address", "02:00:00:00:00:01"
        )
        assert bridge_mac() == node.bridge_mac
    finally:
        cluster.net.remove_pod("shop", "low-mac")
    assert bridge_mac() == node.bridge_mac
    neigh = subprocess.run(
        cluster.net.exec_argv(cluster.net.pod_netns("shop", "a1"), ["ip", "neigh", "show"]),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"{node.gateway} dev eth0 lladdr {node.bridge_mac}" in neigh, neigh
    [reply] = cluster.connect("a1", PODS["b1"][1], 8080)
    assert reply.get("error") is None and reply["ms"] < 1000, reply


def _overlay_packets(cluster: Cluster) -> dict[tuple[str, str], int]:
    if cluster.net.backend != "vxlan":
        return {}
    return {
        (node.name, key): cluster.net.link_stats(node.name, "flannel.1")[key]
        for node in NODES
        for key in ("tx_packets", "rx_packets")
    }


def test_vxlan_device_is_programmed_as_flannel_does(cluster: Cluster) -> None:
    if cluster.net.backend != "vxlan":
        pytest.skip("VXLAN backend only")
    details = cluster.node_run("node-a", "ip", "-d", "link", "show", "flannel.1")
    assert re.search(
        r"vxlan id 1 local 10\.10\.0\.1 dev eth0 .*dstport 8472 nolearning", details
    ), details
    fdb = cluster.node_run("node-a", "bridge", "fdb", "show", "dev", "flannel.1")
    assert f"{NODES[1].vtep_mac} dst 10.10.0.2 self permanent" in fdb, fdb
    neigh = cluster.node_run("node-a", "ip", "neigh", "show", "dev", "flannel.1")
    assert f"10.244.2.0 lladdr {NODES[1].vtep_mac} PERMANENT" in neigh, neigh
    routes = cluster.node_run("node-a", "ip", "route")
    assert "10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink" in routes, routes


def test_the_vxlan_packet_that_opens_a_connection_is_logged_with_its_outer_tuple(
    cluster: Cluster,
) -> None:
    """kube-proxy's observer rule: the encapsulated SYN leaving node-a reaches NFLOG with
    the outer UDP tuple (source port: the kernel's hash of the inner flow) and the inner
    tuple it carries; later packets of the connection are not logged."""
    if cluster.net.backend != "vxlan":
        pytest.skip("VXLAN backend only")
    from mesh.kernel.conntrack import (
        NFLOG_COPY,
        VXLAN_LOG_CHAIN,
        nflog_socket,
        parse_nflog,
        vxlan_log_rules,
    )
    from mesh.kernel.policy import NFLOG_GROUP

    if VXLAN_LOG_CHAIN not in cluster.net.save("node-a", "filter"):
        rules = vxlan_log_rules(NFLOG_GROUP)
        cluster.net.restore("node-a", ("iptables-restore", "--noflush"), rules)
    sock = nflog_socket(cluster.net.node_netns("node-a"), NFLOG_GROUP, copy_range=NFLOG_COPY)
    try:
        [reply] = cluster.connect("a1", "10.244.2.7", 8080)
        sock.settimeout(0.2)
        logged = []
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            try:
                logged += [d for d in parse_nflog(sock.recv(1 << 16), 0) if d.vni is not None]
            except TimeoutError:
                continue
            if any(d.inner_src == reply["local"] for d in logged):
                # keep reading a while: the connection's data and FIN, sent by now, must
                # not show up
                deadline = min(deadline, time.monotonic() + 0.5)
    finally:
        sock.close()
    mine = [d for d in logged if d.inner_src == reply["local"]]
    # the SYN (a retransmit at most), not the data and FIN the connection also carried
    assert 1 <= len(mine) <= 2, (reply, logged)
    syn = mine[0]
    assert syn.vni == 1 and syn.inner_dst == "10.244.2.7:8080"
    outer_ip, outer_port = syn.src.split(":")
    assert outer_ip == "10.10.0.1" and 0 < int(outer_port) < 65536
    assert syn.dst == "10.10.0.2:8472" and syn.protocol == "udp"


def test_cluster_ip_is_dnat_keeping_the_clients_address_and_port(cluster: Cluster) -> None:
    replies = cluster.connect("a1", WEB, count=5)
    for reply in replies:
        assert reply["server"] == "10.244.2.7:8080", reply
        assert reply["peer"] == reply["local"], reply  # source address *and* port kept


def test_service_without_endpoints_is_refused_at_once(cluster: Cluster) -> None:
    [reply] = cluster.connect("a1", EMPTY)
    assert reply.get("error") == "ECONNREFUSED", reply
    assert reply["ms"] < 100, reply


def test_hairpin_is_masqueraded_and_same_node_replies_are_un_natted(cluster: Cluster) -> None:
    # a1 reaches itself through its own Service: the source becomes the node's bridge address,
    # or a1 would answer itself directly and the client would drop the reply.
    [hairpin] = cluster.connect("a1", SELF)
    assert hairpin["server"] == "10.244.1.5:8080", hairpin
    assert hairpin["peer"].split(":")[0] == NODES[0].gateway, hairpin
    # a2 -> a1 on the same bridge: DNAT only; the reply is bridged, and br_netfilter makes
    # it pass conntrack so it is un-DNATed back to the VIP.
    [same_node] = cluster.connect("a2", SELF)
    assert same_node["peer"] == same_node["local"], same_node
    assert "error" not in same_node


def test_conntrack_events_become_the_kube_proxy_hop(cluster: Cluster) -> None:
    flows: list[Flow] = []

    async def watch_while_connecting() -> list[dict[str, Any]]:
        async with ConntrackWatcher(cluster.net.node_netns("node-a"), destroy=False) as watcher:

            async def collect() -> None:
                async for flow in watcher:
                    flows.append(flow)

            task = asyncio.create_task(collect())
            await asyncio.sleep(0.1)
            replies = await asyncio.to_thread(cluster.connect, "a1", WEB)
            deadline = time.monotonic() + 5
            while (
                not any(f.original_dst == f"{WEB}:80" for f in flows)
                and time.monotonic() < deadline
            ):
                await asyncio.sleep(0.05)
            task.cancel()
            return replies

    started = time.time_ns()
    [reply] = asyncio.run(watch_while_connecting())
    [flow] = [f for f in flows if f.original_dst == f"{WEB}:80"]
    assert flow.event == "new" and flow.dnat and not flow.snat, flow
    assert flow.original_src == reply["local"]
    assert flow.translated_dst == "10.244.2.7:8080"
    assert started <= flow.seen_ns <= time.time_ns()

    rules = cluster.proxiers["node-a"].rules
    assert rules is not None
    attrs = service_flow_attributes(flow, rules, cluster.proxiers["node-a"].node)
    assert attrs is not None
    assert attrs["k8s.service.name"] == "web"
    assert attrs["hopscope.endpoint.pod"] == "b1"
    assert attrs["hopscope.nat.original.src"] == reply["local"]
    assert attrs["hopscope.nat.translated.dst"] == "10.244.2.7:8080"
    svc, sep = (
        service_chain("shop/web:http"),
        endpoint_chain("shop/web:http", "tcp", "10.244.2.7:8080"),
    )
    assert attrs["hopscope.rule.chains"] == ["KUBE-SERVICES", svc, sep]
    saved = cluster.node_run("node-a", "iptables-save", "-t", "nat")
    assert f"-A {svc} " in saved and f"-A {sep} " in saved  # the chains named are the live ones

    # The table dump has the same entry, with the kernel's start time, as conntrack -L shows it
    [entry] = [f for f in table(cluster.net.node_netns("node-a")) if f.id == flow.id]
    assert entry.start_ns is not None and started <= entry.start_ns <= time.time_ns()
    listed = cluster.node_run("node-a", "conntrack", "-L", "-p", "tcp", "--orig-dst", WEB)
    # Every field as conntrack -L prints it, but the id (not printed) and the timeout (the
    # two reads are a moment apart, it may have ticked).
    assert entry.timeout is not None and 0 < entry.timeout <= 120
    ours = entry.line().split()[:-1]
    theirs = [line.split() for line in listed.splitlines()]
    assert any(line[:2] + line[3 : len(ours)] == ours[:2] + ours[3:] for line in theirs), (
        ours,
        listed,
    )


def test_a_dump_for_some_ids_reads_those_entries_and_a_destroy_keeps_the_nat_status(
    cluster: Cluster,
) -> None:
    """What kube-proxy's byte refresh and its flow reports rely on: a dump asked for some
    conntrack ids returns exactly those entries, as the full dump has them; a destroy event
    says the entry was DNATed (flows are reported to the joiner by that status)."""
    netns = cluster.net.node_netns("node-a")
    flows: list[Flow] = []

    async def connect_then_delete() -> set[str]:
        # watching before the connections exist: an entry created with no listener carries
        # no event cache (nf_conntrack_events=2) and sends no destroy event
        async with ConntrackWatcher(netns) as watcher:

            async def collect() -> None:
                async for flow in watcher:
                    flows.append(flow)

            task = asyncio.create_task(collect())
            await asyncio.sleep(0.1)
            replies = await asyncio.to_thread(cluster.connect, "a1", WEB, 80, 2)
            ours = {r["local"] for r in replies}
            full = [f for f in dump(netns) if f.original_src in ours]
            assert len(full) == 2 and all(f.dnat and f.event == "entry" for f in full), full
            wanted = full[0]
            [picked] = dump(netns, {wanted.id})
            assert (picked.id, picked.original_src, picked.translated_dst, picked.status) == (
                wanted.id, wanted.original_src, wanted.translated_dst, wanted.status,
            )  # fmt: skip
            assert (picked.bytes_orig, picked.state) == (wanted.bytes_orig, wanted.state)
            assert dump(netns, set()) == []
            for src in ours:  # as the entries' TIME_WAIT running out would
                ip, port = src.rsplit(":", 1)
                await asyncio.to_thread(
                    cluster.node_run, "node-a", "conntrack", "-D", "-p", "tcp",
                    "--orig-src", ip, "--sport", port, "--orig-dst", WEB,
                )  # fmt: skip
            deadline = time.monotonic() + 5
            while (
                sum(f.event == "destroy" and f.original_src in ours for f in flows) < 2
                and time.monotonic() < deadline
            ):
                await asyncio.sleep(0.05)
            task.cancel()
            return ours

    ours = asyncio.run(connect_then_delete())
    gone = [f for f in flows if f.event == "destroy" and f.original_src in ours]
    assert len(gone) == 2 and all(f.dnat for f in gone), flows


def test_a_sync_deletes_the_chains_of_removed_services(cluster: Cluster) -> None:
    old = service_chain("shop/old:http")
    assert f":{old} " in cluster.node_run("node-a", "iptables-save", "-t", "nat")
    try:
        cluster.sync(
            _rules(
                2,
                _service("web", WEB, "b1"),
                _service("self", SELF, "a1"),
                _service("empty", EMPTY),
            )
        )
        saved = cluster.node_run("node-a", "iptables-save", "-t", "nat")
        assert old not in saved
        assert "KUBE-SEP-" in saved and service_chain("shop/web:http") in saved
        assert cluster.connect("a1", WEB)[0]["server"] == "10.244.2.7:8080"
    finally:
        cluster.sync(
            _rules(
                3,
                _service("web", WEB, "b1"),
                _service("self", SELF, "a1"),
                _service("empty", EMPTY),
                _service("old", OLD, "b1"),
            )
        )


def test_cleanup_removes_what_a_crashed_run_left() -> None:
    net = KernelNetwork(prefix=f"{PREFIX}-crash")
    net.cleanup()
    net.add_node(NODES[0])
    net.add_pod("shop", "a1", "node-a", "10.244.1.5")
    # a new run (a new object, as after a crash) finds the namespaces taken, then cleans up
    again = KernelNetwork(prefix=f"{PREFIX}-crash")
    with pytest.raises(KernelNetworkError, match="exists already"):
        again.add_node(NODES[0])
    removed = again.cleanup()
    assert removed == sorted(
        [f"{PREFIX}-crash-node-a", f"{PREFIX}-crash-pod-shop-a1", f"{PREFIX}-crash-underlay"]
    )
    assert not [n for n in _netns() if n.startswith(f"{PREFIX}-crash")]


def test_bad_input_gets_a_clear_error() -> None:
    with pytest.raises(KernelNetworkError, match="unknown overlay backend 'udp'"):
        KernelNetwork(prefix=f"{PREFIX}-bad", backend="udp")
    net = KernelNetwork(prefix=f"{PREFIX}-bad")
    try:
        net.add_node(NODES[0])
        with pytest.raises(KernelNetworkError, match=r"outside 10\.244\.1\.0/24"):
            net.add_pod("shop", "x", "node-a", "10.244.9.9")
        with pytest.raises(KernelNetworkError, match="unknown node 'node-z'"):
            net.add_pod("shop", "x", "node-z", "10.244.1.9")
        with pytest.raises(KernelNetworkError, match="refused the document"):
            net.restore(
                "node-a", ("iptables-restore", "--noflush"), "*nat\n-A NOPE -j ACCEPT\nCOMMIT\n"
            )
    finally:
        net.cleanup()


def test_forwarder_carries_host_loopback_connections_into_a_namespace(cluster: Cluster) -> None:
    node_ns = cluster.net.node_netns("node-a")
    argv = [
        sys.executable,
        "-m",
        "mesh.kernel.forward",
        f"127.77.0.1:18080={node_ns}/10.244.2.7:8080",
        f"127.77.0.1:18081={node_ns}/10.244.2.7:9",  # nothing listens there
    ]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().startswith("forwarding 127.77.0.1:18080 -> "), proc.stderr
        for _ in range(3):  # a refused target closes that client at once; the others go on
            with socket.create_connection(("127.77.0.1", 18080), timeout=5) as conn:
                reply = json.loads(conn.makefile().readline())
            assert reply["server"] == "10.244.2.7:8080", reply
            started = time.monotonic()
            with (
                socket.create_connection(("127.77.0.1", 18081), timeout=5) as conn,
                contextlib.suppress(ConnectionResetError),  # closed or reset, at once
            ):
                assert conn.recv(100) == b""
            assert time.monotonic() - started < 1
        assert proc.poll() is None
    finally:
        proc.kill()
        stdout, stderr = proc.communicate()
    assert "Traceback" not in stdout + stderr, stdout + stderr


def test_forwarder_rejects_bad_rules_clearly() -> None:
    for rule, message in (
        ("127.0.0.1:1", "expected LISTEN=TARGET"),
        ("127.0.0.1=127.0.0.1:80", "expected [NETNS/]IP:PORT"),
        ("127.77.0.1:18090=no-such-ns/10.0.0.1:80", None),
    ):
        argv = [sys.executable, "-m", "mesh.kernel.forward", rule]
        if message is None:
            # a missing namespace is reported when a client comes, and the forwarder stays up
            proc = subprocess.Popen(
                argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
            )
            try:
                assert proc.stdout is not None and proc.stdout.readline().startswith("forwarding")
                with socket.create_connection(("127.77.0.1", 18090), timeout=5) as conn:
                    assert conn.recv(10) == b""
                assert proc.poll() is None
            finally:
                proc.kill()
                stdout, stderr = proc.communicate()
            logged = stdout + stderr  # JSON log lines
            assert "no network namespace no-such-ns" in logged and "Traceback" not in logged, logged
            continue
        done = subprocess.run(argv, capture_output=True, text=True, cwd=REPO)
        assert done.returncode == 2 and message in done.stderr, done.stderr


def _remap(ip: str) -> str:
    """The policy table's loopback plan (127.244.N.x) as addresses a veth can carry."""
    return ip.replace("127.244.", "10.244.", 1) if ip.startswith("127.244.") else ip


def test_policy_rules_give_the_models_verdicts_on_the_real_kernel() -> None:
    """Every TCP case of the NetworkPolicy table (tests/test_netpol.py, taken from the API
    documentation) sent through the rendered filter rules: a connection passes exactly when
    the model allows it, and a denied one is dropped (no answer), never refused."""
    import dataclasses

    from mesh.kernel import policy
    from tests.test_netpol import CASES, _engine

    state = _engine().state
    pods = [dataclasses.replace(p, ip=_remap(p.ip), node="node-a") for p in state.pods]
    state = dataclasses.replace(state, pods=pods)
    cases = [
        (desc, _remap(src), _remap(dst), port, allowed)
        for desc, src, dst, port, protocol, allowed, _side in CASES
        if protocol == "TCP" and src.startswith("127.244.") and dst.startswith("127.244.")
    ]
    assert len(cases) >= 10, cases
    net = KernelNetwork(prefix=f"{PREFIX}-pol")
    net.cleanup()
    servers: list[subprocess.Popen[str]] = []
    try:
        net.add_node(NodeNet("node-a", "10.10.0.1", "10.244.0.0/16"))
        for pod in pods:
            net.add_pod(pod.namespace, pod.name, "node-a", pod.ip)
        net.restore("node-a", ("iptables-restore", "--noflush"), policy.setup())
        document = policy.render(state, "node-a", "10.10.0.254", (8001,), (15000,), "10.96.0.0/16")
        net.restore("node-a", ("iptables-restore", "--noflush"), document)
        by_ip = {p.ip: p for p in pods}
        for dst, port in sorted({(c[2], c[3]) for c in cases}):
            pod = by_ip[dst]
            argv = [sys.executable, "-m", "tests.kernel_probe", "serve", str(port)]
            proc = subprocess.Popen(
                net.exec_argv(net.pod_netns(pod.namespace, pod.name), argv),
                stdout=subprocess.PIPE,
                text=True,
                cwd=REPO,
            )
            servers.append(proc)
            assert (
                proc.stdout is not None and json.loads(proc.stdout.readline())["listening"] == port
            )
        wrong = []
        for desc, src, dst, port, allowed in cases:
            pod = by_ip[src]
            client = (
                "import socket,sys\n"
                "try:\n socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=0.5)\n"
                " print('connected')\n"
                "except OSError as e:\n print(type(e).__name__)"
            )
            done = subprocess.run(
                net.exec_argv(
                    net.pod_netns(pod.namespace, pod.name),
                    [sys.executable, "-c", client, dst, str(port)],
                ),
                capture_output=True,
                text=True,
                timeout=30,
            )
            outcome = done.stdout.strip()
            if outcome != ("connected" if allowed else "TimeoutError"):
                wrong.append((desc, src, dst, port, allowed, outcome))
        assert wrong == [], wrong
        counters = net.save("node-a", "filter")
        assert "NFLOG" in counters
    finally:
        for proc in servers:
            proc.kill()
            proc.wait()
        net.cleanup()

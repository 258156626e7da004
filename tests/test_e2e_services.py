"""End to end: Service types, traffic policies, affinity, refusal, modes and restarts.

A cluster with the echo pods of ``tests/manifests/echo.yaml`` (no sidecars, so the app sees
the TCP peer exactly as kube-proxy left it) behind NodePort, LoadBalancer and ClusterIP
Services. Requests leave from external client addresses in 127.100.0.0/24.
"""

from __future__ import annotations

import http.client
import itertools
import json
import os
import re
import signal
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from mesh import addresses
from mesh.envoy.common import HEADER_LIMITS
from tests.e2e_support import (
    api_get,
    client_seen_as,
    dataplane,
    dump,
    hop_names,
    hopscope,
    http_from_outside,
    node_addresses,
    node_seen_as,
    outside_socket,
    poll_until,
    trace_json,
    userspace_only,
)

pytestmark = pytest.mark.e2e

NODE_A, NODE_B = addresses.NODE_IPS["node-a"], addresses.NODE_IPS["node-b"]
CLIENT = "127.100.0.7"


def _echo(ip: str, port: int, client: str = CLIENT) -> dict[str, Any]:
    """What the echo pod saw of one ``GET /`` from outside client ``client``: to a node's or
    load balancer's host address from the host; to a ClusterIP from where the data path
    routes it (:func:`~tests.e2e_support.http_from_outside`)."""
    if not ip.startswith("127."):
        status, body = http_from_outside((ip, port), client)
        assert status == 200
        return json.loads(body)  # type: ignore[no-any-return]
    conn = http.client.HTTPConnection(ip, port, timeout=5, source_address=(client, 0))
    try:
        conn.request("GET", "/")
        resp = conn.getresponse()
        assert resp.status == 200
        return json.loads(resp.read())  # type: ignore[no-any-return]
    finally:
        conn.close()


def _service(name: str) -> dict[str, Any]:
    return next(s for s in api_get("/api/v1/state")["services"] if s["name"] == name)


def _echo_pods() -> dict[str, str]:
    return {
        p["name"]: p["node"] for p in api_get("/api/v1/state")["pods"] if p["namespace"] == "echo"
    }


def test_echo_pods_run_on_both_nodes(cluster: dict[str, str]) -> None:
    assert sorted(_echo_pods().values()) == ["node-a", "node-b"]


def test_node_port_cluster_policy_snats_to_the_node_and_may_cross_nodes(
    cluster: dict[str, str],
) -> None:
    replies = [_echo(NODE_A, 30080) for _ in range(24)]
    # SNAT to the receiving node's address (on the kernel path: of the interface the packet
    # leaves by, cni0 or flannel.1, as MASQUERADE picks it)
    peers = {r["peer"] for r in replies}
    assert peers and peers <= node_addresses(cluster, "node-a"), peers
    assert {r["node"] for r in replies} == {"node-a", "node-b"}  # may forward to node-b


def test_node_port_local_policy_keeps_the_client_and_stays_on_the_node(
    cluster: dict[str, str],
) -> None:
    for node_ip, node in ((NODE_A, "node-a"), (NODE_B, "node-b")):
        replies = [_echo(node_ip, 30081) for _ in range(8)]
        assert {r["peer"] for r in replies} == {client_seen_as(CLIENT)}
        assert {r["node"] for r in replies} == {node}


def test_load_balancer_gets_an_address_and_is_its_own_hop(cluster: dict[str, str]) -> None:
    svc = _service("echo-lb")
    (lb_ip,) = svc["load_balancer_ingress"]
    assert lb_ip.startswith("127.200.0.")
    assert _echo(lb_ip, 8080)["peer"] == client_seen_as(CLIENT)  # Local, passthrough LB
    port = svc["health_check_node_port"]
    for node_ip in (NODE_A, NODE_B):
        conn = http.client.HTTPConnection(node_ip, port, timeout=5)
        conn.request("GET", "/healthz")
        assert json.loads(conn.getresponse().read())["localEndpoints"] == 1
        conn.close()
    doc = json.loads(hopscope("curl", "--json", f"http://{lb_ip}:8080/", env=cluster).stdout)
    view = poll_until(lambda: (v := trace_json(doc["trace_id"])) and len(v["hops"]) >= 4 and v)
    assert hop_names(view)[:3] == ["client", "load-balancer", "kube-proxy"], dump(view["hops"])
    kube_proxy = next(s for s in view["spans"] if s["attributes"]["hopscope.hop"] == "kube-proxy")
    assert kube_proxy["attributes"]["hopscope.traffic_policy"] == "Local"
    assert kube_proxy["attributes"]["hopscope.nat.snat"] is False


def test_client_ip_affinity_sticks_and_spreads_again_when_switched_off(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    vip = _service("echo-sticky")["cluster_ip"]
    assert len({_echo(vip, 8080)["pod"] for _ in range(12)}) == 1
    assert len({_echo(vip, 8080, client="127.100.0.8")["pod"] for _ in range(12)}) == 1
    plain = tmp_path / "plain.yaml"
    plain.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: echo-sticky, namespace: echo}\n"
        "spec:\n  selector: {app: echo}\n"
        "  ports: [{name: http, port: 8080, targetPort: http}]\n"
    )
    hopscope("apply", "-f", str(plain), env=cluster)
    spread = poll_until(lambda: len({_echo(vip, 8080)["pod"] for _ in range(24)}) == 2, timeout=10)
    assert spread


def test_service_without_ready_endpoints_refuses_connect_at_once(cluster: dict[str, str]) -> None:
    """Like kube-proxy's REJECT rule: ``connect()`` itself fails, no handshake then reset."""
    vip = _service("echo-empty")["cluster_ip"]
    with outside_socket(CLIENT) as sock:  # made first: only the connect() is timed
        sock.settimeout(2)
        start = time.monotonic()
        with pytest.raises(ConnectionRefusedError):
            sock.connect((vip, 8080))
        took = time.monotonic() - start
    assert took < 0.1, f"refused after {took:.3f} s"
    health = requests.get(f"http://{NODE_A}:{addresses.KUBE_PROXY_METRICS_PORT}/healthz", timeout=5)
    assert f"{vip}:8080 (echo/echo-empty)" in health.json()["rejecting"]


@userspace_only("no IPVS in this kernel: the kernel path runs iptables mode (and says so)")
def test_ipvs_round_robin_via_kube_proxy_configuration(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    config = tmp_path / "kube-proxy.yaml"
    config.write_text(
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
        "mode: ipvs\nipvs: {scheduler: rr}\n"
    )
    hopscope("apply", "-f", str(config), env=cluster)
    try:
        assert "ipvs/rr" in hopscope("get", "svc", "-n", "echo", "-o", "wide", env=cluster).stdout
        vip = _service("echo-cluster")["cluster_ip"]

        def alternating() -> bool:
            pods = [_echo(vip, 8080)["pod"] for _ in range(6)]
            return all(a != b for a, b in itertools.pairwise(pods))

        assert poll_until(alternating, timeout=10)
    finally:
        config.write_text(config.read_text().replace("mode: ipvs", "mode: iptables"))
        hopscope("apply", "-f", str(config), env=cluster)


def test_conntrack_lists_the_tuples_of_the_span(cluster: dict[str, str]) -> None:
    doc = json.loads(hopscope("curl", "--json", f"http://{NODE_B}:30080/", env=cluster).stdout)
    view = poll_until(
        lambda: (v := trace_json(doc["trace_id"])) and "kube-proxy" in hop_names(v) and v
    )
    span = next(s for s in view["spans"] if s["attributes"].get("hopscope.hop") == "kube-proxy")
    a = span["attributes"]
    entries = json.loads(
        hopscope("conntrack", "-o", "json", "--service", "echo/echo-cluster", env=cluster).stdout
    )
    matching = [e for e in entries if e["id"] == a["hopscope.conntrack.id"]]
    assert matching, (a, [e["id"] for e in entries][-10:])
    entry = matching[0]
    assert entry["original"] == {
        "src": a["hopscope.nat.original.src"],
        "dst": a["hopscope.nat.original.dst"],
    }
    assert entry["reply"] == {
        "src": a["hopscope.nat.translated.dst"],
        "dst": a["hopscope.nat.translated.src"],
    }
    assert entry["dnat"] and entry["snat"]  # NodePort + Cluster policy: both
    table = hopscope("conntrack", env=cluster).stdout
    assert "DNAT,SNAT" in table and "TIME_WAIT" in table


def test_kube_proxy_restart_keeps_services_working(cluster: dict[str, str]) -> None:
    status = api_get("/api/v1/status")
    old = next(c for c in status["components"] if c["name"] == "kube-proxy")
    os.kill(old["pid"], signal.SIGKILL)
    killed = time.monotonic()

    node_a = node_addresses(cluster, "node-a")

    def serving() -> bool:
        try:
            return _echo(NODE_A, 30080)["peer"] in node_a
        except (OSError, http.client.HTTPException):
            return False

    def restarted() -> dict[str, Any] | None:
        status = api_get("/api/v1/status")["components"]
        new = next(c for c in status if c["name"] == "kube-proxy")
        return new if new["pid"] != old["pid"] and serving() else None

    # On the kernel path the node's rules outlive kube-proxy: Services answer all along,
    # so the restart itself is waited for too.
    new = poll_until(restarted, timeout=10, interval=0.05)
    recovered = time.monotonic() - killed
    assert new["restarts"] == old["restarts"] + 1, new
    # 0.5 s restart back-off + process start + one rule sync.
    assert recovered < 3.0, recovered


@userspace_only(
    "binds a pod's address on the host; tests/test_kernel_datapath.py checks hairpin and "
    "DNAT-only in real pod namespaces"
)
def test_pod_to_cluster_ip_keeps_the_pod_address_and_hairpin_is_masqueraded(
    cluster: dict[str, str],
) -> None:
    pods = [p for p in api_get("/api/v1/state")["pods"] if p["namespace"] == "echo"]
    me = pods[0]
    vip = _service("echo-cluster")["cluster_ip"]
    seen = {}
    for _ in range(30):
        reply = _echo(vip, 8080, client=me["ip"])
        seen[reply["pod"]] = reply["peer"]
    assert seen[me["name"]] == addresses.NODE_IPS[me["node"]]  # hairpin: SNAT to the node
    others = {pod: peer for pod, peer in seen.items() if pod != me["name"]}
    assert others and set(others.values()) == {me["ip"]}  # DNAT only


def test_connection_refused_is_fast_for_closed_node_ports(cluster: dict[str, str]) -> None:
    sock = socket.socket()
    sock.settimeout(2)
    with pytest.raises(ConnectionRefusedError):
        sock.connect((NODE_A, 32000))
    sock.close()


# -- the packet walk starts at the client's own packet ---------------------------------------


def _raw_request(
    ip: str,
    port: int,
    host: str,
    trace_id: str,
    path: str = "/",
    extra: int = 0,
    source: str = CLIENT,
    more: tuple[str, ...] = (),
) -> tuple[bytes, str]:
    """A plain client (no hopscope curl): one HTTP/1.1 request from a socket bound to
    ``source``; returns the whole reply and the client's own ``ip:port``."""
    sock = socket.create_connection((ip, port), timeout=5, source_address=(source, 0))
    try:
        me = "{}:{}".format(*sock.getsockname())
        lines = [
            f"GET {path} HTTP/1.1",
            f"Host: {host}",
            f"traceparent: 00-{trace_id}-{'ab' * 8}-01",
            "Connection: close",
            *more,
            *(f"X-Extra-{i}: {i}" for i in range(extra)),
        ]
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        # Read to the end (the request asked for close): leaving early would make the edge
        # log a downstream disconnect (DC) on a request that in fact went well.
        reply = b""
        while chunk := sock.recv(65536):
            reply += chunk
        return reply, me
    finally:
        sock.close()


def _raw_get(ip: str, port: int, host: str, trace_id: str, extra: int = 0) -> tuple[int, str]:
    """:func:`_raw_request` to ``/``: the status and the client's own ``ip:port``."""
    reply, me = _raw_request(ip, port, host, trace_id, extra=extra)
    return int(reply.split(b" ", 2)[1]), me


@pytest.mark.parametrize("entry", ["node-port", "load-balancer", "ingress"])
def test_packet_walk_starts_with_a_plain_clients_packet_as_sent(
    cluster: dict[str, str], entry: str
) -> None:
    (lb_ip,) = _service("echo-lb")["load_balancer_ingress"]
    ip, port, host = {
        "node-port": (NODE_A, 30080, "echo"),
        "load-balancer": (lb_ip, 8080, "echo"),
        "ingress": (addresses.INGRESS_IP, addresses.INGRESS_PORT, "shop.local"),
    }[entry]
    trace_id = os.urandom(16).hex()
    status, me = _raw_get(ip, port, host, trace_id)
    assert status == 200
    first_hop = {"node-port": "kube-proxy", "load-balancer": "load-balancer"}.get(entry, entry)

    seen: list[dict[str, Any]] = []

    def walk() -> list[dict[str, str]] | None:
        """The walk once the trace is whole: every exporter has flushed (same span count
        a second apart) and it holds the entry hop."""
        view = trace_json(trace_id)
        stable = bool(seen) and seen[-1]["span_count"] == view["span_count"]
        seen[:] = [view]
        rows = view["packet_walk"]
        whole = stable and any(h["hop"] == first_hop for h in view["hops"])
        return rows if whole and rows[-1]["stage"] == "reply received" else None

    try:
        rows = poll_until(walk, timeout=20, interval=1.0)
    except AssertionError:
        raise AssertionError(dump([(v["hops"], v["packet_walk"]) for v in seen])) from None
    first, last = rows[0], rows[-1]
    # the client as the cluster saw it (on the kernel path under its inner address, its
    # port kept)
    me_ip, me_port = me.rsplit(":", 1)
    me = f"{client_seen_as(me_ip)}:{me_port}"
    assert first["stage"] == "request sent", dump(rows)
    dialed = node_seen_as(f"{ip}:{port}") if entry == "node-port" else f"{ip}:{port}"
    assert (first["src"], first["dst"]) == (me, dialed), dump(rows)  # address AND port
    assert last["stage"] == "reply received", dump(rows)
    assert (last["src"], last["dst"]) == (dialed, me), dump(rows)
    assert any(r["stage"] == "served" for r in rows), dump(rows)
    assert len(rows) >= 4, dump(rows)  # at least one rewrite between sending and serving


def test_trace_shows_the_kube_proxy_hops_conntrack_state(cluster: dict[str, str]) -> None:
    trace_id = os.urandom(16).hex()
    assert _raw_get(NODE_A, 30080, "echo", trace_id)[0] == 200
    view = poll_until(
        lambda: (
            (v := trace_json(trace_id)) and any(h["hop"] == "kube-proxy" for h in v["hops"]) and v
        )
    )
    kube_proxy = next(h for h in view["hops"] if h["hop"] == "kube-proxy")
    assert kube_proxy["conntrack"] == "new", dump(view["hops"])
    # Wide enough that the detail cell is one line (a folded cell shares its lines with the
    # next columns' text).
    text = hopscope("trace", trace_id, env={**cluster, "COLUMNS": "500"}).stdout
    assert "conntrack new" in text, text
    as_json = json.loads(hopscope("trace", trace_id, "--json", env=cluster).stdout)
    assert {h["conntrack"] for h in as_json["hops"] if h["hop"] == "kube-proxy"} == {"new"}


def test_trace_shows_established_for_a_second_request_on_a_kept_alive_connection(
    cluster: dict[str, str],
) -> None:
    """Two requests on one TCP connection: kube-proxy's conntrack entry is new for the
    first and established for the second, and ``hopscope trace`` says which."""
    first, second = os.urandom(16).hex(), os.urandom(16).hex()
    conn = http.client.HTTPConnection(NODE_A, 30080, timeout=5, source_address=(CLIENT, 0))
    try:
        ports = set()
        for trace_id in (first, second):
            conn.request("GET", "/", headers={"traceparent": f"00-{trace_id}-{'ab' * 8}-01"})
            resp = conn.getresponse()
            assert resp.status == 200
            resp.read()
            assert conn.sock is not None
            ports.add(conn.sock.getsockname()[1])
        assert len(ports) == 1  # the same connection carried both
    finally:
        conn.close()
    for trace_id, state in ((first, "new"), (second, "established")):
        view = poll_until(
            lambda t=trace_id: (
                (v := trace_json(t)) and any(h["hop"] == "kube-proxy" for h in v["hops"]) and v
            )
        )
        text = hopscope("trace", trace_id, env={**cluster, "COLUMNS": "500"}).stdout
        assert f"conntrack {state}" in text, (state, text, dump(view["hops"]))
        as_json = json.loads(hopscope("trace", trace_id, "--json", env=cluster).stdout)
        assert {h["conntrack"] for h in as_json["hops"] if h["hop"] == "kube-proxy"} == {state}


def test_too_many_headers_get_431_from_the_ingress_not_the_app(cluster: dict[str, str]) -> None:
    # 98 request headers: the ingress (the edge) refuses them itself.
    status, _ = _raw_get(
        addresses.INGRESS_IP, addresses.INGRESS_PORT, "shop.local", "0" * 31 + "1", 95
    )
    assert status == 431
    # As many as the ingress admits (80 with Host, traceparent, Connection) still fit
    # the app's limit after every proxy on the way added its own headers.
    trace_id = os.urandom(16).hex()
    status, _ = _raw_get(addresses.INGRESS_IP, addresses.INGRESS_PORT, "shop.local", trace_id, 77)
    assert status == 200


def test_too_many_headers_through_a_node_port_get_431_from_the_sidecar_not_the_app(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    """A NodePort straight to a sidecar-injected pod: the sidecar's inbound listener is the
    first proxy on the way, so it answers 431 itself; what it admits, the app serves."""
    manifest = tmp_path / "frontend-np.yaml"
    # The nodes' own addresses (those the nodes masquerade to), and the client: on the
    # kernel path a node checks a connection to its own endpoint before it masquerades
    # (FORWARD comes before POSTROUTING), so that pod's policy sees the client's address,
    # as with iptables-based policy on a real node.
    nodes = sorted(node_addresses(cluster, "node-a") | node_addresses(cluster, "node-b"))
    nodes.append(client_seen_as(CLIENT))
    blocks = ", ".join(f"{{ipBlock: {{cidr: {ip}/32}}}}" for ip in nodes)
    manifest.write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: frontend-np, namespace: shop}\n"
        "spec:\n  type: NodePort\n  selector: {app: frontend}\n"
        "  ports: [{name: http, port: 8080, targetPort: http, nodePort: 30090}]\n"
        "---\n"
        # The shop's policies admit the frontend's traffic from the ingress and load
        # balancers only; a NodePort (Cluster policy) arrives SNATed to a node address.
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
        "metadata: {name: frontend-from-nodes, namespace: shop}\n"
        "spec:\n  podSelector: {matchLabels: {app: frontend}}\n  policyTypes: [Ingress]\n"
        f"  ingress: [{{from: [{blocks}], ports: [{{port: http}}]}}]\n"
    )
    hopscope("apply", "-f", str(manifest), env=cluster)
    try:
        poll_until(lambda: _raw_get(NODE_A, 30090, "frontend", os.urandom(16).hex())[0] == 200)
        limit = HEADER_LIMITS["sidecar-inbound"][0]
        # The sidecar stamps x-envoy-upstream-service-time on what its app answered, never
        # on its own replies: each request reaches the app (200 with it) or gets the
        # sidecar's own 431 (without it), never the app's.
        seen = {
            extra: _raw_get_upstream(NODE_A, 30090, "frontend", extra)
            for extra in range(limit - 12, limit + 2)
        }
        assert set(seen.values()) == {(200, True), (431, False)}, seen
        print(
            "NodePort to a sidecar: largest admitted extra headers",
            max(extra for extra, got in seen.items() if got[0] == 200),
        )
    finally:
        hopscope("delete", "-f", str(manifest), env=cluster)


@userspace_only("binds a pod's address on the host (the sidecars' limits are the same on both)")
def test_too_many_headers_from_an_app_get_431_from_its_own_sidecar(
    cluster: dict[str, str],
) -> None:
    """App to app, the caller's outbound sidecar is the first proxy: whatever it admits
    (with the headers it adds) must pass the callee's inbound sidecar, so every request
    either reaches the app or gets the outbound's own 431, never the callee's."""
    pod = next(p for p in api_get("/api/v1/state")["pods"] if p["name"].startswith("frontend-"))
    vip = _service("catalog")["cluster_ip"]
    route = (f"{addresses.ORIGINAL_DST_HEADER}: {vip}:8080",)
    limit = HEADER_LIMITS["sidecar-outbound"][0]
    seen = {}
    for extra in range(limit - 16, limit + 2):
        seen[extra] = _raw_get_upstream(
            pod["ip"], addresses.SIDECAR_OUTBOUND_PORT, "catalog:8080", extra, pod["ip"], route
        )
    assert set(seen.values()) == {(200, True), (431, False)}, seen
    print(
        "app to app: largest admitted extra headers",
        max(extra for extra, got in seen.items() if got[0] == 200),
    )


def _raw_get_upstream(
    ip: str,
    port: int,
    host: str,
    extra: int,
    source: str = CLIENT,
    more: tuple[str, ...] = (),
) -> tuple[int, bool]:
    """:func:`_raw_request` to ``/healthz``: the status, and whether the reply came from
    behind the first proxy (it carries ``x-envoy-upstream-service-time``)."""
    reply, _ = _raw_request(ip, port, host, os.urandom(16).hex(), "/healthz", extra, source, more)
    head = reply.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    upstream = any(line.lower().startswith("x-envoy-upstream-service-time:") for line in head)
    return int(head[0].split(" ", 2)[1]), upstream


def test_iptables_save_shows_kube_proxys_chains_for_the_live_endpoints(
    cluster: dict[str, str],
) -> None:
    """The catalog's ClusterIP jumps to its KUBE-SVC chain, which holds one KUBE-SEP per
    ready endpoint the EndpointSlices list — with kube-proxy's random probabilities."""
    from mesh.kernel import endpoint_chain, service_chain

    state = api_get("/api/v1/state")
    catalog = next(s for s in state["services"] if s["name"] == "catalog")
    port = catalog["ports"][0]
    port_name = f"shop/catalog:{port['name']}" if port.get("name") else "shop/catalog"
    slices = [
        sl
        for sl in state["endpoint_slices"]
        if sl["service"] == "catalog" and sl["namespace"] == "shop"
    ]
    ready = sorted(
        f"{e['addresses'][0]}:{p['port']}"
        for sl in slices
        for p in sl["ports"]
        if p.get("name") == port.get("name")
        for e in sl["endpoints"]
        if e["ready"]
    )
    assert ready, state["endpoint_slices"]
    out = hopscope("iptables-save", "--node", "node-a", "-t", "nat", env=cluster).stdout
    svc = service_chain(port_name)
    # KUBE-SERVICES jumps to it (the first one whose destination is the ClusterIP: the
    # kernel's own iptables-save writes /32 and the tcp match, and KUBE-SVC's masquerade
    # rule names the ClusterIP too)
    jump = [
        line
        for line in out.splitlines()
        if line.startswith("-A KUBE-SERVICES ") and line.endswith(f"-j {svc}")
    ]
    vip = re.escape(catalog["cluster_ip"])
    assert len(jump) == 1 and re.search(rf"-d {vip}(/32)? .*--dport {port['port']}\b", jump[0]), out
    seps = [
        line for line in out.splitlines() if line.startswith(f"-A {svc} ") and "KUBE-SEP-" in line
    ]
    assert len(seps) == len(ready), (seps, ready)
    for endpoint in ready:
        chain = endpoint_chain(port_name, "tcp", endpoint)
        assert f"-A {chain} " in out and f"--to-destination {endpoint}" in out, (endpoint, out)
    if len(ready) > 1:
        assert "--mode random --probability" in seps[0], seps
    live = dataplane() == "kernel"  # the node's own rules, as iptables-save prints them
    first = "# Generated by iptables-save" if live else "# Generated by hopscope for node-a"
    assert out.startswith(first) and "*filter" not in out
    bad = hopscope("iptables-save", "--node", "node-z", env=cluster, check=False)
    assert bad.returncode == 1 and "node 'node-z' not found" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr

"""The iptables renderer: what it writes, then what the kernel does with it.

The first half checks the rendered document (chain names, probabilities, policies). The
second half loads it with ``iptables-restore`` into a throwaway network namespace
(``unshare -n`` as root, ``unshare -r -n`` rootless) and sends real connections there.
This module doubles as the probe that runs inside the namespace (``python -m
tests.test_kernel_iptables`` reads a JSON scenario on stdin); the namespace, its servers
and its rules vanish when the probe exits.
An "outside" client gets a namespace of its own (``... client``, a child of the probe)
joined to the node by a veth pair, so its packets enter through PREROUTING.

Address plan inside the namespace (nothing leaves it):

=====================================  ======================================
node-a IP (veth ``eth0``, default route) 10.0.0.11
cluster CIDR (pods)                      10.244.0.0/16
endpoints (on ``lo``), port 8080         10.244.1.2, 10.244.1.3, 10.244.1.4
client pods                              10.244.1.9, 10.244.1.10
outside client (own namespace, veth)     10.0.0.100
shop/web:http ClusterIP / NodePort       10.96.0.20:80 / 10.0.0.11:30080
shop/sticky:http (ClientIP affinity)     10.96.0.21:80
shop/empty:http (no endpoints)           10.96.0.30:80 / 10.0.0.11:30081
=====================================  ======================================
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from mesh.kernel import (
    IptablesRenderer,
    ProxyNode,
    endpoint_chain,
    external_chain,
    local_policy_chain,
    service_chain,
)
from mesh.kernel.iptables import save_document
from mesh.kubeproxy.rules import EndpointTarget, HealthCheck, RuleSet, ServiceRule, build_rules
from mesh.model.controllers import Cluster
from mesh.model.manifests import default_manifest_paths, load_manifests

NODE_IP = "10.0.0.11"
CLUSTER_CIDR = "10.244.0.0/16"
ENDPOINT_IPS = ("10.244.1.2", "10.244.1.3", "10.244.1.4")
CLIENT_IP = "10.244.1.9"
OUTSIDE_IP = "10.0.0.100"
WEB_VIP, STICKY_VIP, EMPTY_VIP = "10.96.0.20", "10.96.0.21", "10.96.0.30"
WEB_NODE_PORT, EMPTY_NODE_PORT = 30080, 30081
NODE = ProxyNode("node-a", cluster_cidr=CLUSTER_CIDR)
REPO = Path(__file__).resolve().parent.parent
UNSHARE = ["unshare", "-n"] if os.geteuid() == 0 else ["unshare", "-r", "-n"]
"""A new network namespace: as root, or as root of a new user namespace (rootless)."""


# -- building rule sets ---------------------------------------------------------------------


def _endpoint(ip: str, node: str = "node-a", ready: bool = True) -> EndpointTarget:
    return EndpointTarget(ip, 8080, f"pod-{ip}", node, ready, ready, False)


def _rule(name: str, vip: str, port: int, endpoints: tuple[EndpointTarget, ...], **kw: Any):
    return ServiceRule("shop", name, "http", vip, port, "TCP", "NodePort", None, endpoints, **kw)


def _rules(*rules: ServiceRule, checks: dict[tuple[str, int], HealthCheck] | None = None):
    return RuleSet(1, {r.key: r for r in rules}, checks or {})


def _web(etp: str = "Cluster", endpoints: tuple[EndpointTarget, ...] | None = None):
    eps = endpoints if endpoints is not None else tuple(_endpoint(ip) for ip in ENDPOINT_IPS)
    policy = {"external_traffic_policy": etp}
    return (
        _rule("web", WEB_VIP, 80, eps, **policy),
        _rule("web", NODE_IP, WEB_NODE_PORT, eps, kind="node-port", node="node-a", **policy),
    )


def _cluster_rules() -> RuleSet:
    """The rule set the kernel tests load: web (3 endpoints), sticky, empty."""
    eps = tuple(_endpoint(ip) for ip in ENDPOINT_IPS)
    sticky = _rule("sticky", STICKY_VIP, 80, eps, session_affinity="ClientIP", affinity_timeout=30)
    empty = (
        _rule("empty", EMPTY_VIP, 80, ()),
        _rule("empty", NODE_IP, EMPTY_NODE_PORT, (), kind="node-port", node="node-a"),
    )
    return _rules(*_web(), sticky, *empty)


def _chain(doc: str, table: str, chain: str) -> list[str]:
    section = doc.split(f"*{table}\n", 1)[1].split("COMMIT", 1)[0]
    return [line for line in section.splitlines() if line.startswith(f"-A {chain} ")]


# -- (a) the rendered document --------------------------------------------------------------


def test_chain_names_are_kube_proxys_hashes() -> None:
    # Names every kubeadm cluster shows for its built-in Services.
    assert service_chain("default/kubernetes:https", "tcp") == "KUBE-SVC-NPX46M4PTMTKRN6Y"
    assert service_chain("kube-system/kube-dns:dns", "udp") == "KUBE-SVC-TCOU7JCQXEZGVUNU"
    assert service_chain("kube-system/kube-dns:dns-tcp") == "KUBE-SVC-ERIFXISQEP7F7OF4"
    name = "shop/web:http"
    suffix = service_chain(name)[len("KUBE-SVC-") :]
    assert external_chain(name) == f"KUBE-EXT-{suffix}"
    assert local_policy_chain(name) == f"KUBE-SVL-{suffix}"
    sep = endpoint_chain(name, "tcp", "10.244.1.2:8080")
    assert re.fullmatch(r"KUBE-SEP-[A-Z2-7]{16}", sep)
    assert sep != endpoint_chain(name, "tcp", "10.244.1.3:8080")


def test_document_is_complete_and_deterministic() -> None:
    rules = _cluster_rules()
    doc = IptablesRenderer().render(rules, NODE)
    reordered = RuleSet(1, dict(reversed(list(rules.rules.items()))), {})
    assert IptablesRenderer().render(reordered, NODE) == doc
    assert re.fullmatch(r"\*filter\n.*?COMMIT\n\*nat\n.*?COMMIT\n", doc, re.S)
    declared = set(re.findall(r"^:(\S+) - \[0:0\]$", doc, re.M))
    used = set(re.findall(r"^-A (\S+) ", doc, re.M)) | set(re.findall(r"-j (KUBE-\S+)", doc))
    assert used <= declared, used - declared


def test_random_balancing_probabilities() -> None:
    doc = IptablesRenderer().render(_cluster_rules(), NODE)
    svc = _chain(doc, "nat", service_chain("shop/web:http"))
    jumps = [line for line in svc if "-j KUBE-SEP-" in line]
    probabilities = [m[1] if (m := re.search(r"--probability (\S+)", j)) else None for j in jumps]
    assert probabilities == ["0.3333333333", "0.5000000000", None]
    order = [re.search(r"-> (\S+)\"", j)[1] for j in jumps]  # type: ignore[index]
    assert order == [f"{ip}:8080" for ip in ENDPOINT_IPS]
    # Off-cluster sources reaching the ClusterIP are marked for masquerade first.
    assert svc[0].endswith(f"! -s {CLUSTER_CIDR} -j KUBE-MARK-MASQ")


def test_endpoint_chain_hairpin_and_dnat() -> None:
    doc = IptablesRenderer().render(_cluster_rules(), NODE)
    sep = endpoint_chain("shop/web:http", "tcp", "10.244.1.3:8080")
    assert _chain(doc, "nat", sep) == [
        f"-A {sep} -m comment --comment shop/web:http -s 10.244.1.3 -j KUBE-MARK-MASQ",
        f"-A {sep} -m comment --comment shop/web:http -m tcp -p tcp "
        "-j DNAT --to-destination 10.244.1.3:8080",
    ]
    assert _chain(doc, "nat", "KUBE-MARK-MASQ") == ["-A KUBE-MARK-MASQ -j MARK --or-mark 0x4000"]
    postrouting = _chain(doc, "nat", "KUBE-POSTROUTING")
    assert "--mark 0x4000/0x4000 -j RETURN" in postrouting[0]
    assert postrouting[-1].endswith("-j MASQUERADE --random-fully")


def test_client_ip_affinity_uses_recent() -> None:
    doc = IptablesRenderer().render(_cluster_rules(), NODE)
    svc = _chain(doc, "nat", service_chain("shop/sticky:http"))
    checks = [line for line in svc if "--rcheck" in line]
    assert len(checks) == 3
    for line, ip in zip(checks, ENDPOINT_IPS, strict=True):
        sep = endpoint_chain("shop/sticky:http", "tcp", f"{ip}:8080")
        assert f"-m recent --name {sep} --rcheck --seconds 30 --reap -j {sep}" in line
        assert f"-m recent --name {sep} --set" in _chain(doc, "nat", sep)[1]
    assert svc.index(checks[-1]) < min(i for i, line in enumerate(svc) if "statistic" in line)


def test_service_without_endpoints_is_rejected_not_translated() -> None:
    doc = IptablesRenderer().render(_cluster_rules(), NODE)
    assert service_chain("shop/empty:http") not in doc
    reject = "-j REJECT --reject-with icmp-port-unreachable"
    assert _chain(doc, "filter", "KUBE-SERVICES") == [
        '-A KUBE-SERVICES -m comment --comment "shop/empty:http has no endpoints" '
        f"-m tcp -p tcp -d {EMPTY_VIP} --dport 80 {reject}"
    ]
    external = _chain(doc, "filter", "KUBE-EXTERNAL-SERVICES")
    assert external == [
        '-A KUBE-EXTERNAL-SERVICES -m comment --comment "shop/empty:http has no endpoints" '
        f"-m addrtype --dst-type LOCAL -m tcp -p tcp --dport {EMPTY_NODE_PORT} {reject}"
    ]


def test_node_port_cluster_policy_masquerades() -> None:
    doc = IptablesRenderer().render(_cluster_rules(), NODE)
    ext = external_chain("shop/web:http")
    assert _chain(doc, "nat", "KUBE-NODEPORTS") == [
        f"-A KUBE-NODEPORTS -m comment --comment shop/web:http -m tcp -p tcp "
        f"--dport {WEB_NODE_PORT} -j {ext}"
    ]
    assert [line.split(" -j ")[-1] for line in _chain(doc, "nat", ext)] == [
        "KUBE-MARK-MASQ",
        service_chain("shop/web:http"),
    ]
    assert _chain(doc, "nat", "KUBE-SERVICES")[-1].endswith(
        "-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"
    )


def test_external_traffic_policy_local_keeps_to_node_endpoints() -> None:
    eps = (_endpoint("10.244.1.2"), _endpoint("10.244.2.5", "node-b"), _endpoint("10.244.1.3"))
    lb = _rule("web", "10.200.0.1", 80, (), kind="load-balancer", external_traffic_policy="Local")
    checks = {(NODE_IP, 32100): HealthCheck("shop", "web", "node-a", 2)}
    doc = IptablesRenderer().render(_rules(*_web("Local", eps), lb, checks=checks), NODE)
    name, ext, svl = (
        "shop/web:http",
        external_chain("shop/web:http"),
        local_policy_chain("shop/web:http"),
    )
    assert [line.split(" -j ")[-1] for line in _chain(doc, "nat", ext)] == [
        service_chain(name),  # pods short-circuit to every endpoint
        "KUBE-MARK-MASQ",  # the node itself is masqueraded ...
        service_chain(name),  # ... and may use every endpoint
        svl,  # everyone else: this node's endpoints, source kept
    ]
    local = [line for line in _chain(doc, "nat", svl) if "KUBE-SEP-" in line]
    assert [re.search(r"-> (\S+)\"", line)[1] for line in local] == [  # type: ignore[index]
        "10.244.1.2:8080",
        "10.244.1.3:8080",
    ]
    assert "--probability 0.5000000000" in local[0]
    assert f"-d 10.200.0.1 --dport 80 -j {ext}" in _chain(doc, "nat", "KUBE-SERVICES")[1]
    assert _chain(doc, "filter", "KUBE-NODEPORTS")[0].endswith("--dport 32100 -j ACCEPT")

    # On node-b only 10.244.2.5 is local; on node-c nothing is: external traffic is dropped.
    doc_b = IptablesRenderer().render(_rules(*_web("Local", eps), lb), ProxyNode("node-b"))
    assert len([line for line in _chain(doc_b, "nat", svl) if "KUBE-SEP-" in line]) == 1
    doc_c = IptablesRenderer().render(_rules(*_web("Local", eps), lb), ProxyNode("node-c"))
    assert svl not in doc_c
    drops = _chain(doc_c, "filter", "KUBE-EXTERNAL-SERVICES")
    assert len(drops) == 2 and all(line.endswith("-j DROP") for line in drops)
    assert all('"shop/web:http has no local endpoints"' in line for line in drops)

    # Asked to, a node logs each such drop first (NFLOG), so the trace can name it.
    logged = ProxyNode("node-c", drop_log_group=5)
    doc_log = IptablesRenderer().render(_rules(*_web("Local", eps), lb), logged)
    lines = _chain(doc_log, "filter", "KUBE-EXTERNAL-SERVICES")
    assert [line.rsplit(" -j ", 1)[1].split()[0] for line in lines] == [
        "NFLOG", "DROP", "NFLOG", "DROP",
    ]  # fmt: skip
    assert '--nflog-group 5 --nflog-prefix "drop no-local-endpoints shop/web:http"' in lines[0]
    assert "-d 10.200.0.1 --dport 80" in lines[0] and "--dst-type LOCAL" in lines[2]


def test_terminating_endpoints_only_when_none_is_ready() -> None:
    ready = _endpoint("10.244.1.2")
    leaving = EndpointTarget("10.244.1.3", 8080, "old", "node-a", False, True, True)
    doc = IptablesRenderer().render(_rules(*_web(endpoints=(ready, leaving))), NODE)
    assert "10.244.1.3:8080" not in doc
    doc = IptablesRenderer().render(_rules(*_web(endpoints=(leaving,))), NODE)
    assert "--to-destination 10.244.1.3:8080" in doc


def _sample_shop_rules() -> RuleSet:
    """The sample manifests with every pod running and ready."""
    cluster = Cluster()
    cluster.apply(load_manifests(default_manifest_paths()))
    for pod in list(cluster.state.pods):
        cluster.set_pod_running(pod.namespace, pod.name)
        cluster.set_pod_ready(pod.namespace, pod.name, True)
    return build_rules(cluster.state)


SHOP_NODE = ProxyNode("node-a", cluster_cidr="127.244.0.0/16")


def test_sample_shop_renders_one_service_chain_per_port() -> None:
    rules = _sample_shop_rules()
    doc = IptablesRenderer().render(rules, SHOP_NODE)
    cluster_ips = [r for r in rules.rules.values() if r.kind == "cluster-ip"]
    assert cluster_ips
    for rule in cluster_ips:
        chain = service_chain(rule.service)
        jump = [line for line in _chain(doc, "nat", "KUBE-SERVICES") if line.endswith(chain)]
        assert len(jump) == 1 and f"-d {rule.vip} --dport {rule.port} " in jump[0]
        seps = [line for line in _chain(doc, "nat", chain) if "-j KUBE-SEP-" in line]
        assert len(seps) == len(rule.ready_endpoints) > 0


# -- (b) the real kernel --------------------------------------------------------------------


def _kernel_unavailable() -> str | None:
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    for tool in ("unshare", "ip", "iptables", "iptables-restore"):
        if not shutil.which(tool):
            return f"{tool} is not installed"
    probe = subprocess.run([*UNSHARE, "iptables", "--version"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot create a network namespace: {probe.stderr.strip()}"
    if "nf_tables" not in probe.stdout:
        return f"iptables is not the nf_tables backend: {probe.stdout.strip()}"
    return None


UNAVAILABLE = _kernel_unavailable()
kernel = pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE))


def _in_namespace(
    rules: RuleSet, requests: list[dict[str, Any]], node: ProxyNode = NODE, **extra: Any
) -> dict[str, Any]:
    renderer = IptablesRenderer()
    scenario = {
        "setup": renderer.setup(node),
        "document": renderer.render(rules, node),
        "restore": list(renderer.restore_argv),
        "requests": requests,
        **extra,
    }
    done = subprocess.run(
        [*UNSHARE, sys.executable, "-m", "tests.test_kernel_iptables"],
        input=json.dumps(scenario),
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def _counter(saved: str, pattern: str) -> int:
    """Packets through the one ``iptables-save -c`` rule matching ``pattern``."""
    lines = [line for line in saved.splitlines() if re.search(pattern, line)]
    assert len(lines) == 1, lines
    return int(re.match(r"\[(\d+):", lines[0])[1])  # type: ignore[index]


@kernel
def test_kernel_loads_the_sample_shop_atomically_and_idempotently() -> None:
    rules = _sample_shop_rules()
    doc = IptablesRenderer().render(rules, SHOP_NODE)
    out = _in_namespace(rules, [], node=SHOP_NODE, loads=2)
    saved = out["saved"]
    for pattern in (
        r"-j DNAT --to-destination",
        r"--probability",
        r"-A KUBE-SERVICES .*-j KUBE-SVC-",
    ):
        assert len(re.findall(pattern, saved)) == len(re.findall(pattern, doc)) > 0, pattern
    declared = set(re.findall(r"^:(KUBE-\S+) ", doc, re.M))
    assert declared <= set(re.findall(r"^:(KUBE-\S+) ", saved, re.M))


def _jumps(saved: str) -> dict[tuple[str, str], list[str]]:
    """(table, chain) → the targets of its rules in order (counters and match order aside)."""
    out: dict[tuple[str, str], list[str]] = {}
    table = ""
    for line in saved.splitlines():
        line = re.sub(r"^\[\d+:\d+\] ", "", line)
        if line.startswith("*"):
            table = line[1:]
        elif line.startswith("-A "):
            chain = line.split()[1]
            out.setdefault((table, chain), []).append(line.rsplit(" -j ", 1)[1].split()[0])
    return out


@kernel
def test_iptables_save_output_is_what_the_kernel_saves() -> None:
    """``hopscope iptables-save`` prints, chain by chain and in order, what iptables-save
    prints once setup and render are loaded into an empty namespace — and it is itself a
    document iptables-restore takes."""
    rules = _sample_shop_rules()
    shown = save_document(rules, SHOP_NODE)
    kernel_saved = _in_namespace(rules, [], node=SHOP_NODE)["saved"]
    restored = subprocess.run(
        [*UNSHARE, "sh", "-c", "iptables-restore && iptables-save"],
        input=shown,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert restored.returncode == 0, restored.stderr
    wanted = {k: v for k, v in _jumps(kernel_saved).items() if k[1] != "KUBE-FIREWALL"}
    assert _jumps(shown) == wanted
    assert _jumps(restored.stdout) == wanted
    assert save_document(rules, SHOP_NODE, ("nat",)).startswith("*nat\n")


@kernel
def test_kernel_cluster_ip_reaches_an_endpoint_keeping_source_address_and_port() -> None:
    out = _in_namespace(_cluster_rules(), [{"dst": f"{WEB_VIP}:80", "src": CLIENT_IP, "count": 5}])
    for reply in out["replies"]:
        assert reply["error"] is None, reply
        server, peer = reply["answer"].split()
        assert server in {f"{ip}:8080" for ip in ENDPOINT_IPS}
        assert peer == reply["client"]  # pod to ClusterIP: DNAT only, no SNAT
    assert _counter(out["saved"], r"-j MASQUERADE") == 0


@kernel
def test_kernel_random_choice_is_uniform() -> None:
    n = 600
    out = _in_namespace(_cluster_rules(), [{"dst": f"{WEB_VIP}:80", "src": CLIENT_IP, "count": n}])
    assert all(r["error"] is None for r in out["replies"])
    counts = Counter(r["answer"].split()[0] for r in out["replies"])
    assert set(counts) == {f"{ip}:8080" for ip in ENDPOINT_IPS}, counts
    chi2 = sum((c - n / 3) ** 2 / (n / 3) for c in counts.values())
    # Two degrees of freedom: the chi-square survival function is exp(-x/2).
    assert math.exp(-chi2 / 2) > 0.001, counts


@kernel
def test_kernel_service_without_endpoints_is_refused_at_once() -> None:
    requests = [
        {"dst": f"{EMPTY_VIP}:80", "src": CLIENT_IP, "count": 1},
        {"dst": f"{NODE_IP}:{EMPTY_NODE_PORT}", "src": CLIENT_IP, "count": 1},
    ]
    out = _in_namespace(_cluster_rules(), requests)
    for reply in out["replies"]:
        assert reply["error"] == "ECONNREFUSED", reply
        assert reply["ms"] < 500, reply
    saved = out["saved"]
    assert _counter(saved, rf"-A KUBE-SERVICES -d {EMPTY_VIP}/32 .*-j REJECT") == 1
    assert _counter(saved, rf"-A KUBE-EXTERNAL-SERVICES .*--dport {EMPTY_NODE_PORT} ") == 1


@kernel
def test_kernel_client_ip_affinity_sticks() -> None:
    requests = [
        {"dst": f"{STICKY_VIP}:80", "src": CLIENT_IP, "count": 20},
        {"dst": f"{STICKY_VIP}:80", "src": "10.244.1.10", "count": 20},
    ]
    out = _in_namespace(_cluster_rules(), requests)
    assert all(r["error"] is None for r in out["replies"])
    by_client: dict[str, set[str]] = {}
    for reply in out["replies"]:
        client = reply["client"].split(":")[0]
        by_client.setdefault(client, set()).add(reply["answer"].split()[0])
    assert all(len(servers) == 1 for servers in by_client.values()), by_client
    assert set(by_client) == {CLIENT_IP, "10.244.1.10"}


@kernel
def test_kernel_node_port_cluster_policy_is_masqueraded() -> None:
    out = _in_namespace(
        _cluster_rules(), [{"dst": f"{NODE_IP}:{WEB_NODE_PORT}", "src": CLIENT_IP, "count": 3}]
    )
    for reply in out["replies"]:
        assert reply["error"] is None, reply
        server, peer = reply["answer"].split()
        assert server in {f"{ip}:8080" for ip in ENDPOINT_IPS}
        assert peer.split(":")[0] != CLIENT_IP, reply  # SNAT on the way in
    assert _counter(out["saved"], r"-j MASQUERADE") == 3


@kernel
def test_kernel_node_port_local_policy_keeps_outside_client_and_node() -> None:
    # One endpoint here, one on node-b (unreachable from this namespace): Local policy
    # must send every outside connection to the local one, with the client's address.
    eps = (_endpoint(ENDPOINT_IPS[0]), _endpoint("10.244.2.5", "node-b"))
    outside = [{"dst": f"{NODE_IP}:{WEB_NODE_PORT}", "count": 10}]
    out = _in_namespace(_rules(*_web("Local", eps)), [], outside=outside)
    assert len(out["outside"]) == 10
    for reply in out["outside"]:
        assert reply["error"] is None, reply
        server, peer = reply["answer"].split()
        assert server == f"{ENDPOINT_IPS[0]}:8080"
        assert peer == reply["client"] and peer.startswith(f"{OUTSIDE_IP}:")
    assert _counter(out["saved"], r"-j MASQUERADE") == 0


@kernel
def test_kernel_hairpin_is_masqueraded() -> None:
    only = (_endpoint(ENDPOINT_IPS[0]),)
    rules = _rules(_rule("web", WEB_VIP, 80, only))
    out = _in_namespace(rules, [{"dst": f"{WEB_VIP}:80", "src": ENDPOINT_IPS[0], "count": 1}])
    assert out["replies"][0]["error"] is None, out["replies"]
    sep = endpoint_chain("shop/web:http", "tcp", f"{ENDPOINT_IPS[0]}:8080")
    assert _counter(out["saved"], rf"-A {sep} -s {ENDPOINT_IPS[0]}/32 .*KUBE-MARK-MASQ") == 1
    assert _counter(out["saved"], r"-j MASQUERADE") == 1


@kernel
@pytest.mark.skipif(not shutil.which("conntrack"), reason="conntrack (conntrack-tools) missing")
def test_kernel_conntrack_shows_the_dnat() -> None:
    out = _in_namespace(
        _cluster_rules(),
        [{"dst": f"{WEB_VIP}:80", "src": CLIENT_IP, "count": 1}],
        conntrack=["-L", "-p", "tcp", "--orig-dst", WEB_VIP],
    )
    reply = out["replies"][0]
    server = reply["answer"].split()[0]
    sport = reply["client"].split(":")[1]
    entries = [line for line in out["conntrack"].splitlines() if f"sport={sport} " in line]
    assert len(entries) == 1, out["conntrack"]
    original, translated = re.findall(r"src=(\S+) dst=(\S+) sport=(\d+) dport=(\d+)", entries[0])
    assert original == (CLIENT_IP, WEB_VIP, sport, "80")
    assert translated == (server.split(":")[0], CLIENT_IP, "8080", sport)


# -- the probe, run inside the namespace ----------------------------------------------------


def _run(*argv: str, stdin: str | None = None) -> str:
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, check=True).stdout


def _serve(listener: socket.socket) -> None:
    while True:
        conn, peer = listener.accept()
        with conn:
            local = conn.getsockname()
            conn.sendall(f"{local[0]}:{local[1]} {peer[0]}:{peer[1]}\n".encode())


def _connect(dst: str, src: str | None) -> dict[str, Any]:
    host, port = dst.rsplit(":", 1)
    start = time.monotonic()
    with socket.socket() as sock:
        sock.settimeout(3)
        if src:
            sock.bind((src, 0))
        client = "{}:{}".format(*sock.getsockname())
        try:
            sock.connect((host, int(port)))
            client = "{}:{}".format(*sock.getsockname())
            answer = sock.makefile().readline().strip()
            error = None
        except OSError as exc:
            answer, error = "", _errno_name(exc)
    ms = (time.monotonic() - start) * 1000
    return {"client": client, "answer": answer, "error": error, "ms": ms}


def _errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _probe(scenario: dict[str, Any]) -> dict[str, Any]:
    """Set the namespace up as the address plan says, load the rules, send the requests."""
    _run("ip", "link", "set", "lo", "up")
    _run("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0-peer")
    for dev in ("eth0", "eth0-peer"):
        _run("ip", "link", "set", dev, "up")
    _run("ip", "addr", "add", f"{NODE_IP}/24", "dev", "eth0")
    _run("ip", "route", "add", "default", "dev", "eth0")
    for ip in (*ENDPOINT_IPS, CLIENT_IP, "10.244.1.10"):
        _run("ip", "addr", "add", f"{ip}/32", "dev", "lo")
    for ip in ENDPOINT_IPS:
        listener = socket.create_server((ip, 8080))
        threading.Thread(target=_serve, args=(listener,), daemon=True).start()
    _run(*scenario["restore"], stdin=scenario["setup"])
    for _ in range(scenario.get("loads", 1)):
        _run(*scenario["restore"], stdin=scenario["document"])
    replies = _send(scenario["requests"])
    outside = _from_outside(scenario.get("outside", []))
    result: dict[str, Any] = {"replies": replies, "outside": outside}
    result["saved"] = _run("iptables-save", "-c")
    if scenario.get("conntrack"):
        result["conntrack"] = _run("conntrack", *scenario["conntrack"])
    return result


def _send(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        _connect(request["dst"], request.get("src"))
        for request in requests
        for _ in range(request["count"])
    ]


def _from_outside(requests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``requests`` from a client namespace behind the node's ``eth0``."""
    if not requests:
        return []
    argv = ["unshare", "-n", sys.executable, "-m", "tests.test_kernel_iptables", "client"]
    with subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as child:
        assert child.stdin and child.stdout
        try:
            assert child.stdout.readline().strip() == "ready"  # its namespace exists now
            _run("ip", "link", "set", "eth0-peer", "netns", str(child.pid))
            out, _ = child.communicate(json.dumps(requests), timeout=60)
        finally:
            child.kill()
    return json.loads(out)  # type: ignore[no-any-return]


def _client() -> list[dict[str, Any]]:
    """The outside client, in its own namespace: wait for the veth end, then connect."""
    print("ready", flush=True)
    requests = json.load(sys.stdin)
    _run("ip", "link", "set", "lo", "up")
    _run("ip", "addr", "add", f"{OUTSIDE_IP}/24", "dev", "eth0-peer")
    _run("ip", "link", "set", "eth0-peer", "up")
    _run("ip", "route", "add", "default", "dev", "eth0-peer")
    return _send(requests)


if __name__ == "__main__":
    if sys.argv[1:] == ["client"]:
        print(json.dumps(_client()))
    else:
        print(json.dumps(_probe(json.load(sys.stdin))))

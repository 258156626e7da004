"""NetworkPolicy as netfilter rules in a node: what a policy agent (Calico, kube-router)
writes, in the ``filter`` table.

Per node, for the pods on that node::

    FORWARD            -j HOPSCOPE-POLICY                      (inserted first, once)
    HOPSCOPE-POLICY    ctstate RELATED,ESTABLISHED -j ACCEPT   (replies of allowed conns)
                       -d <cluster host> telemetry ports -j RETURN
                       -d <Service CIDR> -j RETURN              (no endpoint: REJECT next)
                       -s <pod>/32 -j HOPSCOPE-EGR-<hash>      (egress-isolated pods)
                       -d <pod>/32 -j HOPSCOPE-ING-<hash>      (ingress-isolated pods)
    HOPSCOPE-EGR-…     one rule per (policy rule, peer, port) -j RETURN
                       -j NFLOG --nflog-group 5 --nflog-prefix "deny egress ns/pod"
                       -j DROP
    HOPSCOPE-ING-…     kubelet probes and metrics scrapes from the cluster host -j RETURN,
                       then as above

An allowed packet RETURNs, so a same-node connection is checked on both sides (egress of
the source, then ingress of the destination) in one pass; a cross-node one on each node.
Peers given by selectors are the matching pods' current IPs (the document is rendered
again on every state change, as an agent re-renders its ipsets); ``ipBlock`` ``except``
ranges go in a chain of their own that RETURNs before the accept. Policies see the
destination after kube-proxy's DNAT (PREROUTING runs before FORWARD) and the source before
masquerade (POSTROUTING runs after), as on a real node. Denied packets are dropped, as by
most CNIs: the client's SYNs go unanswered until it gives up. Each drop is logged to NFLOG
group :data:`NFLOG_GROUP` with the pod and the side in the prefix; the verdict's reason
(which policies isolate the pod) is the model's (:class:`~mesh.model.policy.PolicyEngine`).
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from typing import Any

from mesh.model.policy import PolicyEngine, _named_port, policy_types, selects
from mesh.model.types import ClusterState, NetworkPolicy, Pod

POLICY_CHAIN = "HOPSCOPE-POLICY"
NFLOG_GROUP = 5
ALLOW_MARK = "0x10000"
"""Set by an ``ipBlock`` chain when its range (outside every ``except``) allows a packet."""
PROBE_PORTS_NOTE = "kubelet probes and metrics scrapes"


def _hash(text: str) -> str:
    """12 base32 characters: chain names must stay under 29 characters."""
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:12]


def pod_chain(side: str, pod: Pod) -> str:
    return f"HOPSCOPE-{'EGR' if side == 'egress' else 'ING'}-{_hash(f'{pod.namespace}/{pod.name}')}"


def nflog_prefix(side: str, pod: Pod) -> str:
    """``deny <side> <ns>/<pod>``, within NFLOG's 64-byte prefix."""
    return f"deny {side} {pod.namespace}/{pod.name}"[:63]


def read_nflog_prefix(prefix: str) -> tuple[str, str, str] | None:
    """(side, namespace, pod) of a :func:`nflog_prefix`; None for any other prefix."""
    word, _, rest = prefix.partition(" ")
    side, _, target = rest.partition(" ")
    if word != "deny" or side not in ("egress", "ingress"):
        return None
    namespace, _, pod = target.partition("/")
    return side, namespace, pod


def setup() -> str:
    """The jump from FORWARD, loaded once into a fresh node."""
    return (
        f"*filter\n:{POLICY_CHAIN} - [0:0]\n"
        f'-I FORWARD 1 -m comment --comment "hopscope network policies" -j {POLICY_CHAIN}\n'
        "COMMIT\n"
    )


def render(
    state: ClusterState,
    node: str,
    host_ip: str,
    host_ports: tuple[int, ...],
    probe_ports: tuple[int, ...],
    service_cidr: str,
) -> str:
    """The node's whole policy state as one ``iptables-restore --noflush`` document."""
    engine = PolicyEngine(state)
    local = sorted(
        (p for p in engine.pods_by_ip.values() if p.node == node and p.ip),
        key=lambda p: (p.namespace, p.name),
    )
    chains: dict[str, list[str]] = {POLICY_CHAIN: []}
    main = chains[POLICY_CHAIN]
    main.append("-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT")
    main.append(f"-j MARK --set-xmark 0x0/{ALLOW_MARK}")
    ports = ",".join(str(p) for p in host_ports)
    main.append(
        f"-d {host_ip}/32 -p tcp -m multiport --dports {ports} -m comment --comment "
        '"telemetry and API on the cluster host" -j RETURN'
    )
    # A Service address still untranslated has no endpoint: kube-proxy's REJECT answers it
    # (policies apply after DNAT, to pods, never to a ClusterIP).
    main.append(
        f'-d {service_cidr} -m comment --comment "Service addresses without endpoints: '
        'kube-proxy REJECTs them" -j RETURN'
    )
    for side in ("egress", "ingress"):
        for pod in local:
            isolating = [
                p
                for p in engine.policies
                if side.capitalize() in policy_types(p) and selects(p, pod)
            ]
            if not isolating:
                continue
            chain = pod_chain(side, pod)
            flag = "-s" if side == "egress" else "-d"
            main.append(
                f'{flag} {pod.ip}/32 -m comment --comment "{side} of {pod.namespace}/{pod.name}" '
                f"-j {chain}"
            )
            rules = chains.setdefault(chain, [])
            if side == "ingress":
                listed = ",".join(map(str, sorted(_probe_ports(pod) | set(probe_ports))))
                rules.append(
                    f"-s {host_ip}/32 -p tcp -m multiport --dports {listed} "
                    f'-m comment --comment "{PROBE_PORTS_NOTE}" -j RETURN'
                )
            for policy in isolating:
                _policy_rules(engine, policy, pod, side, rules, chains)
            rules.append(
                f'-j NFLOG --nflog-group {NFLOG_GROUP} --nflog-prefix "{nflog_prefix(side, pod)}"'
            )
            rules.append("-j DROP")
    lines = ["*filter", *(f":{c} - [0:0]" for c in chains)]
    for chain, rules in chains.items():
        lines += [f"-A {chain} {rule}" for rule in rules]
    return "\n".join([*lines, "COMMIT", ""])


def _probe_ports(pod: Pod) -> set[int]:
    """The ports the kubelet's readiness probes reach in the pod (the app's own port)."""
    ports = set()
    for container in pod.containers:
        probe = container.readiness_probe
        port = container.port_number(probe.port) if probe is not None else None
        if port is not None:
            ports.add(port + pod.app_port_offset)
    return ports


def _policy_rules(
    engine: PolicyEngine,
    policy: NetworkPolicy,
    pod: Pod,
    side: str,
    rules: list[str],
    chains: dict[str, list[str]],
) -> None:
    """One policy's rules for ``pod`` on ``side``: every allowed (peer, port) RETURNs."""
    peers_key, flag = ("to", "-d") if side == "egress" else ("from", "-s")
    name = f"{policy.namespace}/{policy.name}"
    comment = f'-m comment --comment "{name}"'
    for index, rule in enumerate(policy.spec.get(side) or []):
        ports = rule.get("ports")
        # named ports are the destination's: the pod itself on ingress, the peer on egress
        fixed_owner = pod if side == "ingress" else None
        peers = rule.get(peers_key)
        if not peers:
            for port in _port_matches(ports, fixed_owner):
                rules.append(_join(port, comment, "-j RETURN"))
            continue
        for peer in peers:
            block = peer.get("ipBlock")
            if block is not None:
                key = f"{name}/{side}/{index}"
                _block_rules(block, flag, ports, fixed_owner, comment, key, rules, chains)
                continue
            for other in sorted(engine.pods_by_ip.values(), key=lambda p: p.ip):
                if not engine._peer_matches(peer, policy, other.ip, other):
                    continue
                owner = fixed_owner if side == "ingress" else other
                for port in _port_matches(ports, owner):
                    rules.append(_join(f"{flag} {other.ip}/32", port, comment, "-j RETURN"))


def _block_rules(
    block: dict[str, Any],
    flag: str,
    ports: list[dict[str, Any]] | None,
    owner: Pod | None,
    comment: str,
    key: str,
    rules: list[str],
    chains: dict[str, list[str]],
) -> None:
    """An ``ipBlock``: a RETURN per port; with ``except`` ranges, a chain of its own that
    returns early for them and otherwise marks the packet allowed."""
    try:
        cidr = str(ipaddress.ip_network(block["cidr"], strict=False))
        excepts = [str(ipaddress.ip_network(e, strict=False)) for e in block.get("except") or []]
    except (KeyError, ValueError, TypeError):
        return  # the manifest check refuses these; a malformed block matches nothing
    if not excepts:
        for port in _port_matches(ports, owner):
            rules.append(_join(f"{flag} {cidr}", port, comment, "-j RETURN"))
        return
    chain = f"HOPSCOPE-BLK-{_hash(key + cidr)}"
    body = chains.setdefault(chain, [])
    body += [f"{flag} {e} -j RETURN" for e in excepts]
    allow = f"-j MARK --set-xmark {ALLOW_MARK}/{ALLOW_MARK}"
    for port in _port_matches(ports, owner):
        body.append(_join(f"{flag} {cidr}", port, allow))
    rules.append(_join(comment, f"-j {chain}"))
    rules.append(f"-m mark --mark {ALLOW_MARK}/{ALLOW_MARK} -j RETURN")


def _join(*parts: str | None) -> str:
    return " ".join(p for p in parts if p)


def _port_matches(ports: list[dict[str, Any]] | None, owner: Pod | None) -> list[str | None]:
    if not ports:
        return [None]
    out: list[str | None] = []
    for entry in ports:
        protocol = (entry.get("protocol") or "TCP").lower()
        wanted = entry.get("port")
        if wanted is None:
            out.append(f"-p {protocol}")
            continue
        if isinstance(wanted, str) and not wanted.isdigit():
            number = _named_port(owner, wanted, protocol.upper()) if owner is not None else None
            if number is None:
                continue  # a named port the peer does not have: matches nothing
            out.append(f"-p {protocol} --dport {number}")
            continue
        low, high = int(wanted), int(entry.get("endPort") or wanted)
        out.append(f"-p {protocol} --dport {low}" + (f":{high}" if high != low else ""))
    return out

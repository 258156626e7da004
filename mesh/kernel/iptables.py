"""iptables mode: the chains kube-proxy writes, as one ``iptables-restore`` document.

Shape of the ``nat`` table for a Service port ``ns/web:http`` (hashes shortened)::

    KUBE-SERVICES   -d <clusterIP> --dport 80            -j KUBE-SVC-H
                    -d <LB IP> --dport 80                -j KUBE-EXT-H
                    (last) -m addrtype --dst-type LOCAL  -j KUBE-NODEPORTS
    KUBE-NODEPORTS  --dport <nodePort>                   -j KUBE-EXT-H
    KUBE-EXT-H      Cluster policy: -j KUBE-MARK-MASQ, then -j KUBE-SVC-H
                    Local policy: pods and the node itself short-circuit to KUBE-SVC-H,
                    everyone else -j KUBE-SVL-H (this node's endpoints only)
    KUBE-SVC-H      [! -s <cluster CIDR> -j KUBE-MARK-MASQ]
                    [-m recent --rcheck ... -j KUBE-SEP-E]   (ClientIP affinity, per endpoint)
                    -m statistic --mode random --probability 1/(n-i) -j KUBE-SEP-E  (last: always)
    KUBE-SEP-E      -s <endpoint IP> -j KUBE-MARK-MASQ      (hairpin)
                    [-m recent --set] -j DNAT --to-destination <ip:port>
    KUBE-MARK-MASQ / KUBE-POSTROUTING: mark 0x4000, masquerade what carries it

Services without a usable endpoint get no ``nat`` chains at all; the ``filter`` table
REJECTs their ClusterIP (``KUBE-SERVICES``) and external addresses
(``KUBE-EXTERNAL-SERVICES``), so a connect() fails at once instead of timing out.

Chain names are kube-proxy's: ``KUBE-SVC-`` / ``KUBE-SVL-`` / ``KUBE-EXT-`` plus the first
16 base32 characters of sha256(``ns/name:port`` + ``tcp``); ``KUBE-SEP-`` hashes the
endpoint's ``ip:port`` in as well. A learner comparing with a real cluster's
``iptables-save`` sees the same names for the same Service.

:meth:`IptablesRenderer.render` declares every chain it fills, which flushes it, and is
loaded with ``iptables-restore --noflush`` so rules others own in the same tables stay.
:meth:`IptablesRenderer.setup` holds the jumps from the built-in chains, loaded once.
"""

from __future__ import annotations

import base64
import functools
import hashlib
from dataclasses import dataclass

from mesh.kernel.renderer import ProxyNode, ServicePortView, service_ports
from mesh.kubeproxy.rules import EndpointTarget, RuleSet

SERVICES = "KUBE-SERVICES"
EXTERNAL_SERVICES = "KUBE-EXTERNAL-SERVICES"
NO_LOCAL_PREFIX = "drop no-local-endpoints"
"""NFLOG prefix of packets dropped for want of a local endpoint (see ``drop_log_group``)."""
NODEPORTS = "KUBE-NODEPORTS"
FORWARD = "KUBE-FORWARD"
FIREWALL = "KUBE-PROXY-FIREWALL"
POSTROUTING = "KUBE-POSTROUTING"
MARK_MASQ = "KUBE-MARK-MASQ"

FILTER_CHAINS = (SERVICES, EXTERNAL_SERVICES, FORWARD, NODEPORTS, FIREWALL)
NAT_CHAINS = (SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ)
NODEPORTS_COMMENT = "kubernetes service nodeports; NOTE: this must be the last rule in this chain"


# -- chain names ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _hash16(text: str) -> str:
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def service_chain(port_name: str, protocol: str = "tcp") -> str:
    """``KUBE-SVC-…``: balances over the endpoints ``Cluster`` traffic policy uses."""
    return "KUBE-SVC-" + _hash16(port_name + protocol)


def local_policy_chain(port_name: str, protocol: str = "tcp") -> str:
    """``KUBE-SVL-…``: balances over this node's endpoints (``Local`` traffic policy)."""
    return "KUBE-SVL-" + _hash16(port_name + protocol)


def external_chain(port_name: str, protocol: str = "tcp") -> str:
    """``KUBE-EXT-…``: where NodePort and LoadBalancer traffic enters a Service."""
    return "KUBE-EXT-" + _hash16(port_name + protocol)


def endpoint_chain(port_name: str, protocol: str, endpoint: str) -> str:
    """``KUBE-SEP-…`` of one endpoint (``ip:port``) of a Service port."""
    return "KUBE-SEP-" + _hash16(port_name + protocol + endpoint)


def probability(n: int) -> str:
    """The match probability of the first of ``n`` remaining endpoints, as kube-proxy
    prints it (ten decimals)."""
    return f"{1.0 / n:.10f}"


# -- hooks from the built-in chains ---------------------------------------------------------


@dataclass(frozen=True)
class Hook:
    """A jump from a built-in chain into kube-proxy's chains (kube-proxy's jump chains)."""

    table: str
    chain: str
    target: str
    comment: str
    new_only: bool = False
    """Match only the first packet of a connection (``--ctstate NEW``)."""

    def args(self) -> list[str]:
        match = ["-m", "conntrack", "--ctstate", "NEW"] if self.new_only else []
        return [*match, *_comment(self.comment), "-j", self.target]


_EXTERNAL_PORTALS = "kubernetes externally-visible service portals"

HOOKS = (
    Hook("filter", "INPUT", EXTERNAL_SERVICES, _EXTERNAL_PORTALS, True),
    Hook("filter", "FORWARD", EXTERNAL_SERVICES, _EXTERNAL_PORTALS, True),
    Hook("filter", "INPUT", NODEPORTS, "kubernetes health check service ports"),
    Hook("filter", "FORWARD", SERVICES, "kubernetes service portals", True),
    Hook("filter", "OUTPUT", SERVICES, "kubernetes service portals", True),
    Hook("filter", "FORWARD", FORWARD, "kubernetes forwarding rules"),
    Hook("filter", "INPUT", FIREWALL, "kubernetes load balancer firewall", True),
    Hook("filter", "OUTPUT", FIREWALL, "kubernetes load balancer firewall", True),
    Hook("filter", "FORWARD", FIREWALL, "kubernetes load balancer firewall", True),
    Hook("nat", "OUTPUT", SERVICES, "kubernetes service portals"),
    Hook("nat", "PREROUTING", SERVICES, "kubernetes service portals"),
    Hook("nat", "POSTROUTING", POSTROUTING, "kubernetes postrouting rules"),
)  # fmt: skip
"""In kube-proxy's order; each is inserted at the top of its chain, as kube-proxy does."""


# -- document building ----------------------------------------------------------------------


def _comment(text: str) -> list[str]:
    return ["-m", "comment", "--comment", f'"{text}"' if " " in text else text]


def _port_match(view: ServicePortView, dest: str | None, port: int) -> list[str]:
    match = ["-m", view.protocol, "-p", view.protocol]
    return [*match, *(["-d", dest] if dest else []), "--dport", str(port)]


class _Table:
    """Chains (declared in order) and their rules, printed grouped by chain."""

    def __init__(self, name: str, chains: tuple[str, ...]) -> None:
        self.name = name
        self.rules: dict[str, list[str]] = {c: [] for c in chains}

    def chain(self, name: str) -> str:
        self.rules.setdefault(name, [])
        return name

    def add(self, chain: str, *parts: str) -> None:
        self.rules[chain].append(" ".join(["-A", chain, *parts]))

    def text(self) -> str:
        lines = [f"*{self.name}", *(f":{c} - [0:0]" for c in self.rules)]
        lines += [rule for rules in self.rules.values() for rule in rules]
        return "\n".join([*lines, "COMMIT", ""])


class IptablesRenderer:
    """kube-proxy's iptables mode (``iptables-restore``, nf_tables or legacy backend)."""

    backend = "iptables"
    restore_argv: tuple[str, ...] = ("iptables-restore", "--noflush")

    def setup(self, node: ProxyNode) -> str:
        """Declare the top-level chains and insert the jumps from the built-in chains.

        Not idempotent (``-I`` again adds a second jump): load it into a fresh namespace.
        """
        docs = []
        for table, chains in (("filter", FILTER_CHAINS), ("nat", NAT_CHAINS)):
            lines = [f"*{table}", *(f":{c} - [0:0]" for c in chains)]
            lines += [" ".join(["-I", h.chain, *h.args()]) for h in HOOKS if h.table == table]
            docs.append("\n".join([*lines, "COMMIT", ""]))
        return "".join(docs)

    def render(self, rules: RuleSet, node: ProxyNode) -> str:
        """The whole ``filter`` + ``nat`` state of kube-proxy on ``node``, deterministic."""
        filt, nat = _Table("filter", FILTER_CHAINS), _Table("nat", NAT_CHAINS)
        _masquerade_chains(nat, node.masquerade_mark)
        for view in service_ports(rules, node):
            _ServicePortRules(view, node, filt, nat).write()
        nat.add(
            SERVICES, *_comment(NODEPORTS_COMMENT), "-m addrtype --dst-type LOCAL", "-j", NODEPORTS
        )
        _forward_chain(filt, node.masquerade_mark)
        return filt.text() + nat.text()

    def delete_stale(self, document: str, previous: str) -> str:
        """Flush and delete (``-X``) the chains ``previous`` declared and ``document`` does
        not, inside the same table sections: kube-proxy's own clean-up of stale chains."""
        stale = {
            table: sorted(set(_declared(previous, table)) - set(_declared(document, table)))
            for table in ("filter", "nat")
        }
        out = []
        for section in document.split("COMMIT\n"):
            if not section.strip():
                continue
            table = section.split("\n", 1)[0].lstrip("*")
            gone = stale.get(table, [])
            lines = section.rstrip("\n").split("\n")
            last = max(i for i, line in enumerate(lines) if line.startswith((":", "*")))
            lines[last + 1 : last + 1] = [f":{c} - [0:0]" for c in gone]  # flushes each
            lines += [f"-X {c}" for c in gone]
            out.append("\n".join(lines) + "\nCOMMIT\n")
        return "".join(out)


def _declared(document: str, table: str) -> list[str]:
    """The chains a document declares (``:NAME``) in one table's section."""
    if f"*{table}\n" not in document:
        return []
    body = document.split(f"*{table}\n", 1)[1].split("COMMIT\n", 1)[0]
    return [line[1:].split(" ", 1)[0] for line in body.splitlines() if line.startswith(":")]


def _masquerade_chains(nat: _Table, mark: str) -> None:
    nat.add(POSTROUTING, "-m mark !", f"--mark {mark}/{mark}", "-j RETURN")
    nat.add(POSTROUTING, f"-j MARK --xor-mark {mark}")
    comment = _comment("kubernetes service traffic requiring SNAT")
    nat.add(POSTROUTING, *comment, "-j MASQUERADE --random-fully")
    nat.add(MARK_MASQ, f"-j MARK --or-mark {mark}")


def _forward_chain(filt: _Table, mark: str) -> None:
    filt.add(FORWARD, "-m conntrack --ctstate INVALID -j DROP")
    filt.add(
        FORWARD,
        *_comment("kubernetes forwarding rules"),
        f"-m mark --mark {mark}/{mark}",
        "-j ACCEPT",
    )
    filt.add(
        FORWARD,
        *_comment("kubernetes forwarding conntrack rule"),
        "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
    )


class _ServicePortRules:
    """Everything one Service port contributes to both tables."""

    def __init__(self, view: ServicePortView, node: ProxyNode, filt: _Table, nat: _Table):
        self.view, self.node, self.filt, self.nat = view, node, filt, nat
        self.svc = service_chain(view.name, view.protocol)
        self.svl = local_policy_chain(view.name, view.protocol)
        self.ext = external_chain(view.name, view.protocol)

    def write(self) -> None:
        v = self.view
        uses_ext = v.has_endpoints and v.externally_accessible
        if uses_ext:
            self.nat.chain(self.ext)
        if v.cluster_endpoints:
            self.nat.chain(self.svc)
        if v.local_endpoints:
            self.nat.chain(self.svl)
        self._capture_cluster_ip()
        self._capture_external(uses_ext)
        if v.health_check_node_port:
            match = _port_match(v, None, v.health_check_node_port)
            comment = _comment(f"{v.name} health check node port")
            self.filt.add(NODEPORTS, *comment, *match, "-j ACCEPT")
        if uses_ext:
            self._external_chain()
        if v.cluster_endpoints:
            self._masquerade_off_cluster()
            self._balance(self.svc, v.cluster_endpoints)
        if v.local_endpoints:
            self._balance(self.svl, v.local_endpoints)
        for endpoint in v.reachable_endpoints:
            self._endpoint(endpoint)

    @property
    def _external_filter(self) -> tuple[str, str] | None:
        """(target, comment) for external traffic the nat table cannot send anywhere."""
        v = self.view
        if not v.has_endpoints:
            return "REJECT --reject-with icmp-port-unreachable", f"{v.name} has no endpoints"
        if v.external_policy_local and not v.local_endpoints:
            return "DROP", f"{v.name} has no local endpoints"
        return None

    def _capture_cluster_ip(self) -> None:
        v = self.view
        match = _port_match(v, v.cluster_ip, v.port)
        if v.has_endpoints:
            self.nat.add(SERVICES, *_comment(f"{v.name} cluster IP"), *match, "-j", self.svc)
        else:
            reject = "-j REJECT --reject-with icmp-port-unreachable"
            self.filt.add(SERVICES, *_comment(f"{v.name} has no endpoints"), *match, reject)

    def _capture_external(self, uses_ext: bool) -> None:
        v, blocked = self.view, self._external_filter
        for lb_ip in v.load_balancer_ips:
            match = _port_match(v, lb_ip, v.port)
            if uses_ext:
                self.nat.add(
                    SERVICES, *_comment(f"{v.name} loadbalancer IP"), *match, "-j", self.ext
                )
            if blocked:
                self._log_drop(blocked[0], match)
                self.filt.add(EXTERNAL_SERVICES, *_comment(blocked[1]), *match, "-j", blocked[0])
        if v.node_port:
            match = _port_match(v, None, v.node_port)
            if uses_ext:
                self.nat.add(NODEPORTS, *_comment(v.name), *match, "-j", self.ext)
            if blocked:
                local = "-m addrtype --dst-type LOCAL"
                self._log_drop(blocked[0], [local, *match])
                self.filt.add(
                    EXTERNAL_SERVICES, *_comment(blocked[1]), local, *match, "-j", blocked[0]
                )

    def _log_drop(self, target: str, match: list[str]) -> None:
        """Before a DROP, an NFLOG copy of the packet when the node asks for one."""
        group = self.node.drop_log_group
        if group is None or target != "DROP":
            return
        prefix = f"{NO_LOCAL_PREFIX} {self.view.name}"[:63]
        log = f'-j NFLOG --nflog-group {group} --nflog-prefix "{prefix}"'
        self.filt.add(EXTERNAL_SERVICES, *match, log)

    def _external_chain(self) -> None:
        """Cluster policy: masquerade, then any endpoint. Local policy: keep the source
        and use this node's endpoints, except for pods and the node itself, which
        short-circuit to every endpoint (the node masqueraded, its address being local)."""
        v, name = self.view, self.view.name
        if not v.external_policy_local:
            comment = _comment(f"masquerade traffic for {name} external destinations")
            self.nat.add(self.ext, *comment, "-j", MARK_MASQ)
            self.nat.add(self.ext, "-j", self.svc)
            return
        if self.node.cluster_cidr:
            comment = _comment(f"pod traffic for {name} external destinations")
            self.nat.add(self.ext, *comment, "-s", self.node.cluster_cidr, "-j", self.svc)
        local = "-m addrtype --src-type LOCAL"
        comment = _comment(f"masquerade LOCAL traffic for {name} external destinations")
        self.nat.add(self.ext, *comment, local, "-j", MARK_MASQ)
        comment = _comment(f"route LOCAL traffic for {name} external destinations")
        self.nat.add(self.ext, *comment, local, "-j", self.svc)
        if v.local_endpoints:
            self.nat.add(self.ext, "-j", self.svl)

    def _masquerade_off_cluster(self) -> None:
        """Traffic to the ClusterIP from outside the pod network is masqueraded."""
        v, cidr = self.view, self.node.cluster_cidr
        if cidr:
            match = _port_match(v, v.cluster_ip, v.port)
            comment = _comment(f"{v.name} cluster IP")
            self.nat.add(self.svc, *comment, *match, "!", "-s", cidr, "-j", MARK_MASQ)

    def _sep(self, endpoint: EndpointTarget) -> str:
        return endpoint_chain(self.view.name, self.view.protocol, endpoint.address)

    def _balance(self, chain: str, endpoints: tuple[EndpointTarget, ...]) -> None:
        v = self.view
        if v.affinity_seconds is not None:
            for e in endpoints:
                sep = self._sep(e)
                recent = f"-m recent --name {sep} --rcheck --seconds {v.affinity_seconds} --reap"
                self.nat.add(chain, *_comment(f"{v.name} -> {e.address}"), recent, "-j", sep)
        for i, e in enumerate(endpoints):
            remaining = len(endpoints) - i
            statistic = (
                ["-m statistic --mode random", f"--probability {probability(remaining)}"]
                if remaining > 1
                else []
            )
            self.nat.add(
                chain, *_comment(f"{v.name} -> {e.address}"), *statistic, "-j", self._sep(e)
            )

    def _endpoint(self, endpoint: EndpointTarget) -> None:
        v, sep = self.view, self.nat.chain(self._sep(endpoint))
        self.nat.add(sep, *_comment(v.name), "-s", endpoint.ip, "-j", MARK_MASQ)
        recent = [f"-m recent --name {sep} --set"] if v.affinity_seconds is not None else []
        proto = f"-m {v.protocol} -p {v.protocol}"
        dnat = f"-j DNAT --to-destination {endpoint.address}"
        self.nat.add(sep, *_comment(v.name), *recent, proto, dnat)


BUILTIN_CHAINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
}
"""The built-in chains of each table, in the order ``iptables-save`` lists them."""


def save_document(
    rules: RuleSet, node: ProxyNode, tables: tuple[str, ...] = ("filter", "nat")
) -> str:
    """What ``iptables-save`` prints on ``node`` once :meth:`IptablesRenderer.setup` and
    :meth:`~IptablesRenderer.render` are loaded into an otherwise empty namespace: built-in
    chains with their policies, the jumps into kube-proxy's chains (``setup`` inserts them
    at the top, so the last inserted comes first), then kube-proxy's own chains and rules.
    Itself a valid ``iptables-restore`` document."""
    rendered = IptablesRenderer().render(rules, node)
    out: list[str] = []
    for table in tables:
        body = rendered.split(f"*{table}\n", 1)[1].split("COMMIT\n", 1)[0].splitlines()
        chains = [line for line in body if line.startswith(":")]
        appended = [line for line in body if line.startswith("-A ")]
        jumps = [
            " ".join(["-A", hook.chain, *hook.args()])
            for builtin in BUILTIN_CHAINS[table]
            for hook in reversed(HOOKS)
            if hook.table == table and hook.chain == builtin
        ]
        out += [f"*{table}", *(f":{c} ACCEPT [0:0]" for c in BUILTIN_CHAINS[table]), *chains]
        out += [*jumps, *appended, "COMMIT"]
    return "\n".join(out) + "\n"

"""How a hop of each kind renders: span → columns, hop → packet-walk rows.

The pieces a :class:`~mesh.tracestore.hopkinds.HopKind` entry is built from. Each function
reads one span (or one hop of :func:`~mesh.tracestore.hops.build_hops`) and knows nothing
of other kinds; which kind uses which is said in :mod:`mesh.tracestore.hopkinds` alone.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from mesh.tracestore.otlp import SpanRecord

Hop = dict[str, Any]
"""One entry of :func:`mesh.tracestore.hops.build_hops`."""


class SentPacket(NamedTuple):
    """The client's packet as the first hop that saw it recorded it."""

    src: str
    dst: str
    at: str | None = None
    """Where the row is drawn; None: at the client."""
    change: str = "-"


@dataclass
class PacketWalk:
    """The rows of a packet walk as the hops along the path add them."""

    rows: list[dict[str, str]] = field(default_factory=list)
    replies: list[dict[str, str]] = field(default_factory=list)
    """Reply rows, in the order the request passed the hops (drawn reversed)."""

    def row(self, stage: str, at: str, src: str, dst: str, change: str) -> None:
        self.rows.append({"stage": stage, "at": at, "src": src, "dst": dst, "change": change})

    def reply(self, stage: str, at: str, src: str, dst: str, change: str) -> None:
        self.replies.append({"stage": stage, "at": at, "src": src, "dst": dst, "change": change})


def ip_of(address: str) -> str:
    """``127.0.0.1`` of ``127.0.0.1:80``; anything else as it is."""
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


# -- how a span renders --------------------------------------------------------------------


def _peer(a: dict[str, Any]) -> str:
    return str(a.get("network.peer.address") or a.get("client.address") or "")


def _server(a: dict[str, Any]) -> str:
    return f"{a.get('server.address', '')}:{a.get('server.port', '')}"


def peer_to_upstream(span: SpanRecord) -> tuple[str, str]:
    a = span.attributes
    return _peer(a), str(a.get("hopscope.upstream.address") or a.get("server.address") or "")


def client_endpoints(span: SpanRecord) -> tuple[str, str]:
    src, dst = peer_to_upstream(span)
    port = span.attributes.get("server.port")
    return src, f"{dst}:{port}" if port else dst


def app_endpoints(span: SpanRecord) -> tuple[str, str]:
    return _peer(span.attributes), _server(span.attributes).strip(":")


def dns_endpoints(span: SpanRecord) -> tuple[str, str]:
    a = span.attributes
    return str(a.get("hopscope.pod.ip", a.get("k8s.pod.name", ""))), _server(a)


def nat_originals(span: SpanRecord) -> tuple[str, str]:
    a = span.attributes
    return str(a.get("hopscope.nat.original.src", "")), str(a.get("hopscope.nat.original.dst", ""))


def policy_or_rewrites(span: SpanRecord) -> str:
    """A NetworkPolicy deny, or the DNAT / SNAT the hop did."""
    a = span.attributes
    if a.get("hopscope.policy.verdict") == "deny":
        side, names = a.get("hopscope.policy.side"), a.get("hopscope.policy.names")
        return f"NetworkPolicy deny ({side}: {names})"
    orig_dst, new_dst = a.get("hopscope.nat.original.dst"), a.get("hopscope.nat.translated.dst")
    orig_src, new_src = a.get("hopscope.nat.original.src"), a.get("hopscope.nat.translated.src")
    parts = []
    if orig_dst and new_dst and orig_dst != new_dst:
        parts.append(f"DNAT {orig_dst} → {new_dst}")
    if orig_src and new_src and str(orig_src).split(":")[0] != str(new_src).split(":")[0]:
        parts.append(f"SNAT {orig_src} → {new_src}")
    return "; ".join(parts)


def string_list(value: object) -> list[str]:
    """An array attribute as strings; anything else (a foreign span's scalar) as empty."""
    return [str(x) for x in value] if isinstance(value, list | tuple) else []


def dns_detail(span: SpanRecord) -> str:
    a = span.attributes
    answer = string_list(a.get("hopscope.dns.answer"))
    queries = string_list(a.get("hopscope.dns.queries"))
    answered = ", ".join(map(str, answer)) or "-"
    noun = "query" if len(queries) == 1 else "queries"
    return f"{a.get('dns.question.name', '')} → {answered} ({len(queries)} {noun})"


def overlay_encapsulation(span: SpanRecord) -> str:
    a = span.attributes
    return (
        f"encap vni {a.get('hopscope.overlay.vni')}: outer "
        f"{a.get('hopscope.overlay.outer.src')} → {a.get('hopscope.overlay.outer.dst')}"
    )


def pod_name(span: SpanRecord) -> str:
    pod = span.attributes.get("k8s.pod.name") or span.resource.get("k8s.pod.name")
    return str(pod or span.resource.get("service.name", ""))


def _service(a: dict[str, Any]) -> str:
    return f"{a.get('k8s.namespace.name', '')}/{a.get('k8s.service.name', '')}"


def node_and_kind(span: SpanRecord) -> str:
    a = span.attributes
    return f"{a.get('k8s.node.name', '')} ({a.get('hopscope.hop')})"


def service_endpoint(span: SpanRecord) -> str:
    pod = span.attributes.get("hopscope.endpoint.pod")
    service = _service(span.attributes)
    return f"svc {service} → {pod}" if pod else f"svc {service} (no endpoint)"


def cloud_lb_for_service(span: SpanRecord) -> str:
    return f"cloud LB for svc {_service(span.attributes)}"


def ok_or_error(span: SpanRecord) -> str:
    return "error" if span.status == "error" else "ok"


def dns_rcode(span: SpanRecord) -> str:
    rcodes = string_list(span.attributes.get("hopscope.dns.rcodes"))
    return rcodes[-1] if rcodes else ("ERROR" if span.status == "error" else "NOERROR")


# -- packet-walk rows ----------------------------------------------------------------------


def walk_proxied(hop: Hop, nxt: Hop | None, walk: PacketWalk) -> None:
    """An Envoy ends the client's connection and opens its own."""
    upstream = hop["dst"]
    if nxt is not None and nxt.get("nat_tuple", {}).get("original_dst"):
        upstream = nxt["nat_tuple"]["original_dst"]
    src = ((nxt or {}).get("nat_tuple") or {}).get("original_src") or hop["src"]
    change = f"{hop['hop']} ends the client's connection and opens its own to {upstream}"
    walk.row("proxied", hop["where"], src, upstream, change)


def walk_service_nat(hop: Hop, nxt: Hop | None, walk: PacketWalk) -> None:
    """kube-proxy's DNAT (and SNAT), undone by conntrack on the reply; or its REJECT."""
    nat = hop.get("nat_tuple") or {}
    osrc, odst = nat.get("original_src", ""), nat.get("original_dst", "")
    tsrc, tdst = nat.get("translated_src", ""), nat.get("translated_dst", "")
    if not tdst:
        walk.row("rejected", hop["where"], osrc or "-", odst, hop.get("message") or "refused")
        return
    changes = [f"DNAT {odst} → {tdst}"]
    if ip_of(osrc) != ip_of(tsrc):
        changes.append(f"SNAT {ip_of(osrc)} → {ip_of(tsrc)}")
    walk.row("after " + hop["hop"], hop["where"], tsrc, tdst, ", ".join(changes))
    change = f"reply from {tdst} rewritten back to come from {odst}"
    walk.reply("reply after conntrack", hop["where"], odst, osrc, change)


def walk_overlay(hop: Hop, nxt: Hop | None, walk: PacketWalk) -> None:
    nat = hop.get("nat_tuple") or {}
    inner_src, inner_dst = nat.get("original_src", ""), nat.get("original_dst", "")
    inner = f"{hop['nat']} (inner {inner_src} → {inner_dst})"
    walk.row(
        "encapsulated",
        hop["where"],
        nat.get("translated_src", ""),
        nat.get("translated_dst", ""),
        inner,
    )
    change = "outer header removed; the pod sees the inner source"
    walk.row("decapsulated", "remote node", inner_src, inner_dst, change)


def walk_egress(hop: Hop, nxt: Hop | None, walk: PacketWalk) -> None:
    nat = hop.get("nat_tuple") or {}
    tsrc = nat.get("translated_src", "")
    change = f"SNAT {nat.get('original_src', '')} → {tsrc}"
    walk.row("left the cluster", hop["where"], tsrc, nat.get("translated_dst", ""), change)


def walk_dropped(hop: Hop, nxt: Hop | None, walk: PacketWalk) -> None:
    walk.row("dropped", hop["where"], hop["src"], hop["dst"], hop.get("policy") or "denied")


def walk_in_pod(hop: Hop, nxt: Hop | None, walk: PacketWalk) -> None:
    change = "the sidecar hands the request to the app's port in the same pod"
    walk.row("to the app", hop["where"], ip_of(hop["src"]), hop["dst"], change)


def walk_served(hop: Hop, nxt: Hop | None, walk: PacketWalk) -> None:
    walk.row("served", hop["where"], hop["src"], hop["dst"], f"status {hop['status']}")


# -- the client's packet as the first hop saw it -------------------------------------------


def sent_as_translated(seen_by: Hop, path: list[Hop]) -> SentPacket | None:
    nat = seen_by.get("nat_tuple") or {}
    if not nat.get("original_src"):
        return None
    return SentPacket(nat["original_src"], nat.get("original_dst", ""))


def sent_as_accepted(seen_by: Hop, path: list[Hop]) -> SentPacket | None:
    downstream = seen_by.get("downstream") or {}
    if not downstream.get("remote"):
        return None
    return SentPacket(downstream["remote"], downstream.get("local", ""))


def sent_as_captured(seen_by: Hop, path: list[Hop]) -> SentPacket | None:
    """The app addressed the Service; its sidecar's outbound listener took the packet."""
    accepted = sent_as_accepted(seen_by, path)
    if accepted is None:
        return None
    nxt = path[path.index(seen_by) + 1] if seen_by is not path[-1] else None
    target = (nxt or {}).get("nat_tuple", {}).get("original_dst") or seen_by["dst"]
    change = f"captured by the pod's sidecar (outbound listener {accepted.dst})"
    return SentPacket(accepted.src, target, seen_by["where"], change)


# -- TLS -----------------------------------------------------------------------------------


def tag(a: dict[str, Any], key: str) -> str:
    """An attribute as text; an Envoy tag whose formatter had no value (``-``, "") is ""."""
    value = a.get(key)
    text = "" if value is None else str(value)
    return "" if text == "-" else text


def no_tls(span: SpanRecord) -> str:
    return ""


def inbound_tls(span: SpanRecord) -> str:
    """``mTLS TLSv1.3 peer spiffe://…`` or ``plaintext (PERMISSIVE)``: how a sidecar took
    the connection."""
    a = span.attributes
    mode = tag(a, "hopscope.tls.mode")
    if mode == "mtls":
        parts = ["mTLS", tag(a, "tls.protocol.version")]
        peer = tag(a, "hopscope.tls.peer_identity")
        return " ".join(p for p in parts if p) + (f" peer {peer}" if peer else "")
    if mode == "plaintext":
        listener = tag(a, "hopscope.mtls.mode")
        return f"plaintext ({listener})" if listener else "plaintext"
    return mode


def outbound_tls(span: SpanRecord) -> str:
    """What a proxy originated towards its upstream: ``mTLS TLSv1.3 peer spiffe://…``,
    ``mTLS handshake failed`` or ``plaintext (peer STRICT)``."""
    a = span.attributes
    mode = tag(a, "hopscope.tls.mode")
    if mode == "mtls":
        version = tag(a, "hopscope.upstream.tls_version")
        peer = tag(a, "hopscope.upstream.peer_identity")
        if not version and not peer and tag(a, "hopscope.upstream.failure"):
            return "mTLS handshake failed"
        return " ".join(p for p in ("mTLS", version) if p) + (f" peer {peer}" if peer else "")
    if mode == "plaintext":
        peer_mode = tag(a, "hopscope.mtls.peer_mode")
        return f"plaintext (peer {peer_mode})" if peer_mode else "plaintext"
    return mode


def opaque_tls(span: SpanRecord) -> str:
    """A NAT hop that relayed a TLS stream it could not read: ``TLS (opaque) SNI …``."""
    a = span.attributes
    if a.get("hopscope.tls.opaque") is not True:
        return ""
    sni = tag(a, "tls.client.server_name")
    return f"TLS (opaque) SNI {sni}" if sni else "TLS (opaque)"


TLS_FACTS = {
    "mode": "hopscope.tls.mode",
    "version": "tls.protocol.version",
    "peer_identity": "hopscope.tls.peer_identity",
    "listener_mode": "hopscope.mtls.mode",
    "listener_policy": "hopscope.mtls.policy",
    "upstream_version": "hopscope.upstream.tls_version",
    "upstream_identity": "hopscope.upstream.peer_identity",
    "peer_mode": "hopscope.mtls.peer_mode",
    "peer_policy": "hopscope.mtls.peer_policy",
    "peer_namespace": "hopscope.mtls.peer_namespace",
    "origination": "hopscope.mtls.origination",
    "failure": "hopscope.upstream.failure",
    "service": "k8s.service.name",
    "sni": "tls.client.server_name",
}
"""The TLS facts a verdict reads from a hop (``tls_facts`` of a hop row), by short name."""


def tls_facts(span: SpanRecord) -> dict[str, str]:
    """The span's TLS attributes under short names; empty when it says nothing of TLS."""
    a = span.attributes
    if not tag(a, "hopscope.tls.mode") and a.get("hopscope.tls.opaque") is not True:
        return {}
    facts = {name: tag(a, key) for name, key in TLS_FACTS.items()}
    return {k: v for k, v in facts.items() if v}

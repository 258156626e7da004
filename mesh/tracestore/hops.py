"""From a trace's spans to the journey a learner reads: hops in causal order and a verdict.

A hop is any span carrying ``hopscope.hop``. Hops are ordered by walking the span tree
depth-first (children by start time), so a request's path reads top to bottom the way the
packet travelled, even when clocks of different processes disagree slightly. The tree is
the trace's, except that a hop reached through a NAT hop (kube-proxy, the overlay) is nested
below it (:func:`logical_parent`): those hops forward the caller's trace context unchanged.
What each kind of hop shows (src → dst, NAT, where, status, TLS) comes from its entry in
:mod:`mesh.tracestore.hopkinds`.

A TLS connection kube-proxy relayed has its span in a trace of its own; the store pairs it
into the request's trace below the caller's proxy span (:mod:`mesh.tracestore.pairing`),
and the callee's inbound sidecar span, a child of the caller's span through the encrypted
``traceparent``, nests below the paired hop that delivered to its address. Such hops are
marked ``paired_by: "connection"``.
"""

from __future__ import annotations

import ipaddress
import math
from collections import defaultdict
from typing import Any

from mesh import addresses
from mesh.hopattributes import (
    DATAPLANE,
    DOWNSTREAM_LOCAL_ADDRESS,
    EMULATION_COST,
    UPSTREAM_FAILURE,
    VIA,
)
from mesh.tracestore.hopkinds import CNI_OVERLAY, DNS, KUBE_PROXY, HopKind, Trait, kind_of
from mesh.tracestore.hoprender import string_list, tag, tls_facts
from mesh.tracestore.otlp import SpanRecord
from mesh.tracestore.verdict import packet_walk, verdict


def logical_parent(span: SpanRecord, by_id: dict[str, SpanRecord]) -> str:
    """The span this one hangs below in the journey.

    NAT hops (kube-proxy, the overlay) pass the caller's trace context on unchanged, so the
    callee's sidecar span is the caller's child in the trace (the CLIENT→SERVER pair service
    graphs need) and a sibling of the NAT hop. The sidecar tags the NAT hop it came through
    (``hopscope.via.span_id``); the journey nests it there, the way the packet went.
    """
    via = span.attributes.get(VIA)
    if isinstance(via, str) and via != span.span_id and via in by_id:
        return via
    if span.paired_with and span.parent_span_id not in by_id:
        return span.paired_with  # a connection span, below the proxy span it carried
    parent = by_id.get(span.parent_span_id)
    if parent is not None and Trait.DIALS_SERVICES in _kind(parent).traits:
        paired = _paired_hop_to(span, parent.span_id, by_id)
        if paired:
            return paired
    if parent is None and span.parent_span_id:
        # a plain client's request (it sent a trace context, no span): the kernel hop
        # written beside the callee, below the same span id
        paired = _paired_hop_to(span, span.parent_span_id, by_id)
        if paired:
            return paired
    in_pod = parent is not None and Trait.DELIVERS_IN_POD in _kind(parent).traits
    if Trait.CONNTRACK_PAIRED in _kind(span).traits and not in_pod:
        nat = _nat_hop_to(span, by_id)
        if nat:
            return nat
    return span.parent_span_id


def _paired_hop_to(span: SpanRecord, caller: str, by_id: dict[str, SpanRecord]) -> str:
    """For a callee's span whose request came inside TLS (nothing could tag the NAT hop it
    passed): the connection hop paired below its caller's proxy span that delivered to the
    address the callee accepted on; its ``cni-overlay`` child when the connection crossed
    nodes. Kernel-path kube-proxy hops (children of the caller, written from conntrack)
    nest their callee the same way. Only those are looked at: userspace plaintext journeys
    nest by `hopscope.via.span_id` and are unchanged."""
    local = tag(span.attributes, DOWNSTREAM_LOCAL_ADDRESS)
    if not local:
        return ""
    nat, overlay = "", ""
    for other in by_id.values():
        # a paired connection span (userspace, TLS), or a kernel hop below the caller
        if other.paired_with != caller and not _kernel_hop_below(other, caller, by_id):
            continue
        o, hop = other.attributes, other.attributes.get("hopscope.hop")
        if hop == CNI_OVERLAY.name and o.get("hopscope.nat.original.dst") == local:
            overlay = other.span_id
        elif hop == KUBE_PROXY.name and o.get("hopscope.nat.translated.dst") == local:
            nat = other.span_id
    return overlay or nat


def _kernel_hop_below(span: SpanRecord, caller: str, by_id: dict[str, SpanRecord]) -> bool:
    """A hop written from the kernel's conntrack table for one of the requests of the span
    with id ``caller`` (stored or not: a plain client's): its child, or the child of such a
    hop (the overlay below kube-proxy)."""
    if span.attributes.get(DATAPLANE) != "kernel":
        return False
    if span.parent_span_id == caller:
        return True
    up = by_id.get(span.parent_span_id)
    return (
        up is not None and up.parent_span_id == caller and up.attributes.get(DATAPLANE) == "kernel"
    )


def _nat_hop_to(span: SpanRecord, by_id: dict[str, SpanRecord]) -> str:
    """For an app without a sidecar (nothing reads ``x-hopscope-via``): the last NAT hop
    that sent a packet to its address before it started, as conntrack would pair them."""
    a = span.attributes
    address = f"{a.get('server.address', '')}:{a.get('server.port', '')}"
    best: SpanRecord | None = None
    for other in by_id.values():
        o = other.attributes
        if (
            Trait.FORWARDS_CONTEXT in _kind(other).traits
            and o.get("hopscope.nat.translated.dst") == address
            and other.start_ns <= span.start_ns
            and (best is None or other.start_ns > best.start_ns)
        ):
            best = other
    return best.span_id if best is not None else ""


def hop_kind(span: SpanRecord, by_id: dict[str, SpanRecord]) -> str:
    """The span's ``hopscope.hop``, or "" when it is not a hop of its own.

    The ingress traces each upstream attempt as a CLIENT span below its SERVER span (the span
    a service graph pairs with the next workload); both carry the ingress's tags, but the
    attempt is part of the ingress hop, not a second one.
    """
    hop = str(span.attributes.get("hopscope.hop") or "")
    if hop and span.kind == "client":
        parent = by_id.get(span.parent_span_id)
        if (
            parent is not None
            and parent.kind == "server"
            and parent.attributes.get("hopscope.hop") == hop
        ):
            return ""
    return hop


def ordered_spans(spans: list[SpanRecord]) -> list[tuple[int, SpanRecord]]:
    """All spans depth-first from the roots (over logical parents), with their depth."""
    by_id = {s.span_id: s for s in spans}
    children: dict[str, list[SpanRecord]] = defaultdict(list)
    roots: list[SpanRecord] = []
    for span in spans:
        parent = logical_parent(span, by_id)
        if parent and parent in by_id:
            children[parent].append(span)
        else:
            roots.append(span)
    out: list[tuple[int, SpanRecord]] = []
    seen: set[str] = set()
    stack = [(0, s) for s in sorted(roots, key=lambda s: s.start_ns, reverse=True)]
    while stack:
        depth, span = stack.pop()
        if span.span_id in seen:
            continue
        seen.add(span.span_id)
        out.append((depth, span))
        kids = sorted(children.get(span.span_id, []), key=lambda s: s.start_ns, reverse=True)
        stack.extend((depth + 1, k) for k in kids)
    # A malformed link (a cycle) must not hide spans: list the unreached ones as roots.
    out.extend((0, s) for s in sorted(spans, key=lambda s: s.start_ns) if s.span_id not in seen)
    return out


def hop_status(span: SpanRecord) -> str:
    """HTTP status, gRPC status or span status, as one short string."""
    attrs = span.attributes
    grpc_status = attrs.get("rpc.grpc.status_code", attrs.get("grpc.status_code"))
    http = attrs.get("http.response.status_code")
    if http is not None and grpc_status not in (None, 0, "0"):
        return f"{http} grpc={grpc_status}"
    if http is not None:
        return str(http)
    if grpc_status is not None:
        return f"grpc={grpc_status}"
    return _kind(span).fallback_status(span)


def _kind(span: SpanRecord) -> HopKind:
    return kind_of(span.attributes.get("hopscope.hop"))


def build_hops(spans: list[SpanRecord]) -> list[dict[str, Any]]:
    """The hop list of ``hopscope trace --json``."""
    hops = []
    by_id = {s.span_id: s for s in spans}

    def parent_hop(span: SpanRecord) -> str:
        """The nearest ancestor that is a hop (app client spans etc. are skipped)."""
        seen: set[str] = set()
        cur = by_id.get(logical_parent(span, by_id))
        while cur is not None and cur.span_id not in seen:
            if hop_kind(cur, by_id):
                return cur.span_id
            seen.add(cur.span_id)
            cur = by_id.get(logical_parent(cur, by_id))
        return ""

    for depth, span in ordered_spans(spans):
        hop = hop_kind(span, by_id)
        if not hop:
            continue
        kind = kind_of(hop)
        src, dst = kind.endpoints(span)
        hops.append(
            {
                "hop": hop,
                "name": span.name,
                "where": kind.where(span),
                "src": src,
                "dst": dst,
                "nat": kind.detail(span),
                "status": hop_status(span),
                "response_flags": _flags(span),
                "duration_ms": round(span.duration_ms, 3),
                "emulation_ms": emulation_ms(span),
                "span_id": span.span_id,
                "parent_span_id": span.parent_span_id,
                "depth": depth,
                "start_ns": span.start_ns,
                "error": _is_error(span),
                "policy": _policy(span),
                "error_type": str(span.attributes.get("error.type", "") or ""),
                "message": span.status_message,
                "app": str(span.resource.get("service.name", "")),
                "nat_tuple": _nat_tuple(span),
                "parent_hop_id": parent_hop(span),
                "service": (
                    f"{span.attributes.get('k8s.namespace.name', '')}/"
                    f"{span.attributes['k8s.service.name']}"
                    if span.attributes.get("k8s.service.name")
                    else ""
                ),
                "conntrack": str(span.attributes.get("hopscope.conntrack.state", "") or ""),
                "downstream": _downstream(span),
                "upstream_failure": str(span.attributes.get(UPSTREAM_FAILURE, "") or ""),
                "upstream_cluster": str(span.attributes.get("upstream_cluster", "") or ""),
                "derived": False,
                "tls": kind.tls(span),
                "tls_facts": tls_facts(span),
                "paired_by": "connection" if span.paired_with else "",
            }
        )
    return _with_refusals(hops, spans)


def emulation_ms(span: SpanRecord) -> float | None:
    """The hop's emulation cost in milliseconds (2 decimals), or None when it has none."""
    cost = span.attributes.get(EMULATION_COST)
    if (
        isinstance(cost, bool)
        or not isinstance(cost, int | float)
        or not math.isfinite(cost)
        or cost < 0
    ):
        return None
    return round(cost / 1000, 2)


def _downstream(span: SpanRecord) -> dict[str, str]:
    """The connection a proxy accepted: the peer's ``ip:port`` and its own."""
    a = span.attributes
    remote = str(a.get("hopscope.downstream.remote_address", "") or "")
    local = str(a.get("hopscope.downstream.local_address", "") or "")
    return {"remote": remote, "local": local} if remote or local else {}


def _is_service_address(address: str) -> bool:
    """A ClusterIP (or a node's NodePort / the load balancer's address) that kube-proxy owns."""
    ip = address.rsplit(":", 1)[0]
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if addr in ipaddress.ip_network(addresses.SERVICE_CIDR):
        return True
    if ip in addresses.NODE_IPS.values():
        return True
    return addr in ipaddress.ip_network(addresses.LB_POOL_CIDR) and ip != addresses.INGRESS_IP


def _service_name(address: str, hop: dict[str, Any], spans: list[SpanRecord]) -> str:
    """``ns/name`` of the Service at ``address``, from what the trace itself says: the
    ingress's cluster (``ingress|ns|name|port``) or the caller's DNS answer."""
    parts = hop.get("upstream_cluster", "").split("|")
    if len(parts) == 4 and parts[0] == "ingress":
        return f"{parts[1]}/{parts[2]}"
    ip = address.rsplit(":", 1)[0]
    for span in spans:
        a = span.attributes
        answers = string_list(a.get("hopscope.dns.answer"))
        if a.get("hopscope.hop") != DNS.name or ip not in answers:
            continue
        # The query that answered is the last one tried (the search path goes in order).
        queries = string_list(a.get("hopscope.dns.queries"))
        name = queries[-1] if queries else str(a.get("dns.question.name", ""))
        labels = name.rstrip(".").split(".")
        if len(labels) >= 3 and labels[2] == "svc":
            return f"{labels[1]}/{labels[0]}"
    return ""


def _with_refusals(hops: list[dict[str, Any]], spans: list[SpanRecord]) -> list[dict[str, Any]]:
    """Add the kube-proxy REJECT a caller met but kube-proxy never saw.

    A Service port with no ready endpoints has no listener (like the REJECT rule), so the
    caller's ``connect()`` is refused by the kernel and no kube-proxy span exists. The
    caller's proxy span says it: upstream connection failure (UF/URX) with "connection
    refused" towards a Service address. That hop is derived from the caller's span
    (``derived: true``), never invented without it.
    """
    out: list[dict[str, Any]] = []
    children = {h["parent_hop_id"] for h in hops}
    for hop in hops:
        out.append(hop)
        flags = set(hop["response_flags"].split(","))
        refused = "refused" in hop["upstream_failure"].lower()
        if (
            Trait.DIALS_SERVICES not in kind_of(hop["hop"]).traits
            or not flags & {"UF", "URX"}
            or not refused
            or not _is_service_address(hop["dst"])
            or hop["span_id"] in children
        ):
            continue
        service = _service_name(hop["dst"], hop, spans)
        named = f"Service {service}" if service else f"the Service at {hop['dst']}"
        out.append(
            {
                **{k: "" for k in hop},
                "hop": KUBE_PROXY.name,
                "name": f"kube-proxy REJECT {hop['dst']} (connection refused)",
                "where": f"svc {service or hop['dst']} (no endpoint)",
                "src": "",
                "dst": hop["dst"],
                "nat": "REJECT: no listener, connect() refused",
                "status": "refused",
                "response_flags": "",
                "duration_ms": 0.0,
                "emulation_ms": None,
                "span_id": f"{hop['span_id']}-reject",
                "parent_span_id": hop["span_id"],
                "depth": hop["depth"] + 1,
                "start_ns": hop["start_ns"],
                "error": True,
                "error_type": "no-ready-endpoints",
                "message": (
                    f"{named} has no ready endpoints (connect() to {hop['dst']} was refused "
                    "at once: kube-proxy keeps no listener for it, like its REJECT rule)"
                ),
                "app": "kube-proxy",
                "nat_tuple": {"original_dst": hop["dst"]},
                "parent_hop_id": hop["span_id"],
                "service": service,
                "conntrack": "",
                "downstream": {},
                "derived": True,
                "tls_facts": {},
            }
        )
    return out


def _nat_tuple(span: SpanRecord) -> dict[str, str]:
    a = span.attributes
    keys = ("original.src", "original.dst", "translated.src", "translated.dst")
    return {
        k.replace(".", "_"): str(a[f"hopscope.nat.{k}"]) for k in keys if a.get(f"hopscope.nat.{k}")
    }


def _policy(span: SpanRecord) -> str:
    """``deny by ingress policy shop/default-deny: <reason>`` when NetworkPolicy dropped it."""
    a = span.attributes
    if a.get("hopscope.policy.verdict") != "deny":
        return ""
    side, names = a.get("hopscope.policy.side", ""), a.get("hopscope.policy.names", "")
    where = ", ".join(str(part) for part in (f"{side} side" if side else "", names) if part)
    reason = str(a.get("hopscope.policy.reason", "") or "")
    return ": ".join(part for part in (where, reason) if part) or "denied"


def _flags(span: SpanRecord) -> str:
    flags = str(span.attributes.get("response_flags", "") or "")
    return "" if flags == "-" else flags


def _is_error(span: SpanRecord) -> bool:
    code = span.attributes.get("http.response.status_code")
    try:
        if code is not None and int(code) >= 500:
            return True
    except (TypeError, ValueError):
        pass
    return span.status == "error" or bool(_flags(span))


def trace_view(trace_id: str, spans: list[SpanRecord]) -> dict[str, Any]:
    """The full JSON document of ``hopscope trace --json``."""
    hops = build_hops(spans)
    public = [
        {
            k: h[k]
            for k in (
                "hop",
                "name",
                "where",
                "src",
                "dst",
                "nat",
                "status",
                "response_flags",
                "duration_ms",
                "emulation_ms",
                "span_id",
                "parent_span_id",
                "parent_hop_id",
                "conntrack",
                "derived",
                "paired_by",
                "tls",
            )
        }
        for h in hops
    ]
    outcome = verdict(hops)
    return {
        "trace_id": trace_id,
        "hops": public,
        "verdict": outcome,
        "packet_walk": packet_walk(hops, outcome),
        "span_count": len(spans),
    }

"""From a trace's spans to the journey a learner reads: hops in causal order and a verdict.

A hop is any span carrying ``hopscope.hop``. Hops are ordered by walking the span tree
depth-first (children by start time), so a request's path reads top to bottom the way the
packet travelled, even when clocks of different processes disagree slightly. The tree is
the trace's, except that a hop reached through a NAT hop (kube-proxy, the overlay) is nested
below it (:func:`logical_parent`): those hops forward the caller's trace context unchanged.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from mesh.tracestore.otlp import SpanRecord
from mesh.tracestore.verdict import packet_walk, verdict

HOP_KINDS = (
    "client",
    "dns",
    "ingress",
    "sidecar-outbound",
    "sidecar-inbound",
    "kube-proxy",
    "load-balancer",
    "cni-overlay",
    "egress-snat",
    "network-policy",
    "app",
)


VIA_ATTRIBUTE = "hopscope.via.span_id"
"""Set by a sidecar from the ``x-hopscope-via`` header: the NAT hop the request came through."""


def logical_parent(span: SpanRecord, by_id: dict[str, SpanRecord]) -> str:
    """The span this one hangs below in the journey.

    NAT hops (kube-proxy, the overlay) pass the caller's trace context on unchanged, so the
    callee's sidecar span is the caller's child in the trace (the CLIENT→SERVER pair service
    graphs need) and a sibling of the NAT hop. The sidecar tags the NAT hop it came through
    (``hopscope.via.span_id``); the journey nests it there, the way the packet went.
    """
    via = span.attributes.get(VIA_ATTRIBUTE)
    if isinstance(via, str) and via != span.span_id and via in by_id:
        return via
    return span.parent_span_id


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
    if attrs.get("hopscope.hop") == "dns":
        rcodes = attrs.get("hopscope.dns.rcodes") or []
        return str(rcodes[-1]) if rcodes else ("ERROR" if span.status == "error" else "NOERROR")
    return "error" if span.status == "error" else "ok"


def _src_dst(span: SpanRecord) -> tuple[str, str]:
    a = span.attributes
    hop = a.get("hopscope.hop")
    if hop in ("kube-proxy", "load-balancer", "cni-overlay", "egress-snat", "network-policy"):
        return str(a.get("hopscope.nat.original.src", "")), str(
            a.get("hopscope.nat.original.dst", "")
        )
    if hop == "dns":
        server = f"{a.get('server.address', '')}:{a.get('server.port', '')}"
        return str(a.get("hopscope.pod.ip", a.get("k8s.pod.name", ""))), server
    src = a.get("network.peer.address") or a.get("client.address") or ""
    if hop == "app":
        dst = f"{a.get('server.address', '')}:{a.get('server.port', '')}".strip(":")
    else:
        dst = a.get("hopscope.upstream.address") or a.get("server.address") or ""
        if hop == "client" and a.get("server.port"):
            dst = f"{dst}:{a.get('server.port')}"
    return str(src), str(dst)


def _nat(span: SpanRecord) -> str:
    a = span.attributes
    if a.get("hopscope.hop") == "dns":
        answer = a.get("hopscope.dns.answer") or []
        queries = a.get("hopscope.dns.queries") or []
        answered = ", ".join(map(str, answer)) or "-"
        noun = "query" if len(queries) == 1 else "queries"
        return f"{a.get('dns.question.name', '')} → {answered} ({len(queries)} {noun})"
    if a.get("hopscope.hop") == "cni-overlay":
        return (
            f"encap vni {a.get('hopscope.overlay.vni')}: outer "
            f"{a.get('hopscope.overlay.outer.src')} → {a.get('hopscope.overlay.outer.dst')}"
        )
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


def _where(span: SpanRecord) -> str:
    a = span.attributes
    if a.get("hopscope.hop") == "load-balancer":
        return f"cloud LB for svc {a.get('k8s.namespace.name', '')}/{a.get('k8s.service.name', '')}"
    if a.get("hopscope.hop") in ("cni-overlay", "egress-snat", "network-policy"):
        return f"{a.get('k8s.node.name', '')} ({a.get('hopscope.hop')})"
    if a.get("hopscope.hop") == "kube-proxy":
        service = f"{a.get('k8s.namespace.name', '')}/{a.get('k8s.service.name', '')}"
        pod = a.get("hopscope.endpoint.pod")
        return f"svc {service} → {pod}" if pod else f"svc {service} (no endpoint)"
    pod = a.get("k8s.pod.name") or span.resource.get("k8s.pod.name")
    return str(pod or span.resource.get("service.name", ""))


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
        src, dst = _src_dst(span)
        hops.append(
            {
                "hop": hop,
                "name": span.name,
                "where": _where(span),
                "src": src,
                "dst": dst,
                "nat": _nat(span),
                "status": hop_status(span),
                "response_flags": _flags(span),
                "duration_ms": round(span.duration_ms, 3),
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
            }
        )
    return hops


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
    return f"{side} side, {names}: {a.get('hopscope.policy.reason', '')}"


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
                "span_id",
                "parent_span_id",
                "parent_hop_id",
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

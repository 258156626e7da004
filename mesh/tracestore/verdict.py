"""Reading a trace like an on-call engineer: who produced the failure, and the packet walk.

:func:`verdict` names the hop where a failure *originated* (the deepest failing hop: every
hop above it only passed the error on) and the proxy that turned it into the status the
caller saw, and says why in words — telling a status the app produced (passed through by
the proxies) from one a proxy, kube-proxy, NetworkPolicy or DNS produced.

:func:`packet_walk` is the notes' packet table for the request that reached the app (or
failed): each stage with the source and destination as that stage saw them, and what
changed — DNAT, SNAT, encapsulation, hand-off to the app — then the reply, undone by
conntrack.
"""

from __future__ import annotations

from typing import Any

from mesh.tracestore.hopkinds import (
    APP,
    CLIENT,
    KINDS,
    NETWORK_POLICY,
    Trait,
    explained_error,
    kind_of,
)
from mesh.tracestore.hoprender import Hop, PacketWalk, SentPacket, ip_of
from mesh.tracestore.tlsverdict import tls_cause

ENVOY_FLAG_MEANINGS = {
    "UH": "no healthy upstream (no ready endpoint to send to)",
    "UF": "upstream connection failure",
    "UO": "upstream overflow (circuit breaker)",
    "NR": "no route configured for this host/path",
    "URX": "upstream retry limit exceeded",
    "UT": "upstream request timeout",
    "UC": "upstream connection terminated",
    "UR": "upstream remote reset",
    "LR": "connection reset locally",
    "DC": "downstream connection terminated",
    "RL": "rate limited",
    "UAEX": "denied by external authorization",
    "RBAC": "denied by RBAC",
    "DI": "fault injection delay",
    "FI": "fault injection abort",
    "NC": "no upstream cluster",
    "DT": "request exceeded max duration",
}


def _flag_words(flags: str) -> str:
    return ", ".join(ENVOY_FLAG_MEANINGS.get(f, f) for f in flags.split(","))


def template_fields(hop: dict[str, Any]) -> dict[str, Any]:
    """What a :class:`~mesh.tracestore.hopkinds.HopKind`'s text templates may name."""
    where, nat = hop["where"], hop["nat"]
    dns_name, _, dns_rest = nat.partition(" → ")
    out = {
        "kind": hop["hop"],
        "where": where,
        "app": hop.get("app") or where,
        "status": hop["status"],
        "flags": hop["response_flags"],
        "message": hop.get("message") or "",
        "error_type": hop.get("error_type") or "",
        "service": hop.get("service") or where,
        "policy": hop.get("policy") or "",
        "policy_side": (hop.get("policy") or "").split(":")[0],
        "dns_name": dns_name,
        "dns_tried": dns_rest.rpartition("(")[2].rstrip(")") or "queries",
    }
    out["label"] = kind_of(hop["hop"]).label.format(**out)
    return out


def _label(hop: dict[str, Any]) -> str:
    """``the frontend-x sidecar (outbound)``, ``the ingress``, ``kube-proxy (svc shop/a)``."""
    return str(template_fields(hop)["label"])


def _group(hop: dict[str, Any], produced_by: str) -> str:
    """A pod-free label to group many failures by (``hopscope traffic``'s summary): the
    template of the kind that produced the failure, else of the hop's own kind."""
    kind = KINDS.get(produced_by) or kind_of(hop["hop"])
    return kind.group.format(**template_fields(hop)).strip()


def _cause(hop: dict[str, Any]) -> tuple[str, str]:
    """(who produced it, why) for the hop where the failure originated."""
    kind, fill = kind_of(hop["hop"]), template_fields(hop)
    if hop.get("policy"):
        return NETWORK_POLICY.name, f"NetworkPolicy denied the connection ({hop['policy']})"
    explained = explained_error(fill["error_type"])
    if explained is not None:
        producer, why = explained
        return producer, why.format(**fill)
    if kind.explains:
        return kind.name, kind.explains.format(**fill)
    if fill["flags"]:
        flags = fill["flags"]
        return "proxy", f"{fill['label']} returned {fill['status']} {flags}: {_flag_words(flags)}"
    return hop["hop"], f"{fill['label']} failed: {fill['message'] or fill['status']}"


def verdict(hops: list[dict[str, Any]]) -> dict[str, Any]:
    """Which hop produced the failure, which proxy reported it, and why, in words."""
    failing = [h for h in hops if h["error"]]
    if not failing:
        return {"ok": True, "origin": None, "produced_by": None, "reason": "every hop succeeded"}
    origin = max(failing, key=lambda h: (h["depth"], h["start_ns"]))
    by_id = {h["span_id"]: h for h in hops}
    tls = _tls_verdict(origin, by_id)
    if tls is not None:
        return tls
    produced_by, cause = _cause(origin)
    # The proxy whose status the caller saw: the nearest ancestor that set response flags.
    reporter = None
    for cur in _ancestors(by_id, origin):
        if Trait.REPORTS_FLAGS in kind_of(cur["hop"]).traits and cur["response_flags"]:
            reporter = cur
            break
    if produced_by == APP.name:
        reason = f"{cause}; the proxies above passed it through"
    elif reporter is not None and reporter is not origin:
        reason = (
            f"{_label(reporter)} returned {reporter['status']} {reporter['response_flags']} "
            f"({_flag_words(reporter['response_flags'])}) because {cause}"
        )
    else:
        reason = cause
    return {
        "ok": False,
        "origin": origin["hop"],
        "origin_span_id": origin["span_id"],
        "produced_by": produced_by,
        "reported_by": reporter["hop"] if reporter else None,
        "group": _group(origin, produced_by),
        "reason": reason,
    }


def _tls_verdict(origin: Hop, by_id: dict[str, Hop]) -> dict[str, Any] | None:
    """A failed handshake, named by the proxy that originated the connection: the nearest
    hop from the origin up that dials Services and reports a TLS failure
    (:mod:`.tlsverdict`). That proxy is where the failure shows; the refusing side left no
    span of its own."""
    for hop in (origin, *_ancestors(by_id, origin)):
        traits = kind_of(hop["hop"]).traits
        if Trait.FORWARDS_CONTEXT in traits:
            continue  # kube-proxy or the overlay between the two sidecars
        if Trait.DIALS_SERVICES not in traits:
            return None  # the request got past the handshake: a hop beyond it failed
        cause = tls_cause(hop)
        if cause is None:
            return None
        flags = hop["response_flags"]
        said = f" {flags} ({_flag_words(flags)})" if flags else ""
        return {
            "ok": False,
            "origin": hop["hop"],
            "origin_span_id": hop["span_id"],
            "produced_by": cause.produced_by,
            "reported_by": hop["hop"],
            "group": cause.group,
            "reason": f"{_label(hop)} returned {hop['status']}{said} because {cause.reason}",
        }
    return None


def _ancestors(by_id: dict[str, dict[str, Any]], hop: dict[str, Any]) -> list[dict[str, Any]]:
    """``hop``'s parent, grandparent, … (a cycle in malformed links ends the walk)."""
    out: list[dict[str, Any]] = []
    seen = {hop["span_id"]}
    cur = by_id.get(hop.get("parent_hop_id") or "")
    while cur is not None and cur["span_id"] not in seen:
        seen.add(cur["span_id"])
        out.append(cur)
        cur = by_id.get(cur.get("parent_hop_id") or "")
    return out


def _path_to(hops: list[dict[str, Any]], target: dict[str, Any]) -> list[dict[str, Any]]:
    by_id = {h["span_id"]: h for h in hops}
    return [*reversed(_ancestors(by_id, target)), target]


def packet_walk(hops: list[Hop], view_verdict: dict[str, Any]) -> list[dict[str, str]]:
    """Stages of the first request to reach an app (or of the failing one)."""
    if not hops:
        return []
    if not view_verdict.get("ok") and view_verdict.get("origin_span_id"):
        target = next(h for h in hops if h["span_id"] == view_verdict["origin_span_id"])
    else:
        target = _first_app(hops) or hops[-1]
    walk = PacketWalk()
    path = _path_to(hops, target)
    sent = _as_sent(path)
    if sent is not None:
        walk.row("request sent", *sent)
    for i, hop in enumerate(path):
        add_rows = kind_of(hop["hop"]).walk
        if add_rows is not None:
            add_rows(hop, path[i + 1] if i + 1 < len(path) else None, walk)
    if sent is not None and (view_verdict.get("ok") or walk.rows[-1]["stage"] == "served"):
        at, src, dst, _change = sent
        change = "the client sees the reply come from the address it sent to"
        walk.replies.insert(
            0, {"stage": "reply received", "at": at, "src": dst, "dst": src, "change": change}
        )
    return walk.rows + list(reversed(walk.replies))


def _first_app(hops: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The app the client's own request reached: below the earliest entry hop, shallowest.

    Calls an app makes further down hang below that app; one whose parent span is missing
    (not exported yet, or dropped) starts a second tree, which must not be taken for the
    client's request."""

    def rank(app: dict[str, Any]) -> tuple[bool, int, int]:
        head = _path_to(hops, app)[0]
        return (
            Trait.ENTRY not in kind_of(head["hop"]).traits,
            int(head.get("start_ns") or 0),
            app["depth"],
        )

    apps = [h for h in hops if h["hop"] == APP.name]
    return min(apps, key=rank) if apps else None


def _as_sent(path: list[Hop]) -> tuple[str, str, str, str] | None:
    """``(at, src, dst, change)`` of the client's packet as it left the client.

    Whatever the client — ``hopscope curl`` (a ``client`` span), curl or a load tool (no
    span: the first hop saw its packet), or a pod's app (its sidecar captured the packet) —
    the row has the client's address *and* port, as the first hop that saw it recorded.
    """
    if not path:
        return None
    first = path[0]
    from_client = first["hop"] == CLIENT.name
    seen_by = path[1] if from_client and len(path) > 1 else first
    seen_as = kind_of(seen_by["hop"]).client_packet
    sent = seen_as(seen_by, path) if seen_as is not None else None
    if sent is None and from_client:
        sent = SentPacket(first["src"], first["dst"])
    if sent is None:
        return None
    at = (
        sent.at
        if sent.at is not None
        else ("client" if from_client else f"client {ip_of(sent.src)}")
    )
    return at, sent.src, sent.dst, sent.change

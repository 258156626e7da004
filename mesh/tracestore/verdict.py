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

PROXY_HOPS = ("ingress", "sidecar-outbound", "sidecar-inbound")


def _flag_words(flags: str) -> str:
    return ", ".join(ENVOY_FLAG_MEANINGS.get(f, f) for f in flags.split(","))


def _label(hop: dict[str, Any]) -> str:
    """``the frontend-x sidecar (outbound)``, ``the ingress``, ``kube-proxy (svc shop/a)``."""
    kind, where = hop["hop"], hop["where"]
    if kind == "sidecar-outbound":
        return f"the {where} sidecar (outbound)"
    if kind == "sidecar-inbound":
        return f"the {where} sidecar (inbound)"
    if kind == "ingress":
        return "the ingress"
    if kind == "app":
        return f"the {hop.get('app') or where} app in pod {where}"
    if kind in ("kube-proxy", "load-balancer"):
        return f"{kind} ({where})"
    return f"the {kind} hop at {where}"


def _group(hop: dict[str, Any], produced_by: str) -> str:
    """A pod-free label to group many failures by (``hopscope traffic``'s summary)."""
    kind, status, flags = hop["hop"], hop["status"], hop["response_flags"]
    if produced_by == "app":
        return f"app {hop.get('app') or hop['where']} answered {status}"
    if produced_by == "network-policy":
        return f"NetworkPolicy deny ({hop.get('policy', '').split(':')[0]})"
    if produced_by == "kube-proxy":
        return f"kube-proxy {hop.get('error_type')} ({hop.get('service') or hop['where']})"
    if produced_by == "dns":
        return f"dns {status} ({hop['nat'].split(' → ')[0]})"
    label = "ingress" if kind == "ingress" else f"{hop.get('app') or hop['where']} {kind}"
    return f"{label} {status} {flags}".strip()


def _cause(hop: dict[str, Any]) -> tuple[str, str]:
    """(who produced it, why) for the hop where the failure originated."""
    kind, status, flags = hop["hop"], hop["status"], hop["response_flags"]
    error_type, message = hop.get("error_type") or "", hop.get("message") or ""
    if hop.get("policy"):
        return "network-policy", f"NetworkPolicy denied the connection ({hop['policy']})"
    if kind == "dns":
        name, _, rest = hop["nat"].partition(" → ")
        tried = rest.rpartition("(")[2].rstrip(")") or "queries"
        return "dns", (
            f"pod {hop['where']} could not resolve {name!r}: {status} after {tried} "
            "(the whole search path)"
        )
    if error_type in ("no-ready-endpoints", "no-local-endpoints"):
        return "kube-proxy", f"kube-proxy rejected the connection: {message}"
    if error_type == "endpoint-unreachable":
        return "kube-proxy", (
            f"kube-proxy sent it to an endpoint that did not answer ({message}); "
            "its rules may be stale or the pod just went away"
        )
    if kind == "app":
        return "app", f"{_label(hop)} answered {status} itself"
    if flags:
        return "proxy", f"{_label(hop)} returned {status} {flags}: {_flag_words(flags)}"
    detail = message or status
    return kind, f"{_label(hop)} failed: {detail}"


def verdict(hops: list[dict[str, Any]]) -> dict[str, Any]:
    """Which hop produced the failure, which proxy reported it, and why, in words."""
    failing = [h for h in hops if h["error"]]
    if not failing:
        return {"ok": True, "origin": None, "produced_by": None, "reason": "every hop succeeded"}
    origin = max(failing, key=lambda h: (h["depth"], h["start_ns"]))
    produced_by, cause = _cause(origin)
    by_id = {h["span_id"]: h for h in hops}
    # The proxy whose status the caller saw: the nearest ancestor that set response flags.
    reporter, cur = None, by_id.get(origin.get("parent_hop_id") or "")
    while cur is not None:
        if cur["hop"] in PROXY_HOPS and cur["response_flags"]:
            reporter = cur
            break
        cur = by_id.get(cur.get("parent_hop_id") or "")
    if produced_by == "app":
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


def _path_to(hops: list[dict[str, Any]], target: dict[str, Any]) -> list[dict[str, Any]]:
    by_id = {h["span_id"]: h for h in hops}
    path: list[dict[str, Any]] = []
    cur: dict[str, Any] | None = target
    while cur is not None:
        path.append(cur)
        cur = by_id.get(cur.get("parent_hop_id") or "")
    return list(reversed(path))


def _ip(address: str) -> str:
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


def packet_walk(hops: list[dict[str, Any]], view_verdict: dict[str, Any]) -> list[dict[str, str]]:
    """Stages of the first request to reach an app (or of the failing one)."""
    if not hops:
        return []
    if not view_verdict.get("ok") and view_verdict.get("origin_span_id"):
        target = next(h for h in hops if h["span_id"] == view_verdict["origin_span_id"])
    else:
        target = _first_app(hops) or hops[-1]
    rows: list[dict[str, str]] = []
    replies: list[dict[str, str]] = []

    def row(stage: str, at: str, src: str, dst: str, change: str) -> None:
        rows.append({"stage": stage, "at": at, "src": src, "dst": dst, "change": change})

    path = _path_to(hops, target)
    sent = _as_sent(path)
    if sent is not None:
        row("request sent", *sent)
    for i, hop in enumerate(path):
        kind, nat = hop["hop"], hop.get("nat_tuple") or {}
        nxt = path[i + 1] if i + 1 < len(path) else None
        if kind == "client":
            continue  # the "request sent" row above
        if kind in ("ingress", "sidecar-outbound"):
            upstream = hop["dst"]
            if nxt is not None and nxt.get("nat_tuple", {}).get("original_dst"):
                upstream = nxt["nat_tuple"]["original_dst"]
            src = ((nxt or {}).get("nat_tuple") or {}).get("original_src") or hop["src"]
            row(
                "proxied",
                hop["where"],
                src,
                upstream,
                f"{kind} ends the client's connection and opens its own to {upstream}",
            )
        elif kind in ("kube-proxy", "load-balancer"):
            osrc, odst = nat.get("original_src", ""), nat.get("original_dst", "")
            tsrc, tdst = nat.get("translated_src", ""), nat.get("translated_dst", "")
            if not tdst:
                row("rejected", hop["where"], osrc or "-", odst, hop.get("message") or "refused")
                continue
            changes = [f"DNAT {odst} → {tdst}"]
            if _ip(osrc) != _ip(tsrc):
                changes.append(f"SNAT {_ip(osrc)} → {_ip(tsrc)}")
            row("after " + kind, hop["where"], tsrc, tdst, ", ".join(changes))
            replies.append(
                {
                    "stage": "reply after conntrack",
                    "at": hop["where"],
                    "src": odst,
                    "dst": osrc,
                    "change": f"reply from {tdst} rewritten back to come from {odst}",
                }
            )
        elif kind == "cni-overlay":
            row(
                "encapsulated",
                hop["where"],
                nat.get("translated_src", ""),
                nat.get("translated_dst", ""),
                f"{hop['nat']} (inner {nat.get('original_src', '')} → "
                f"{nat.get('original_dst', '')})",
            )
            row(
                "decapsulated",
                "remote node",
                nat.get("original_src", ""),
                nat.get("original_dst", ""),
                "outer header removed; the pod sees the inner source",
            )
        elif kind == "egress-snat":
            row(
                "left the cluster",
                hop["where"],
                nat.get("translated_src", ""),
                nat.get("translated_dst", ""),
                f"SNAT {nat.get('original_src', '')} → {nat.get('translated_src', '')}",
            )
        elif kind == "network-policy":
            row("dropped", hop["where"], hop["src"], hop["dst"], hop.get("policy") or "denied")
        elif kind == "sidecar-inbound":
            row(
                "to the app",
                hop["where"],
                _ip(hop["src"]),
                hop["dst"],
                "the sidecar hands the request to the app's port in the same pod",
            )
        elif kind == "app":
            row("served", hop["where"], hop["src"], hop["dst"], f"status {hop['status']}")
    if sent is not None and (view_verdict.get("ok") or rows[-1]["stage"] == "served"):
        at, src, dst, _change = sent
        replies.insert(
            0,
            {
                "stage": "reply received",
                "at": at,
                "src": dst,
                "dst": src,
                "change": "the client sees the reply come from the address it sent to",
            },
        )
    return rows + list(reversed(replies))


ENTRY_HOPS = ("client", "ingress", "load-balancer", "kube-proxy", "sidecar-outbound")
"""Hops a request can enter the journey at (the first one to see the client's packet)."""


def _first_app(hops: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The app the client's own request reached: below the earliest entry hop, shallowest.

    Calls an app makes further down hang below that app; one whose parent span is missing
    (not exported yet, or dropped) starts a second tree, which must not be taken for the
    client's request."""

    def rank(app: dict[str, Any]) -> tuple[bool, int, int]:
        head = _path_to(hops, app)[0]
        return head["hop"] not in ENTRY_HOPS, int(head.get("start_ns") or 0), app["depth"]

    apps = [h for h in hops if h["hop"] == "app"]
    return min(apps, key=rank) if apps else None


def _as_sent(path: list[dict[str, Any]]) -> tuple[str, str, str, str] | None:
    """``(at, src, dst, change)`` of the client's packet as it left the client.

    Whatever the client — ``hopscope curl`` (a ``client`` span), curl or a load tool (no
    span: the first hop saw its packet), or a pod's app (its sidecar captured the packet) —
    the row has the client's address *and* port, as the first hop that saw it recorded.
    """
    if not path:
        return None
    first = path[0]
    seen_by = path[1] if first["hop"] == "client" and len(path) > 1 else first
    kind, nat = seen_by["hop"], seen_by.get("nat_tuple") or {}
    downstream = seen_by.get("downstream") or {}
    if kind in ("kube-proxy", "load-balancer") and nat.get("original_src"):
        src, dst = nat["original_src"], nat.get("original_dst", "")
    elif kind in ("ingress", "sidecar-outbound") and downstream.get("remote"):
        src, dst = downstream["remote"], downstream.get("local", "")
        if kind == "sidecar-outbound":
            # The app addressed the Service; its sidecar's outbound listener took the packet.
            nxt = path[path.index(seen_by) + 1] if seen_by is not path[-1] else None
            target = (nxt or {}).get("nat_tuple", {}).get("original_dst") or seen_by["dst"]
            return (
                seen_by["where"],
                src,
                target,
                f"captured by the pod's sidecar (outbound listener {dst})",
            )
    elif first["hop"] == "client":
        src, dst = first["src"], first["dst"]
    else:
        return None
    at = "client" if first["hop"] == "client" else f"client {_ip(src)}"
    return at, src, dst, "-"

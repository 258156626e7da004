"""The hop explorer: recent traces, one request's journey, and Services with their endpoints.

Server-rendered pages (Flask + Jinja, autoescaped) on the control plane's address, so it
works with no JavaScript and no build step: ``/`` lists recent traces, ``/traces/<id>``
shows the journey hop by hop with the packet walk and the verdict, ``/services`` shows
every Service with its endpoints and kube-proxy's conntrack entries for it.
"""

from __future__ import annotations

import time
from typing import Any

import requests
from flask import Blueprint, abort, current_app, render_template

from mesh import addresses
from mesh.model.types import ClusterState
from mesh.tracestore.hopkinds import CLIENT, badge_css, kind_of
from mesh.tracestore.hops import build_hops, trace_view, verdict
from mesh.tracestore.store import TraceStore, format_size

explorer = Blueprint("explorer", __name__, template_folder="templates", static_folder="static")

KUBE_PROXY_ADMIN = f"http://{addresses.NODE_IPS['node-a']}:{addresses.KUBE_PROXY_METRICS_PORT}"

HOP_BADGE_CSS = badge_css()
"""Each hop kind's badge colour (``.hop-<kind>``), from the hop-kind table; put inline."""


@explorer.context_processor
def _hop_kinds() -> dict[str, Any]:
    return {"hop_badge_css": HOP_BADGE_CSS}


def _store() -> TraceStore:
    return current_app.config["STORE"]  # type: ignore[no-any-return]


@explorer.get("/")
def index() -> str:
    rows = []
    for trace_id, spans in _store().recent(50):
        hops = build_hops(spans)
        root = min(spans, key=lambda s: s.start_ns)
        outcome = verdict(hops)
        root_status = next((h["status"] for h in hops if h["hop"] == CLIENT.name), "")
        rows.append(
            {
                "trace_id": trace_id,
                "root": root.name,
                "when": time.strftime("%H:%M:%S", time.localtime(root.start_ns / 1e9)),
                "duration_ms": (max(s.end_ns for s in spans) - root.start_ns) / 1e6,
                "hops": len(hops),
                "status": root_status,
                "verdict": outcome,
            }
        )
    return render_template("traces.html", rows=rows, store=_store_summary(), page="traces")


def _store_summary() -> dict[str, Any]:
    """How far back the store reaches, and how full it is, for the traces page."""
    stats = _store().stats()
    oldest = stats["oldest_start_ns"]
    return {
        **stats,
        "size": format_size(stats["bytes"]),
        "budget": format_size(stats["budget_bytes"]),
        "percent": 100 * stats["bytes"] / stats["budget_bytes"],
        "oldest": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(oldest / 1e9))
        if oldest
        else "",
    }


@explorer.get("/traces/<trace_id>")
def journey(trace_id: str) -> str:
    store = _store()
    matches = store.find_prefix(trace_id) if len(trace_id) < 32 else [trace_id.lower()]
    spans = store.get(matches[0]) if len(matches) == 1 else []
    if not spans:
        abort(404, store.missing_message(trace_id))
    view = trace_view(matches[0], spans)
    start = min(s.start_ns for s in spans)
    total = max(1.0, (max(s.end_ns for s in spans) - start) / 1e6)
    hops = [_timeline(hop, start, total) for hop in build_hops(spans)]
    return render_template(
        "journey.html",
        view=view,
        hops=hops,
        total_ms=total,
        emulated=any(h["emulation_ms"] is not None for h in hops),
        page="traces",
    )


def _timeline(hop: dict[str, Any], start_ns: int, total_ms: float) -> dict[str, Any]:
    """A hop row with its kind and its bar: offset and width, and the emulator's share of
    the width (drawn hatched). A hop derived from its caller's span starts with it."""
    emulation = hop["emulation_ms"] or 0.0
    share = min(1.0, emulation / hop["duration_ms"]) if hop["duration_ms"] > 0 else 0.0
    return {
        **hop,
        "kind": kind_of(hop["hop"]),
        "offset_pct": 100 * (hop["start_ns"] - start_ns) / 1e6 / total_ms,
        "width_pct": max(0.5, 100 * hop["duration_ms"] / total_ms),
        "emulation_pct": 100 * share,
        "failed": hop["error"],
    }


@explorer.get("/services")
def services() -> str:
    state = ClusterState.from_dict(current_app.config["CLUSTER"].snapshot())
    try:
        conntrack = requests.get(f"{KUBE_PROXY_ADMIN}/conntrack", timeout=2).json()
        conntrack_error = ""
    except (requests.RequestException, ValueError) as exc:
        conntrack, conntrack_error = [], f"kube-proxy not reachable: {exc}"
    rows: list[dict[str, Any]] = []
    for svc in sorted(state.services, key=lambda s: (s.namespace, s.name)):
        endpoints = [e for s in state.slices_for(svc.namespace, svc.name) for e in s.endpoints]
        key = f"{svc.namespace}/{svc.name}"
        entries = [c for c in conntrack if str(c.get("service", "")).split(":")[0] == key]
        rows.append(
            {
                "svc": svc,
                "endpoints": endpoints,
                "conntrack": entries[-8:],
                "conntrack_total": len(entries),
            }
        )
    return render_template(
        "services.html",
        rows=rows,
        proxy=state.proxy,
        conntrack_error=conntrack_error,
        page="services",
    )

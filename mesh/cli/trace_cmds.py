"""``hopscope trace``: one request's journey as a terminal waterfall, or JSON."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from mesh.cli._client import APIClient
from mesh.tracestore.hopkinds import kind_of

out = Console(
    highlight=False,
    # A terminal's own width; piped, 200 columns, or $COLUMNS when set (rich reads it).
    width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200,
)

BAR_WIDTH = 24

PAIRED_NOTE = (
    "(paired by connection) = kube-proxy could not read this encrypted stream, so its span "
    "is in a trace of its own; it is shown here because its client address is the one the "
    "caller's upstream connection left from, as conntrack pairs a flow"
)

EMULATION_NOTE = (
    "(n emulation) = the part of the hop's time that hopscope's userspace stand-in for kernel "
    "work (kube-proxy's DNAT, the overlay's encapsulation) spent; a real node does this work "
    "in microseconds, so read it as the playground's cost, not Kubernetes'"
)


def fetch_trace(client: APIClient, trace_id: str | None, settle: float) -> dict[str, Any]:
    """Fetch a trace, re-reading until its span count stops changing (spans arrive in batches)."""
    if trace_id is None:
        recent = client.get("/api/v1/traces", limit=1)
        if not recent:
            raise click.ClickException(
                "no traces stored yet; send a request first (`hopscope curl http://shop.local/`)"
            )
        trace_id = recent[0]["trace_id"]
    view = client.get(f"/api/v1/traces/{trace_id}")
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline:
        time.sleep(0.3)
        again = client.get(f"/api/v1/traces/{view['trace_id']}")
        if again["span_count"] == view["span_count"]:
            return again  # type: ignore[no-any-return]
        view = again
    return view  # type: ignore[no-any-return]


def _bar(start: float, dur: float, t0: float, total: float, emulation: float = 0.0) -> Text:
    """The hop's place on the timeline; its emulation share (if any) drawn light at the end."""
    if total <= 0:
        return Text("")
    left = int((start - t0) / total * BAR_WIDTH)
    width = max(1, int(dur / total * BAR_WIDTH))
    left = min(left, BAR_WIDTH - 1)
    width = min(width, BAR_WIDTH - left)
    emulated = min(width, round(width * emulation / dur)) if dur > 0 and emulation > 0 else 0
    bar = Text(" " * left + "█" * (width - emulated), style="cyan")
    bar.append("░" * emulated, style="dim cyan")
    return bar


def _timing(hop: dict[str, Any]) -> Text:
    """``1.9``, with ``(1.7 emulation)`` below it when the emulator's share is known."""
    timing = Text(f"{hop['duration_ms']:.1f}")
    emulation = hop.get("emulation_ms")
    if emulation is not None:
        timing.append(f"\n({emulation:.1f} emulation)", style="dim")
    return timing


def render_waterfall(view: dict[str, Any]) -> None:
    spans = {s["span_id"]: s for s in view.get("spans", [])}
    starts = [s["start_ns"] / 1e6 for s in spans.values()] or [0.0]
    ends = [s["end_ns"] / 1e6 for s in spans.values()] or [0.0]
    t0, total = min(starts), max(ends) - min(starts)
    out.print(
        f"trace [bold]{view['trace_id']}[/] · {len(view['hops'])} hops · "
        f"{view['span_count']} spans · {total:.1f} ms"
    )
    table = Table("#", "hop", box=None)
    # Long cells (SPIFFE IDs, SNIs, tuples) fold onto the next line, never lose characters.
    for heading in ("where", "src → dst", "NAT / detail"):
        table.add_column(heading, overflow="fold")
    for heading in ("status", "ms", "timeline"):
        table.add_column(heading)
    hops = {h["span_id"]: h for h in view["hops"]}
    for i, hop in enumerate(view["hops"], 1):
        span = spans.get(hop["span_id"], {})
        depth = _depth(hop["span_id"], hops)
        status = hop["status"] + (f" {hop['response_flags']}" if hop["response_flags"] else "")
        style = "red" if _failed(hop) else "green"
        table.add_row(
            str(i),
            Text("  " * min(depth, 8) + hop["hop"], style=kind_of(hop["hop"]).style),
            hop["where"],
            f"{hop['src']} → {hop['dst']}",
            _detail(hop),
            Text(status, style=style),
            _timing(hop),
            _bar(
                span.get("start_ns", 0) / 1e6,
                hop["duration_ms"],
                t0,
                total,
                hop.get("emulation_ms") or 0.0,
            ),
        )
    out.print(table)
    if any(hop.get("emulation_ms") is not None for hop in view["hops"]):
        out.print(f"[dim]{EMULATION_NOTE}[/]")
    if any(hop.get("paired_by") for hop in view["hops"]):
        out.print(f"[dim]{PAIRED_NOTE}[/]")
    walk = view.get("packet_walk") or []
    if walk:
        out.print("packet walk:")
        table = Table("stage", "at", "src", "dst", "what changed", box=None)
        for step in walk:
            table.add_row(step["stage"], step["at"], step["src"], step["dst"], step["change"])
        out.print(table)
    v = view["verdict"]
    if v["ok"]:
        out.print(f"[green]verdict: ok[/] — {v['reason']}")
    else:
        who = v.get("produced_by") or v["origin"]
        out.print(f"[red]verdict: failed at {v['origin']} (produced by {who})[/] — {v['reason']}")


def _detail(hop: dict[str, Any]) -> str:
    """NAT / detail column: the rewrite, the conntrack state of a kube-proxy hop, TLS as the
    hop knew it, and a mark on hops read from another hop's span (a REJECT kube-proxy never
    saw) or paired into the trace by their connection (a TLS stream kube-proxy relayed)."""
    parts = [hop["nat"]] if hop["nat"] else []
    if hop.get("conntrack"):
        parts.append(f"conntrack {hop['conntrack']}")
    if hop.get("tls"):
        parts.append(hop["tls"])
    if hop.get("derived"):
        parts.append("(from the caller's span)")
    if hop.get("paired_by"):
        parts.append(f"(paired by {hop['paired_by']})")
    return " · ".join(parts)


def _failed(hop: dict[str, Any]) -> bool:
    status = hop["status"]
    return bool(hop["response_flags"]) or status.startswith("5") or status in ("error", "refused")


def _depth(span_id: str, hops: dict[str, dict[str, Any]]) -> int:
    """How many hops the journey passes before this one (NAT hops included)."""
    depth, seen = 0, set()
    cur = hops.get(span_id)
    while cur and cur.get("parent_hop_id") in hops and cur["span_id"] not in seen:
        seen.add(cur["span_id"])
        cur = hops[cur["parent_hop_id"]]
        depth += 1
    return depth


@click.command()
@click.argument("trace_id", required=False)
@click.option("--last", is_flag=True, help="The most recent trace (the default without an ID).")
@click.option("--json", "as_json", is_flag=True, help="Print the hop list and verdict as JSON.")
@click.option(
    "--list",
    "list_n",
    type=int,
    default=None,
    metavar="N",
    help="List the N most recent traces instead.",
)
@click.option("--settle", default=1.5, show_default=True, help="Seconds to wait for late spans.")
def trace(
    trace_id: str | None, last: bool, as_json: bool, list_n: int | None, settle: float
) -> None:
    """Show a request's journey hop by hop: src → dst, NAT, status, timing and a verdict."""
    client = APIClient()
    if list_n is not None:
        _list_traces(client, list_n, as_json)
        return
    if trace_id and last:
        raise click.UsageError("give a trace ID or --last, not both")
    view = fetch_trace(client, trace_id, settle)
    if as_json:
        public = {k: view[k] for k in ("trace_id", "hops", "verdict", "packet_walk")}
        click.echo(json.dumps(public, indent=2))
        return
    render_waterfall(view)


def _list_traces(client: APIClient, n: int, as_json: bool) -> None:
    traces = client.get("/api/v1/traces", limit=n)
    if as_json:
        click.echo(json.dumps(traces, indent=2))
        return
    table = Table("TRACE", "ROOT", "HOPS", "MS", "VERDICT", box=None)
    for t in traces:
        verdict = "[green]ok[/]" if t["verdict"]["ok"] else f"[red]{t['verdict']['origin']}[/]"
        table.add_row(
            t["trace_id"], t["root"], str(len(t["hops"])), f"{t['duration_ms']:.1f}", verdict
        )
    out.print(table)

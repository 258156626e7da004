"""``hopscope traffic``: constant-rate load with a live progress bar and a culprit summary."""

from __future__ import annotations

import json
import time
from collections import Counter
from typing import Any
from urllib.parse import urlsplit

import click
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from mesh import addresses
from mesh.cli._client import APIClient
from mesh.model.types import ClusterState
from mesh.traffic.capacity import WARMUP_S, CPUWatch, LiveJudge, lag_warning
from mesh.traffic.engine import Generator, Outcome, Stats, Target, summarize

BLAME_SAMPLE = 30
"""Failing requests whose traces are read to find the hop that produced the failure."""


def resolve_target(spec: str, state: ClusterState) -> Target:
    """``ingress`` | ``nodeport/NS/SVC[@NODE]`` | ``lb/NS/SVC`` | an ``http://`` URL."""
    source = addresses.EXTERNAL_CLIENT_IP
    hosts = [r.host for i in state.ingresses for r in i.rules if r.host]
    if spec == "ingress":
        host = hosts[0] if hosts else "shop.local"
        return Target(
            addresses.INGRESS_IP, addresses.INGRESS_PORT, host, source, f"ingress ({host})"
        )
    kind, _, rest = spec.partition("/")
    if kind in ("nodeport", "lb"):
        ref, _, node = rest.partition("@")
        ns, _, name = ref.rpartition("/")
        svc = state.service(ns or "default", name)
        if svc is None:
            raise click.BadParameter(f"Service {ref!r} not found", param_hint="--target")
        port = svc.ports[0]
        if kind == "nodeport":
            node = node or "node-a"
            if node not in addresses.NODE_IPS:
                raise click.BadParameter(f"unknown node {node!r}", param_hint="--target")
            if port.node_port is None:
                raise click.BadParameter(f"Service {ref} has no NodePort", param_hint="--target")
            ip = addresses.NODE_IPS[node]
            return Target(ip, port.node_port, f"{ip}:{port.node_port}", source, f"{node} NodePort")
        if not svc.load_balancer_ingress:
            raise click.BadParameter(f"Service {ref} has no load balancer", param_hint="--target")
        ip = svc.load_balancer_ingress[0]
        return Target(ip, port.port, f"{ip}:{port.port}", source, f"load balancer {ip}")
    parts = urlsplit(spec)
    if parts.scheme != "http" or not parts.hostname:
        raise click.BadParameter(
            f"{spec!r}: use ingress, nodeport/NS/SVC[@NODE], lb/NS/SVC or an http:// URL",
            param_hint="--target",
        )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    fixed = None if path == "/" else path
    if parts.hostname in hosts:
        return Target(
            addresses.INGRESS_IP, addresses.INGRESS_PORT, parts.hostname, source, spec, fixed
        )
    if not parts.hostname.startswith("127."):
        raise click.BadParameter(
            f"{parts.hostname!r}: only loopback addresses and Ingress hosts ({', '.join(hosts)}) "
            "are playground targets",
            param_hint="--target",
        )
    return Target(parts.hostname, parts.port or 80, parts.netloc, source, spec, fixed)


def blame(failures: list[Outcome]) -> dict[str, int]:
    """Failures grouped by the hop their trace blames (a sample of them, read from traces)."""
    client = APIClient(timeout=5)
    if not client.running():
        return {"(no cluster to read traces from)": len(failures)}
    counts: Counter[str] = Counter()
    sample = failures[:BLAME_SAMPLE]
    time.sleep(1.0)  # let the last spans reach the trace store
    for outcome in sample:
        if outcome.status == 0:
            counts[f"client: {outcome.error or 'no response'}"] += 1
            continue
        try:
            view = client.get(f"/api/v1/traces/{outcome.trace_id}")
        except click.ClickException:
            counts[f"unknown (trace not found): {outcome.status}"] += 1
            continue
        verdict = view.get("verdict") or {}
        if verdict.get("ok"):
            counts[f"{outcome.status}, but its trace shows no failing hop"] += 1
            continue
        counts[verdict.get("group") or str(verdict.get("origin"))] += 1
    if len(failures) > len(sample):
        counts[f"(from the first {len(sample)} of {len(failures)} failures)"] = 0
    return dict(counts.most_common())


def _tracer() -> Any:
    """Client spans go to the running cluster's receiver (see ``client_otlp_endpoint``), or
    to OTEL_EXPORTER_OTLP_ENDPOINT when no cluster runs; with neither, spans are still made
    (trace ids in the summary) but not exported."""
    import os

    from mesh.apiclient import client_otlp_endpoint
    from telemetry.tracing import setup_tracing

    if APIClient().running():
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = client_otlp_endpoint()
    return setup_tracing("hopscope-traffic", {"hopscope.client": "traffic"}, set_global=False)


@click.command()
@click.option("--rps", type=click.FloatRange(0.1, 20000), default=20, show_default=True)
@click.option(
    "--duration", type=click.FloatRange(0.1, 86400), default=10, show_default=True, help="Seconds."
)
@click.option(
    "--concurrency",
    type=click.IntRange(1, 10000),
    default=64,
    show_default=True,
    help="Most requests in flight; a request waiting for a slot keeps counting its latency.",
)
@click.option(
    "--target",
    default="ingress",
    show_default=True,
    help="ingress | nodeport/NS/SVC[@NODE] | lb/NS/SVC | http://URL (a path disables the mix)",
)
@click.option("--seed", type=int, default=None, help="Seed the route mix (repeatable runs).")
@click.option("--json", "as_json", is_flag=True, help="Print only the summary, as JSON.")
def traffic(
    rps: float, duration: float, concurrency: int, target: str, seed: int | None, as_json: bool
) -> None:
    """Send open-model load at a constant rate; summarize statuses, culprits and latency.

    Requests follow a weighted mix of the sample routes (/ with HTTP and gRPC calls behind
    it, /reviews/* gRPC only, /checkout leaving the cluster). Ctrl-C stops early and prints
    what was measured so far.
    """
    if target.startswith("http://127."):
        state = ClusterState()  # a loopback URL needs no cluster (benchmarks, other servers)
    else:
        state = ClusterState.from_dict(APIClient().get("/api/v1/state"))
    resolved = resolve_target(target, state)
    provider = _tracer()
    gen = Generator(
        resolved, rps, duration, concurrency, provider.get_tracer("hopscope.traffic"), seed=seed
    )
    console = Console(stderr=True)
    interrupted = False
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        disable=as_json,
        transient=True,
    )
    task = progress.add_task(f"→ {resolved.label}", total=gen.total, detail="")
    watch = _cluster_cpu_watch()
    judge = LiveJudge(rps, watch)

    def tick(stats: Stats) -> None:
        p99 = stats.histogram.get_value_at_percentile(99) / 1000 if stats.done else 0
        warning = judge.update(stats.done)
        if warning and not as_json:
            progress.console.print(f"[yellow]warning:[/] {warning}")
        lag = "  [yellow]not keeping up[/]" if judge.warning else ""
        progress.update(
            task,
            completed=stats.done,
            detail=f"ok {stats.done - stats.failed}  failed {stats.failed}  p99 {p99:.1f} ms{lag}",
        )

    with progress:
        try:
            _run(gen, tick)
        except KeyboardInterrupt:
            interrupted = True
    provider.force_flush()
    summary = summarize(gen, blame, interrupted)
    summary["capacity"] = _capacity(summary, watch)
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    if interrupted:
        raise SystemExit(130)


def _cluster_cpu_watch() -> CPUWatch | None:
    """CPU per component of the running cluster (its process tree), if we can see it."""
    client = APIClient(timeout=5)
    if not client.running():
        return None
    try:
        watch = CPUWatch(int(client.get("/api/v1/status")["pid"]))
    except (click.ClickException, KeyError, TypeError, ValueError):
        return None
    watch.start()
    return watch


def _capacity(summary: dict[str, Any], watch: CPUWatch | None) -> dict[str, Any]:
    """Did the cluster keep up over the whole run, and what did each component cost?"""
    cores = watch.whole_run() if watch else {}
    asked, achieved = summary["requested_rps"], summary["achieved_rps"]
    warning = lag_warning(asked, achieved, cores) if summary["duration_s"] >= WARMUP_S else None
    return {
        "kept_up": warning is None,
        "warning": warning,
        "cores_by_component": {k: round(v, 3) for k, v in cores.items()},
    }


def _run(gen: Generator, tick: Any) -> None:
    import uvloop

    uvloop.run(gen.run(tick))


def print_summary(s: dict[str, Any]) -> None:
    out = Console()
    head = "[yellow]interrupted[/] — partial results" if s["interrupted"] else "done"
    out.print(
        f"{head}: {s['requests']} requests to {s['target']} in {s['duration_s']:.1f} s "
        f"({s['achieved_rps']} req/s achieved of {s['requested_rps']:g} requested)"
    )
    lat = s["latency_ms"]
    if lat["p50"] is not None:
        out.print(
            f"latency from the scheduled send time: p50 {lat['p50']:.1f} ms · "
            f"p90 {lat['p90']:.1f} ms · p99 {lat['p99']:.1f} ms · max {lat['max']:.1f} ms"
        )
    codes = "  ".join(f"{k}: {v}" for k, v in s["status_codes"].items())
    out.print(f"status codes: {codes}")
    if s["failures_by_hop"]:
        table = Table("failures by the hop that produced them", "count", box=None)
        for reason, count in s["failures_by_hop"].items():
            table.add_row(reason, str(count) if count else "")
        out.print(table)
    for t in s["slowest_traces"][:3]:
        out.print(f"slow:    {t['trace_id']}  {t['latency_ms']:.1f} ms")
    for t in s["failing_traces"][:5]:
        out.print(f"failing: {t['trace_id']}  {t['status']}  {t['route']}")
    out.print(f"generator CPU: {s['generator_cpu_cores']:.2f} cores")
    capacity = s.get("capacity") or {}
    if capacity.get("warning"):
        out.print(f"[yellow]warning:[/] {capacity['warning']}")
    busiest = list((capacity.get("cores_by_component") or {}).items())[:4]
    if busiest:
        out.print("cluster CPU: " + " · ".join(f"{k} {v:.2f} cores" for k, v in busiest))

"""``hopscope curl``: send one traced request, from outside the cluster or as a pod.

From outside, the client sends from ``EXTERNAL_CLIENT_IP`` and an Ingress host resolves to
the ingress controller's address (what a public DNS record would say). With ``--from POD``
the request leaves exactly as the pod's app would send it: cluster DNS with the pod's search
path, then the pod's sidecar, from the pod's IP. Either way the request starts a ``client``
span, so its whole journey is one trace.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import click
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from mesh import addresses
from mesh.apiclient import client_otlp_endpoint
from mesh.cli._client import APIClient
from mesh.model.types import ClusterState, Pod


@dataclass
class Target:
    """Where the TCP connection goes, and what the request says."""

    connect_ip: str
    connect_port: int
    source_ip: str
    host_header: str
    path: str
    extra_headers: dict[str, str]
    note: str


def _parse_headers(raw: tuple[str, ...]) -> dict[str, str]:
    headers = {}
    for item in raw:
        name, sep, value = item.partition(":")
        if not sep or not name.strip():
            raise click.BadParameter(
                f"header {item!r} must look like 'Name: value'", param_hint="-H"
            )
        headers[name.strip()] = value.strip()
    return headers


def _outside_target(url: str, state: ClusterState) -> Target:
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise click.BadParameter(f"{url!r} is not an http:// URL", param_hint="URL")
    host, path = parts.hostname, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    ingress_hosts = {r.host for i in state.ingresses for r in i.rules if r.host}
    if host in ingress_hosts:
        return Target(
            addresses.INGRESS_IP,
            addresses.INGRESS_PORT,
            addresses.EXTERNAL_CLIENT_IP,
            host if parts.port is None else f"{host}:{parts.port}",
            path,
            {},
            f"{host} → ingress {addresses.INGRESS_IP}:{addresses.INGRESS_PORT}",
        )
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        known = ", ".join(sorted(ingress_hosts)) or "none"
        raise click.ClickException(
            f"{host!r} does not resolve from outside the cluster (Ingress hosts: {known}); "
            "Service names resolve only inside pods: use --from POD"
        ) from None
    if ip not in ipaddress.ip_network("127.0.0.0/8"):
        raise click.ClickException(f"{host} is not a local-mode cluster address (127.0.0.0/8)")
    return Target(host, parts.port or 80, addresses.EXTERNAL_CLIENT_IP, parts.netloc, path, {}, "")


def _pod_target(url: str, pod: Pod, state: ClusterState) -> tuple[Target, Any]:
    """Resolve like the pod's app does (cluster DNS, search path), then go via its sidecar."""
    from mesh.dns.resolver import PodResolver

    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise click.BadParameter(f"{url!r} is not an http:// URL", param_hint="URL")
    port = parts.port or 80
    resolver = PodResolver(
        server=(addresses.DNS_SERVICE_IP, addresses.DNS_PORT),
        search=[f"{pod.namespace}.svc.cluster.local", "svc.cluster.local", "cluster.local"],
        ndots=5,
        pod_name=pod.name,
        namespace=pod.namespace,
        source_ip=pod.ip,
    )
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(
        pod.ip,
        addresses.SIDECAR_OUTBOUND_PORT,
        pod.ip,
        parts.netloc,
        path,
        {},
        f"as pod {pod.namespace}/{pod.name} via its sidecar",
    ), (resolver, parts.hostname, port)


def _tracer_provider() -> TracerProvider:
    import os

    from telemetry.tracing import setup_tracing

    os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = client_otlp_endpoint()
    return setup_tracing("hopscope-cli", {"hopscope.client": "curl"}, set_global=False)


def _send(
    t: Target, method: str, body: bytes | None, headers: dict[str, str]
) -> tuple[int, str, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection(
        t.connect_ip, t.connect_port, timeout=30, source_address=(t.source_ip, 0)
    )
    try:
        conn.request(
            method, t.path, body=body, headers={"Host": t.host_header, **t.extra_headers, **headers}
        )
        resp = conn.getresponse()
        return resp.status, resp.reason, resp.read(), dict(resp.getheaders())
    finally:
        conn.close()


@click.command()
@click.argument("url")
@click.option(
    "--from", "from_pod", metavar="POD", help="Send from inside this pod (name or ns/name)."
)
@click.option("-X", "--request", "method", default="GET", show_default=True, help="HTTP method.")
@click.option(
    "-H", "--header", "raw_headers", multiple=True, help="Extra header 'Name: value' (repeatable)."
)
@click.option("-d", "--data", default=None, help="Request body.")
@click.option("-i", "--include", is_flag=True, help="Print response headers too.")
@click.option("--json", "as_json", is_flag=True, help="Print status, trace id and body as JSON.")
def curl(
    url: str,
    from_pod: str | None,
    method: str,
    raw_headers: tuple[str, ...],
    data: str | None,
    include: bool,
    as_json: bool,
) -> None:
    """Send one traced HTTP request and print the status and its trace id."""
    headers = _parse_headers(raw_headers)
    state = ClusterState.from_dict(APIClient().get("/api/v1/state"))
    lookup = None
    if from_pod:
        target, lookup = _pod_target(url, _find_pod(state, from_pod), state)
    else:
        target = _outside_target(url, state)
    provider = _tracer_provider()
    tracer = provider.get_tracer("hopscope.cli")
    with tracer.start_as_current_span(f"client {method} {url}", kind=SpanKind.CLIENT) as span:
        span.set_attributes(
            {
                "hopscope.hop": "client",
                "http.request.method": method,
                "url.full": url,
                "client.address": target.source_ip,
                "server.address": target.connect_ip,
                "server.port": target.connect_port,
            }
        )
        if from_pod:
            span.set_attributes({"k8s.pod.name": target.note.split("/")[-1].split(" ")[0]})
        try:
            if lookup is not None:
                resolver, name, port = lookup
                resolver.tracer = tracer
                ip = resolver.resolve(name)[0]
                target.extra_headers[addresses.ORIGINAL_DST_HEADER] = f"{ip}:{port}"
            carrier: dict[str, str] = {}
            TraceContextTextMapPropagator().inject(carrier)
            status, reason, body, resp_headers = _send(
                target, method, data.encode() if data else None, {**headers, **carrier}
            )
        except (OSError, http.client.HTTPException) as exc:
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            trace_id = format(span.get_span_context().trace_id, "032x")
            provider.force_flush()
            raise click.ClickException(
                f"request failed: {_describe(exc)} (trace {trace_id})"
            ) from None
        except Exception as exc:  # a resolution failure from the pod resolver
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            trace_id = format(span.get_span_context().trace_id, "032x")
            provider.force_flush()
            raise click.ClickException(f"{exc} (trace {trace_id})") from None
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        trace_id = format(span.get_span_context().trace_id, "032x")
    provider.force_flush()
    _print(as_json, include, status, reason, body, resp_headers, trace_id)
    otel_trace.get_tracer_provider()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.timeout):
        return "timed out"
    return str(exc) or type(exc).__name__


def _find_pod(state: ClusterState, ref: str) -> Pod:
    ns, _, name = ref.rpartition("/")
    matches = [p for p in state.pods if p.name == name and ns in ("", p.namespace)]
    if not matches:
        raise click.ClickException(f"pod {ref!r} not found (`hopscope get pods`)")
    pod = matches[0]
    if pod.phase != "Running":
        raise click.ClickException(f"pod {ref!r} is {pod.phase}, not Running")
    return pod


def _print(
    as_json: bool,
    include: bool,
    status: int,
    reason: str,
    body: bytes,
    headers: dict[str, str],
    trace_id: str,
) -> None:
    text = body.decode("utf-8", "replace")
    if as_json:
        click.echo(
            json.dumps(
                {
                    "status": status,
                    "reason": reason,
                    "trace_id": trace_id,
                    "headers": headers,
                    "body": text,
                },
                indent=2,
            )
        )
        return
    click.echo(f"HTTP {status} {reason}")
    if include:
        for k, v in headers.items():
            click.echo(f"{k}: {v}")
        click.echo()
    if text:
        click.echo(text.rstrip("\n"))
    click.echo(f"trace {trace_id}   (hopscope trace {trace_id[:12]})", err=True)

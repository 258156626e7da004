"""``hopscope curl``: send one traced request, from outside the cluster or as a pod.

From outside, the client sends from ``EXTERNAL_CLIENT_IP`` and an Ingress host resolves to
the ingress controller's address (what a public DNS record would say). With ``--from POD``
the request leaves exactly as the pod's app would send it: cluster DNS with the pod's search
path, then the pod's sidecar, from the pod's IP. Either way the request starts a ``client``
span, so its whole journey is one trace.

``https://`` URLs go to the ingress's HTTPS port with the URL's host as SNI, as curl does:
the server's certificate is checked against ``--cacert FILE`` (the cluster CA is
``$HOPSCOPE_HOME/identity/root-cert.pem``, ``~/.hopscope`` by default) or the system's
roots, and ``-k`` skips the check. Handshake failures exit like curl's: 35 for a failed
handshake, 60 for a certificate that could not be verified.
"""

from __future__ import annotations

import http.client
import ipaddress
import json
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path
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
from mesh.kernel.forward import in_netns
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
    tls: ssl.SSLContext | None = None
    """Set for ``https://``: the client's TLS settings (the SNI is :attr:`server_name`)."""
    server_name: str = ""
    tls_info: dict[str, str] = field(default_factory=dict)
    """What the handshake agreed (version, cipher, the server's certificate), once sent."""
    tag_connection: bool = False
    """Put the connection's own tuple on the client span (a request from outside)."""


EXIT_TLS_HANDSHAKE = 35
"""curl's exit code for a failed TLS handshake."""
EXIT_TLS_CERTIFICATE = 60
"""curl's exit code for a server certificate that could not be verified."""


class TlsFailure(click.ClickException):
    """The TLS handshake failed (curl's exit code 35)."""

    exit_code = EXIT_TLS_HANDSHAKE

    def with_trace(self, trace_id: str) -> TlsFailure:
        return type(self)(f"{self.message} (trace {trace_id})")


class CertificateFailure(TlsFailure):
    """The server's certificate could not be verified (curl's exit code 60)."""

    exit_code = EXIT_TLS_CERTIFICATE


def tls_context(cacert: Path | None, insecure: bool) -> ssl.SSLContext:
    """The client's context: ``cacert`` (or the system's roots) unless ``insecure``."""
    if insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        return ssl.create_default_context(cafile=str(cacert) if cacert else None)
    except (OSError, ssl.SSLError) as exc:
        raise click.BadParameter(
            f"cannot read CA certificates from {cacert}: {exc}", param_hint="--cacert"
        ) from None


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


def _outside_target(url: str, state: ClusterState, tls: ssl.SSLContext | None) -> Target:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.BadParameter(f"{url!r} is not an http:// or https:// URL", param_hint="URL")
    secure = parts.scheme == "https"
    host, path = parts.hostname, (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    ingress_hosts = {r.host for i in state.ingresses for r in i.rules if r.host}
    if host in ingress_hosts:
        port = addresses.INGRESS_TLS_PORT if secure else addresses.INGRESS_PORT
        return Target(
            addresses.INGRESS_IP,
            port,
            addresses.EXTERNAL_CLIENT_IP,
            host if parts.port is None else f"{host}:{parts.port}",
            path,
            {},
            f"{host} → ingress {addresses.INGRESS_IP}:{port}",
            tls if secure else None,
            host,
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
    port = parts.port or (443 if secure else 80)
    return Target(
        host,
        port,
        addresses.EXTERNAL_CLIENT_IP,
        parts.netloc,
        path,
        {},
        "",
        tls if secure else None,
        "",
    )


def _pod_target(url: str, pod: Pod, state: ClusterState) -> tuple[Target, Any]:
    """Resolve like the pod's app does (cluster DNS, search path), then go via its sidecar."""
    from mesh.dns.resolver import PodResolver

    parts = urlsplit(url)
    if parts.scheme == "https":
        raise click.BadParameter(
            "https:// is for requests from outside, through the ingress; inside the mesh "
            "the sidecars carry TLS (drop --from, or use http://)",
            param_hint="URL",
        )
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


def send_request(
    t: Target, method: str, body: bytes | None, headers: dict[str, str]
) -> tuple[int, str, bytes, dict[str, str]]:
    """One request to ``t`` (TLS first for https); ``t.tls_info`` is filled by then."""
    conn = http.client.HTTPConnection(
        t.connect_ip, t.connect_port, timeout=30, source_address=(t.source_ip, 0)
    )
    try:
        if t.tls is not None:
            conn.sock = _handshake(t)
        conn.request(
            method, t.path, body=body, headers={"Host": t.host_header, **t.extra_headers, **headers}
        )
        if t.tag_connection and conn.sock is not None:
            # as the traffic generator does: the kernel data path joins conntrack by it
            local = conn.sock.getsockname()
            otel_trace.get_current_span().set_attributes(
                {
                    "hopscope.upstream.local_address": f"{local[0]}:{local[1]}",
                    "hopscope.upstream.address": f"{t.connect_ip}:{t.connect_port}",
                }
            )
        resp = conn.getresponse()
        return resp.status, resp.reason, resp.read(), dict(resp.getheaders())
    finally:
        conn.close()


def _handshake(t: Target) -> ssl.SSLSocket:
    """Connect and complete the TLS handshake (SNI = the URL's host), or raise TlsFailure."""
    assert t.tls is not None
    raw = socket.create_connection(
        (t.connect_ip, t.connect_port), timeout=30, source_address=(t.source_ip, 0)
    )
    try:
        sock = t.tls.wrap_socket(raw, server_hostname=t.server_name or None)
    except ssl.SSLCertVerificationError as exc:
        raw.close()
        raise CertificateFailure(
            f"SSL certificate problem: {exc.verify_message or exc.reason} "
            f"(server {t.server_name or t.connect_ip}); the cluster CA is "
            "$HOPSCOPE_HOME/identity/root-cert.pem: pass it with --cacert, or -k to skip the check"
        ) from None
    except (ssl.SSLError, ConnectionError) as exc:
        raw.close()
        reason = getattr(exc, "reason", None) or _describe(exc)
        raise TlsFailure(
            f"TLS handshake with {t.connect_ip}:{t.connect_port} failed ({reason}): "
            f"the ingress serves no certificate for SNI {t.server_name!r}? "
            "(`hopscope get ingress -o wide`, and the control plane's log)"
        ) from None
    der = sock.getpeercert(binary_form=True)
    t.tls_info = {
        "tls.protocol.version": sock.version() or "",
        "tls.cipher": (sock.cipher() or ("",))[0],
        "tls.client.server_name": t.server_name,
        **_certificate_summary(der),
    }
    return sock


def _certificate_summary(der: bytes | None) -> dict[str, str]:
    if not der:
        return {}
    from cryptography import x509

    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = ",".join(san.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        names = ""
    return {
        "tls.server.subject": cert.subject.rfc4514_string(),
        "tls.server.issuer": cert.issuer.rfc4514_string(),
        "tls.server.names": names,
        "tls.server.not_after": cert.not_valid_after_utc.isoformat(),
        "tls.server.serial": format(cert.serial_number, "x"),
    }


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
@click.option(
    "--cacert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Check https:// servers against these CA certificates (PEM), e.g. the cluster CA "
    "$HOPSCOPE_HOME/identity/root-cert.pem.",
)
@click.option(
    "-k", "--insecure", is_flag=True, help="https://: do not check the server's certificate."
)
def curl(
    url: str,
    from_pod: str | None,
    method: str,
    raw_headers: tuple[str, ...],
    data: str | None,
    include: bool,
    as_json: bool,
    cacert: Path | None,
    insecure: bool,
) -> None:
    """Send one traced HTTP(S) request and print the status and its trace id."""
    headers = _parse_headers(raw_headers)
    tls = tls_context(cacert, insecure) if url.lower().startswith("https:") else None
    state = ClusterState.from_dict(APIClient().get("/api/v1/state"))
    lookup = None
    netns = None
    if from_pod:
        pod = _find_pod(state, from_pod)
        target, lookup = _pod_target(url, pod, state)
        netns = _kernel_pod_netns(pod, lookup[0])
    else:
        target = _outside_target(url, state, tls)
        target.tag_connection = True
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
            with in_netns(netns):  # the kernel data path: from inside the pod's network
                status, reason, body, resp_headers = _send(
                    target, lookup, tracer, method, data, headers
                )
        except TlsFailure as exc:
            span.set_attributes(target.tls_info)
            span.set_status(Status(StatusCode.ERROR, exc.message))
            span.set_attribute("error.type", "tls")
            trace_id = format(span.get_span_context().trace_id, "032x")
            provider.force_flush()
            raise exc.with_trace(trace_id) from None
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
        span.set_attributes(target.tls_info)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        trace_id = format(span.get_span_context().trace_id, "032x")
    provider.force_flush()
    _print(as_json, include, status, reason, body, resp_headers, trace_id, target.tls_info)
    otel_trace.get_tracer_provider()


def _send(
    target: Target,
    lookup: Any,
    tracer: Any,
    method: str,
    data: str | None,
    headers: dict[str, str],
) -> tuple[int, str, bytes, dict[str, str]]:
    """Resolve like the pod (with ``--from``), then send the request with the trace context."""
    if lookup is not None:
        resolver, name, port = lookup
        resolver.tracer = tracer
        ip = resolver.resolve(name)[0]
        target.extra_headers[addresses.ORIGINAL_DST_HEADER] = f"{ip}:{port}"
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return send_request(target, method, data.encode() if data else None, {**headers, **carrier})


def _kernel_pod_netns(pod: Pod, resolver: Any) -> str | None:
    """On the kernel data path, the pod's network namespace (and its resolver pointed at the
    cluster DNS of that address plan); None on the userspace path."""
    from mesh.cli.kernel_cmds import kernel_status, pod_netns

    status = kernel_status()
    if status is None:
        return None
    host, _, port = str(status.get("cluster_dns", "")).rpartition(":")
    if host:
        resolver.server = (host, int(port))
    return pod_netns(status, f"{pod.namespace}/{pod.name}")


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
    tls_info: dict[str, str] | None = None,
) -> None:
    text = body.decode("utf-8", "replace")
    if as_json:
        out: dict[str, object] = {
            "status": status,
            "reason": reason,
            "trace_id": trace_id,
            "headers": headers,
            "body": text,
        }
        if tls_info:
            out["tls"] = {k.removeprefix("tls."): v for k, v in tls_info.items()}
        click.echo(json.dumps(out, indent=2))
        return
    if tls_info:
        click.echo(
            f"tls {tls_info.get('tls.protocol.version')} {tls_info.get('tls.cipher')}; "
            f"certificate for {tls_info.get('tls.server.names') or '?'} issued by "
            f"{tls_info.get('tls.server.issuer') or '?'}",
            err=True,
        )
    click.echo(f"HTTP {status} {reason}")
    if include:
        for k, v in headers.items():
            click.echo(f"{k}: {v}")
        click.echo()
    if text:
        click.echo(text.rstrip("\n"))
    click.echo(f"trace {trace_id}   (hopscope trace {trace_id[:12]})", err=True)

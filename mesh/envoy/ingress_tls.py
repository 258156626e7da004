"""The ingress's HTTPS listener: Ingress ``spec.tls`` and the ingress-nginx TLS annotations.

One listener on ``INGRESS_IP:INGRESS_TLS_PORT`` with a ``tls_inspector`` listener filter,
which reads the SNI from the ClientHello; Envoy then picks the filter chain whose
``server_names`` holds it — several hosts on one address, each with its own certificate:

* **terminating** chains, one per ``kubernetes.io/tls`` Secret: TLS ends here with that
  Secret's certificate, and an HTTP connection manager routes by ``Host`` like the HTTP
  listener does. Its spans say where TLS ended (:data:`TLS_SPAN_TAGS`).
* **passthrough** chains (``nginx.ingress.kubernetes.io/ssl-passthrough: "true"``): the
  connection goes whole, still encrypted, to the rule's Service (``tcp_proxy``). The ingress
  sees no HTTP, so it writes no span: its access-log line (:data:`PASSTHROUGH_LOG_FORMAT`)
  names the SNI, the upstream and the bytes; the backend's own span says it ended TLS.

A connection whose SNI no chain names (or that has none) is closed during the handshake:
hopscope's ingress has no default certificate. Objects that cannot be served — a missing
Secret, one of another type, a certificate that does not parse or does not match its key,
two Ingresses claiming one host — are left out and reported as :class:`TlsPlan` warnings,
so one bad Secret never stops the others from being served.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from mesh import addresses
from mesh.envoy.common import typed
from mesh.model.manifests import (
    FORCE_SSL_REDIRECT_ANNOTATION,
    SSL_PASSTHROUGH_ANNOTATION,
    SSL_REDIRECT_ANNOTATION,
    annotation_is_true,
)
from mesh.model.types import ClusterState, Ingress, IngressPath, PathType, Secret

TLS_LISTENER = "ingress_https"
"""Name of the HTTPS listener (an LDS resource when served from files)."""

TLS_SECRET_TYPE = "kubernetes.io/tls"

TLS_SPAN_TAGS = {
    "tls.protocol.version": "%DOWNSTREAM_TLS_VERSION%",
    "tls.cipher": "%DOWNSTREAM_TLS_CIPHER%",
    "tls.client.server_name": "%REQUESTED_SERVER_NAME%",
    "tls.server.subject": "%DOWNSTREAM_LOCAL_SUBJECT%",
}
"""Span tags of a terminating chain, filled per connection: the TLS version (Envoy's
spelling, ``TLSv1.3``), the cipher, the SNI the client sent and the subject of the
certificate the ingress presented. Literal tags add ``hopscope.tls.terminated_by: ingress``
and ``hopscope.tls.secret: <namespace>/<name>``."""

TERMINATED_BY = "hopscope.tls.terminated_by"
TLS_SECRET_TAG = "hopscope.tls.secret"

PASSTHROUGH_LOG_FORMAT = {
    "time": "%START_TIME%",
    "level": "info",
    "logger": "access",
    "hop": "ingress",
    "tls_mode": "passthrough",
    "sni": "%REQUESTED_SERVER_NAME%",
    "downstream_remote": "%DOWNSTREAM_REMOTE_ADDRESS%",
    "downstream_local": "%DOWNSTREAM_LOCAL_ADDRESS%",
    "upstream_host": "%UPSTREAM_HOST%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "duration_ms": "%DURATION%",
    "response_flags": "%RESPONSE_FLAGS%",
    "upstream_failure": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
}
"""The access-log line of one passed-through connection (no trace id: the ingress cannot
read the request's trace context inside the TLS it does not end)."""

TERMINATED_LOG_FIELDS = {
    "tls_mode": "terminate",
    "tls_version": "%DOWNSTREAM_TLS_VERSION%",
    "sni": "%REQUESTED_SERVER_NAME%",
}
"""Added to the access-log line of a request that came over a terminating chain."""


@dataclass
class TerminatingChain:
    secret: str
    """``namespace/name`` of the Secret whose certificate this chain serves."""
    hosts: list[str]
    cert_pem: str
    key_pem: str


@dataclass
class PassthroughChain:
    host: str
    ingress: str
    """``namespace/name``."""
    namespace: str
    backend: IngressPath


@dataclass
class TlsPlan:
    """What the HTTPS listener serves, host by host, and what it had to leave out."""

    terminating: list[TerminatingChain] = field(default_factory=list)
    passthrough: list[PassthroughChain] = field(default_factory=list)
    redirect_hosts: set[str] = field(default_factory=set)
    """Hosts whose plain-HTTP requests are answered 308 to ``https://``."""
    passthrough_ingresses: set[str] = field(default_factory=set)
    """``namespace/name`` of passthrough Ingresses: they get no HTTP routes."""
    warnings: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.terminating and not self.passthrough


def _ours(ing: Ingress) -> bool:
    return ing.ingress_class in (None, "hopscope")


def plan_tls(state: ClusterState) -> TlsPlan:
    """Decide, from the Ingresses and Secrets in ``state``, which host gets which chain.

    Ingresses are taken oldest first (then by namespace/name), so a host two Ingresses claim
    stays with the one that had it first, as ingress-nginx does."""
    plan = TlsPlan()
    claimed: dict[str, str] = {}
    by_secret: dict[str, TerminatingChain] = {}
    ingresses = sorted(
        (i for i in state.ingresses if _ours(i)), key=lambda i: (i.created, i.namespace, i.name)
    )

    def claim(host: str, who: str) -> bool:
        if host in claimed and claimed[host] != who:
            plan.warnings.append(
                f"{_owner(who)}: TLS host {host} is already served by {_owner(claimed[host])}"
            )
            return False
        claimed[host] = who
        return True

    for ing in ingresses:
        who = f"{ing.namespace}/{ing.name}"
        if annotation_is_true(ing.annotations, SSL_PASSTHROUGH_ANNOTATION):
            plan.passthrough_ingresses.add(who)
            for rule in ing.rules:
                if rule.host and rule.paths and claim(rule.host, who):
                    backend = _root_path(rule.paths)
                    plan.passthrough.append(
                        PassthroughChain(rule.host, who, ing.namespace, backend)
                    )
            if annotation_is_true(ing.annotations, FORCE_SSL_REDIRECT_ANNOTATION):
                plan.redirect_hosts.update(r.host for r in ing.rules if r.host)
            continue
        served: set[str] = set()
        for entry in ing.tls:
            name = f"{ing.namespace}/{entry.secret_name}"
            chain = _chain(
                state,
                plan,
                by_secret,
                (ing.namespace, entry.secret_name or ""),
                f"Ingress {who}: spec.tls secret {name}",
                ", ".join(entry.hosts) or "its hosts",
            )
            if chain is None:
                continue
            for host in entry.hosts:
                if host not in chain.hosts and claim(host, who):
                    chain.hosts.append(host)
                    served.add(host)
        if annotation_is_true(ing.annotations, FORCE_SSL_REDIRECT_ANNOTATION):
            plan.redirect_hosts.update(r.host for r in ing.rules if r.host)
        elif annotation_is_true(ing.annotations, SSL_REDIRECT_ANNOTATION):
            plan.redirect_hosts.update(served)
    _tls_routes(state, plan, claim)
    _gateway_https(state, plan, claim, by_secret)
    plan.terminating = [c for c in plan.terminating if c.hosts]
    return plan


def _gateway_https(
    state: ClusterState, plan: TlsPlan, claim: Any, by_secret: dict[str, TerminatingChain]
) -> None:
    """Gateway API termination: an ``HTTPS`` listener (mode ``Terminate``) of a hopscope
    Gateway serves its ``hostname`` with its first ``certificateRefs`` Secret; the routes
    attached to it are on the HTTPS listener's virtual hosts."""
    from mesh.model.gateway_attach import GATEWAY_CLASS
    from mesh.model.gateway_views import gateway_view

    for gw in state.gateways:
        if gw.spec.get("gatewayClassName") != GATEWAY_CLASS:
            continue
        who = f"Gateway {gw.namespace}/{gw.name}"
        for listener in gateway_view(gw).listeners:
            if listener.protocol != "HTTPS" or listener.tls_mode == "Passthrough":
                continue
            if not listener.hostname or "*" in listener.hostname:
                plan.warnings.append(
                    f"{who}: listener {listener.name}: HTTPS needs an exact hostname here "
                    "(SNI picks the certificate); not served"
                )
                continue
            if not listener.certificate_refs:
                continue
            namespace, secret_name = listener.certificate_refs[0]
            name = f"{namespace}/{secret_name}"
            chain = _chain(
                state,
                plan,
                by_secret,
                (namespace, secret_name),
                f"{who}: listener {listener.name}: certificateRefs secret {name}",
                listener.hostname,
            )
            if chain is None:
                continue
            if listener.hostname not in chain.hosts and claim(listener.hostname, who):
                chain.hosts.append(listener.hostname)


def _chain(
    state: ClusterState,
    plan: TlsPlan,
    by_secret: dict[str, TerminatingChain],
    secret: tuple[str, str],
    what: str,
    hosts: str,
) -> TerminatingChain | None:
    """The terminating chain of one Secret (shared by everything that names it), or None
    with a warning saying which hosts go unserved and why."""
    name = "/".join(secret)
    chain = by_secret.get(name)
    if chain is not None:
        return chain
    pair = _certificate_pair(state.secret(*secret))
    if isinstance(pair, str):
        plan.warnings.append(f"{what} {pair}; TLS for {hosts} is not served")
        return None
    chain = by_secret[name] = TerminatingChain(name, [], *pair)
    plan.terminating.append(chain)
    return chain


def _owner(who: str) -> str:
    """``Ingress shop/x`` or ``TLSRoute shop/y`` (Ingresses are claimed by namespace/name)."""
    return who if who.startswith(("TLSRoute ", "Gateway ")) else f"Ingress {who}"


def _tls_routes(state: ClusterState, plan: TlsPlan, claim: Any) -> None:
    """Gateway API passthrough: TLSRoutes on a Gateway's ``TLS`` listener in ``Passthrough``
    mode — by SNI, unopened, to the route's first backend (TLS carries no path to match)."""
    from mesh.envoy.gateway import passthrough_attachments

    for attachment in passthrough_attachments(state):
        route = attachment.route
        backends = [b for rule in route.rules for b in rule.backends]
        if not backends:
            continue
        first = backends[0]
        who = f"TLSRoute {route.namespace}/{route.name}"
        path = IngressPath("/", PathType.PREFIX, first.name, first.port)
        for host in attachment.hostnames:
            if host != "*" and claim(host, who):
                plan.passthrough.append(PassthroughChain(host, who, first.namespace, path))


def _root_path(paths: list[IngressPath]) -> IngressPath:
    """The backend a passthrough host goes to: its ``/`` path's, else its first (there is no
    path to match on inside TLS)."""
    return next((p for p in paths if p.path in ("", "/")), paths[0])


def _certificate_pair(secret: Secret | None) -> tuple[str, str] | str:
    """``(certificate chain, key)`` PEM from a ``kubernetes.io/tls`` Secret, or why not."""
    if secret is None:
        return "does not exist"
    if secret.type != TLS_SECRET_TYPE:
        return f"is of type {secret.type}, not {TLS_SECRET_TYPE}"
    try:
        cert_pem = base64.b64decode(secret.data.get("tls.crt", ""), validate=True)
        key_pem = base64.b64decode(secret.data.get("tls.key", ""), validate=True)
    except (binascii.Error, ValueError):
        return "holds data that is not base64"
    try:
        certs = x509.load_pem_x509_certificates(cert_pem)
    except ValueError:
        return "has a tls.crt that is not a PEM certificate"
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return "has a tls.key that is not an unencrypted PEM private key"
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if key.public_key().public_bytes(*spki) != certs[0].public_key().public_bytes(*spki):
        return "has a tls.key that is not the key of its tls.crt"
    return cert_pem.decode(), key_pem.decode()


def expired_warnings(plan: TlsPlan, now: dt.datetime | None = None) -> list[str]:
    """Certificates served although out of their validity (clients will refuse them)."""
    now = now or dt.datetime.now(dt.UTC)
    out = []
    for chain in plan.terminating:
        cert = x509.load_pem_x509_certificate(chain.cert_pem.encode())
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            out.append(
                f"secret {chain.secret}: the certificate is valid only from "
                f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
            )
    return out


def redirect_route(host: str) -> dict[str, Any]:
    """Every request for ``host`` answered 308 to the same URL on the HTTPS port."""
    return {
        "match": {"prefix": "/"},
        "redirect": {
            "https_redirect": True,
            "port_redirect": addresses.INGRESS_TLS_PORT,
            "response_code": "PERMANENT_REDIRECT",
        },
        "decorator": {"operation": f"ingress redirect {host} to https"},
    }


def _downstream_tls(chain: TerminatingChain) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": typed(
            "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            common_tls_context={
                "tls_certificates": [
                    {
                        "certificate_chain": {"inline_string": chain.cert_pem},
                        "private_key": {"inline_string": chain.key_pem},
                    }
                ],
                "tls_params": {"tls_minimum_protocol_version": "TLSv1_2"},
                "alpn_protocols": ["h2", "http/1.1"],
            },
        ),
    }


def _mark_terminated(hcm: dict[str, Any], chain: TerminatingChain) -> dict[str, Any]:
    """The connection manager of a terminating chain, its spans and log naming the TLS."""
    config = hcm["typed_config"]
    config["tracing"]["custom_tags"] += [
        {"tag": TERMINATED_BY, "literal": {"value": "ingress"}},
        {"tag": TLS_SECRET_TAG, "literal": {"value": chain.secret}},
        *({"tag": k, "value": v} for k, v in TLS_SPAN_TAGS.items()),
    ]
    for logger in config["access_log"]:
        fmt = logger["typed_config"].get("log_format", {}).get("json_format")
        if fmt is not None:
            fmt.update(TERMINATED_LOG_FIELDS)
    return hcm


def tls_listener(
    plan: TlsPlan,
    hcm_for: Callable[[TerminatingChain], dict[str, Any]],
    passthrough_cluster: Callable[[PassthroughChain], str],
) -> dict[str, Any] | None:
    """The HTTPS listener for ``plan`` (None when it has no chain: Envoy refuses a listener
    without one). ``hcm_for`` makes a chain's HTTP connection manager (routes as the HTTP
    listener's, less redirects); ``passthrough_cluster`` names the cluster a passthrough
    host goes to ("" when its Service is missing: that host is then closed)."""
    chains = []
    for chain in plan.terminating:
        chains.append(
            {
                "name": f"terminate|{chain.secret}",
                "filter_chain_match": {"server_names": sorted(chain.hosts)},
                "filters": [_mark_terminated(hcm_for(chain), chain)],
                "transport_socket": _downstream_tls(chain),
            }
        )
    for passage in plan.passthrough:
        cluster = passthrough_cluster(passage)
        if not cluster:
            continue
        chains.append(
            {
                "name": f"passthrough|{passage.host}",
                "filter_chain_match": {"server_names": [passage.host]},
                "filters": [_tcp_proxy(passage, cluster)],
            }
        )
    if not chains:
        return None
    return {
        "name": TLS_LISTENER,
        "address": {
            "socket_address": {
                "address": addresses.INGRESS_IP,
                "port_value": addresses.INGRESS_TLS_PORT,
            }
        },
        "traffic_direction": "INBOUND",
        "listener_filters": [
            {
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": typed(
                    "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"
                ),
            }
        ],
        "filter_chains": chains,
    }


def _tcp_proxy(chain: PassthroughChain, cluster: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.tcp_proxy",
        "typed_config": typed(
            "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
            stat_prefix=f"ingress_passthrough_{chain.host}",
            cluster=cluster,
            access_log=[
                {
                    "name": "envoy.access_loggers.stdout",
                    "typed_config": typed(
                        "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                        log_format={
                            "json_format": {**PASSTHROUGH_LOG_FORMAT, "ingress": chain.ingress}
                        },
                    ),
                }
            ],
        ),
    }

"""A DestinationRule's ``connectionPool`` on a caller's cluster (Istio's field names).

The caller is a sidecar, the ingress or a Gateway: each follows the rule of the Service it
calls (:func:`mesh.model.meshpolicy.destination_rule`). Two parts: the circuit breaker
(how many connections and requests may be open or wait) and how long each connection lives.
"""

from __future__ import annotations

from typing import Any

from mesh.envoy.common import HTTP_PROTOCOL_OPTIONS, go_duration
from mesh.model.types import DestinationRule


def connection_pool(cluster: dict[str, Any], rule: DestinationRule | None) -> None:
    """Apply ``rule``'s ``connectionPool`` to ``cluster`` (nothing without a rule)."""
    _connection_lifetime(cluster, rule)
    limits = _circuit_breaker(rule)
    if limits:
        cluster["circuit_breakers"] = {"thresholds": [limits]}


def _circuit_breaker(rule: DestinationRule | None) -> dict[str, Any]:
    """DestinationRule ``connectionPool`` as Envoy's default-priority thresholds."""
    tcp, http = _pool(rule)
    out: dict[str, Any] = {}
    for field, key in (("maxConnections", "max_connections"),):
        if field in tcp:
            out[key] = tcp[field]
    for field, key in (
        ("http1MaxPendingRequests", "max_pending_requests"),
        ("http2MaxRequests", "max_requests"),
        ("maxRetries", "max_retries"),
    ):
        if field in http:
            out[key] = http[field]
    return out


def _connection_lifetime(cluster: dict[str, Any], rule: DestinationRule | None) -> None:
    """DestinationRule ``connectionPool`` fields that shape each caller connection's life, by
    Istio's names: ``tcp.connectTimeout``, ``tcp.maxConnectionDuration``, ``http.idleTimeout``
    and ``http.maxRequestsPerConnection`` (0: unlimited, as in Istio; 1: a connection per
    request). A field the rule leaves out keeps hopscope's default: a new connection per
    HTTP/1.1 request, so kube-proxy balances each one ("Connection reuse is part of the
    lesson" in docs/design.md); one long-lived connection for HTTP/2."""
    tcp, http = _pool(rule)
    if "connectTimeout" in tcp:
        cluster["connect_timeout"] = go_duration(tcp["connectTimeout"])
    options = cluster["typed_extension_protocol_options"][HTTP_PROTOCOL_OPTIONS]
    common = dict(options.get("common_http_protocol_options") or {})
    if "maxRequestsPerConnection" in http:
        common.pop("max_requests_per_connection", None)
        if http["maxRequestsPerConnection"]:
            common["max_requests_per_connection"] = http["maxRequestsPerConnection"]
    for section, field, key in (
        (http, "idleTimeout", "idle_timeout"),
        (tcp, "maxConnectionDuration", "max_connection_duration"),
    ):
        if field in section:
            common[key] = go_duration(section[field])
    if common:
        options["common_http_protocol_options"] = common
    else:
        options.pop("common_http_protocol_options", None)


def _pool(rule: DestinationRule | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The rule's ``connectionPool.tcp`` and ``connectionPool.http`` (empty without them)."""
    if rule is None:
        return {}, {}
    pool = (rule.spec.get("trafficPolicy") or {}).get("connectionPool") or {}
    return pool.get("tcp") or {}, pool.get("http") or {}

"""The Gateway API (``gateway.networking.k8s.io``): schemas and checks of its kinds.

Placeholder schemas: every spec is accepted as a mapping until the kinds are interpreted.
"""

from __future__ import annotations

from typing import Any

GATEWAY_SCHEMA: dict[str, Any] = {"type": "object"}
HTTP_ROUTE_SCHEMA: dict[str, Any] = {"type": "object"}
GRPC_ROUTE_SCHEMA: dict[str, Any] = {"type": "object"}
TLS_ROUTE_SCHEMA: dict[str, Any] = {"type": "object"}


def check_gateway(spec: dict[str, Any]) -> list[tuple[str, str]]:
    return []


def check_http_route(spec: dict[str, Any]) -> list[tuple[str, str]]:
    return []


def check_grpc_route(spec: dict[str, Any]) -> list[tuple[str, str]]:
    return []


def check_tls_route(spec: dict[str, Any]) -> list[tuple[str, str]]:
    return []

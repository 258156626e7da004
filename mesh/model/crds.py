"""Kinds without a Kubernetes OpenAPI schema in ``kubernetes-validate``: the mesh's policies
and the Gateway API. Each has a JSON Schema of its own, written for the fields hopscope
acts on (unknown fields are refused, so a typo does not pass silently), plus checks a
schema cannot express. A loaded object keeps its ``spec`` as given; the code that acts on
it reads it (:mod:`mesh.model.meshpolicy`, :mod:`mesh.model.gateway_api`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jsonschema

from mesh.model import gateway_api, meshpolicy
from mesh.model.types import (
    ApiObject,
    DestinationRule,
    Gateway,
    GRPCRoute,
    HTTPRoute,
    PeerAuthentication,
    TLSRoute,
)


@dataclass(frozen=True)
class CustomKind:
    cls: type[ApiObject]
    schema: dict[str, Any]
    """JSON Schema of ``spec``."""
    check: Callable[[dict[str, Any]], list[tuple[str, str]]]
    """Further checks on a schema-valid spec: ``(field path, message)`` per problem."""


GATEWAY_GROUP = "gateway.networking.k8s.io"

CUSTOM_KINDS: dict[tuple[str, str], CustomKind] = {
    ("security.istio.io/v1", "PeerAuthentication"): CustomKind(
        PeerAuthentication, meshpolicy.PEER_AUTHENTICATION_SCHEMA, meshpolicy.check_peer_auth
    ),
    ("networking.istio.io/v1", "DestinationRule"): CustomKind(
        DestinationRule, meshpolicy.DESTINATION_RULE_SCHEMA, meshpolicy.check_destination_rule
    ),
    (f"{GATEWAY_GROUP}/v1", "Gateway"): CustomKind(
        Gateway, gateway_api.GATEWAY_SCHEMA, gateway_api.check_gateway
    ),
    (f"{GATEWAY_GROUP}/v1", "HTTPRoute"): CustomKind(
        HTTPRoute, gateway_api.HTTP_ROUTE_SCHEMA, gateway_api.check_http_route
    ),
    (f"{GATEWAY_GROUP}/v1", "GRPCRoute"): CustomKind(
        GRPCRoute, gateway_api.GRPC_ROUTE_SCHEMA, gateway_api.check_grpc_route
    ),
    (f"{GATEWAY_GROUP}/v1alpha2", "TLSRoute"): CustomKind(
        TLSRoute, gateway_api.TLS_ROUTE_SCHEMA, gateway_api.check_tls_route
    ),
}

METADATA_FIELDS = {
    "name",
    "namespace",
    "labels",
    "annotations",
    "uid",
    "resourceVersion",
    "creationTimestamp",
    "generation",
}


def load_custom(doc: dict[str, Any], origin: str) -> ApiObject:
    """Validate one document of a custom kind and convert it; raise ValueError with the
    failing field's path."""
    kind = CUSTOM_KINDS[(doc["apiVersion"], doc["kind"])]
    for key in doc:
        if key not in ("apiVersion", "kind", "metadata", "spec"):
            raise ValueError(f"{key}: unsupported field (known: apiVersion, kind, metadata, spec)")
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        raise ValueError("metadata: must be a mapping")
    unknown = set(meta) - METADATA_FIELDS
    if unknown:
        raise ValueError(f"metadata.{sorted(unknown)[0]}: unsupported field")
    spec = doc.get("spec", {})
    errors = sorted(
        jsonschema.Draft202012Validator(kind.schema).iter_errors(spec),
        key=lambda e: list(e.absolute_path),
    )
    if errors:
        err = errors[0]
        raise ValueError(f"{_path(['spec', *err.absolute_path])}: {_message(err)}")
    problems = kind.check(spec)
    if problems:
        field, message = problems[0]
        raise ValueError(f"{field}: {message}")
    labels = meta.get("labels") or {}
    if not isinstance(labels, dict):
        raise ValueError("metadata.labels: must be a mapping")
    return kind.cls(
        name=str(meta["name"]),
        namespace=str(meta.get("namespace", "default")),
        spec=spec,
        labels={str(k): str(v) for k, v in labels.items()},
        source=origin,
        created=time.time(),
    )


def _message(err: jsonschema.ValidationError) -> str:
    """The error as the core kinds word it: enum values comma-joined, not a Python repr."""
    if err.validator == "enum" and isinstance(err.validator_value, list | tuple):
        allowed = ", ".join(str(v) for v in err.validator_value)
        return f"{err.instance!r} is not one of {allowed}"
    return str(err.message)


def _path(parts: list[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out

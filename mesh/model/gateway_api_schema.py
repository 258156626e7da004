"""JSON Schemas of the Gateway API specs hopscope reads (``gateway.networking.k8s.io``).

Written from the Gateway API v1.7 Standard channel (``apis/v1``: ``Gateway``, ``HTTPRoute``
with ``timeouts`` and ``retry``, ``GRPCRoute``; ``TLSRoute`` as served at ``v1alpha2``),
limited to the fields hopscope acts on. Unknown fields are refused, so a typo does not pass
silently; limits (lengths, item counts, ranges) and enums are the API's own. Defaults the
API server would fill in are applied where the spec is read (:mod:`mesh.model.gateway_api`),
not here. Rules a schema cannot express (the CEL rules of the CRDs) are checked there too.
"""

from __future__ import annotations

from typing import Any

DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
HOSTNAME = rf"^(\*\.)?{DNS_LABEL}(\.{DNS_LABEL})*$"
"""A Gateway API ``Hostname``: RFC 1123, optionally prefixed by one ``*.`` label."""
PRECISE_HOSTNAME = rf"^{DNS_LABEL}(\.{DNS_LABEL})*$"
SECTION_NAME = rf"^{DNS_LABEL}(\.{DNS_LABEL})*$"
HEADER_NAME = r"^[A-Za-z0-9!#$%&'*+\-.^_`|~]+$"
DURATION = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"
"""GEP-2257 durations: up to four number+unit parts (``1h30m``, ``500ms``, ``0s``)."""
GROUP = r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
KIND = r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"


def _obj(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    schema: dict[str, Any] = {
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
    }
    if required:
        schema["required"] = list(required)
    return schema


def _list(items: dict[str, Any], max_items: int, min_items: int = 0) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "array", "items": items, "maxItems": max_items}
    if min_items:
        schema["minItems"] = min_items
    return schema


def _str(pattern: str | None = None, max_length: int = 253, min_length: int = 1) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "minLength": min_length, "maxLength": max_length}
    if pattern:
        schema["pattern"] = pattern
    return schema


_NAME = _str(max_length=253)
_NAMESPACE = _str(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_HOSTNAMES = _list(_str(HOSTNAME), 16)
_DURATION = {"type": "string", "pattern": DURATION}

PARENT_REF = _obj(
    {
        "group": _str(GROUP, min_length=0),
        "kind": _str(KIND, max_length=63),
        "namespace": _NAMESPACE,
        "name": _NAME,
        "sectionName": _str(SECTION_NAME),
        "port": _PORT,
    },
    required=("name",),
)

BACKEND_OBJECT_REF = {
    "group": _str(GROUP, min_length=0),
    "kind": _str(KIND, max_length=63),
    "name": _NAME,
    "namespace": _NAMESPACE,
    "port": _PORT,
}

_HEADER = _obj({"name": _str(HEADER_NAME, 256), "value": _str(max_length=4096)}, ("name", "value"))
HEADER_FILTER = _obj(
    {
        "set": _list(_HEADER, 16),
        "add": _list(_HEADER, 16),
        "remove": _list(_str(HEADER_NAME, 256), 16),
    }
)
MIRROR_FILTER = _obj(
    {
        "backendRef": _obj(BACKEND_OBJECT_REF, ("name",)),
        "percent": {"type": "integer", "minimum": 0, "maximum": 100},
        "fraction": _obj(
            {
                "numerator": {"type": "integer", "minimum": 0},
                "denominator": {"type": "integer", "minimum": 1},
            },
            ("numerator",),
        ),
    },
    ("backendRef",),
)
PATH_MODIFIER = _obj(
    {
        "type": {"enum": ["ReplaceFullPath", "ReplacePrefixMatch"]},
        "replaceFullPath": _str(max_length=1024, min_length=0),
        "replacePrefixMatch": _str(max_length=1024, min_length=0),
    },
    ("type",),
)
REWRITE_FILTER = _obj({"hostname": _str(PRECISE_HOSTNAME), "path": PATH_MODIFIER})
REDIRECT_FILTER = _obj(
    {
        "scheme": {"enum": ["http", "https"]},
        "hostname": _str(PRECISE_HOSTNAME),
        "path": PATH_MODIFIER,
        "port": _PORT,
        "statusCode": {"enum": [301, 302, 303, 307, 308]},
    }
)

HTTP_FILTER_TYPES = (
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestMirror",
    "RequestRedirect",
    "URLRewrite",
)
"""The HTTPRoute filters hopscope renders (``ExtensionRef`` and ``CORS`` are refused)."""
GRPC_FILTER_TYPES = ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestMirror")

FILTER_FIELDS = {
    "RequestHeaderModifier": "requestHeaderModifier",
    "ResponseHeaderModifier": "responseHeaderModifier",
    "RequestMirror": "requestMirror",
    "RequestRedirect": "requestRedirect",
    "URLRewrite": "urlRewrite",
}
"""Filter ``type`` → the field that holds its configuration."""


def _filter(types: tuple[str, ...]) -> dict[str, Any]:
    fields = {
        "requestHeaderModifier": HEADER_FILTER,
        "responseHeaderModifier": HEADER_FILTER,
        "requestMirror": MIRROR_FILTER,
        "requestRedirect": REDIRECT_FILTER,
        "urlRewrite": REWRITE_FILTER,
    }
    allowed = {FILTER_FIELDS[t] for t in types}
    return _obj(
        {"type": {"enum": list(types)}, **{k: v for k, v in fields.items() if k in allowed}},
        ("type",),
    )


def _backend_refs(filter_types: tuple[str, ...]) -> dict[str, Any]:
    ref = _obj(
        {
            **BACKEND_OBJECT_REF,
            "weight": {"type": "integer", "minimum": 0, "maximum": 1000000},
            "filters": _list(_filter(filter_types), 16),
        },
        ("name",),
    )
    return _list(ref, 16)


_HEADER_MATCH = _obj(
    {
        "type": {"enum": ["Exact", "RegularExpression"]},
        "name": _str(HEADER_NAME, 256),
        "value": _str(max_length=4096),
    },
    ("name", "value"),
)
_QUERY_MATCH = _obj(
    {
        "type": {"enum": ["Exact", "RegularExpression"]},
        "name": _str(HEADER_NAME, 256),
        "value": _str(max_length=1024),
    },
    ("name", "value"),
)
HTTP_MATCH = _obj(
    {
        "path": _obj(
            {
                "type": {"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                "value": _str(max_length=1024),
            }
        ),
        "headers": _list(_HEADER_MATCH, 16),
        "queryParams": _list(_QUERY_MATCH, 16),
        "method": {
            "enum": ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]
        },
    }
)

HTTP_ROUTE_SCHEMA: dict[str, Any] = _obj(
    {
        "parentRefs": _list(PARENT_REF, 32),
        "hostnames": _HOSTNAMES,
        "rules": _list(
            _obj(
                {
                    "name": _str(SECTION_NAME),
                    "matches": _list(HTTP_MATCH, 64),
                    "filters": _list(_filter(HTTP_FILTER_TYPES), 16),
                    "backendRefs": _backend_refs(HTTP_FILTER_TYPES),
                    "timeouts": _obj({"request": _DURATION, "backendRequest": _DURATION}),
                    "retry": _obj(
                        {
                            "codes": {
                                "type": "array",
                                "uniqueItems": True,
                                "items": {"type": "integer", "minimum": 400, "maximum": 599},
                            },
                            "attempts": {"type": "integer", "minimum": 0},
                            "backoff": _DURATION,
                        }
                    ),
                }
            ),
            16,
            min_items=1,
        ),
    }
)

GRPC_ROUTE_SCHEMA: dict[str, Any] = _obj(
    {
        "parentRefs": _list(PARENT_REF, 32),
        "hostnames": _HOSTNAMES,
        "rules": _list(
            _obj(
                {
                    "name": _str(SECTION_NAME),
                    "matches": _list(
                        _obj(
                            {
                                "method": _obj(
                                    {
                                        "type": {"enum": ["Exact", "RegularExpression"]},
                                        "service": _str(max_length=1024),
                                        "method": _str(max_length=1024),
                                    }
                                ),
                                "headers": _list(_HEADER_MATCH, 16),
                            }
                        ),
                        64,
                    ),
                    "filters": _list(_filter(GRPC_FILTER_TYPES), 16),
                    "backendRefs": _backend_refs(GRPC_FILTER_TYPES),
                }
            ),
            16,
        ),
    }
)

TLS_ROUTE_SCHEMA: dict[str, Any] = _obj(
    {
        "parentRefs": _list(PARENT_REF, 32),
        "hostnames": _HOSTNAMES,
        "rules": _list(
            _obj(
                {
                    "name": _str(SECTION_NAME),
                    "backendRefs": _list(
                        _obj(
                            {
                                **BACKEND_OBJECT_REF,
                                "weight": {"type": "integer", "minimum": 0, "maximum": 1000000},
                            },
                            ("name",),
                        ),
                        16,
                        min_items=1,
                    ),
                },
                ("backendRefs",),
            ),
            16,
            min_items=1,
        ),
    },
    ("rules",),
)

_SECRET_REF = _obj(
    {
        "group": _str(GROUP, min_length=0),
        "kind": _str(KIND, max_length=63),
        "name": _NAME,
        "namespace": _NAMESPACE,
    },
    ("name",),
)
_LABEL_SELECTOR = _obj(
    {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": _list(
            _obj(
                {
                    "key": _str(),
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
                ("key", "operator"),
            ),
            32,
        ),
    }
)
LISTENER = _obj(
    {
        "name": _str(SECTION_NAME),
        "hostname": _str(HOSTNAME),
        "port": _PORT,
        "protocol": {"enum": ["HTTP", "HTTPS", "TLS"]},
        "tls": _obj(
            {
                "mode": {"enum": ["Terminate", "Passthrough"]},
                "certificateRefs": _list(_SECRET_REF, 64),
            }
        ),
        "allowedRoutes": _obj(
            {
                "namespaces": _obj(
                    {"from": {"enum": ["All", "Same", "Selector"]}, "selector": _LABEL_SELECTOR}
                ),
                "kinds": _list(
                    _obj({"group": _str(GROUP, min_length=0), "kind": _str(KIND, 63)}, ("kind",)),
                    8,
                ),
            }
        ),
    },
    ("name", "port", "protocol"),
)

GATEWAY_SCHEMA: dict[str, Any] = _obj(
    {
        "gatewayClassName": _str(max_length=253),
        "listeners": _list(LISTENER, 64, min_items=1),
        "addresses": _list(
            _obj({"type": _str(max_length=253), "value": _str(max_length=253)}, ("value",)), 16
        ),
    },
    ("gatewayClassName", "listeners"),
)

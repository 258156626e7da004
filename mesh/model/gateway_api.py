"""The Gateway API (``gateway.networking.k8s.io``): validation, and the public surface.

Three layers, each usable alone:

* **Validation** (here) — :data:`GATEWAY_SCHEMA` and friends
  (:mod:`mesh.model.gateway_api_schema`) refuse unknown fields and out-of-range values at
  load; ``check_*`` add the rules the CRDs state in CEL (a redirect and a rewrite in one rule,
  ``ReplacePrefixMatch`` without exactly one ``PathPrefix`` match, ``backendRequest`` longer
  than ``request``...). Every problem names its field: ``spec.rules[0].backendRefs[1].weight``.
* **Views** (:mod:`mesh.model.gateway_views`) — :func:`gateway_view` and :func:`route_view`
  turn a loaded object's ``spec`` into frozen dataclasses with the API's defaults applied, so
  the Envoy renderer (:mod:`mesh.envoy.gateway`) never reads raw dicts.
* **Attachment** (:mod:`mesh.model.gateway_attach`) — what a controller writes into
  ``status``: which routes a Gateway listener accepts, which bind to a Service the GAMMA way,
  and the problems a user wants told (:func:`route_problems`).

hopscope serves the Gateways of class :data:`GATEWAY_CLASS` on its ingress Envoy.
"""

from __future__ import annotations

import re
from typing import Any

from mesh.model.gateway_api_schema import (
    FILTER_FIELDS,
    GATEWAY_SCHEMA,
    GRPC_ROUTE_SCHEMA,
    HTTP_ROUTE_SCHEMA,
    TLS_ROUTE_SCHEMA,
)
from mesh.model.gateway_attach import (
    GATEWAY_CLASS,
    Attachment,
    backend_problem,
    backend_services,
    gateway_attachments,
    intersect_hostnames,
    route_problems,
    service_routes,
)
from mesh.model.gateway_views import (
    BackendRef,
    GatewayView,
    HeaderChanges,
    Listener,
    Match,
    Mirror,
    ParentRef,
    PathChange,
    Redirect,
    Retry,
    Rewrite,
    RouteView,
    Rule,
    all_routes,
    duration_seconds,
    gateway_view,
    route_view,
)

__all__ = [
    "GATEWAY_CLASS",
    "GATEWAY_SCHEMA",
    "GRPC_ROUTE_SCHEMA",
    "HTTP_ROUTE_SCHEMA",
    "TLS_ROUTE_SCHEMA",
    "Attachment",
    "BackendRef",
    "GatewayView",
    "HeaderChanges",
    "Listener",
    "Match",
    "Mirror",
    "ParentRef",
    "PathChange",
    "Redirect",
    "Retry",
    "Rewrite",
    "RouteView",
    "Rule",
    "all_routes",
    "backend_problem",
    "backend_services",
    "check_gateway",
    "check_grpc_route",
    "check_http_route",
    "check_tls_route",
    "duration_seconds",
    "gateway_attachments",
    "gateway_view",
    "intersect_hostnames",
    "route_problems",
    "route_view",
    "service_routes",
]

GATEWAY_GROUP = "gateway.networking.k8s.io"

Problems = list[tuple[str, str]]

# -- validation beyond the schema -------------------------------------------------------------


def check_gateway(spec: dict[str, Any]) -> Problems:
    problems: Problems = []
    names: set[str] = set()
    for i, listener in enumerate(spec.get("listeners", [])):
        where = f"spec.listeners[{i}]"
        if listener["name"] in names:
            problems.append((f"{where}.name", f"duplicate listener name {listener['name']!r}"))
        names.add(listener["name"])
        protocol, tls = listener["protocol"], listener.get("tls")
        mode = (tls or {}).get("mode", "Terminate")
        if protocol == "HTTP" and tls is not None:
            problems.append((f"{where}.tls", "must not be set for protocol HTTP"))
        if protocol == "HTTPS" and mode != "Terminate":
            problems.append((f"{where}.tls.mode", "HTTPS listeners terminate TLS (use TLS)"))
        terminates = protocol == "HTTPS" or (protocol == "TLS" and mode == "Terminate" and tls)
        if terminates and not (tls or {}).get("certificateRefs"):
            problems.append((f"{where}.tls.certificateRefs", "needed to terminate TLS"))
        if protocol == "TLS" and tls is None:
            problems.append((f"{where}.tls", "required for protocol TLS (mode Passthrough)"))
        if protocol == "TLS" and mode == "Passthrough" and (tls or {}).get("certificateRefs"):
            problems.append((f"{where}.tls.certificateRefs", "must be empty for Passthrough"))
        ns = (listener.get("allowedRoutes") or {}).get("namespaces") or {}
        if ns.get("from") == "Selector" and not ns.get("selector"):
            problems.append((f"{where}.allowedRoutes.namespaces.selector", "needed by Selector"))
    return problems


def _check_filters(filters: list[dict[str, Any]], where: str) -> Problems:
    problems: Problems = []
    seen: set[str] = set()
    for j, flt in enumerate(filters):
        kind, here = flt["type"], f"{where}[{j}]"
        field = FILTER_FIELDS[kind]
        for other in FILTER_FIELDS.values():
            if other != field and other in flt:
                problems.append((f"{here}.{other}", f"must not be set for type {kind}"))
        if field not in flt:
            problems.append((f"{here}.{field}", f"required for type {kind}"))
        if kind in seen and kind != "RequestMirror":
            problems.append((f"{here}.type", f"{kind} cannot be repeated"))
        seen.add(kind)
        mirror = flt.get("requestMirror") or {}
        if "percent" in mirror and "fraction" in mirror:
            problems.append((f"{here}.requestMirror", "only one of percent or fraction"))
        frac = mirror.get("fraction")
        if frac and frac["numerator"] > frac.get("denominator", 100):
            problems.append((f"{here}.requestMirror.fraction", "numerator > denominator"))
        headers = flt.get("requestHeaderModifier") or flt.get("responseHeaderModifier") or {}
        named = [h["name"].lower() for key in ("set", "add") for h in headers.get(key, [])]
        named += [h.lower() for h in headers.get("remove", [])]
        dupes = sorted({h for h in named if named.count(h) > 1})
        if dupes:
            problems.append((f"{here}", f"header {dupes[0]!r} is modified more than once"))
        for key in ("urlRewrite", "requestRedirect"):
            path = (flt.get(key) or {}).get("path")
            if path:
                problems += _check_path_modifier(path, f"{here}.{key}.path")
    if {"RequestRedirect", "URLRewrite"} <= seen:
        problems.append((where, "RequestRedirect and URLRewrite cannot be combined"))
    return problems


def _check_path_modifier(path: dict[str, Any], where: str) -> Problems:
    wanted = "replaceFullPath" if path["type"] == "ReplaceFullPath" else "replacePrefixMatch"
    other = "replacePrefixMatch" if wanted == "replaceFullPath" else "replaceFullPath"
    if wanted not in path:
        return [(f"{where}.{wanted}", f"required for type {path['type']}")]
    if other in path:
        return [(f"{where}.{other}", f"must not be set for type {path['type']}")]
    return []


def _check_path(path: dict[str, Any], where: str) -> Problems:
    kind, value = path.get("type", "PathPrefix"), path.get("value", "/")
    if kind == "RegularExpression":
        try:
            re.compile(value)
        except re.error as exc:
            return [(f"{where}.value", f"not a regular expression: {exc}")]
        return []
    if not value.startswith("/"):
        return [(f"{where}.value", f"must start with '/' for type {kind}")]
    for bad in ("//", "/./", "/../", "%2f", "%2F", "#"):
        if bad in value:
            return [(f"{where}.value", f"must not contain {bad!r}")]
    if value.endswith(("/..", "/.")):
        return [(f"{where}.value", "must not end with '/.' or '/..'")]
    return []


def _check_rule_common(rule: dict[str, Any], where: str) -> Problems:
    problems = _check_filters(rule.get("filters", []), f"{where}.filters")
    for k, ref in enumerate(rule.get("backendRefs", [])):
        here = f"{where}.backendRefs[{k}]"
        problems += _check_backend_ref(ref, here)
        problems += _check_filters(ref.get("filters", []), f"{here}.filters")
    for k, flt in enumerate(rule.get("filters", [])):
        mirror = flt.get("requestMirror")
        if mirror:
            problems += _check_backend_ref(
                mirror["backendRef"], f"{where}.filters[{k}].requestMirror.backendRef"
            )
    return problems


def _check_backend_ref(ref: dict[str, Any], where: str) -> Problems:
    if ref.get("group", "") != "" or ref.get("kind", "Service") != "Service":
        return [(f"{where}.kind", 'only Services (group "", kind Service) are supported')]
    if "port" not in ref:
        return [(f"{where}.port", "required when referring to a Service")]
    return []


def _check_parent_refs(spec: dict[str, Any]) -> Problems:
    problems: Problems = []
    for i, ref in enumerate(spec.get("parentRefs", [])):
        group, kind = ref.get("group", GATEWAY_GROUP), ref.get("kind", "Gateway")
        if (group, kind) not in ((GATEWAY_GROUP, "Gateway"), ("", "Service")):
            problems.append(
                (f"spec.parentRefs[{i}].kind", "must be a Gateway or (GAMMA) a core Service")
            )
        if kind == "Service" and "sectionName" in ref:
            problems.append((f"spec.parentRefs[{i}].sectionName", "not used with a Service"))
    return problems


def check_http_route(spec: dict[str, Any]) -> Problems:
    problems = _check_parent_refs(spec)
    for i, rule in enumerate(spec.get("rules", [])):
        where = f"spec.rules[{i}]"
        matches = rule.get("matches", [])
        for m, match in enumerate(matches):
            if "path" in match:
                problems += _check_path(match["path"], f"{where}.matches[{m}].path")
            for kind in ("headers", "queryParams"):
                for h, item in enumerate(match.get(kind, [])):
                    if item.get("type") == "RegularExpression":
                        try:
                            re.compile(item["value"])
                        except re.error as exc:
                            problems.append(
                                (f"{where}.matches[{m}].{kind}[{h}].value", f"bad regex: {exc}")
                            )
        problems += _check_rule_common(rule, where)
        filters = rule.get("filters", [])
        if rule.get("backendRefs") and any(f["type"] == "RequestRedirect" for f in filters):
            problems.append((f"{where}.filters", "RequestRedirect cannot be used with backendRefs"))
        for j, flt in enumerate(filters):
            for key in ("urlRewrite", "requestRedirect"):
                path = (flt.get(key) or {}).get("path") or {}
                if path.get("type") == "ReplacePrefixMatch" and not _one_prefix_match(matches):
                    problems.append(
                        (
                            f"{where}.filters[{j}].{key}.path",
                            "ReplacePrefixMatch needs exactly one PathPrefix match in the rule",
                        )
                    )
        timeouts = rule.get("timeouts") or {}
        if "request" in timeouts and "backendRequest" in timeouts:
            request = duration_seconds(timeouts["request"])
            if request and duration_seconds(timeouts["backendRequest"]) > request:
                problems.append(
                    (f"{where}.timeouts.backendRequest", "cannot be longer than request")
                )
    if sum(len(r.get("matches", [])) for r in spec.get("rules", [])) > 128:
        problems.append(("spec.rules", "more than 128 matches in all rules"))
    return problems


def _one_prefix_match(matches: list[dict[str, Any]]) -> bool:
    if not matches:  # the default match: PathPrefix /
        return True
    path = matches[0].get("path") or {"type": "PathPrefix"}
    return len(matches) == 1 and path.get("type", "PathPrefix") == "PathPrefix"


def check_grpc_route(spec: dict[str, Any]) -> Problems:
    problems = _check_parent_refs(spec)
    for i, rule in enumerate(spec.get("rules", [])):
        where = f"spec.rules[{i}]"
        for m, match in enumerate(rule.get("matches", [])):
            method = match.get("method")
            if method is not None and not (method.get("service") or method.get("method")):
                problems.append((f"{where}.matches[{m}].method", "needs service or method"))
            if method and method.get("type", "Exact") == "Exact":
                for key in ("service", "method"):
                    if "/" in method.get(key, ""):
                        problems.append((f"{where}.matches[{m}].method.{key}", "must not hold /"))
        problems += _check_rule_common(rule, where)
    return problems


def check_tls_route(spec: dict[str, Any]) -> Problems:
    problems = _check_parent_refs(spec)
    for i, rule in enumerate(spec.get("rules", [])):
        for k, ref in enumerate(rule.get("backendRefs", [])):
            problems += _check_backend_ref(ref, f"spec.rules[{i}].backendRefs[{k}]")
    return problems

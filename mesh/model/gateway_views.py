"""Typed views of Gateway API objects: frozen dataclasses with the API's defaults applied.

The Envoy renderer (:mod:`mesh.envoy.gateway`) and the attachment rules
(:mod:`mesh.model.gateway_attach`) read these, never a raw ``spec``: a match without a path is
``PathPrefix /``, a backend without a weight weighs 1, a redirect without a code is 302, a
mirror without ``percent``/``fraction`` copies every request. A GRPCRoute method match is
already the HTTP/2 ``:path`` it stands for (``/service/method``), so one renderer serves both
route kinds.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from mesh.model.types import ApiObject, ClusterState, Gateway, GRPCRoute, HTTPRoute, TLSRoute


def duration_seconds(text: str) -> float:
    """A GEP-2257 duration (``1h30m``, ``250ms``, ``0s``) in seconds."""
    parts = re.findall(r"([0-9]+)(ms|h|m|s)", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{text!r} is not a duration like 500ms, 10s or 1m30s")
    scale = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(int(n) * scale[u] for n, u in parts)


@dataclass(frozen=True)
class ParentRef:
    kind: str
    """``Gateway`` or ``Service`` (GAMMA)."""
    namespace: str
    name: str
    section_name: str | None
    port: int | None

    @property
    def is_service(self) -> bool:
        return self.kind == "Service"


@dataclass(frozen=True)
class BackendRef:
    """A Service port a rule sends to (or mirrors to)."""

    namespace: str
    name: str
    port: int
    weight: int = 1
    where: str = ""
    """The field path of the reference, for messages."""


@dataclass(frozen=True)
class Match:
    """One match of a rule (all conditions ANDed); defaults applied."""

    path_type: str = "PathPrefix"
    path: str = "/"
    headers: tuple[tuple[str, str, str], ...] = ()
    """``(type, name, value)`` — ``Exact`` or ``RegularExpression``."""
    query_params: tuple[tuple[str, str, str], ...] = ()
    method: str | None = None
    grpc: bool = False
    """A GRPCRoute match: ``path``/``path_type`` already hold the ``/service/method`` form."""


@dataclass(frozen=True)
class HeaderChanges:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class Mirror:
    backend: BackendRef
    percent: float = 100.0


@dataclass(frozen=True)
class PathChange:
    type: str
    """``ReplaceFullPath`` or ``ReplacePrefixMatch``."""
    value: str


@dataclass(frozen=True)
class Rewrite:
    hostname: str | None = None
    path: PathChange | None = None


@dataclass(frozen=True)
class Redirect:
    scheme: str | None = None
    hostname: str | None = None
    path: PathChange | None = None
    port: int | None = None
    status_code: int = 302


@dataclass(frozen=True)
class Retry:
    codes: tuple[int, ...] = ()
    attempts: int = 1
    """Retries after the first try; unset in the spec means Envoy's default, 1."""
    backoff: str | None = None


@dataclass(frozen=True)
class Rule:
    index: int
    name: str | None
    matches: tuple[Match, ...]
    backends: tuple[BackendRef, ...]
    request_headers: HeaderChanges | None = None
    response_headers: HeaderChanges | None = None
    mirrors: tuple[Mirror, ...] = ()
    rewrite: Rewrite | None = None
    redirect: Redirect | None = None
    request_timeout: str | None = None
    backend_timeout: str | None = None
    retry: Retry | None = None


@dataclass(frozen=True)
class RouteView:
    kind: str
    """``HTTPRoute``, ``GRPCRoute`` or ``TLSRoute``."""
    namespace: str
    name: str
    created: float
    hostnames: tuple[str, ...]
    parents: tuple[ParentRef, ...]
    rules: tuple[Rule, ...]

    @property
    def label(self) -> str:
        """``HTTPRoute shop/catalog-canary``: how traces and messages name the route."""
        return f"{self.kind} {self.namespace}/{self.name}"


@dataclass(frozen=True)
class Listener:
    name: str
    hostname: str | None
    port: int
    protocol: str
    """``HTTP``, ``HTTPS`` or ``TLS``."""
    tls_mode: str | None
    """``Terminate``/``Passthrough`` for HTTPS and TLS listeners, else None."""
    certificate_refs: tuple[tuple[str, str], ...]
    """``(namespace, Secret name)``."""
    routes_from: str = "Same"
    routes_selector: dict[str, Any] | None = None
    route_kinds: tuple[str, ...] = ()
    """Allowed route kinds; empty means the protocol's default kinds."""

    def allows_kind(self, kind: str) -> bool:
        if self.route_kinds:
            return kind in self.route_kinds
        default = {"HTTP": ("HTTPRoute", "GRPCRoute"), "HTTPS": ("HTTPRoute", "GRPCRoute")}
        return kind in default.get(self.protocol, ("TLSRoute",))


@dataclass(frozen=True)
class GatewayView:
    namespace: str
    name: str
    class_name: str
    listeners: tuple[Listener, ...]


def gateway_view(gw: Gateway) -> GatewayView:
    listeners = []
    for item in gw.spec.get("listeners", []):
        tls = item.get("tls")
        allowed = item.get("allowedRoutes") or {}
        namespaces = allowed.get("namespaces") or {}
        listeners.append(
            Listener(
                name=item["name"],
                hostname=item.get("hostname"),
                port=item["port"],
                protocol=item["protocol"],
                tls_mode=(tls or {}).get("mode", "Terminate") if tls is not None else None,
                certificate_refs=tuple(
                    (ref.get("namespace", gw.namespace), ref["name"])
                    for ref in (tls or {}).get("certificateRefs", [])
                ),
                routes_from=namespaces.get("from", "Same"),
                routes_selector=namespaces.get("selector"),
                route_kinds=tuple(k["kind"] for k in allowed.get("kinds", [])),
            )
        )
    return GatewayView(gw.namespace, gw.name, gw.spec.get("gatewayClassName", ""), tuple(listeners))


def _backend(ref: dict[str, Any], namespace: str, where: str) -> BackendRef:
    return BackendRef(
        namespace=ref.get("namespace", namespace),
        name=ref["name"],
        port=int(ref.get("port", 0)),
        weight=int(ref.get("weight", 1)),
        where=where,
    )


def _headers(data: dict[str, Any] | None) -> HeaderChanges | None:
    if data is None:
        return None
    return HeaderChanges(
        set=tuple((h["name"], h["value"]) for h in data.get("set", [])),
        add=tuple((h["name"], h["value"]) for h in data.get("add", [])),
        remove=tuple(data.get("remove", [])),
    )


def _path_change(data: dict[str, Any] | None) -> PathChange | None:
    if not data:
        return None
    key = "replaceFullPath" if data["type"] == "ReplaceFullPath" else "replacePrefixMatch"
    return PathChange(data["type"], data.get(key, ""))


def _http_match(data: dict[str, Any]) -> Match:
    path = data.get("path") or {}
    return Match(
        path_type=path.get("type", "PathPrefix"),
        path=path.get("value", "/"),
        headers=tuple(
            (h.get("type", "Exact"), h["name"], h["value"]) for h in data.get("headers", [])
        ),
        query_params=tuple(
            (q.get("type", "Exact"), q["name"], q["value"]) for q in data.get("queryParams", [])
        ),
        method=data.get("method"),
    )


def _grpc_match(data: dict[str, Any]) -> Match:
    """A gRPC method as the HTTP/2 ``:path`` it becomes: ``/<service>/<method>``."""
    method = data.get("method") or {}
    headers = tuple(
        (h.get("type", "Exact"), h["name"], h["value"]) for h in data.get("headers", [])
    )
    service, name = method.get("service"), method.get("method")
    if method.get("type", "Exact") == "RegularExpression":
        path = f"/{service or '[^/]+'}/{name or '[^/]+'}"
        return Match("RegularExpression", path, headers, grpc=True)
    if service and name:
        return Match("Exact", f"/{service}/{name}", headers, grpc=True)
    if service:
        return Match("PathPrefix", f"/{service}", headers, grpc=True)
    if name:
        return Match("RegularExpression", f"/[^/]+/{re.escape(name)}", headers, grpc=True)
    return Match("PathPrefix", "/", headers, grpc=True)


def _rule(kind: str, index: int, data: dict[str, Any], namespace: str) -> Rule:
    where = f"spec.rules[{index}]"
    grpc = kind == "GRPCRoute"
    raw_matches = data.get("matches") or [{}]
    matches = tuple(_grpc_match(m) if grpc else _http_match(m) for m in raw_matches)
    backends = tuple(
        _backend(ref, namespace, f"{where}.backendRefs[{k}]")
        for k, ref in enumerate(data.get("backendRefs", []))
    )
    by_type = {f["type"]: f for f in data.get("filters", [])}
    mirrors = []
    for k, flt in enumerate(data.get("filters", [])):
        if flt["type"] != "RequestMirror":
            continue
        cfg = flt["requestMirror"]
        frac = cfg.get("fraction")
        percent = (
            cfg.get("percent", 100)
            if frac is None
            else (100.0 * frac["numerator"] / frac.get("denominator", 100))
        )
        ref = _backend(cfg["backendRef"], namespace, f"{where}.filters[{k}].requestMirror")
        mirrors.append(Mirror(ref, float(percent)))
    rewrite = redirect = None
    if "URLRewrite" in by_type:
        cfg = by_type["URLRewrite"]["urlRewrite"]
        rewrite = Rewrite(cfg.get("hostname"), _path_change(cfg.get("path")))
    if "RequestRedirect" in by_type:
        cfg = by_type["RequestRedirect"]["requestRedirect"]
        redirect = Redirect(
            cfg.get("scheme"),
            cfg.get("hostname"),
            _path_change(cfg.get("path")),
            cfg.get("port"),
            cfg.get("statusCode", 302),
        )
    timeouts = data.get("timeouts") or {}
    retry = None
    if "retry" in data:
        cfg = data["retry"]
        retry = Retry(tuple(cfg.get("codes", [])), cfg.get("attempts", 1), cfg.get("backoff"))
    return Rule(
        index=index,
        name=data.get("name"),
        matches=matches,
        backends=backends,
        request_headers=_headers(
            by_type.get("RequestHeaderModifier", {}).get("requestHeaderModifier")
        ),
        response_headers=_headers(
            by_type.get("ResponseHeaderModifier", {}).get("responseHeaderModifier")
        ),
        mirrors=tuple(mirrors),
        rewrite=rewrite,
        redirect=redirect,
        request_timeout=timeouts.get("request"),
        backend_timeout=timeouts.get("backendRequest"),
        retry=retry,
    )


def route_view(obj: HTTPRoute | GRPCRoute | TLSRoute) -> RouteView:
    kind = type(obj).__name__
    parents = tuple(
        ParentRef(
            kind=ref.get("kind", "Gateway"),
            namespace=ref.get("namespace", obj.namespace),
            name=ref["name"],
            section_name=ref.get("sectionName"),
            port=ref.get("port"),
        )
        for ref in obj.spec.get("parentRefs", [])
    )
    rules = obj.spec.get("rules") or ([{}] if kind != "TLSRoute" else [])
    return RouteView(
        kind=kind,
        namespace=obj.namespace,
        name=obj.name,
        created=obj.created,
        hostnames=tuple(obj.spec.get("hostnames", [])),
        parents=parents,
        rules=tuple(_rule(kind, i, r, obj.namespace) for i, r in enumerate(rules)),
    )


def all_routes(state: ClusterState) -> list[RouteView]:
    """Every route in ``state``, oldest first (the API's tie-break order)."""
    objects: list[ApiObject] = [*state.http_routes, *state.grpc_routes, *state.tls_routes]
    views = [route_view(obj) for obj in objects]  # type: ignore[arg-type]
    return sorted(views, key=lambda r: (r.created, r.namespace, r.name))

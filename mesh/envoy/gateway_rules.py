"""One Gateway API route rule as Envoy routes: the translation the ingress gateway and the
sidecars (:mod:`mesh.envoy.gateway`) share.

* matches → ``RouteMatch`` (``path``/``path_separated_prefix``/``safe_regex``, headers,
  query parameters, ``:method``; GRPCRoute methods as the ``/service/method`` path);
* backendRefs → one cluster or ``weighted_clusters``; the share of invalid backends (a
  Service that does not exist) is split off with ``runtime_fraction`` into a route that
  answers 500, as the API requires;
* filters → header changes, ``request_mirror_policies``, ``host_rewrite_literal`` and
  ``regex_rewrite``, ``redirect``;
* ``timeouts.request`` → the route timeout; ``timeouts.backendRequest`` → the retry policy's
  ``per_try_timeout`` (retried: ``reset`` is in ``retry_on``, without it Envoy does not retry
  a try its per-try timeout cut), or the route timeout when nothing is retried; ``retry`` →
  ``retry_policy``.

:func:`precedence` orders matches as the API says: Exact path, then RegularExpression, then
the longest PathPrefix, then method, most headers, most query parameters, oldest route,
``namespace/name``, rule order.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from mesh.model.gateway_api import (
    BackendRef,
    HeaderChanges,
    Match,
    PathChange,
    RouteView,
    Rule,
    duration_seconds,
)

DEFAULT_ROUTE_TIMEOUT = "15s"
"""A rule's timeout when it sets no ``timeouts.request`` (the Ingress routes' timeout too)."""

ROUTE_TAG = "hopscope.route"
"""Span tag naming the route that decided (``HTTPRoute shop/catalog-canary``)."""

RULE_TAG = "hopscope.route.rule"
"""Span tag with the rule's name, or its index when it has none."""

ClusterOf = Callable[[BackendRef], str | None]
"""The Envoy cluster for a backend, or None when the backend is invalid."""


def _string_match(kind: str, value: str) -> dict[str, Any]:
    if kind == "RegularExpression":
        return {"safe_regex": {"regex": value}}
    return {"exact": value}


def route_match(match: Match, extra_headers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The Envoy ``RouteMatch`` of one Gateway API match."""
    out: dict[str, Any] = {}
    if match.path_type == "Exact":
        out["path"] = match.path
    elif match.path_type == "RegularExpression":
        out["safe_regex"] = {"regex": match.path}
    else:
        # PathPrefix matches whole path elements, like Envoy's path_separated_prefix.
        prefix = match.path.rstrip("/")
        out.update({"path_separated_prefix": prefix} if prefix else {"prefix": "/"})
    headers = [
        {"name": name.lower(), "string_match": _string_match(kind, value)}
        for kind, name, value in match.headers
    ]
    if match.method:
        headers.append({"name": ":method", "string_match": {"exact": match.method}})
    headers += extra_headers or []
    if headers:
        out["headers"] = headers
    if match.query_params:
        out["query_parameters"] = [
            {"name": name, "string_match": _string_match(kind, value)}
            for kind, name, value in match.query_params
        ]
    if match.grpc:
        out["grpc"] = {}
    return out


def precedence(route: RouteView, rule: Rule, match: Match, index: int) -> tuple[Any, ...]:
    """Sort key of one match among all routes of a host (lower wins)."""
    rank = {"Exact": 0, "RegularExpression": 1}.get(match.path_type, 2)
    return (
        rank,
        -len(match.path.rstrip("/")) if rank == 2 else 0,
        match.method is None,
        -len(match.headers),
        -len(match.query_params),
        route.created,
        f"{route.namespace}/{route.name}",
        rule.index,
        index,
    )


def _header_values(changes: HeaderChanges) -> list[dict[str, Any]]:
    out = [
        {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
        for k, v in changes.set
    ]
    out += [
        {"header": {"key": k, "value": v}, "append_action": "APPEND_IF_EXISTS_OR_ADD"}
        for k, v in changes.add
    ]
    return out


def _seconds(text: str) -> str:
    return f"{duration_seconds(text):.3f}s"


def _fraction(percent: float) -> dict[str, Any]:
    return {"numerator": round(percent * 10_000), "denominator": "MILLION"}


def _path_rewrite(change: PathChange, match: Match) -> dict[str, Any]:
    """``ReplaceFullPath``/``ReplacePrefixMatch`` as an Envoy ``regex_rewrite`` (the query
    string is kept: Envoy rewrites the path part only)."""
    if change.type == "ReplaceFullPath":
        return {"regex_rewrite": {"pattern": {"regex": "^/.*$"}, "substitution": change.value}}
    prefix = match.path.rstrip("/") if match.path_type == "PathPrefix" else ""
    replacement = change.value.rstrip("/")
    if not replacement:  # /foo/bar → /bar, /foo → /
        return {
            "regex_rewrite": {
                "pattern": {"regex": f"^{re.escape(prefix)}/*"},
                "substitution": "/",
            }
        }
    pattern = f"^{re.escape(prefix)}" if prefix else "^/"
    substitution = replacement if prefix else replacement + "/"
    return {"regex_rewrite": {"pattern": {"regex": pattern}, "substitution": substitution}}


_REDIRECT_CODES = {
    301: "MOVED_PERMANENTLY",
    302: "FOUND",
    303: "SEE_OTHER",
    307: "TEMPORARY_REDIRECT",
    308: "PERMANENT_REDIRECT",
}


def _redirect(rule: Rule, match: Match) -> dict[str, Any]:
    assert rule.redirect is not None
    red = rule.redirect
    out: dict[str, Any] = {"response_code": _REDIRECT_CODES[red.status_code]}
    if red.scheme:
        out["scheme_redirect"] = red.scheme
    if red.hostname:
        out["host_redirect"] = red.hostname
    if red.port:
        out["port_redirect"] = red.port
    if red.path and red.path.type == "ReplaceFullPath":
        out["path_redirect"] = red.path.value
    elif red.path:
        out.update(_path_rewrite(red.path, match))
    return out


def _retry_policy(rule: Rule) -> dict[str, Any] | None:
    retry = rule.retry
    if retry is None or retry.attempts == 0:
        return None
    # Failures before the backend saw the request are always retried (the API's SHOULD);
    # a try cut by backendRequest is retried too ("reset" covers Envoy's per-try timeout).
    retry_on = ["connect-failure", "refused-stream"]
    policy: dict[str, Any] = {"num_retries": retry.attempts}
    if retry.codes:
        retry_on.append("retriable-status-codes")
        policy["retriable_status_codes"] = list(retry.codes)
    if rule.backend_timeout:
        retry_on.append("reset")
        policy["per_try_timeout"] = _seconds(rule.backend_timeout)
    if retry.backoff:
        policy["retry_back_off"] = {"base_interval": _seconds(retry.backoff)}
    policy["retry_on"] = ",".join(retry_on)
    return policy


def _timeout(rule: Rule) -> str:
    request = rule.request_timeout
    backend = duration_seconds(rule.backend_timeout) if rule.backend_timeout else 0.0
    if backend and _retry_policy(rule) is None:
        # One try only: the try's limit is the request's, unless the request's is shorter.
        limit = duration_seconds(request) if request is not None else 0.0
        if not limit or backend < limit:
            return f"{backend:.3f}s"
    if request is not None:
        return _seconds(request)
    return DEFAULT_ROUTE_TIMEOUT


def _route_action(
    rule: Rule, match: Match, valid: list[tuple[str, int]], mirrors: list[tuple[str, float]]
) -> dict[str, Any]:
    action: dict[str, Any] = {}
    if len(valid) == 1:
        action["cluster"] = valid[0][0]
    else:
        action["weighted_clusters"] = {
            "clusters": [{"name": name, "weight": weight} for name, weight in valid]
        }
    action["timeout"] = _timeout(rule)
    retry = _retry_policy(rule)
    if retry:
        action["retry_policy"] = retry
    if mirrors:
        policies = []
        for cluster, percent in mirrors:
            policy: dict[str, Any] = {"cluster": cluster}
            if percent < 100:
                policy["runtime_fraction"] = {"default_value": _fraction(percent)}
            policies.append(policy)
        action["request_mirror_policies"] = policies
    if rule.rewrite and rule.rewrite.hostname:
        action["host_rewrite_literal"] = rule.rewrite.hostname
    if rule.rewrite and rule.rewrite.path:
        action.update(_path_rewrite(rule.rewrite.path, match))
    return action


def span_tags(tags: dict[str, str]) -> dict[str, Any]:
    return {"custom_tags": [{"tag": k, "literal": {"value": v}} for k, v in tags.items()]}


def fail_response(status: int, text: str) -> dict[str, Any]:
    return {"status": status, "body": {"inline_string": text + "\n"}}


def rule_routes(
    route: RouteView,
    rule: Rule,
    match: Match,
    cluster_of: ClusterOf,
    operation: str | None = None,
    extra_headers: list[dict[str, Any]] | None = None,
    tags: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The Envoy routes of one match of one rule: one route, or two when part of the
    traffic belongs to invalid backends (that share answers 500 first, then the rest).
    ``tags``: further literal span tags for the route (after ``hopscope.route``)."""
    base: dict[str, Any] = {"match": route_match(match, extra_headers)}
    if operation:
        base["decorator"] = {"operation": operation}
    rule_label = rule.name or str(rule.index)
    base["tracing"] = span_tags({ROUTE_TAG: route.label, RULE_TAG: rule_label, **(tags or {})})
    if rule.request_headers:
        if rule.request_headers.set or rule.request_headers.add:
            base["request_headers_to_add"] = _header_values(rule.request_headers)
        if rule.request_headers.remove:
            base["request_headers_to_remove"] = list(rule.request_headers.remove)
    if rule.response_headers:
        if rule.response_headers.set or rule.response_headers.add:
            base["response_headers_to_add"] = _header_values(rule.response_headers)
        if rule.response_headers.remove:
            base["response_headers_to_remove"] = list(rule.response_headers.remove)
    if rule.redirect is not None:
        return [{**base, "redirect": _redirect(rule, match)}]
    valid: list[tuple[str, int]] = []
    invalid_weight, reasons = 0, []
    for ref in rule.backends:
        cluster = cluster_of(ref)
        if cluster is None:
            invalid_weight += ref.weight
            reasons.append(f"{ref.namespace}/{ref.name}:{ref.port}")
        elif ref.weight > 0:
            valid.append((cluster, ref.weight))
    mirrors = [(c, m.percent) for m in rule.mirrors if (c := cluster_of(m.backend)) is not None]
    valid_weight = sum(w for _, w in valid)
    why = f"{route.label} rule {rule_label}: backend " + (
        ", ".join(reasons) + " is not a usable Service" if reasons else "weights are all 0"
    )
    if not rule.backends:
        why = f"{route.label} rule {rule_label}: no backendRefs"
    if not valid_weight:
        return [{**base, "direct_response": fail_response(500, why)}]
    forward = {**base, "route": _route_action(rule, match, valid, mirrors)}
    if not invalid_weight:
        return [forward]
    share = 100.0 * invalid_weight / (invalid_weight + valid_weight)
    failing = {
        **base,
        "match": {
            **base["match"],
            "runtime_fraction": {
                "default_value": _fraction(share),
                "runtime_key": f"hopscope.invalid_backends.{route.namespace}.{route.name}."
                f"{rule.index}",
            },
        },
        "direct_response": fail_response(500, why),
    }
    return [failing, forward]


def ordered(entries: list[tuple[RouteView, Rule, Match, int]]) -> list[tuple[Any, ...]]:
    unique = {(e[0].label, e[1].index, e[3]): e for e in entries}
    return sorted(unique.values(), key=lambda e: precedence(*e))

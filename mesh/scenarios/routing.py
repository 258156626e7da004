"""Break-it scenarios of the mesh's routing and resilience: a canary split, mirrored traffic,
retries over a flaky pod, and a circuit breaker that opens.

The routes are Gateway API objects bound to the catalog Service (GAMMA: ``parentRefs``
``kind: Service``), rendered into every caller's sidecar; the circuit breaker is a
``DestinationRule``. Each check reads the traces of the requests the scenario sent.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from mesh import addresses
from mesh.scenarios.base import BlameCheck, Context, Finding, ScenarioError, lab_docs, spans_of
from mesh.scenarios.library import SCENARIOS, Scenario, _catalog_with, _reapply
from mesh.traffic.engine import Outcome

CATALOG_V2 = "gamma-catalog-v2.yaml"
DASHBOARD = "Mesh: mTLS, retries and canaries"


def _calls_catalog(view: dict[str, Any]) -> bool:
    return any(
        s["attributes"].get("k8s.service.name") == "catalog"
        or str(s["attributes"].get("hopscope.route", "")).startswith("HTTPRoute shop/catalog")
        for s in spans_of(view, "sidecar-outbound")
    )


def _decided_by(view: dict[str, Any], route: str) -> list[dict[str, Any]]:
    """The callers' sidecar-outbound spans whose request ``route`` decided."""
    return [
        s
        for s in spans_of(view, "sidecar-outbound")
        if s["attributes"].get("hopscope.route") == route
    ]


def _routed(ctx: Context, route: str) -> None:
    """Until the frontend's sidecars send catalog calls by ``route``."""
    until_outbound(ctx, lambda a: a.get("hopscope.route") == route, route)


def until_outbound(
    ctx: Context,
    test: Callable[[dict[str, Any]], bool],
    what: str,
    timeout: float = 60,
    in_a_row: int = 8,
) -> None:
    """Until the frontend's sidecar-outbound spans pass ``test`` (their attributes) — the
    sidecars took a new policy or route (files reach each within a second or so of the
    apply): ``in_a_row`` requests in a row, each on a new connection so that every
    frontend pod gets its turn."""
    ctx.say(f"waiting for every caller's sidecar to take {what}")
    deadline = time.monotonic() + timeout
    streak = 0
    while time.monotonic() < deadline and streak < in_a_row:
        outcomes = ctx.send("/", 1, rps=5, new_connections=True, announce=False)
        outcome = outcomes[0] if outcomes else None
        view = None
        if outcome and outcome.trace_id:
            # Once the frontend's call to the catalog is in (spans arrive within ~0.2 s).
            view = ctx.trace(outcome.trace_id, _calls_catalog, timeout=3)
        routed = any(test(s["attributes"]) for s in spans_of(view or {}, "sidecar-outbound"))
        streak = streak + 1 if routed else 0
        if not routed:
            time.sleep(0.3)
    if streak < in_a_row:
        raise ScenarioError(f"the sidecars did not take {what} within {timeout:g} s")


def _with_v2(ctx: Context, fault: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """catalog-v2 (one pod) and the catalog-v1/-v2 Services; ``fault``: env for v2."""
    docs = copy.deepcopy(lab_docs(CATALOG_V2))
    if fault:
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        container.setdefault("env", []).extend({"name": k, "value": v} for k, v in fault.items())
    ctx.apply(docs, CATALOG_V2)
    ctx.say("catalog-v2 deployed next to catalog (v1)")
    ctx.wait_ready("shop", "catalog", 3)
    return docs


def _without_v2(ctx: Context, routes: list[str]) -> None:
    for file in routes:
        ctx.delete(lab_docs(file), file)
    ctx.delete(lab_docs(CATALOG_V2), CATALOG_V2)
    ctx.wait_ready("shop", "catalog", 2)


def _version(view: dict[str, Any], span: dict[str, Any]) -> str | None:
    """Which catalog version answered the outbound span: the pod of the catalog inbound span
    below it (catalog-v2-… or the shipped catalog-…)."""
    by_parent: dict[str, list[dict[str, Any]]] = {}
    for s in view.get("spans", []):
        by_parent.setdefault(s["parent_span_id"], []).append(s)
    for child in by_parent.get(span["span_id"], []):
        a = child["attributes"]
        pod = str(a.get("k8s.pod.name", ""))
        if a.get("hopscope.hop") == "sidecar-inbound" and pod.startswith("catalog"):
            return "v2" if pod.startswith("catalog-v2") else "v1"
    return None


class CanaryTenPercent(Scenario):
    name = "canary-10-percent"
    title = "A canary release: 10 % of the catalog calls go to v2"
    story = (
        "catalog v2 is deployed next to v1, and an HTTPRoute bound to the catalog Service "
        "(the Gateway API's mesh binding, GAMMA) splits the callers' requests 90/10 by "
        "weight. kube-proxy plays no part in the split: each caller's sidecar picks a "
        "backend Service per request (catalog-v1 or catalog-v2) and only then does kube-proxy "
        "pick a pod of it. The split is measured from the traces: which version's sidecar "
        "answered each call."
    )
    breaks = "deploys catalog-v2 and HTTPRoute shop/catalog-canary (90 catalog-v1, 10 catalog-v2)"
    traffic = "200 requests to http://shop.local/"
    look_for = (
        "the frontend's sidecar-outbound span: hopscope.route = HTTPRoute shop/catalog-canary",
        "below it, the catalog sidecar-inbound span on a catalog-v2-… pod for about 1 call in 10",
        "Envoy metric envoy_cluster_upstream_rq_total per catalog-v1 / catalog-v2 cluster",
    )
    dashboard = DASHBOARD
    route = "HTTPRoute shop/catalog-canary"
    share = 0.10

    def inject(self, ctx: Context) -> None:
        _with_v2(ctx)
        ctx.apply(lab_docs("gamma-canary-10-percent.yaml"), self.name)
        _routed(ctx, self.route)

    def drive(self, ctx: Context) -> list[Outcome]:
        return ctx.send("/", 200, rps=40)

    def check(self, ctx: Context, outcomes: list[Outcome]) -> Finding:
        versions: Counter[str] = Counter()
        for o in outcomes:
            view = ctx.trace(o.trace_id, lambda v: bool(spans_of(v, "sidecar-inbound")), 5)
            for span in _decided_by(view or {}, self.route):
                version = _version(view or {}, span)
                if version:
                    versions[version] += 1
        n = versions["v1"] + versions["v2"]
        if n < 50:
            return Finding(False, f"too few catalog calls read from traces ({n}): {dict(versions)}")
        measured = versions["v2"] / n
        # The tolerance: three standard deviations of a share over n independent picks.
        tolerance = 3 * math.sqrt(self.share * (1 - self.share) / n)
        ok = abs(measured - self.share) <= tolerance
        verdict = (
            f"catalog v2 answered {versions['v2']} of {n} calls ({measured:.1%}); the route "
            f"asks for {self.share:.0%} ± {tolerance:.1%} (three standard deviations for {n} calls)"
        )
        return Finding(ok, verdict, [verdict], [o.trace_id for o in outcomes[:5]])

    def restore(self, ctx: Context) -> None:
        _without_v2(ctx, ["gamma-canary-10-percent.yaml"])


class MirrorToV2(Scenario):
    name = "mirror-to-v2"
    title = "Mirror every catalog call to v2; callers only ever see v1"
    story = (
        "Before sending v2 real users, the team mirrors traffic to it: an HTTPRoute's "
        "RequestMirror filter has each caller's sidecar send a copy of every catalog call to "
        "catalog-v2 and throw its answer away (fire and forget). The copy carries the same "
        "trace context, so each trace shows both: the v1 call that answered the user and "
        "the shadow call to v2 (its Host ends in -shadow)."
    )
    breaks = "deploys catalog-v2 and HTTPRoute shop/catalog-mirror (all to v1, a copy to v2)"
    traffic = "20 requests to http://shop.local/"
    look_for = (
        "each trace: a catalog sidecar-inbound span on a catalog-… (v1) pod that answered, and "
        "one on a catalog-v2-… pod whose host ends in -shadow",
        "the user's status never depends on v2",
    )
    dashboard = DASHBOARD
    route = "HTTPRoute shop/catalog-mirror"

    def inject(self, ctx: Context) -> None:
        _with_v2(ctx)
        ctx.apply(lab_docs("gamma-mirror-to-v2.yaml"), self.name)
        _routed(ctx, self.route)

    def drive(self, ctx: Context) -> list[Outcome]:
        return ctx.send("/", 20, rps=10)

    def check(self, ctx: Context, outcomes: list[Outcome]) -> Finding:
        answered_v1 = mirrored = 0
        for o in outcomes:
            view = ctx.trace(o.trace_id, lambda v: len(spans_of(v, "sidecar-inbound")) >= 3, 6)
            if view is None:
                continue
            pods = [
                str(s["attributes"].get("k8s.pod.name", ""))
                for s in spans_of(view, "sidecar-inbound")
            ]
            if any(p.startswith("catalog-v2") for p in pods):
                mirrored += 1
            answers = [_version(view, s) for s in _decided_by(view, self.route)]
            if "v1" in answers:
                answered_v1 += 1
        ok_status = sum(1 for o in outcomes if o.status == 200)
        ok = ok_status == len(outcomes) and mirrored >= 0.8 * len(outcomes) and answered_v1 > 0
        verdict = (
            f"{ok_status}/{len(outcomes)} requests answered 200 by v1 ({answered_v1} traces show "
            f"the v1 answer); {mirrored} traces hold the mirrored call to catalog-v2"
        )
        return Finding(ok, verdict, [verdict], [o.trace_id for o in outcomes[:5]])

    def restore(self, ctx: Context) -> None:
        _without_v2(ctx, ["gamma-mirror-to-v2.yaml"])


def _p99_ms(outcomes: list[Outcome]) -> float:
    latencies = sorted(o.latency_us / 1000 for o in outcomes)
    if not latencies:
        return 0.0
    return latencies[min(len(latencies) - 1, math.ceil(0.99 * len(latencies)) - 1)]


class RetriesHideAFlakyPod(Scenario):
    name = "retries-hide-a-flaky-pod"
    title = "Retries hide a flaky pod: fewer errors, a longer tail"
    story = (
        "One of three catalog pods (a v2 pod behind the same Service) answers 500 to every "
        "request. Without retries about a third of the shop's requests fail. Then an "
        "HTTPRoute bound to the catalog Service adds retries (2 more tries on 5xx, 25 ms "
        "backoff); each try is a new connection, so kube-proxy may pick a healthy pod. Errors "
        "almost vanish — and the tail grows, because a retried call pays for the failed try. "
        "In a trace, a retried call is one frontend sidecar span with a kube-proxy hop per "
        "try, and the retry's hops say hopscope.retry.attempt = 2."
    )
    breaks = (
        "deploys catalog-v2 with HOPSCOPE_FAULT_ERROR_RATE=1 (one bad pod of three), measures, "
        "then applies HTTPRoute shop/catalog-retries and measures again"
    )
    traffic = "twice 60 requests to http://shop.local/ (before and after the retries)"
    look_for = (
        "before: ~1/3 of the requests fail, blamed on the catalog-v2 app",
        "after: failures near 0, p99 latency higher",
        "a retried call's trace: two kube-proxy hops under one sidecar-outbound span; "
        "hopscope.retry.attempt=2 on the second try's sidecar-inbound span",
    )
    dashboard = DASHBOARD
    route = "HTTPRoute shop/catalog-retries"

    def inject(self, ctx: Context) -> None:
        _with_v2(ctx, {"HOPSCOPE_FAULT_ERROR_RATE": "1"})

    def drive(self, ctx: Context) -> list[Outcome]:
        self.before = ctx.send("/", 60, rps=20, new_connections=True)
        ctx.apply(lab_docs("gamma-retries.yaml"), self.name)
        _routed(ctx, self.route)
        return ctx.send("/", 60, rps=20, new_connections=True)

    def check(self, ctx: Context, outcomes: list[Outcome]) -> Finding:
        before = getattr(self, "before", [])
        bad_before = sum(1 for o in before if o.status != 200)
        bad_after = sum(1 for o in outcomes if o.status != 200)
        retried = []
        for o in outcomes:
            view = ctx.trace(o.trace_id, lambda v: bool(spans_of(v, "sidecar-inbound")), 4)
            attempts = {
                str(s["attributes"].get("hopscope.retry.attempt"))
                for s in spans_of(view or {}, "sidecar-inbound")
            }
            if "2" in attempts:
                retried.append(o.trace_id)
            if len(retried) >= 3:
                break
        p99_before, p99_after = _p99_ms(before), _p99_ms(outcomes)
        mean_before = statistics.fmean([o.latency_us / 1000 for o in before] or [0])
        mean_after = statistics.fmean([o.latency_us / 1000 for o in outcomes] or [0])
        ok = (
            bad_before >= 0.1 * len(before)
            and bad_after <= max(2, bad_before // 3)
            and bool(retried)
        )
        verdict = (
            f"errors {bad_before}/{len(before)} without retries → {bad_after}/{len(outcomes)} "
            f"with them; latency mean {mean_before:.0f} → {mean_after:.0f} ms, p99 "
            f"{p99_before:.0f} → {p99_after:.0f} ms; {len(retried)} traces read show a second try"
        )
        return Finding(ok, verdict, [verdict], retried or [o.trace_id for o in outcomes[:3]])

    def restore(self, ctx: Context) -> None:
        _without_v2(ctx, ["gamma-retries.yaml"])


CIRCUIT_BREAKER: dict[str, Any] = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "DestinationRule",
    "metadata": {"name": "catalog-circuit-breaker", "namespace": "shop"},
    "spec": {
        "host": "catalog",
        "trafficPolicy": {
            "connectionPool": {
                "tcp": {"maxConnections": 1},
                "http": {"http1MaxPendingRequests": 1},
            }
        },
    },
}


class CircuitBreakerOpens(Scenario):
    name = "circuit-breaker-opens"
    title = "The circuit breaker opens: 503 UO from the caller's own sidecar"
    story = (
        "A DestinationRule caps each caller's connections to the catalog (one connection, "
        "one pending request — Istio's connectionPool), and the catalog slows down to 300 ms. "
        "Under load, a frontend sidecar with one call in flight and one waiting refuses the "
        "next at once: 503 with response flag UO (upstream overflow). No packet left the "
        "frontend pod — the failure is the caller's own protection, not the catalog."
    )
    breaks = (
        "applies DestinationRule shop/catalog-circuit-breaker (maxConnections 1, "
        "http1MaxPendingRequests 1) and rolls the catalog with HOPSCOPE_FAULT_DELAY_MS=300"
    )
    traffic = "40 requests to http://shop.local/ at 20/s, 16 at a time"
    look_for = (
        "the frontend's sidecar-outbound span: 503 UO, and no kube-proxy hop below it",
        "Envoy metric envoy_cluster_upstream_rq_pending_overflow on the catalog cluster",
    )
    dashboard = DASHBOARD
    blame = BlameCheck("sidecar-outbound", "proxy", ("UO",), min_share=0.75)

    def inject(self, ctx: Context) -> None:
        ctx.apply([CIRCUIT_BREAKER], self.name)
        _catalog_with(ctx, {"HOPSCOPE_FAULT_DELAY_MS": "300"}, {})

    def drive(self, ctx: Context) -> list[Outcome]:
        return ctx.send("/", 40, rps=20, concurrency=16)

    def restore(self, ctx: Context) -> None:
        ctx.delete([CIRCUIT_BREAKER], self.name)
        _reapply(ctx, "shop.yaml", "Deployment", "catalog", "catalog")


for _scenario in (CanaryTenPercent, MirrorToV2, RetriesHideAFlakyPod, CircuitBreakerOpens):
    SCENARIOS[_scenario.name] = _scenario


OUTLIER_RULE: dict[str, Any] = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "DestinationRule",
    "metadata": {"name": "catalog-outliers", "namespace": "shop"},
    "spec": {
        "host": "catalog",
        "trafficPolicy": {
            "outlierDetection": {
                "consecutive5xxErrors": 2,
                "interval": "1s",
                "baseEjectionTime": "60s",
                "maxEjectionPercent": 50,
            }
        },
    },
}


class OutlierEjection(Scenario):
    name = "outlier-ejection"
    title = "Outlier detection ejects the pod that keeps failing"
    story = (
        "One of three catalog pods answers 500 to everything. A DestinationRule turns on "
        "outlier detection (two 5xx in a row eject a pod for 60 s): the callers' sidecars now "
        "hold the catalog's pods themselves — as Istio's do — and balance per request, so "
        "each sidecar ejects the bad pod after its second failure from it: a few requests "
        "fail, then none reaches the bad pod. Envoy says which host it ejected."
    )
    breaks = (
        "deploys catalog-v2 with HOPSCOPE_FAULT_ERROR_RATE=1 (one bad pod of three) and "
        "DestinationRule shop/catalog-outliers (consecutive5xxErrors 2, baseEjectionTime 60s)"
    )
    traffic = "60 requests to http://shop.local/"
    look_for = (
        "each frontend sidecar's admin /clusters: the catalog-v2 pod flagged failed_outlier_check",
        "the frontend's sidecar-outbound spans: upstream host the catalog-v2 pod only early on",
        "Envoy metric envoy_cluster_outlier_detection_ejections_active",
    )
    dashboard = DASHBOARD

    def inject(self, ctx: Context) -> None:
        _with_v2(ctx, {"HOPSCOPE_FAULT_ERROR_RATE": "1"})
        ctx.apply([OUTLIER_RULE], self.name)
        # the cluster's own pod addresses (this process may not share its address plan)
        catalog_ips = {p.ip for p in ctx.pods("shop", "catalog")}
        until_outbound(
            ctx,
            lambda a: (
                a.get("k8s.service.name") == "catalog"
                and str(a.get("hopscope.upstream.address", "")).rpartition(":")[0] in catalog_ips
            ),
            "the catalog's pods as their hosts",
        )

    def drive(self, ctx: Context) -> list[Outcome]:
        return ctx.send("/", 60, rps=10)

    def check(self, ctx: Context, outcomes: list[Outcome]) -> Finding:
        bad_pod = next(
            (p for p in ctx.pods("shop", "catalog") if p.name.startswith("catalog-v2")), None
        )
        if bad_pod is None:
            return Finding(False, "catalog-v2 pod not found")
        failures = sum(1 for o in outcomes if o.status != 200)
        reached_bad = 0
        for o in outcomes[len(outcomes) // 2 :]:
            view = ctx.trace(o.trace_id, _calls_catalog, 4) or {}
            for span in spans_of(view, "sidecar-outbound"):
                address = str(span["attributes"].get("hopscope.upstream.address", ""))
                reached_bad += address.startswith(f"{bad_pod.ip}:")
        # What each caller's Envoy says: the hosts it ejected (admin /clusters health flags).
        ejected_by = []
        for frontend in ctx.pods("shop", "frontend"):
            clusters = ctx.pod_get("shop", frontend.name, addresses.SIDECAR_ADMIN_PORT, "clusters")
            flagged = [
                line
                for line in clusters.splitlines()
                if f"::{bad_pod.ip}:" in line and "failed_outlier_check" in line
            ]
            if flagged:
                ejected_by.append(frontend.name)
        ok = bool(ejected_by) and reached_bad == 0 and failures <= 8
        verdict = (
            f"{bad_pod.name} ({bad_pod.ip}) is ejected by the sidecars of "
            f"{', '.join(ejected_by) or 'no caller'} (health flag failed_outlier_check); "
            f"{failures} of {len(outcomes)} requests failed, and in the second half "
            f"{reached_bad} calls reached it"
        )
        return Finding(ok, verdict, [verdict], [o.trace_id for o in outcomes[:3]])

    def restore(self, ctx: Context) -> None:
        ctx.delete([OUTLIER_RULE], self.name)
        _without_v2(ctx, [])


SCENARIOS[OutlierEjection.name] = OutlierEjection

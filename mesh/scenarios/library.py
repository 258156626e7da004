"""The break-it scenarios: story, fault, traffic, what to look for, and the telemetry check."""

from __future__ import annotations

import copy
import statistics
from collections import Counter, defaultdict
from typing import Any

from mesh import addresses
from mesh.scenarios.base import (
    BlameCheck,
    Context,
    Finding,
    ScenarioError,
    failed,
    lab_docs,
    not_ok,
    shipped_docs,
    spans_of,
)
from mesh.traffic.engine import Outcome


class Scenario:
    """One scenario. Subclasses set the texts and override the steps they need."""

    name = ""
    title = ""
    story = ""
    breaks = ""
    traffic = ""
    look_for: tuple[str, ...] = ()
    dashboard = ""
    """Title of the Grafana dashboard to open in the compose stack (one of those
    ``compose/config/grafana/generate.py`` writes)."""
    blame: BlameCheck | None = None
    """For scenarios whose requests fail: who the traces must blame."""
    failure = staticmethod(failed)

    def inject(self, ctx: Context) -> None:
        """Break the cluster."""

    def drive(self, ctx: Context) -> list[Outcome]:
        return ctx.send("/", 10)

    def check(self, ctx: Context, outcomes: list[Outcome]) -> Finding:
        if self.blame is None:
            raise NotImplementedError
        return self.blame.evaluate(ctx, outcomes, self.failure)

    def restore(self, ctx: Context) -> None:
        """Undo ``inject`` (``scenario reset`` also restores everything shipped)."""

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "story": self.story,
            "breaks": self.breaks,
            "traffic": self.traffic,
            "look_for": list(self.look_for),
            "dashboard": self.dashboard,
        }


def _catalog_with(ctx: Context, env: dict[str, str], annotations: dict[str, str]) -> None:
    """Roll the catalog Deployment with extra env / pod annotations (new pods replace old)."""
    doc = copy.deepcopy(shipped_docs("shop.yaml", "Deployment", "catalog")[0])
    template = doc["spec"]["template"]
    template["metadata"].setdefault("annotations", {}).update(annotations)
    container = template["spec"]["containers"][0]
    container.setdefault("env", []).extend({"name": k, "value": v} for k, v in env.items())
    ctx.apply([doc])
    ctx.say("rolling out catalog with the fault")
    ctx.wait_ready("shop", "catalog", 2)


def _reapply(ctx: Context, file: str, kind: str, name: str, app: str | None = None) -> None:
    ctx.apply(shipped_docs(file, kind, name))
    if app:
        ctx.wait_ready("shop", app, 2)


class PodNotReady(Scenario):
    name = "pod-not-ready"
    title = "A pod fails readiness and quietly leaves the rotation"
    story = (
        "One catalog replica stops passing its readiness probe. Nothing errors: the "
        "EndpointSlice controller marks it ready=false, kube-proxy drops it from the rules, "
        "and every new connection goes to the other replica. Users see no failure — only the "
        "telemetry shows that half the capacity is gone."
    )
    breaks = "marks one catalog pod unready (`hopscope ready pod <catalog> false`)"
    traffic = "20 requests to http://shop.local/"
    look_for = (
        "`hopscope get endpointslices -o wide`: the pod is ready=false",
        "kube-proxy spans for shop/catalog: hopscope.endpoint.pod never names it",
        'metric hopscope_kubeproxy_connections_total{service="catalog"} grows for one pod only',
    )
    dashboard = "Services and endpoints"

    def inject(self, ctx: Context) -> None:
        pods = sorted(ctx.pods("shop", "catalog"), key=lambda p: p.name)
        if len(pods) < 2:
            raise ScenarioError("needs two catalog pods (run `hopscope scenario reset`)")
        self.victim = pods[0].name
        ctx.say(f"marking {self.victim} unready")
        ctx.set_ready("shop", self.victim, False)
        ctx.wait_kube_proxy_synced()  # the victim's rules are gone before traffic starts

    def drive(self, ctx: Context) -> list[Outcome]:
        return ctx.send("/", 20)

    def check(self, ctx: Context, outcomes: list[Outcome]) -> Finding:
        state = ctx.state()
        listed = [
            e
            for s in state.endpoint_slices
            if (s.namespace, s.service) == ("shop", "catalog")
            for e in s.endpoints
            if e.pod == self.victim
        ]
        endpoints: Counter[str] = Counter()
        traces = []
        for o in outcomes:
            view = ctx.trace(o.trace_id, lambda v: _has_service(v, "catalog"))
            if view is None:
                continue
            traces.append(o.trace_id)
            for span in spans_of(view, "kube-proxy"):
                a = span["attributes"]
                if a.get("k8s.service.name") == "catalog" and a.get("hopscope.endpoint.pod"):
                    endpoints[a["hopscope.endpoint.pod"]] += 1
        errors = sum(failed(o) for o in outcomes)
        ok = bool(listed) and not listed[0].ready and endpoints and self.victim not in endpoints
        ok = bool(ok) and errors == 0
        chosen = ", ".join(f"{p} x{n}" for p, n in endpoints.items()) or "none"
        return Finding(
            ok,
            f"{self.victim} is listed ready=false in its EndpointSlice and kube-proxy sent it 0 of "
            f"{sum(endpoints.values())} catalog connections (chosen: {chosen}); "
            f"{errors} requests failed",
            [f"EndpointSlice condition ready={listed[0].ready if listed else '?'}"],
            traces[:5],
        )

    def restore(self, ctx: Context) -> None:
        if hasattr(self, "victim"):
            ctx.set_ready("shop", self.victim, None)


def _has_service(view: dict[str, Any], service: str) -> bool:
    return any(
        s["attributes"].get("k8s.service.name") == service for s in spans_of(view, "kube-proxy")
    )


class NoEndpoints(Scenario):
    name = "no-endpoints"
    title = "A Service with no ready endpoints"
    story = (
        "The catalog Deployment is scaled to zero. Its Service and ClusterIP still exist and "
        "DNS still answers, but the EndpointSlice is empty: kube-proxy rejects every "
        "connection to the VIP (like iptables' REJECT rule: connect() is refused at once) and "
        "the caller's sidecar turns that into a 503 UF, which the frontend reports as a 502."
    )
    breaks = "scales Deployment shop/catalog to 0"
    traffic = "10 requests to http://shop.local/"
    look_for = (
        "the trace verdict: kube-proxy rejected the connection, Service has no ready endpoints "
        "(the REJECT hop is read from the caller's sidecar span: connection refused)",
        'metric hopscope_kubeproxy_rejecting_service_ports{service="catalog"} is 1',
        "`hopscope get endpointslices`: catalog has no endpoints",
    )
    dashboard = "Services and endpoints"
    blame = BlameCheck("kube-proxy", "kube-proxy", ("no ready endpoints", "shop/catalog"))

    def inject(self, ctx: Context) -> None:
        ctx.scale("shop", "catalog", 0)
        ctx.wait_ready("shop", "catalog", 0)

    def restore(self, ctx: Context) -> None:
        ctx.scale("shop", "catalog", 2)
        ctx.wait_ready("shop", "catalog", 2)


class StaleKubeProxy(Scenario):
    name = "stale-kube-proxy"
    title = "kube-proxy stops syncing and keeps sending to pods that are gone"
    story = (
        "kube-proxy loses its connection to the API server (here: its rule sync is paused). "
        "Then both catalog pods are replaced, as in a rollout. The new pods have new IPs, "
        "but kube-proxy still DNATs to the old ones: connections go nowhere and the caller's "
        "sidecar answers 503."
    )
    breaks = "pauses kube-proxy's rule sync, then deletes both catalog pods"
    traffic = "10 requests to http://shop.local/"
    look_for = (
        "kube-proxy spans with error.type=endpoint-unreachable whose translated.dst is no "
        "longer in any EndpointSlice",
        "metric kubeproxy_sync_proxy_rules_last_timestamp_seconds stops moving",
        "kube-proxy /healthz: syncPaused",
    )
    dashboard = "kube-proxy"
    blame = BlameCheck("kube-proxy", "kube-proxy", ("did not answer",))

    def inject(self, ctx: Context) -> None:
        ctx.kube_proxy_paused(True)
        for pod in ctx.pods("shop", "catalog"):
            ctx.say(f"deleting {pod.name} while kube-proxy is not syncing")
            ctx.kill("shop", pod.name)
        ctx.wait_ready("shop", "catalog", 2)

    def check(self, ctx: Context, outcomes: list[Outcome]) -> Finding:
        finding = super().check(ctx, outcomes)
        live = {e.addresses[0] for s in ctx.state().endpoint_slices for e in s.endpoints}
        stale = []
        for trace_id in finding.trace_ids[:3]:
            view = ctx.trace(trace_id) or {}
            for span in spans_of(view, "kube-proxy"):
                dst = span["attributes"].get("hopscope.nat.translated.dst", "")
                if span["attributes"].get("error.type") == "endpoint-unreachable":
                    stale.append(dst)
        gone = [d for d in stale if d.rsplit(":", 1)[0] not in live]
        finding.evidence.append(f"DNAT targets not in any EndpointSlice: {sorted(set(gone))}")
        finding.ok = finding.ok and bool(gone)
        return finding

    def restore(self, ctx: Context) -> None:
        ctx.kube_proxy_paused(False)


class NetpolDeny(Scenario):
    name = "netpol-deny"
    title = "A NetworkPolicy change cuts the frontend off from the catalog"
    story = (
        "Someone tightens the catalog's NetworkPolicy so that only an `admin` app may call it. "
        "The frontend's connections to the catalog are now dropped by policy; the frontend "
        "sidecar answers 503 and the page fails."
    )
    breaks = "replaces NetworkPolicy shop/catalog: ingress only from app=admin"
    traffic = "10 requests to http://shop.local/"
    look_for = (
        "a kube-proxy span with hopscope.policy.verdict=deny, hopscope.policy.side=ingress",
        "metric hopscope_networkpolicy_denied_connections_total{policy=...}",
        "`hopscope get netpol`",
    )
    dashboard = "NetworkPolicy"
    blame = BlameCheck(
        "kube-proxy", "network-policy", ("shop/catalog", "ingress"), kernel_origin="network-policy"
    )

    def inject(self, ctx: Context) -> None:
        doc = copy.deepcopy(shipped_docs("shop-netpol.yaml", "NetworkPolicy", "catalog")[0])
        doc["spec"]["ingress"][0]["from"] = [{"podSelector": {"matchLabels": {"app": "admin"}}}]
        ctx.apply([doc])

    def restore(self, ctx: Context) -> None:
        _reapply(ctx, "shop-netpol.yaml", "NetworkPolicy", "catalog")


class DnsTypo(Scenario):
    name = "dns-typo"
    title = "A typo in a Service name: NXDOMAIN after the whole search path"
    story = (
        "A config change points the frontend at `catalgo` instead of `catalog`. The pod's "
        "resolver (ndots:5) tries catalgo.shop.svc.cluster.local, catalgo.svc.cluster.local, "
        "catalgo.cluster.local and finally catalgo. — four NXDOMAINs — and the frontend "
        "answers 502. Nothing in the network is broken; the name is."
    )
    breaks = "rolls the frontend with CATALOG_URL=http://catalgo:8080/items"
    traffic = "10 requests to http://shop.local/"
    look_for = (
        "the dns span: hopscope.dns.queries and hopscope.dns.rcodes (4 x NXDOMAIN)",
        'metric coredns_dns_responses_total{rcode="NXDOMAIN"}',
        "`hopscope dig catalgo --from shop/<frontend pod>`",
    )
    dashboard = "Cluster DNS"
    blame = BlameCheck("dns", "dns", ("NXDOMAIN", "catalgo"))

    def inject(self, ctx: Context) -> None:
        doc = copy.deepcopy(shipped_docs("shop.yaml", "Deployment", "frontend")[0])
        container = doc["spec"]["template"]["spec"]["containers"][0]
        container.setdefault("env", []).append(
            {"name": "CATALOG_URL", "value": "http://catalgo:8080/items"}
        )
        ctx.apply([doc])
        ctx.say("rolling out the frontend with the typo")
        ctx.wait_ready("shop", "frontend", 2)

    def restore(self, ctx: Context) -> None:
        _reapply(ctx, "shop.yaml", "Deployment", "frontend", "frontend")


class IngressNoRoute(Scenario):
    name = "ingress-no-route"
    title = "A host the ingress has no rule for"
    story = (
        "A user types shop.example instead of shop.local. The ingress controller finds no "
        "Ingress rule for that host and answers 404 with response flag NR itself — the "
        "request never reaches a Service. Nothing needs breaking: this is about reading "
        "who answered."
    )
    breaks = "nothing (requests use Host: shop.example)"
    traffic = "5 requests to http://shop.example/ through the ingress address"
    look_for = (
        "the ingress span: 404 with response_flags NR",
        "Envoy metric envoy_http_rq_total / no_route on the ingress",
    )
    dashboard = "Envoy: ingress and sidecars"
    blame = BlameCheck("ingress", "proxy", ("404 NR",))
    failure = staticmethod(not_ok)

    def drive(self, ctx: Context) -> list[Outcome]:
        return ctx.send("/", 5, host="shop.example")


class UpstreamTimeout(Scenario):
    name = "upstream-timeout"
    title = "A slow catalog and a sidecar timeout: 504 from the sidecar"
    story = (
        "The catalog starts taking 1.5 s per request, and its sidecar's route timeout is "
        "500 ms (like an Istio VirtualService timeout). After 500 ms the catalog's sidecar "
        "gives up and answers 504 with response flag UT; the app itself finishes later and "
        "its 200 is thrown away."
    )
    breaks = (
        "rolls the catalog with HOPSCOPE_FAULT_DELAY_MS=1500 and "
        "sidecar.hopscope.dev/timeout: 500ms"
    )
    traffic = "6 requests to http://shop.local/"
    look_for = (
        "the catalog sidecar-inbound span: 504, response_flags UT, ~500 ms",
        "the catalog app span under it still ends with 200, later",
        "Envoy metric envoy_cluster_upstream_rq_timeout_total",
    )
    dashboard = "Envoy: ingress and sidecars"
    blame = BlameCheck("sidecar-inbound", "proxy", ("504 UT",))

    def inject(self, ctx: Context) -> None:
        _catalog_with(
            ctx, {"HOPSCOPE_FAULT_DELAY_MS": "1500"}, {"sidecar.hopscope.dev/timeout": "500ms"}
        )

    def drive(self, ctx: Context) -> list[Outcome]:
        return ctx.send("/", 6, rps=3)

    def restore(self, ctx: Context) -> None:
        _reapply(ctx, "shop.yaml", "Deployment", "catalog", "catalog")


class AppError(Scenario):
    name = "app-error"
    title = "The app itself answers 500 and the proxies pass it through"
    story = (
        "A bad release makes the catalog answer 500 on every request. Every proxy on the way "
        "back (catalog sidecar, frontend sidecar) relays the 500 unchanged — no response flag — "
        "and the frontend turns it into a 502 for the user. The verdict must blame the app, "
        "not the proxies that carried its answer."
    )
    breaks = "rolls the catalog with HOPSCOPE_FAULT_ERROR_RATE=1"
    traffic = "10 requests to http://shop.local/"
    look_for = (
        "the catalog app span: 500, and no response flags on the sidecars above it",
        'metric hopscope_requests_total{app="catalog",code="500"}',
    )
    dashboard = "Start here: the request journey"
    blame = BlameCheck("app", "app", ("catalog", "500"))

    def inject(self, ctx: Context) -> None:
        _catalog_with(ctx, {"HOPSCOPE_FAULT_ERROR_RATE": "1"}, {})

    def restore(self, ctx: Context) -> None:
        _reapply(ctx, "shop.yaml", "Deployment", "catalog", "catalog")


class GrpcSticky(Scenario):
    name = "grpc-sticky-connections"
    title = "gRPC through a ClusterIP sticks to one pod"
    story = (
        "kube-proxy balances connections, not requests. The frontend's sidecar keeps one "
        "HTTP/2 connection to the reviews VIP and sends every gRPC call over it, so all calls "
        "from one frontend pod land on the same reviews pod — while HTTP/1 calls to the "
        "catalog (a new connection each) spread over both replicas."
    )
    breaks = "nothing: this is how ClusterIP load balancing works"
    traffic = "30 requests to http://shop.local/ (each makes a gRPC and an HTTP call)"
    look_for = (
        "kube-proxy spans for shop/reviews: hopscope.conntrack.state=established",
        "the same hopscope.endpoint.pod for every call from one frontend pod",
    )
    dashboard = "Services and endpoints"

    def drive(self, ctx: Context) -> list[Outcome]:
        return ctx.send("/", 30, rps=15)

    def check(self, ctx: Context, outcomes: list[Outcome]) -> Finding:
        grpc: dict[str, Counter[str]] = defaultdict(Counter)
        http: Counter[str] = Counter()
        states: Counter[str] = Counter()
        for o in outcomes:
            view = ctx.trace(o.trace_id, lambda v: _has_service(v, "ratings"))
            if view is None:
                continue
            pods = {s["span_id"]: s for s in view["spans"]}
            for span in spans_of(view, "kube-proxy"):
                a = span["attributes"]
                if a.get("k8s.service.name") == "reviews":
                    caller = _caller_pod(span, pods)
                    grpc[caller][a.get("hopscope.endpoint.pod", "?")] += 1
                    states[a.get("hopscope.conntrack.state", "?")] += 1
                elif a.get("k8s.service.name") == "catalog":
                    http[a.get("hopscope.endpoint.pod", "?")] += 1
        sticky = bool(grpc) and all(len(targets) == 1 for targets in grpc.values())
        ok = sticky and states["established"] > 0 and len(http) >= 2
        lines = [
            f"{caller} → {', '.join(f'{p} x{n}' for p, n in t.items())}"
            for caller, t in grpc.items()
        ]
        return Finding(
            ok,
            "gRPC: each frontend pod sent all its reviews calls to one pod over an established "
            f"connection ({'; '.join(lines)}); HTTP to catalog spread over {len(http)} pods "
            f"({dict(http)}); conntrack states {dict(states)}",
            lines,
            [o.trace_id for o in outcomes[:5]],
        )


KEEP_ALIVE_RULE: dict[str, Any] = {
    "apiVersion": "networking.istio.io/v1",
    "kind": "DestinationRule",
    "metadata": {"name": "catalog-keep-alive", "namespace": "shop"},
    "spec": {
        "host": "catalog",
        "trafficPolicy": {
            "connectionPool": {"http": {"maxRequestsPerConnection": 0, "idleTimeout": "30s"}}
        },
    },
}


class HttpKeepAlive(Scenario):
    name = "http-keep-alive-sticks"
    title = "HTTP keep-alive through a ClusterIP sticks to the pod of its connection"
    story = (
        "hopscope's sidecars open a new connection for every HTTP/1.1 request, so kube-proxy "
        "balances each one. A DestinationRule with maxRequestsPerConnection: 0 (Istio's "
        "default: unlimited) makes the frontend sidecars keep their connections to the "
        "catalog alive. kube-proxy chose a pod when the connection opened; every later "
        "request on it meets the established conntrack entry and that same pod — cheaper, "
        "and no longer balanced per request."
    )
    breaks = (
        "applies DestinationRule shop/catalog-keep-alive "
        "(connectionPool.http.maxRequestsPerConnection 0, idleTimeout 30s)"
    )
    traffic = "30 requests to http://shop.local/ at 15/s"
    look_for = (
        "kube-proxy spans for shop/catalog: hopscope.conntrack.state=established after the first",
        "one hopscope.endpoint.pod per client address:port (hopscope.nat.original.src)",
    )
    dashboard = "Services and endpoints"

    def inject(self, ctx: Context) -> None:
        ctx.apply([KEEP_ALIVE_RULE], self.name)

    def drive(self, ctx: Context) -> list[Outcome]:
        return ctx.send("/", 30, rps=15)

    def check(self, ctx: Context, outcomes: list[Outcome]) -> Finding:
        connections: dict[str, Counter[str]] = defaultdict(Counter)
        states: Counter[str] = Counter()
        for o in outcomes:
            view = ctx.trace(o.trace_id, lambda v: _has_service(v, "catalog"))
            if view is None:
                continue
            for span in spans_of(view, "kube-proxy"):
                a = span["attributes"]
                if a.get("k8s.service.name") == "catalog":
                    client = str(a.get("hopscope.nat.original.src", "?"))
                    connections[client][a.get("hopscope.endpoint.pod", "?")] += 1
                    states[a.get("hopscope.conntrack.state", "?")] += 1
        one_pod_each = bool(connections) and all(len(p) == 1 for p in connections.values())
        reused = any(sum(p.values()) > 1 for p in connections.values())
        ok = one_pod_each and reused and states["established"] > 0
        lines = [
            f"{client} → {', '.join(f'{pod} x{n}' for pod, n in pods.items())}"
            for client, pods in connections.items()
        ]
        return Finding(
            ok,
            f"{sum(states.values())} catalog calls rode {len(connections)} connections, each "
            f"to one pod ({'; '.join(lines)}); conntrack states {dict(states)}",
            lines,
            [o.trace_id for o in outcomes[:5]],
        )

    def restore(self, ctx: Context) -> None:
        ctx.delete([KEEP_ALIVE_RULE], self.name)


def _ms(span: dict[str, Any]) -> float:
    return float(span["end_ns"] - span["start_ns"]) / 1e6


def _caller_pod(span: dict[str, Any], spans: dict[str, dict[str, Any]]) -> str:
    cur = spans.get(span["parent_span_id"])
    while cur is not None:
        pod = cur["attributes"].get("k8s.pod.name")
        if pod:
            return str(pod)
        cur = spans.get(cur["parent_span_id"])
    return "?"


class _Lab(Scenario):
    """Scenarios that deploy the echo lab (deleted again by ``restore``)."""

    def inject(self, ctx: Context) -> None:
        ctx.apply(lab_docs("lab.yaml"), "lab.yaml")
        ctx.wait_ready("lab", "echo-local", 1)
        ctx.wait_ready("lab", "echo-sticky", 3)

    def restore(self, ctx: Context) -> None:
        ctx.delete([d for d in lab_docs("lab.yaml") if d["kind"] != "Namespace"], "lab.yaml")


class ExternalTrafficLocal(_Lab):
    name = "external-traffic-local"
    title = "externalTrafficPolicy: Local keeps the client IP — and only local pods answer"
    story = (
        "The echo-local Service is a NodePort with externalTrafficPolicy: Local and one pod, "
        "on node-a. Through node-a the pod sees the real client address (no SNAT); through "
        "node-b there is no local endpoint and kube-proxy drops the connection (the userspace "
        "relay refuses it) — which is why a cloud load balancer health-checks each node."
    )
    breaks = "deploys the lab: echo-local (1 pod on node-a) behind NodePort 30090, Local"
    traffic = "5 requests to node-a:30090 and 5 to node-b:30090 from 127.100.0.1"
    look_for = (
        "node-a: kube-proxy span hopscope.nat.snat=false; the echo app's peer is 127.100.0.1",
        "node-b: kube-proxy span with error.type=no-local-endpoints",
    )
    dashboard = "kube-proxy"

    def drive(self, ctx: Context) -> list[Outcome]:
        out = []
        for node in ("node-a", "node-b"):
            ip = addresses.NODE_IPS[node]
            out += ctx.send("/", 5, host=f"{ip}:30090", connect=(ip, 30090))
        return out

    def check(self, ctx: Context, outcomes: list[Outcome]) -> Finding:
        a_out, b_out = outcomes[:5], outcomes[5:]
        peers: set[Any] = set()
        snat: set[Any] = set()
        refused: Counter[str] = Counter()
        for o in a_out:
            view = ctx.trace(o.trace_id, lambda v: bool(spans_of(v, "app"))) or {}
            for span in spans_of(view, "app"):
                peers.add(span["attributes"].get("network.peer.address"))
            for span in spans_of(view, "kube-proxy"):
                snat.add(span["attributes"].get("hopscope.nat.snat"))
        for o in b_out:
            view = ctx.trace(o.trace_id, lambda v: bool(spans_of(v, "kube-proxy"))) or {}
            for span in spans_of(view, "kube-proxy"):
                refused[span["attributes"].get("error.type", "")] += 1
        a_ok = all(o.status == 200 for o in a_out)
        client = addresses.EXTERNAL_CLIENT_IP
        if ctx.dataplane() == "kernel":  # the host's forwarder keeps one address per client
            client = addresses.kernel_client_address(client)
        b_refused = all(o.status == 0 for o in b_out)
        ok = (
            a_ok
            and peers == {client}
            and snat == {False}
            and b_refused
            and refused["no-local-endpoints"] > 0
        )
        return Finding(
            ok,
            f"via node-a: {sum(o.status == 200 for o in a_out)}/5 answered and the pod saw "
            f"peer {sorted(p for p in peers if p)} (SNAT {sorted(snat, key=str)}); via node-b: "
            f"{sum(o.status == 0 for o in b_out)}/5 refused, kube-proxy says {dict(refused)}",
            [],
            [o.trace_id for o in outcomes],
        )


class SessionAffinity(_Lab):
    name = "session-affinity"
    title = "sessionAffinity: ClientIP pins each client to one pod"
    story = (
        "echo-sticky has three pods and sessionAffinity: ClientIP. Each client address keeps "
        "landing on the same pod for timeoutSeconds, while different clients may land on "
        "different pods — stickiness by source IP, not by cookie."
    )
    breaks = "deploys the lab: echo-sticky (3 pods) behind NodePort 30091 with ClientIP affinity"
    traffic = (
        "8 requests each from 127.100.0.1, 127.100.0.2 and 127.100.0.3, a new connection "
        "each (affinity is decided per connection)"
    )
    look_for = (
        "kube-proxy spans: hopscope.lb.affinity = ClientIP (new), then ClientIP (sticky)",
        "`hopscope get svc -n lab -o wide`: affinity column",
    )
    dashboard = "kube-proxy"

    def drive(self, ctx: Context) -> list[Outcome]:
        ip = addresses.NODE_IPS["node-a"]
        out = []
        for client in ("127.100.0.1", "127.100.0.2", "127.100.0.3"):
            out += ctx.send(
                "/",
                8,
                host=f"{ip}:30091",
                connect=(ip, 30091),
                source_ip=client,
                new_connections=True,
            )
        return out

    def check(self, ctx: Context, outcomes: list[Outcome]) -> Finding:
        per_client: dict[str, Counter[str]] = defaultdict(Counter)
        modes: Counter[str] = Counter()
        for i, o in enumerate(outcomes):
            client = ("127.100.0.1", "127.100.0.2", "127.100.0.3")[i // 8]
            view = ctx.trace(o.trace_id, lambda v: bool(spans_of(v, "kube-proxy"))) or {}
            for span in spans_of(view, "kube-proxy"):
                a = span["attributes"]
                per_client[client][a.get("hopscope.endpoint.pod", "?")] += 1
                modes[a.get("hopscope.lb.affinity", "none")] += 1
        ok = (
            len(per_client) == 3
            and all(len(c) == 1 for c in per_client.values())
            and modes["ClientIP (sticky)"] > 0
            and all(o.status == 200 for o in outcomes)
        )
        lines = [f"{c} → {', '.join(p)}" for c, p in per_client.items()]
        return Finding(
            ok, f"each client stayed on one pod: {'; '.join(lines)}; {dict(modes)}", lines
        )


class CrossNodeLatency(Scenario):
    name = "cross-node-latency"
    title = "The overlay makes cross-node hops expensive"
    story = (
        "The overlay network gets 50 ms slower each way (a congested tunnel, an MTU problem). "
        "Requests whose legs stay on one node do not notice; every leg that crosses nodes "
        "pays 100 ms per round trip in its cni-overlay hop."
    )
    breaks = "sets overlayDelay: 50ms in ConfigMap kube-system/hopscope-cni"
    traffic = "12 requests to http://shop.local/"
    look_for = (
        "cni-overlay spans (hopscope.overlay.delay_ms=50) lasting ≥ 100 ms",
        "kube-proxy legs with a cni-overlay child vs without",
        "metric hopscope_cni_overlay_delay_seconds",
    )
    dashboard = "Start here: the request journey"

    def inject(self, ctx: Context) -> None:
        doc = copy.deepcopy(shipped_docs("cni.yaml", "ConfigMap", "hopscope-cni")[0])
        doc["data"]["overlayDelay"] = "50ms"
        ctx.apply([doc])
        if ctx.dataplane() == "kernel":
            ctx.wait_overlay_delay(50)
        ctx.send("/", 1)

    def drive(self, ctx: Context) -> list[Outcome]:
        return ctx.send("/", 12, rps=4)

    def check(self, ctx: Context, outcomes: list[Outcome]) -> Finding:
        tunnel_ms: list[float] = []
        local_legs = crossing_legs = 0
        for o in outcomes:
            view = ctx.trace(o.trace_id, lambda v: _has_service(v, "ratings"))
            if view is None:
                continue
            kids = defaultdict(list)
            for span in view["spans"]:
                kids[span["parent_span_id"]].append(span)
            for kp in spans_of(view, "kube-proxy"):
                overlay = [
                    k
                    for k in kids[kp["span_id"]]
                    if k["attributes"].get("hopscope.hop") == "cni-overlay"
                ]
                if not overlay:
                    local_legs += 1
                    continue
                crossing_legs += 1
                if overlay[0]["attributes"].get("hopscope.overlay.delay_ms") != 50:
                    continue
                # the pod's sidecar span hangs under the caller's span (its trace context
                # passes the tunnel untouched) and names the overlay hop it came through
                inner = [
                    s
                    for s in view["spans"]
                    if s["attributes"].get("hopscope.via.span_id") == overlay[0]["span_id"]
                ]
                if inner:
                    # time in the tunnel: the overlay hop minus what the pod behind it took
                    tunnel_ms.append(_ms(overlay[0]) - max(_ms(k) for k in inner))
                elif overlay[0]["attributes"].get("hopscope.dataplane") == "kernel":
                    # the kernel's hop spans the pod's own time: the tunnel's is what the
                    # caller waited beyond it
                    caller = next(
                        (s for s in view["spans"] if s["span_id"] == kp["parent_span_id"]), None
                    )
                    if caller is not None:
                        tunnel_ms.append(_ms(caller) - _ms(overlay[0]))
        if not tunnel_ms or not local_legs:
            return Finding(
                False,
                f"need legs of both kinds (crossing {crossing_legs}, same-node {local_legs}) "
                f"with the new delay ({len(tunnel_ms)})",
            )
        median = statistics.median(tunnel_ms)
        ok = median >= 90
        return Finding(
            ok,
            f"{crossing_legs} legs crossed nodes and each spent a median {median:.0f} ms in the "
            f"tunnel (cni-overlay hop minus the pod's own time; 2 x 50 ms expected); "
            f"{local_legs} same-node legs had no overlay hop and paid nothing",
        )

    def restore(self, ctx: Context) -> None:
        ctx.apply(shipped_docs("cni.yaml", "ConfigMap", "hopscope-cni"))


SCENARIOS: dict[str, type[Scenario]] = {
    s.name: s
    for s in (
        PodNotReady,
        NoEndpoints,
        StaleKubeProxy,
        NetpolDeny,
        DnsTypo,
        IngressNoRoute,
        UpstreamTimeout,
        AppError,
        GrpcSticky,
        HttpKeepAlive,
        ExternalTrafficLocal,
        SessionAffinity,
        CrossNodeLatency,
    )
}

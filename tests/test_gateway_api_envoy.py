"""Gateway API routes in the real Envoy, in front of real HTTP backends that record what
they receive: weighted splits, mirroring, rewrites, matches, retries, timeouts, redirects,
invalid backends, and the GAMMA routes a caller's sidecar uses.

Address plan (the 127.65/16 block is this module's):

| address          | port  | what                                                        |
| ---------------- | ----- | ----------------------------------------------------------- |
| 127.65.0.1       | 18000 | Envoy: the ingress gateway's listener (hop ``ingress``)     |
| 127.65.0.1       | 18001 | Envoy: a caller's outbound listener (hop ``sidecar-outbound``) |
| 127.65.0.1       | 18901 | Envoy admin                                                 |
| 127.65.0.1       | 18318 | OTLP/HTTP trace receiver (this test)                        |
| 127.65.0.11      | 18080 | backend ``v1`` = Service shop/catalog-v1's cluster IP       |
| 127.65.0.12      | 18080 | backend ``v2`` = Service shop/catalog-v2's cluster IP       |
| 127.65.0.20      | 18080 | Service shop/catalog's cluster IP (GAMMA parent; no socket) |

Backends obey request headers: ``x-test`` groups requests, ``x-fail-first: N`` answers 503
to the first N of a group, ``x-slow-first: MS`` delays the first of a group.
"""

from __future__ import annotations

import http.client
import http.server
import json
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh import addresses
from mesh.envoy import envoy_command
from mesh.envoy.common import (
    bootstrap,
    http_connection_manager,
    http_listener,
    otlp_cluster,
    static_cluster,
)
from mesh.envoy.gateway import gateway_resources, mesh_backend_services, mesh_routes
from mesh.envoy.sidecar import service_cluster_name
from mesh.model.manifests import load_document
from mesh.model.types import ClusterState, Namespace, Service, ServicePort
from mesh.tracestore.otlp import SpanRecord, decode_export
from tests.e2e_support import QuietHandler

ENVOY_IP, INGRESS, OUTBOUND, ADMIN, OTLP_PORT = "127.65.0.1", 18000, 18001, 18901, 18318
BACKENDS = {"v1": "127.65.0.11", "v2": "127.65.0.12"}
CATALOG_VIP, PORT = "127.65.0.20", 18080
OTLP = f"http://{ENVOY_IP}:{OTLP_PORT}"

ROUTES = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge, namespace: shop}
spec:
  gatewayClassName: hopscope
  listeners:
    - {name: http, port: 8080, protocol: HTTP, allowedRoutes: {namespaces: {from: Same}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: shop}
spec:
  parentRefs: [{name: edge}]
  hostnames: [split.test]
  rules:
    - backendRefs:
        - {name: catalog-v1, port: 18080, weight: 80}
        - {name: catalog-v2, port: 18080, weight: 20}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mirror, namespace: shop}
spec:
  parentRefs: [{name: edge}]
  hostnames: [mirror.test]
  rules:
    - backendRefs: [{name: catalog-v1, port: 18080}]
      filters:
        - type: RequestMirror
          requestMirror: {backendRef: {name: catalog-v2, port: 18080}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: rewrite, namespace: shop}
spec:
  parentRefs: [{name: edge}]
  hostnames: [rewrite.test]
  rules:
    - matches: [{path: {type: PathPrefix, value: /api/catalog}}]
      filters:
        - type: URLRewrite
          urlRewrite:
            hostname: catalog.internal
            path: {type: ReplacePrefixMatch, replacePrefixMatch: /items}
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: x-route, value: rewrite}]
            remove: [x-secret]
      backendRefs: [{name: catalog-v1, port: 18080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: match, namespace: shop}
spec:
  parentRefs: [{name: edge}]
  hostnames: [match.test]
  rules:
    - matches:
        - headers: [{name: X-Version, value: v2}]
        - queryParams: [{name: canary, value: "yes"}]
        - {method: POST, path: {type: Exact, value: /orders}}
      backendRefs: [{name: catalog-v2, port: 18080}]
    - backendRefs: [{name: catalog-v1, port: 18080}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: retry, namespace: shop}
spec:
  parentRefs: [{name: edge}]
  hostnames: [retry.test]
  rules:
    - backendRefs: [{name: catalog-v1, port: 18080}]
      retry: {codes: [503], attempts: 2, backoff: 10ms}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: timeout, namespace: shop}
spec:
  parentRefs: [{name: edge}]
  hostnames: [timeout.test]
  rules:
    - backendRefs: [{name: catalog-v1, port: 18080}]
      timeouts: {request: 300ms}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: per-try, namespace: shop}
spec:
  parentRefs: [{name: edge}]
  hostnames: [per-try.test]
  rules:
    - backendRefs: [{name: catalog-v1, port: 18080}]
      timeouts: {request: 5s, backendRequest: 300ms}
      retry: {attempts: 1, backoff: 10ms}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: broken, namespace: shop}
spec:
  parentRefs: [{name: edge}]
  hostnames: [broken.test]
  rules:
    - backendRefs:
        - {name: catalog-v1, port: 18080}
        - {name: catalog-v3, port: 18080}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: redirect, namespace: shop}
spec:
  parentRefs: [{name: edge}]
  hostnames: [redirect.test]
  rules:
    - filters:
        - type: RequestRedirect
          requestRedirect: {scheme: https, statusCode: 301}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: catalog-by-version, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: catalog, port: 18080}]
  rules:
    - matches: [{headers: [{name: x-version, value: v2}]}]
      backendRefs: [{name: catalog-v2, port: 18080}]
    - backendRefs: [{name: catalog-v1, port: 18080}]
      retry: {codes: [503], attempts: 1}
"""


class _Backend(QuietHandler):
    name = ""
    seen: list[dict[str, Any]] = []
    groups: Counter[str] = Counter()
    lock = threading.Lock()

    def _handle(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        self.rfile.read(length)
        headers = {k.lower(): v for k, v in self.headers.items()}
        with self.lock:
            group = headers.get("x-test", "")
            self.groups[f"{self.name}/{group}"] += 1
            nth = self.groups[f"{self.name}/{group}"]
            self.seen.append(
                {
                    "backend": self.name,
                    "method": self.command,
                    "path": self.path,
                    "host": headers.get("host"),
                    "headers": headers,
                }
            )
        if nth == 1 and "x-slow-first" in headers:
            time.sleep(int(headers["x-slow-first"]) / 1000)
        if nth <= int(headers.get("x-fail-first", 0)):
            self.answer(b"failing on purpose\n", 503)
            return
        self.answer(json.dumps({"backend": self.name, "path": self.path}).encode())

    do_GET = do_POST = _handle


class _Spans(QuietHandler):
    """The OTLP/HTTP trace endpoint Envoy exports to (it sends chunked bodies)."""

    spans: list[SpanRecord] = []

    def do_POST(self) -> None:
        if self.headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while size := int(self.rfile.readline().split(b";")[0], 16):
                body += self.rfile.read(size)
                self.rfile.readline()
            self.rfile.readline()
        else:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
        self.spans.extend(decode_export(body, self.headers.get("content-type", "")))
        self.answer(b"")


def _state() -> ClusterState:
    state = ClusterState(namespaces=[Namespace("shop")])
    ips = {"catalog-v1": BACKENDS["v1"], "catalog-v2": BACKENDS["v2"], "catalog": CATALOG_VIP}
    for name, ip in ips.items():
        state.services.append(
            Service(name, "shop", ports=[ServicePort(PORT, PORT, name="http")], cluster_ip=ip)
        )
    for i, doc in enumerate(yaml.safe_load_all(ROUTES)):
        obj = load_document(doc, "routes.yaml", i)
        target = {
            "Gateway": state.gateways,
            "HTTPRoute": state.http_routes,
        }[type(obj).__name__]
        obj.created = float(i)
        target.append(obj)  # type: ignore[attr-defined]
    return state


def _config(state: ClusterState) -> dict[str, Any]:
    vhosts, clusters = gateway_resources(state)
    ingress = http_connection_manager(
        "ingress", "ingress", {"name": "ingress", "virtual_hosts": vhosts}, "ingress", OTLP, {}
    )
    catalog = state.service("shop", "catalog")
    assert catalog is not None
    routes = mesh_routes(state, catalog, PORT, "shop") or []
    routes.append({"match": {"prefix": "/"}, "direct_response": {"status": 418}})
    outbound = http_connection_manager(
        "outbound",
        "sidecar-outbound",
        {
            "name": "outbound",
            "virtual_hosts": [{"name": "outbound", "domains": ["*"], "routes": routes}],
        },
        "frontend",
        OTLP,
        {},
    )
    services = [
        static_cluster(service_cluster_name(ns, name, port), svc.cluster_ip or "", port)
        for ns, name, port in mesh_backend_services(state)
        if (svc := state.service(ns, name)) is not None
    ]
    config = bootstrap(
        ENVOY_IP,
        [
            http_listener("ingress", ENVOY_IP, INGRESS, "INBOUND", ingress),
            http_listener("outbound", ENVOY_IP, OUTBOUND, "OUTBOUND", outbound),
        ],
        [otlp_cluster(OTLP), *clusters, *services],
    )
    config["admin"]["address"]["socket_address"]["port_value"] = ADMIN
    return config


class _Rig:
    def __init__(self, tmp: Path) -> None:
        self.servers: list[http.server.ThreadingHTTPServer] = []
        _Backend.seen, _Backend.groups, _Spans.spans = [], Counter(), []
        for name, ip in BACKENDS.items():
            handler = type(f"Backend_{name}", (_Backend,), {"name": name})
            self._serve(http.server.ThreadingHTTPServer((ip, PORT), handler))
        self._serve(http.server.ThreadingHTTPServer((ENVOY_IP, OTLP_PORT), _Spans))
        path = tmp / "envoy.json"
        path.write_text(json.dumps(_config(_state())))
        self.access_log = tmp / "access.log"
        self.envoy_log = tmp / "envoy.log"
        self.proc = subprocess.Popen(
            envoy_command(path, "gateway-test", "gateway-test"),
            stdout=self.access_log.open("w"),
            stderr=self.envoy_log.open("w"),
        )

    def _serve(self, server: http.server.ThreadingHTTPServer) -> None:
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        self.servers.append(server)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        for server in self.servers:
            server.shutdown()
            server.server_close()

    def request(
        self,
        host: str,
        path: str = "/",
        method: str = "GET",
        headers: dict[str, str] | None = None,
        port: int = INGRESS,
    ) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(ENVOY_IP, port, timeout=10)
        try:
            conn.request(method, path, headers={"host": host, **(headers or {})})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def seen(self, group: str) -> list[dict[str, Any]]:
        with _Backend.lock:
            return [s for s in _Backend.seen if s["headers"].get("x-test") == group]

    def until(self, condition: Any, timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.envoy_log.read_text()[-2000:]
            value = condition()
            if value:
                return value
            time.sleep(0.1)
        raise AssertionError(f"not within {timeout}s; envoy: {self.envoy_log.read_text()[-1500:]}")


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Rig]:
    running = _Rig(tmp_path_factory.mktemp("gateway-envoy"))
    try:
        running.until(lambda: _up(running), timeout=20)
        yield running
    finally:
        running.stop()


def _up(rig: _Rig) -> bool:
    try:
        return rig.request("match.test", headers={"x-test": "probe"})[0] == 200
    except OSError:
        return False


def test_weighted_backends_split_the_traffic(rig: _Rig) -> None:
    n = 400
    for _ in range(n):
        assert rig.request("split.test", headers={"x-test": "split"})[0] == 200
    share = Counter(s["backend"] for s in rig.seen("split"))
    # 20% to v2: three standard deviations of a binomial over 400 requests is 6 points.
    assert sum(share.values()) == n
    assert abs(share["v2"] / n - 0.20) <= 0.06, share


def test_mirrored_requests_reach_v2_while_the_client_sees_v1(rig: _Rig) -> None:
    for _ in range(10):
        status, _, body = rig.request("mirror.test", "/items", headers={"x-test": "mirror"})
        assert status == 200 and json.loads(body)["backend"] == "v1"
    copies = rig.until(lambda: [s for s in rig.seen("mirror") if s["backend"] == "v2"] or None)
    rig.until(lambda: len([s for s in rig.seen("mirror") if s["backend"] == "v2"]) == 10)
    assert copies[0]["host"] == "mirror.test-shadow"
    assert len([s for s in rig.seen("mirror") if s["backend"] == "v1"]) == 10


def test_url_rewrite_and_header_changes_reach_the_backend(rig: _Rig) -> None:
    status, _, _ = rig.request(
        "rewrite.test", "/api/catalog/p1?x=1", headers={"x-test": "rw", "x-secret": "s"}
    )
    assert status == 200
    (seen,) = rig.seen("rw")
    assert seen["path"] == "/items/p1?x=1"
    assert seen["host"] == "catalog.internal"
    assert seen["headers"]["x-route"] == "rewrite" and "x-secret" not in seen["headers"]
    assert rig.request("rewrite.test", "/api/catalogue", headers={"x-test": "rw"})[0] == 404


@pytest.mark.parametrize(
    ("method", "path", "headers", "backend"),
    [
        ("GET", "/", {"x-version": "v2"}, "v2"),
        ("GET", "/any?canary=yes", {}, "v2"),
        ("POST", "/orders", {}, "v2"),
        ("GET", "/orders", {}, "v1"),
        ("GET", "/", {"x-version": "v3"}, "v1"),
    ],
)
def test_matches_pick_the_rule(
    rig: _Rig, method: str, path: str, headers: dict[str, str], backend: str
) -> None:
    status, _, body = rig.request("match.test", path, method, headers)
    assert status == 200 and json.loads(body)["backend"] == backend


def _trace_headers(trace_id: str, group: str) -> dict[str, str]:
    return {"traceparent": f"00-{trace_id}-{'12' * 8}-01", "x-test": group}


def test_a_retried_request_succeeds_and_each_attempt_is_a_span(rig: _Rig) -> None:
    trace_id = "7e" * 16
    headers = {**_trace_headers(trace_id, "retry"), "x-fail-first": "1"}
    status, _, body = rig.request("retry.test", "/items", headers=headers)
    assert status == 200 and json.loads(body)["backend"] == "v1"
    assert len(rig.seen("retry")) == 2  # the failed try and the retry

    def spans() -> list[SpanRecord]:
        found = [s for s in _Spans.spans if s.trace_id == trace_id]
        return found if len(found) >= 3 else []

    found = rig.until(spans)
    attempts = [s for s in found if s.kind == "client"]
    server = [s for s in found if s.kind == "server"]
    assert len(attempts) == 2 and len(server) == 1, [(s.kind, s.name) for s in found]
    assert {s.parent_span_id for s in attempts} == {server[0].span_id}
    codes = sorted(str(s.attributes.get("http.status_code")) for s in attempts)
    assert codes == ["200", "503"], [s.attributes for s in attempts]
    assert server[0].attributes["hopscope.route"] == "HTTPRoute shop/retry"


def test_retries_give_up_after_the_attempts(rig: _Rig) -> None:
    headers = {"x-test": "give-up", "x-fail-first": "5"}
    assert rig.request("retry.test", headers=headers)[0] == 503
    assert len(rig.seen("give-up")) == 3  # the first try and two retries


def _access(rig: _Rig, authority: str) -> list[dict[str, Any]]:
    lines = rig.access_log.read_text().splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    return [r for r in records if r.get("authority") == authority]


def test_a_request_timeout_answers_504_flagged_ut(rig: _Rig) -> None:
    trace_id = "5a" * 16
    headers = {**_trace_headers(trace_id, "slow"), "x-slow-first": "1500"}
    started = time.monotonic()
    status, _, _ = rig.request("timeout.test", headers=headers)
    assert status == 504 and time.monotonic() - started < 1.4
    (record,) = rig.until(lambda: _access(rig, "timeout.test"))
    assert record["response_flags"] == "UT" and str(record["status"]) == "504", record
    (server,) = rig.until(
        lambda: [s for s in _Spans.spans if s.trace_id == trace_id and s.kind == "server"]
    )
    assert server.attributes["response_flags"] == "UT", server.attributes


def test_a_backend_request_timeout_is_retried(rig: _Rig) -> None:
    headers = {"x-test": "per-try", "x-slow-first": "1500"}
    status, _, body = rig.request("per-try.test", headers=headers)
    assert status == 200 and json.loads(body)["backend"] == "v1"
    assert len(rig.seen("per-try")) == 2


def test_invalid_backends_answer_500_for_their_share(rig: _Rig) -> None:
    statuses = Counter(rig.request("broken.test", headers={"x-test": "b"})[0] for _ in range(200))
    assert set(statuses) == {200, 500}, statuses
    assert abs(statuses[500] / 200 - 0.5) <= 0.11, statuses  # 3 standard deviations
    _, _, body = next(r for r in (rig.request("broken.test") for _ in range(50)) if r[0] == 500)
    assert b"shop/catalog-v3:18080 is not a usable Service" in body


def test_redirect(rig: _Rig) -> None:
    status, headers, _ = rig.request("redirect.test", "/a?b=c")
    assert status == 301
    assert headers["location"] == "https://redirect.test/a?b=c"


def test_mesh_routes_decide_in_the_callers_sidecar(rig: _Rig) -> None:
    dst = {addresses.ORIGINAL_DST_HEADER: f"{CATALOG_VIP}:{PORT}", "x-test": "mesh"}
    status, _, body = rig.request("catalog", "/items", headers=dst, port=OUTBOUND)
    assert status == 200 and json.loads(body)["backend"] == "v1"
    v2 = {**dst, "x-version": "v2"}
    status, _, body = rig.request("catalog", "/items", headers=v2, port=OUTBOUND)
    assert status == 200 and json.loads(body)["backend"] == "v2"
    retried = {**dst, "x-test": "mesh-retry", "x-fail-first": "1"}
    assert rig.request("catalog", "/items", headers=retried, port=OUTBOUND)[0] == 200
    assert len(rig.seen("mesh-retry")) == 2
    # Another destination is not the route's business: the sidecar's own routes follow.
    other = {addresses.ORIGINAL_DST_HEADER: f"127.65.0.99:{PORT}"}
    assert rig.request("x", headers=other, port=OUTBOUND)[0] == 418

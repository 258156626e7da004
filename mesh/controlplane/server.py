"""The local control plane: API server, controllers, kubelet and system add-ons in one parent.

``ControlPlane.run()`` is what ``hopscope up`` runs (in the foreground, or detached as
``python -m mesh.controlplane``). It is the long-lived parent of every Envoy and app
process, so stopping it — by SIGTERM from ``hopscope down``, Ctrl-C, or even SIGKILL —
stops the whole cluster.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import requests
from prometheus_client import REGISTRY, CollectorRegistry
from werkzeug.serving import BaseWSGIServer, make_server

from mesh import addresses
from mesh.controlplane.api import create_app, prometheus_sd_groups
from mesh.controlplane.guard import Guard, create_tokens
from mesh.controlplane.ingress import IngressController
from mesh.controlplane.kubelet import Kubelet
from mesh.controlplane.mesh import IDENTITY_DIR, MeshController
from mesh.controlplane.slowrequests import SlowRequests
from mesh.identity.ca import IdentityError
from mesh.kernel.rootless import privileges
from mesh.model.controllers import Cluster
from mesh.model.manifests import load_manifests
from mesh.otlp import OTLP_HTTP_PORT
from mesh.otlp.pipeline import TelemetryPipeline, guard_access
from mesh.runtime.base import Runtime, SystemComponent, ingress_pod
from mesh.runtime.local import LocalRuntime
from mesh.tracestore.store import TraceStore, budget_from_env

if TYPE_CHECKING:
    from mesh.kernel.hops import KernelHopJoiner
    from mesh.kernel.topology import KernelNetwork
    from mesh.kubeproxy.rules import RuleSet

log = logging.getLogger(__name__)

API_URL = f"http://{addresses.CONTROL_PLANE_CLIENT_HOST}:{addresses.CONTROL_PLANE_PORT}"
OTLP_URL = f"http://{addresses.CONTROL_PLANE_CLIENT_HOST}:{OTLP_HTTP_PORT}"
"""The OTLP receiver's own listener: where every local component sends its telemetry."""


class StartupError(RuntimeError):
    """The cluster could not be brought up; the message says which part and why."""


class ControlPlane:
    """Owns the model, the runtime and the API; one instance per running cluster.

    Its metrics (API, trace store, kubelet) go on ``registry``, the process's default one
    unless given."""

    def __init__(
        self,
        manifest_paths: list[Path],
        state_dir: Path,
        schema_checked: bool = False,
        runtime: Runtime | None = None,
        trace_store_budget: int | None = None,
        registry: CollectorRegistry = REGISTRY,
        kernel_network: KernelNetwork | None = None,
    ) -> None:
        self.manifest_paths = manifest_paths
        self.schema_checked = schema_checked
        self.state_dir = state_dir
        self.registry = registry
        self.cluster = Cluster()
        self.store = TraceStore(trace_store_budget or budget_from_env(), registry=registry)
        try:
            self.pipeline = TelemetryPipeline.from_env(
                self.store,
                registry,
                sd_groups=lambda: prometheus_sd_groups(self.cluster),
                api_url=API_URL,
            )
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        if runtime is None and kernel_network is not None:
            from mesh.runtime.kernel import KernelRuntime, KernelSetupError

            try:
                runtime = KernelRuntime(
                    state_dir, API_URL, kernel_network, log_sink=self.pipeline.log_sink
                )
            except KernelSetupError as exc:
                raise StartupError(str(exc)) from None
        self.runtime = runtime or LocalRuntime(
            state_dir, API_URL, OTLP_URL, log_sink=self.pipeline.log_sink
        )
        self.kernel_hops: KernelHopJoiner | None = None
        self.kernel_network = kernel_network
        if kernel_network is not None:
            from mesh.kernel.hops import KernelHopJoiner
            from mesh.runtime.kernel import FLOWS_SOCKET

            self.kernel_hops = KernelHopJoiner(
                self.pipeline.intake.add_spans,  # stored, and forwarded like any export
                self._rule_set,
                state_dir / FLOWS_SOCKET,
                registry=registry,
                state=lambda: self.cluster.state,
            )
            self.store.span_hooks.append(self.kernel_hops.on_spans)
        self._rules: tuple[int, RuleSet] | None = None
        try:
            self.mesh = MeshController(self.cluster, self.runtime, state_dir / IDENTITY_DIR)
        except IdentityError as exc:
            raise StartupError(str(exc)) from None
        self.kubelet = Kubelet(self.cluster, self.runtime, registry=registry, mesh=self.mesh)
        self.components: list[SystemComponent] = []
        self._slow_requests: SlowRequests | None = None
        self.ready_at: float | None = None
        self.started_at = time.time()
        self._server: BaseWSGIServer | None = None
        self._stopping = threading.Event()
        self.ingress: IngressController | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, progress: Callable[[str], None] = lambda _msg: None) -> None:
        """Bring the cluster up; returns once the API is serving (pods start in background)."""
        objects = load_manifests(self.manifest_paths, schema=not self.schema_checked)
        self._start_api()
        progress(f"control plane API on {API_URL}")
        self.components.extend(self.runtime.start_system_components())
        changes = self.cluster.apply(objects)
        for change in changes:
            progress(change)
        # the ingress controller: routes follow Ingress objects live (where the runtime's
        # ingress Envoy can read the files it writes; else they are rendered at start only)
        identity = self.mesh.prepare(ingress_pod(), None, xds=False)
        self.ingress = IngressController.for_runtime(self.cluster, self.runtime, identity)
        if self.ingress is not None:
            self.ingress.start()
        self.components.append(self.runtime.start_ingress(self.cluster.state, identity))
        self.kubelet.system_components = list(self.components)
        self.mesh.start()
        self.kubelet.start()
        if self.kernel_hops is not None:
            self.kernel_hops.start()

    def _rule_set(self) -> RuleSet:
        """kube-proxy's rule set for the current state (rebuilt when the state changes)."""
        from mesh.kubeproxy.rules import build_rules

        state = self.cluster.state
        if self._rules is None or self._rules[0] != state.resource_version:
            self._rules = (state.resource_version, build_rules(state, dict(addresses.NODE_IPS)))
        return self._rules[1]

    def _start_api(self) -> None:
        token, otlp_token = create_tokens(self.state_dir)
        guard = Guard(
            token,
            otlp_token,
            addresses.CONTROL_PLANE_IP,
            addresses.CONTROL_PLANE_PORT,
            is_pod_ip=self._is_pod_ip,
            extra_ips=(addresses.CLUSTER_HOST_IP,),
        )
        app = create_app(
            self.cluster,
            self.store,
            self.status,
            actions=self,
            registry=self.registry,
            guard=guard,
            pipeline=self.pipeline,
        )
        self._slow_requests = SlowRequests(app)
        self._slow_requests.start()
        try:
            self._server = make_server(
                addresses.CONTROL_PLANE_IP,
                addresses.CONTROL_PLANE_PORT,
                self._slow_requests,
                threaded=True,
            )
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {API_URL}: {exc.strerror}. Is another hopscope cluster "
                "running? (`hopscope status`, `hopscope down`)"
            ) from None
        thread = threading.Thread(target=self._server.serve_forever, name="api", daemon=True)
        thread.start()
        self.pipeline.server.access = guard_access(guard)
        try:
            self.pipeline.start()
        except OSError as exc:
            self._server.shutdown()
            raise StartupError(
                f"cannot listen on {self.pipeline.url} (OTLP receiver): {exc}"
            ) from None

    def _is_pod_ip(self, ip: str) -> bool:
        """A pod's address, or one of the system pods' (the ingress, the playground internet)."""
        if ip == addresses.INGRESS_IP or ip in addresses.EXTERNAL_HOSTS.values():
            return True
        with self.cluster.lock:
            return self.cluster.state.pod_by_ip(ip) is not None

    def wait_ready(self, timeout: float, progress: Callable[[str], None] = lambda _m: None) -> None:
        """Block until every component and pod is ready, or raise StartupError."""
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline and not self._stopping.is_set():
            st = self.status()
            if st["ready"]:
                return
            summary = st["summary"]
            if summary != last:
                progress(summary)
                last = summary
            time.sleep(0.1)
        raise StartupError(f"cluster not ready after {timeout:.0f}s: {self.status()['summary']}")

    def shutdown(self) -> None:
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self.ingress is not None:
            self.ingress.stop()
        self.kubelet.stop()
        if self._slow_requests is not None:
            self._slow_requests.stop()
        self.mesh.stop()
        if self.kernel_hops is not None:
            self.kernel_hops.stop()
        self.runtime.shutdown()
        self.pipeline.stop()
        if self._server is not None:
            self._server.shutdown()

    def run(self, ready_timeout: float = 60.0) -> int:
        """Run until SIGTERM/SIGINT (the ``python -m mesh.controlplane`` entry point)."""
        stop = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop.set())
        pidfile = self.state_dir / "controlplane.pid"
        pidfile.write_text(str(os.getpid()))
        try:
            self.start(progress=lambda m: log.info(m))
            stop.wait()
        finally:
            self.shutdown()
            pidfile.unlink(missing_ok=True)
        return 0

    # -- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        components = [self._component_status(c) for c in self.components]
        with self.cluster.lock:
            pods = [
                {
                    "namespace": p.namespace,
                    "name": p.name,
                    "phase": p.phase,
                    "ready": p.ready,
                    "node": p.node,
                    "ip": p.ip,
                }
                for p in self.cluster.state.pods
            ]
        ready_pods = sum(1 for p in pods if p["ready"])
        all_ready = bool(components) and all(c["ready"] for c in components)
        all_ready = all_ready and bool(pods) and ready_pods == len(pods)
        if all_ready and self.ready_at is None:
            self.ready_at = time.time()
        not_ready = [c["name"] for c in components if not c["ready"]]
        summary = f"{ready_pods}/{len(pods)} pods ready"
        if not_ready:
            summary += f"; waiting for {', '.join(not_ready)}"
        errors = {f"{ns}/{name}": err for (ns, name), err in self.kubelet.start_errors.items()}
        return {
            "ready": all_ready,
            "summary": summary,
            "api": API_URL,
            "ingress": f"http://{addresses.INGRESS_IP}:{addresses.INGRESS_PORT}",
            "dataplane": "kernel" if self.kernel_hops is not None else "userspace",
            "netns_prefix": self.kernel_network.prefix if self.kernel_network else None,
            "privileges": privileges(),
            "cluster_dns": f"{addresses.DNS_SERVICE_IP}:{addresses.DNS_PORT}",
            "pid": os.getpid(),
            "started_at": self.started_at,
            "ready_at": self.ready_at,
            "components": components,
            "pods": pods,
            "pod_errors": errors,
            "traces": len(self.store),
            "trace_store": self.store.stats(),
            "otlp_receiver": self.pipeline.status(),
            "state_dir": str(self.state_dir),
        }

    def _component_status(self, comp: SystemComponent) -> dict[str, Any]:
        proc = self.runtime.component_status(comp)
        ready = False
        external = comp.process is None
        if (external or (proc is not None and proc.running)) and comp.ready_url:
            try:
                ready = requests.get(comp.ready_url, timeout=0.5).status_code == 200
            except requests.RequestException:
                ready = False
        return {
            "name": comp.name,
            "kind": comp.kind,
            "ready": ready,
            "pid": proc.pid if proc else None,
            "restarts": proc.restarts if proc else 0,
            "log": str(proc.log_path) if proc and proc.log_path else None,
        }

    # -- pod actions (``hopscope ready pod``, ``kill pod``, ``scale``) ------------------------

    def pod_action(
        self, namespace: str, name: str, action: str, body: dict[str, Any]
    ) -> dict[str, Any]:
        if self.cluster.state.pod(name, namespace) is None:
            raise KeyError(f"pod {namespace}/{name} not found")
        if action == "ready":
            value = body.get("ready")
            if value not in (True, False, None):
                raise ValueError('body must be {"ready": true|false|null}')
            self.cluster.set_ready_override(namespace, name, value)
        elif action == "kill":
            self.cluster.delete_pod(namespace, name)
        elif action == "certificate":
            return self._certificate(namespace, name, body)
        else:
            raise ValueError(f"unknown pod action {action!r} (ready, kill, certificate)")
        return {"pod": f"{namespace}/{name}", "action": action, "ok": True}

    def _certificate(self, namespace: str, name: str, body: dict[str, Any]) -> dict[str, Any]:
        """Show the pod's workload certificate; ``{"expired": true}`` swaps in one that
        expired an hour ago, ``{"expired": false}`` a fresh one (both without a restart)."""
        expired = body.get("expired")
        if expired not in (True, False, None):
            raise ValueError('body must be {"expired": true|false} or {}')
        if expired is None:
            cert = self.mesh.certificate(namespace, name)
            if cert is None:
                raise KeyError(f"pod {namespace}/{name} has no workload certificate")
        else:
            cert = self.mesh.set_certificate_lifetime(namespace, name, expired)
        return {
            "pod": f"{namespace}/{name}",
            "action": "certificate",
            "ok": True,
            "identity": cert.spiffe_id,
            "serial": f"{cert.serial:x}",
            "not_before": cert.not_before.isoformat(),
            "not_after": cert.not_after.isoformat(),
            "expired": cert.not_after <= dt.datetime.now(dt.UTC),
            "rotate_at": cert.rotate_at.isoformat(),
        }

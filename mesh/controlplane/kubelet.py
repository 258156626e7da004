"""The kubelet loop: start Pending pods, stop Terminating ones, probe, restart crashed ones.

It runs for both nodes (one loop is enough for a two-node playground), talks to the model
only through the ``Cluster`` methods a real kubelet's status updates correspond to, and to
the runtime only through :class:`~mesh.runtime.base.Runtime`. System components are
restarted like static pods.
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import REGISTRY, CollectorRegistry, Counter

from mesh.controlplane.mesh import MeshController
from mesh.model.controllers import Cluster
from mesh.model.types import Pod
from mesh.runtime.base import ProcessStatus, Runtime, SystemComponent
from mesh.runtime.probes import ProbeTracker, probe_pod

log = logging.getLogger(__name__)

LOOP_INTERVAL = 0.1
"""Seconds between kubelet passes."""

RESTART_BACKOFF = 1.0
"""Seconds to wait before restarting a crashed container (CrashLoopBackOff, simplified)."""


class Kubelet:
    """Drives pod lifecycle against the runtime on a background thread."""

    def __init__(
        self,
        cluster: Cluster,
        runtime: Runtime,
        registry: CollectorRegistry = REGISTRY,
        mesh: MeshController | None = None,
    ) -> None:
        self.cluster = cluster
        self.runtime = runtime
        self.mesh = mesh
        """Issues each pod's certificate and sidecar files before it starts (None: none)."""
        self.trackers: dict[tuple[str, str], ProbeTracker] = {}
        self.start_errors: dict[tuple[str, str], str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kubelet", daemon=True)
        self._crashed_at: dict[str, float] = {}
        self.system_components: list[SystemComponent] = []
        """Add-ons (DNS, data path, ingress, internet), restarted like static pods."""
        self.started_pods = Counter(
            "hopscope_kubelet_started_pods_total", "Pods the runtime started", registry=registry
        )
        self.start_errors_total = Counter(
            "hopscope_kubelet_started_pods_errors_total",
            "Attempts to start a pod that failed",
            registry=registry,
        )
        self.restarts = Counter(
            "hopscope_kubelet_restarted_containers_total",
            "Exited containers and system components the kubelet restarted",
            ["kind"],
            registry=registry,
        )
        for kind in ("container", "system"):
            self.restarts.labels(kind)  # both series exist from the start, at 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(LOOP_INTERVAL):
            try:
                self.sync_once()
            except Exception:
                log.exception("kubelet pass failed")

    def sync_once(self) -> None:
        for pod in self.cluster.pods_to_start():
            if pod.ip and pod.node:
                self._start(pod)
        for pod in self.cluster.pods_to_stop():
            self._stop_pod(pod)
        for pod in self.cluster.running_pods():
            self._check_processes(pod)
            self._probe(pod)
        self._check_system()

    def _check_system(self) -> None:
        for component in self.system_components:
            status = self.runtime.component_status(component)
            if status is None or not self._restart_due(status, RESTART_BACKOFF / 2):
                continue
            log.warning(
                "system component exited; restarting",
                extra={"proc": status.name, "exit_code": status.exit_code},
            )
            self.runtime.restart_component(component)
            self.restarts.labels("system").inc()

    def _restart_due(self, status: ProcessStatus, backoff: float) -> bool:
        """Whether an exited container has waited out its back-off (and may restart now)."""
        if status.running:
            return False
        crashed = self._crashed_at.setdefault(status.name, time.monotonic())
        if time.monotonic() - crashed < backoff:
            return False
        self._crashed_at.pop(status.name, None)
        return True

    def _start(self, pod: Pod) -> None:
        key = (pod.namespace, pod.name)
        with self.cluster.lock:
            state = self.cluster.state
            try:
                files = self.mesh.prepare(pod, state) if self.mesh is not None else None
                self.runtime.start_pod(pod, state, files)
            except Exception as exc:
                if key not in self.start_errors:
                    log.error("pod failed to start", extra={"pod": pod.name, "error": str(exc)})
                self.start_errors[key] = str(exc)
                self.start_errors_total.inc()
                return
        self.start_errors.pop(key, None)
        self.started_pods.inc()
        self.trackers[key] = ProbeTracker()
        self.cluster.set_pod_running(pod.namespace, pod.name)
        log.info("pod started", extra={"pod": pod.name, "ip": pod.ip, "node": pod.node})

    def _stop_pod(self, pod: Pod) -> None:
        self.runtime.stop_pod(pod)
        if self.mesh is not None:
            self.mesh.forget(pod)
        self.trackers.pop((pod.namespace, pod.name), None)
        self.cluster.finalize_pod(pod.namespace, pod.name)
        log.info("pod stopped", extra={"pod": pod.name})

    def _check_processes(self, pod: Pod) -> None:
        for status in self.runtime.container_statuses(pod):
            if not self._restart_due(status, RESTART_BACKOFF):
                continue
            log.warning(
                "container exited; restarting",
                extra={"proc": status.name, "exit_code": status.exit_code},
            )
            self.runtime.restart_container(status.name)
            self.restarts.labels("container").inc()
            self.cluster.count_restart(pod.namespace, pod.name)
            self.cluster.set_pod_ready(pod.namespace, pod.name, False)

    def _probe(self, pod: Pod) -> None:
        tracker = self.trackers.setdefault((pod.namespace, pod.name), ProbeTracker())
        probe = next((c.readiness_probe for c in pod.containers if c.readiness_probe), None)
        if not tracker.due(probe):
            return
        ok, error = probe_pod(pod)
        if tracker.record(ok, probe) or pod.ready != tracker.ready:
            self.cluster.set_pod_ready(pod.namespace, pod.name, tracker.ready)
            log.info(
                "pod readiness changed",
                extra={"pod": pod.name, "ready": tracker.ready, "reason": error},
            )

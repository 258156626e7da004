"""The kubelet loop: start Pending pods, stop Terminating ones, probe, restart crashed ones.

It runs for both nodes (one loop is enough for a two-node playground) and talks to the
model only through the ``Cluster`` methods a real kubelet's status updates correspond to.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from mesh.model.types import Pod
from mesh.runtime.local import LocalRuntime
from mesh.runtime.probes import ProbeTracker, probe_pod

log = logging.getLogger(__name__)

LOOP_INTERVAL = 0.1
"""Seconds between kubelet passes."""

RESTART_BACKOFF = 1.0
"""Seconds to wait before restarting a crashed container (CrashLoopBackOff, simplified)."""


class Kubelet:
    """Drives pod lifecycle against the runtime on a background thread."""

    def __init__(self, cluster: Any, runtime: LocalRuntime) -> None:
        self.cluster = cluster
        self.runtime = runtime
        self.trackers: dict[tuple[str, str], ProbeTracker] = {}
        self.start_errors: dict[tuple[str, str], str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kubelet", daemon=True)
        self._crashed_at: dict[str, float] = {}
        self.system_processes: list[str] = []
        """Add-on processes (DNS, kube-proxy, ingress) restarted like static pods."""

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
        for pod in self._running_pods():
            self._check_processes(pod)
            self._probe(pod)
        self._check_system()

    def _check_system(self) -> None:
        for name in self.system_processes:
            proc = self.runtime.processes.get(name)
            if proc is None or proc.alive():
                continue
            crashed = self._crashed_at.setdefault(name, time.monotonic())
            if time.monotonic() - crashed < RESTART_BACKOFF / 2:
                continue
            self._crashed_at.pop(name, None)
            log.warning(
                "system component exited; restarting",
                extra={"proc": name, "exit_code": proc.exit_code()},
            )
            self.runtime.processes.restart(name)

    def _running_pods(self) -> list[Pod]:
        with self.cluster.lock:
            return [p for p in self.cluster.state.pods if p.phase == "Running"]

    def _start(self, pod: Pod) -> None:
        key = (pod.namespace, pod.name)
        with self.cluster.lock:
            state = self.cluster.state
            try:
                self.runtime.start_pod(pod, state)
            except Exception as exc:
                if key not in self.start_errors:
                    log.error("pod failed to start", extra={"pod": pod.name, "error": str(exc)})
                self.start_errors[key] = str(exc)
                return
        self.start_errors.pop(key, None)
        self.trackers[key] = ProbeTracker()
        self.cluster.set_pod_running(pod.namespace, pod.name)
        log.info("pod started", extra={"pod": pod.name, "ip": pod.ip, "node": pod.node})

    def _stop_pod(self, pod: Pod) -> None:
        self.runtime.stop_pod(pod)
        self.trackers.pop((pod.namespace, pod.name), None)
        self.cluster.finalize_pod(pod.namespace, pod.name)
        log.info("pod stopped", extra={"pod": pod.name})

    def _check_processes(self, pod: Pod) -> None:
        for proc in self.runtime.pod_processes(pod):
            if proc.alive():
                continue
            crashed = self._crashed_at.setdefault(proc.name, time.monotonic())
            if time.monotonic() - crashed < RESTART_BACKOFF:
                continue
            self._crashed_at.pop(proc.name, None)
            log.warning(
                "container exited; restarting",
                extra={"proc": proc.name, "exit_code": proc.exit_code()},
            )
            self.runtime.restart(proc.name)
            with self.cluster.lock:
                pod.restarts += 1
            self.cluster.set_pod_ready(pod.namespace, pod.name, False)

    def _probe(self, pod: Pod) -> None:
        tracker = self.trackers.setdefault((pod.namespace, pod.name), ProbeTracker())
        probe = next((c.readiness_probe for c in pod.containers if c.readiness_probe), None)
        if not tracker.due(probe):
            return
        ok, error = probe_pod(pod)
        if tracker.record(ok, error, probe) or pod.ready != tracker.ready:
            self.cluster.set_pod_ready(pod.namespace, pod.name, tracker.ready)
            log.info(
                "pod readiness changed",
                extra={"pod": pod.name, "ready": tracker.ready, "reason": error},
            )

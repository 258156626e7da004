"""The Deployment and StatefulSet controllers: keep each workload's replicas running.

A Deployment's pods are named ``<name>-<pod-template-hash>-<random>``; a changed template
replaces them all (a ``Recreate`` rollout) and scaling down removes the newest first. A
StatefulSet's pods are ``<name>-<ordinal>`` with stable hostnames under its Service, and
scaling down removes the highest ordinals.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from mesh.model.controllers.names import name_suffix
from mesh.model.controllers.pods import PodLifecycle, owned_pods
from mesh.model.controllers.scheduler import Scheduler
from mesh.model.controllers.store import upsert
from mesh.model.types import ClusterState, Workload


def template_hash(workload: Workload) -> str:
    """A stable hash of the pod template, like the ``pod-template-hash`` label."""
    return name_suffix(json.dumps(asdict(workload.template), sort_keys=True), 10)


class WorkloadController:
    """Stores workloads and reconciles their pods through :class:`PodLifecycle`."""

    def __init__(self, state: ClusterState, pods: PodLifecycle, scheduler: Scheduler) -> None:
        self.state = state
        self.pods = pods
        self.scheduler = scheduler
        self._template_hashes: dict[tuple[str, str], str] = {}

    def apply(self, wl: Workload) -> str:
        self.scheduler.check(wl)
        key = (wl.namespace, wl.name)
        new_hash = template_hash(wl)
        old_hash = self._template_hashes.get(key)
        if old_hash is not None and old_hash != new_hash:
            for pod in owned_pods(self.state, wl):
                self.pods.terminate(pod)
        self._template_hashes[key] = new_hash
        verb = "configured" if old_hash else "created"
        upsert(self.state.workloads, wl, wl.kind.lower())
        return f"{wl.kind.lower()}.apps/{wl.namespace}/{wl.name} {verb} ({wl.replicas} replicas)"

    def delete(self, wl: Workload) -> str:
        found = [
            w
            for w in self.state.workloads
            if (w.namespace, w.name, w.kind) == (wl.namespace, wl.name, wl.kind)
        ]
        for old in found:
            self.state.workloads.remove(old)
            self._template_hashes.pop((old.namespace, old.name), None)
            for pod in owned_pods(self.state, old):
                self.pods.terminate(pod)
        verb = "deleted" if found else "not found"
        return f"{wl.kind.lower()}.apps/{wl.namespace}/{wl.name} {verb}"

    def scale(self, namespace: str, name: str, replicas: int) -> str:
        for wl in self.state.workloads:
            if wl.namespace == namespace and wl.name == name:
                wl.replicas = replicas
                return f"{wl.kind.lower()}.apps/{namespace}/{name} scaled to {replicas}"
        raise KeyError(f"deployment or statefulset {namespace}/{name} not found")

    def reconcile(self) -> None:
        """Create and terminate pods until every workload has its replicas."""
        for wl in self.state.workloads:
            if wl.kind == "StatefulSet":
                self._reconcile_stateful_set(wl)
            else:
                self._reconcile_deployment(wl)

    def _reconcile_deployment(self, wl: Workload) -> None:
        pods = owned_pods(self.state, wl)
        pod_template_hash = self._template_hashes[(wl.namespace, wl.name)]
        for _ in range(wl.replicas - len(pods)):
            self._create(wl, f"{wl.name}-{pod_template_hash}-{name_suffix(None, 5)}")
        if len(pods) > wl.replicas:
            newest = sorted(pods, key=lambda p: p.created, reverse=True)
            for pod in newest[: len(pods) - wl.replicas]:
                self.pods.terminate(pod)

    def _reconcile_stateful_set(self, wl: Workload) -> None:
        names = {p.name for p in owned_pods(self.state, wl, live_only=False)}
        for ordinal in range(wl.replicas):
            name = f"{wl.name}-{ordinal}"
            if name not in names:
                self._create(wl, name)
        for pod in owned_pods(self.state, wl):
            if int(pod.name.rsplit("-", 1)[1]) >= wl.replicas:
                self.pods.terminate(pod)

    def _create(self, wl: Workload, name: str) -> None:
        self.pods.create(wl, name, self.scheduler.pick(wl))

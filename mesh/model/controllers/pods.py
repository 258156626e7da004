"""Pod lifecycle: creation with an address from the node's pod CIDR, the kubelet's status
updates (running, probe results, ``hopscope ready pod`` overrides), termination, removal.

Pods go ``Pending`` → ``Running`` → ``Terminating`` → gone. A pod is ready when it runs and
its override, or else its last probe, says so. Methods that change what EndpointSlices
show return ``True``; the caller then resyncs the slices and bumps the version.
"""

from __future__ import annotations

import time

from mesh import addresses
from mesh.model.controllers.allocators import AddressPool
from mesh.model.types import ClusterState, Node, Pod, Workload


def owned_pods(state: ClusterState, wl: Workload, live_only: bool = True) -> list[Pod]:
    """The pods ``wl`` controls; with ``live_only``, not those already terminating."""
    return [
        p
        for p in state.pods
        if p.namespace == wl.namespace
        and p.owner_kind == wl.kind
        and p.owner_name == wl.name
        and (not live_only or p.phase != "Terminating")
    ]


class PodLifecycle:
    """Creates, updates and removes the state's pods; the node IPAM lives here too."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state
        # Node and ingress addresses may sit inside a pod CIDR (compose): never hand them out.
        infra = {*addresses.NODE_IPS.values(), addresses.INGRESS_IP, *addresses.RESERVED_POD_IPS}
        self.pod_ips = {n.name: AddressPool(n.pod_cidr, reserved=infra) for n in state.nodes}
        """Node name → the pool of its pod CIDR."""
        self._probe_ready: dict[tuple[str, str], bool] = {}

    def find(self, namespace: str, name: str) -> Pod:
        pod = self.state.pod(name, namespace)
        if pod is None:
            raise KeyError(f"pod {namespace}/{name} not found")
        return pod

    def with_phase(self, phase: str) -> list[Pod]:
        return [p for p in self.state.pods if p.phase == phase]

    def create(self, wl: Workload, name: str, node: Node) -> Pod:
        pod = Pod(
            name=name,
            namespace=wl.namespace,
            labels=dict(wl.template.labels),
            node=node.name,
            ip=self.pod_ips[node.name].allocate(),
            containers=wl.template.containers,
            owner_kind=wl.kind,
            owner_name=wl.name,
            created=time.time(),
            annotations=dict(wl.template.annotations),
            service_account=wl.template.service_account,
        )
        if wl.kind == "StatefulSet":
            pod.hostname, pod.subdomain = name, wl.service_name
        self.state.pods.append(pod)
        return pod

    @staticmethod
    def terminate(pod: Pod) -> None:
        pod.phase = "Terminating"
        pod.ready = False

    def set_running(self, namespace: str, name: str) -> bool:
        pod = self.find(namespace, name)
        if pod.phase != "Pending":
            return False
        pod.phase = "Running"
        return True

    def set_probe_result(self, namespace: str, name: str, ready: bool) -> bool:
        pod = self.state.pod(name, namespace)
        if pod is None:
            return False
        self._probe_ready[(namespace, name)] = ready
        return self._update_ready(pod)

    def set_override(self, namespace: str, name: str, ready: bool | None) -> bool:
        pod = self.find(namespace, name)
        pod.ready_override = ready
        return self._update_ready(pod)

    def _update_ready(self, pod: Pod) -> bool:
        probe = self._probe_ready.get((pod.namespace, pod.name), False)
        effective = pod.ready_override if pod.ready_override is not None else probe
        effective = effective and pod.phase == "Running"
        if effective == pod.ready:
            return False
        pod.ready = effective
        return True

    def finalize(self, namespace: str, name: str) -> bool:
        """The pod's containers are gone: remove it and release its address."""
        pod = self.state.pod(name, namespace)
        if pod is None:
            return False
        self.state.pods.remove(pod)
        self.pod_ips[pod.node].release(pod.ip)
        self._probe_ready.pop((namespace, name), None)
        return True

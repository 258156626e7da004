"""The :class:`Cluster` facade: one lock, one state, and the controllers wired together.

Callers (the API, the kubelet, tests) see the methods a real cluster's API server and
kubelet status updates offer. Each ``apply``/``delete`` dispatches on the object's type
through :attr:`Cluster.kinds`; each change ends with :meth:`Cluster._sync` — workloads
reconcile to their replicas, EndpointSlices are rebuilt, the version is bumped.
"""

from __future__ import annotations

from typing import Any

from mesh import addresses
from mesh.model.controllers.endpointslices import EndpointSliceController
from mesh.model.controllers.kinds import ClusterConfig, Kind, StoredKind, default_egress_ips
from mesh.model.controllers.pods import PodLifecycle
from mesh.model.controllers.scheduler import Scheduler
from mesh.model.controllers.services import ServiceRegistry
from mesh.model.controllers.store import ObjectStore
from mesh.model.controllers.workloads import WorkloadController
from mesh.model.manifests import ManifestError, ManifestObject
from mesh.model.meshpolicy import MESH_ROOT_NAMESPACE
from mesh.model.types import (
    ClusterState,
    DestinationRule,
    DnsConfig,
    Gateway,
    GRPCRoute,
    HTTPRoute,
    Ingress,
    Namespace,
    NetworkConfig,
    NetworkPolicy,
    Node,
    PeerAuthentication,
    Pod,
    ProxyConfig,
    Secret,
    Service,
    TLSRoute,
    Workload,
)


def initial_state() -> ClusterState:
    """The two nodes, the ``default`` and ``kube-system`` namespaces, default egress IPs."""
    state = ClusterState(
        nodes=[
            Node(name, ip, addresses.POD_CIDRS[name], {"kubernetes.io/hostname": name})
            for name, ip in addresses.NODE_IPS.items()
        ],
        namespaces=[
            Namespace(n, {"kubernetes.io/metadata.name": n})
            for n in ("default", "kube-system", MESH_ROOT_NAMESPACE)
        ],
    )
    state.network.egress_ips = default_egress_ips()
    return state


class Cluster:
    """The model plus its controllers. All mutation goes through methods holding ``lock``."""

    def __init__(self) -> None:
        self.store = ObjectStore(initial_state())
        self.lock = self.store.lock
        self.state = self.store.state
        self.config = ClusterConfig(self.state)
        self.services = ServiceRegistry(self.state)
        self.pods = PodLifecycle(self.state)
        self.workloads = WorkloadController(self.state, self.pods, Scheduler(self.state))
        self.endpoint_slices = EndpointSliceController(self.state)
        self.kinds: dict[type, Kind] = {
            Namespace: Kind(self.config.apply_namespace),
            DnsConfig: Kind(self.config.apply_dns),
            NetworkConfig: Kind(self.config.apply_network),
            ProxyConfig: Kind(self.config.apply_proxy),
            Service: Kind(self.services.apply, self.services.delete),
            Workload: Kind(self.workloads.apply, self.workloads.delete),
            Ingress: StoredKind(self.state.ingresses, "ingress").kind(),
            NetworkPolicy: StoredKind(self.state.network_policies, "netpol").kind(),
            Secret: StoredKind(self.state.secrets, "secret").kind(),
            PeerAuthentication: StoredKind(
                self.state.peer_authentications, "peerauthentication"
            ).kind(),
            DestinationRule: StoredKind(self.state.destination_rules, "destinationrule").kind(),
            Gateway: StoredKind(self.state.gateways, "gateway").kind(),
            HTTPRoute: StoredKind(self.state.http_routes, "httproute").kind(),
            GRPCRoute: StoredKind(self.state.grpc_routes, "grpcroute").kind(),
            TLSRoute: StoredKind(self.state.tls_routes, "tlsroute").kind(),
        }
        """Object type → what ``apply`` and ``delete`` do with it."""
        self.endpoint_slices.sync()

    # -- reading -----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        return self.store.snapshot()

    def wait_for_change(self, after: int, timeout: float) -> dict[str, Any]:
        """Return the state once its version exceeds ``after`` or ``timeout`` passes."""
        return self.store.wait_for_change(after, timeout)

    # -- objects (``hopscope apply -f``, ``delete -f``, ``scale``) -------------------------

    def apply(self, objects: list[ManifestObject]) -> list[str]:
        """Create or update objects (like ``kubectl apply``); return what changed, in words.

        Objects before a refused one stay applied, as with ``kubectl apply``."""
        with self.lock:
            self._check_namespaces(objects)
            changes: list[str] = []
            try:
                for obj in objects:
                    if obj is not None:
                        changes.append(self._kind(obj).apply(obj))
            finally:
                self._sync()
            return changes

    def delete(self, objects: list[ManifestObject]) -> list[str]:
        """Remove objects (like ``kubectl delete -f``); pods of a workload terminate."""
        with self.lock:
            changes: list[str] = []
            for obj in objects:
                kind = self.kinds.get(type(obj))
                if kind is not None and kind.delete is not None:
                    changes.append(kind.delete(obj))
            self._sync()
            return changes

    def scale(self, namespace: str, name: str, replicas: int) -> str:
        if replicas < 0:
            raise ValueError("replicas must be 0 or more")
        with self.lock:
            message = self.workloads.scale(namespace, name, replicas)
            self._sync()
            return message

    def _kind(self, obj: object) -> Kind:
        kind = self.kinds.get(type(obj))
        if kind is None:
            raise TypeError(f"no handler for {type(obj).__name__} objects")
        return kind

    def _check_namespaces(self, objects: list[ManifestObject]) -> None:
        known = self.config.namespace_names() | {
            o.name for o in objects if isinstance(o, Namespace)
        }
        for obj in objects:
            ns = getattr(obj, "namespace", None)
            if ns is not None and ns not in known:
                raise ManifestError(
                    f"{getattr(obj, 'source', '')}: namespace {ns!r} not found "
                    "(add a Namespace object)"
                )

    # -- pods (the kubelet's status updates, ``hopscope ready|kill pod``) -----------------

    def pods_to_start(self) -> list[Pod]:
        with self.lock:
            return self.pods.with_phase("Pending")

    def pods_to_stop(self) -> list[Pod]:
        with self.lock:
            return self.pods.with_phase("Terminating")

    def running_pods(self) -> list[Pod]:
        with self.lock:
            return self.pods.with_phase("Running")

    def set_pod_running(self, namespace: str, name: str) -> None:
        with self.lock:
            if self.pods.set_running(namespace, name):
                self._endpoints_changed()

    def set_pod_ready(self, namespace: str, name: str, ready: bool) -> None:
        """Record the probe result (the kubelet's status update)."""
        with self.lock:
            if self.pods.set_probe_result(namespace, name, ready):
                self._endpoints_changed()

    def set_ready_override(self, namespace: str, name: str, ready: bool | None) -> None:
        """Force readiness (``hopscope ready pod``); ``None`` goes back to the probe."""
        with self.lock:
            self.pods.set_override(namespace, name, ready)
            self._endpoints_changed()

    def count_restart(self, namespace: str, name: str) -> None:
        """A container of the pod was restarted (shown as RESTARTS; no new version)."""
        with self.lock:
            pod = self.state.pod(name, namespace)
            if pod is not None:
                pod.restarts += 1

    def delete_pod(self, namespace: str, name: str) -> None:
        """Delete a pod (``hopscope kill pod``); its controller creates a replacement."""
        with self.lock:
            self.pods.terminate(self.pods.find(namespace, name))
            self._sync()

    def finalize_pod(self, namespace: str, name: str) -> None:
        """The pod's processes are gone: remove it and release its IP."""
        with self.lock:
            if self.pods.finalize(namespace, name):
                self._endpoints_changed()

    # -- after every change ----------------------------------------------------------------

    def _sync(self) -> None:
        self.workloads.reconcile()
        self._endpoints_changed()

    def _endpoints_changed(self) -> None:
        self.endpoint_slices.sync()
        self.store.bump()

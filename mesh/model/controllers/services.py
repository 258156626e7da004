"""The Service registry: stores Services and gives each the addresses its type needs.

Each :class:`ServiceType` lists, in :data:`SERVICE_TYPES`, the allocators whose fields it
has; every other allocator clears its fields. Adding a Service type is one entry there,
plus an allocator if the type brings a new kind of address. The allocators:

* :class:`ClusterIPAllocator` — ``spec.clusterIP`` from the Service CIDR (``"None"`` keeps
  a Service headless);
* :class:`NodePortAllocator` — ``spec.ports[].nodePort`` from 30000-32767;
* :class:`LoadBalancerAllocator` — the emulated cloud provider: ``status.loadBalancer``
  addresses from the LB pool, and ``spec.healthCheckNodePort`` for
  ``externalTrafficPolicy: Local``.

An update first gives back what the old object held, then allocates again, preferring the
old values (a Service keeps its ClusterIP and NodePorts); a refused Service rolls every
allocator back, so it leaks nothing.
"""

from __future__ import annotations

from typing import Any, Protocol

from mesh import addresses
from mesh.model.controllers.allocators import AddressPool, AllocationError, PortAllocator
from mesh.model.controllers.store import remove, upsert
from mesh.model.manifests import ManifestError
from mesh.model.types import ClusterState, Service, ServicePort, ServiceType, TrafficPolicy
from mesh.model.types import Protocol as PortProtocol

SERVED_BY_ANNOTATION = "hopscope.dev/served-by"
"""Marks a Service whose VIP is served by a system component itself (no proxying)."""

HEADLESS = "None"
"""``spec.clusterIP`` of a headless Service."""


class AddressAllocator(Protocol):
    """Fills one group of a Service's address fields."""

    def allocate(self, svc: Service, old: Service | None) -> None:
        """Fill the fields (keeping ``old``'s where possible) or raise ManifestError."""

    def clear(self, svc: Service) -> None:
        """The type has none of these fields: empty them."""

    def release(self, svc: Service) -> None:
        """Give back what ``svc`` holds."""

    def checkpoint(self) -> Any: ...

    def rollback(self, checkpoint: Any) -> None: ...


def _owner(svc: Service) -> str:
    return f"Service {svc.namespace}/{svc.name}"


def _refused(svc: Service, field: str, exc: AllocationError) -> ManifestError:
    return ManifestError(f"{svc.source}: {field}: {exc}")


class ClusterIPAllocator:
    """``spec.clusterIP``: the requested address, the old one, or the lowest free one."""

    def __init__(self) -> None:
        reserved = (addresses.DNS_SERVICE_IP, addresses.KUBERNETES_SERVICE_IP)
        self.pool = AddressPool(addresses.SERVICE_CIDR, first_host=11, reserved=reserved)

    def allocate(self, svc: Service, old: Service | None) -> None:
        if svc.cluster_ip in (None, ""):
            svc.cluster_ip = old.cluster_ip if old and old.cluster_ip else None
        try:
            if svc.cluster_ip is None:
                svc.cluster_ip = self.pool.allocate()
            elif svc.cluster_ip != HEADLESS:
                self.pool.claim(svc.cluster_ip)
        except AllocationError as exc:
            raise _refused(svc, "spec.clusterIP", exc) from None

    def clear(self, svc: Service) -> None:
        svc.cluster_ip = None

    def release(self, svc: Service) -> None:
        if svc.cluster_ip and svc.cluster_ip != HEADLESS:
            self.pool.release(svc.cluster_ip)

    def checkpoint(self) -> frozenset[str]:
        return self.pool.checkpoint()

    def rollback(self, checkpoint: frozenset[str]) -> None:
        self.pool.rollback(checkpoint)


class NodePortAllocator:
    """``spec.ports[].nodePort``: the requested port if free, the old one, else the lowest."""

    def __init__(self, ports: PortAllocator) -> None:
        self.ports = ports

    def allocate(self, svc: Service, old: Service | None) -> None:
        for i, sp in enumerate(svc.ports):
            if sp.node_port is None and old is not None:
                previous = next((p for p in old.ports if p.name == sp.name), None)
                if previous and previous.node_port not in self.ports.owners:
                    sp.node_port = previous.node_port
            try:
                sp.node_port = self.ports.claim(sp.node_port, _owner(svc))
            except AllocationError as exc:
                raise _refused(svc, f"spec.ports[{i}].nodePort", exc) from None

    def clear(self, svc: Service) -> None:
        for sp in svc.ports:
            sp.node_port = None

    def release(self, svc: Service) -> None:
        for sp in svc.ports:
            if sp.node_port is not None:
                self.ports.release(sp.node_port, _owner(svc))

    def checkpoint(self) -> dict[int, str]:
        return self.ports.checkpoint()

    def rollback(self, checkpoint: dict[int, str]) -> None:
        self.ports.rollback(checkpoint)


class LoadBalancerAllocator:
    """The emulated cloud provider: a load-balancer address per Service (kept across
    updates), and a health-check NodePort when ``externalTrafficPolicy`` is ``Local``."""

    def __init__(self, ports: PortAllocator) -> None:
        self.pool = AddressPool(addresses.LB_POOL_CIDR, first_host=2)
        self.ports = ports

    def allocate(self, svc: Service, old: Service | None) -> None:
        wanted = old.load_balancer_ingress if old and old.load_balancer_ingress else []
        if not wanted and svc.load_balancer_ip:
            wanted = [svc.load_balancer_ip]
        try:
            for ip in wanted:
                self.pool.claim(ip)
            svc.load_balancer_ingress = list(wanted) or [self.pool.allocate()]
        except AllocationError as exc:
            raise _refused(svc, "spec.loadBalancerIP", exc) from None
        if svc.external_traffic_policy != TrafficPolicy.LOCAL:
            svc.health_check_node_port = None
            return
        if svc.health_check_node_port is None and old is not None:
            svc.health_check_node_port = old.health_check_node_port
        try:
            svc.health_check_node_port = self.ports.claim(svc.health_check_node_port, _owner(svc))
        except AllocationError as exc:
            raise _refused(svc, "spec.healthCheckNodePort", exc) from None

    def clear(self, svc: Service) -> None:
        svc.load_balancer_ingress = []
        svc.health_check_node_port = None

    def release(self, svc: Service) -> None:
        for ip in svc.load_balancer_ingress:
            self.pool.release(ip)
        if svc.health_check_node_port is not None:
            self.ports.release(svc.health_check_node_port, _owner(svc))

    def checkpoint(self) -> tuple[frozenset[str], dict[int, str]]:
        return self.pool.checkpoint(), self.ports.checkpoint()

    def rollback(self, checkpoint: tuple[frozenset[str], dict[int, str]]) -> None:
        self.pool.rollback(checkpoint[0])
        self.ports.rollback(checkpoint[1])


SERVICE_TYPES: dict[ServiceType, tuple[type[AddressAllocator], ...]] = {
    ServiceType.CLUSTER_IP: (ClusterIPAllocator,),
    ServiceType.NODE_PORT: (ClusterIPAllocator, NodePortAllocator),
    ServiceType.LOAD_BALANCER: (ClusterIPAllocator, NodePortAllocator, LoadBalancerAllocator),
    ServiceType.EXTERNAL_NAME: (),
}
"""Which address fields each Service type has, by the allocator that fills them."""


class ServiceRegistry:
    """Creates, updates and deletes Services in the state, allocating their addresses."""

    def __init__(self, state: ClusterState) -> None:
        self.state = state
        node_ports = PortAllocator(*addresses.NODE_PORT_RANGE, what="NodePort")
        self.allocators: dict[type[AddressAllocator], AddressAllocator] = {
            ClusterIPAllocator: ClusterIPAllocator(),
            NodePortAllocator: NodePortAllocator(node_ports),
            LoadBalancerAllocator: LoadBalancerAllocator(node_ports),
        }
        state.services.extend([kube_dns_service(), kubernetes_service()])

    def apply(self, svc: Service) -> str:
        old = self.state.service(svc.namespace, svc.name)
        self._allocate(svc, old)
        verb = "configured" if old else "created"
        upsert(self.state.services, svc, "service")
        return f"service/{svc.namespace}/{svc.name} {verb} ({svc.type} {svc.cluster_ip})"

    def delete(self, svc: Service) -> str:
        old = self.state.service(svc.namespace, svc.name)
        if old is None:
            return f"service/{svc.namespace}/{svc.name} not found"
        for allocator in self.allocators.values():
            allocator.release(old)
        return remove(self.state.services, old, "service")

    def _allocate(self, svc: Service, old: Service | None) -> None:
        wanted = SERVICE_TYPES[svc.type]
        checkpoints = [(a, a.checkpoint()) for a in self.allocators.values()]
        try:
            if old is not None:
                for allocator in self.allocators.values():
                    allocator.release(old)
            for kind, allocator in self.allocators.items():
                if kind in wanted:
                    allocator.allocate(svc, old)
                else:
                    allocator.clear(svc)
        except ManifestError:
            for allocator, checkpoint in checkpoints:
                allocator.rollback(checkpoint)
            raise


def kubernetes_service() -> Service:
    """``kubernetes.default``: resolvable like in any cluster (the API itself is not proxied)."""
    return Service(
        name="kubernetes",
        namespace="default",
        cluster_ip=addresses.KUBERNETES_SERVICE_IP,
        ports=[ServicePort(443, 6443, "https")],
        labels={"component": "apiserver", "provider": "kubernetes"},
        annotations={SERVED_BY_ANNOTATION: "control-plane"},
        source="built-in",
    )


def kube_dns_service() -> Service:
    """``kube-dns.kube-system``: the cluster DNS VIP, answered by the DNS server itself."""
    dns, metrics = addresses.DNS_PORT, addresses.DNS_METRICS_PORT
    return Service(
        name="kube-dns",
        namespace="kube-system",
        cluster_ip=addresses.DNS_SERVICE_IP,
        ports=[
            ServicePort(dns, dns, "dns", PortProtocol.UDP),
            ServicePort(dns, dns, "dns-tcp", PortProtocol.TCP),
            ServicePort(metrics, metrics, "metrics"),
        ],
        labels={"k8s-app": "kube-dns"},
        annotations={SERVED_BY_ANNOTATION: "cluster-dns"},
        source="built-in",
    )

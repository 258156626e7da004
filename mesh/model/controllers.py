"""Controllers: the parts of the control plane that turn desired state into pods and endpoints.

:class:`Cluster` owns the one :class:`ClusterState` and plays, in one place, the roles of
the Deployment/StatefulSet controllers (replicas → pods), the scheduler (spread across
nodes, honouring ``nodeSelector``), the CNI's IPAM (per-node pod CIDRs, addresses reused
when pods go), the Service IP allocator and the EndpointSlice controller (endpoints built
from pod readiness, at most 100 per slice). Every change bumps ``resource_version`` and wakes
watchers, the way the API server notifies kube-proxy.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import random
import threading
import time
from dataclasses import asdict
from typing import Any

from mesh import addresses
from mesh.model.manifests import ManifestError, ManifestObject
from mesh.model.types import (
    ClusterState,
    DnsConfig,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Ingress,
    Namespace,
    NetworkConfig,
    NetworkPolicy,
    Node,
    Pod,
    Protocol,
    ProxyConfig,
    Service,
    ServicePort,
    Workload,
)

MAX_ENDPOINTS_PER_SLICE = 100
"""The EndpointSlice controller's default ``--max-endpoints-per-slice``."""

NAME_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
"""Characters Kubernetes uses for generated name suffixes (no vowels, no look-alikes)."""

SERVED_BY_ANNOTATION = "hopscope.dev/served-by"
"""Marks a Service whose VIP is served by a system component itself (no proxying)."""


def _suffix(seed: str | None, length: int) -> str:
    if seed is None:
        return "".join(random.choice(NAME_ALPHABET) for _ in range(length))
    digest = hashlib.sha256(seed.encode()).digest()
    return "".join(NAME_ALPHABET[b % len(NAME_ALPHABET)] for b in digest[:length])


def template_hash(workload: Workload) -> str:
    """A stable hash of the pod template, like the ``pod-template-hash`` label."""
    return _suffix(json.dumps(asdict(workload.template), sort_keys=True), 10)


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


class AddressPool:
    """Lowest-free allocation from a CIDR, skipping network, gateway-like .1 and broadcast."""

    def __init__(self, cidr: str, first_host: int = 2, reserved: set[str] | None = None) -> None:
        self.network = ipaddress.ip_network(cidr)
        self.first = int(self.network.network_address) + first_host
        self.last = int(self.network.broadcast_address) - 1
        self.used: set[str] = set(reserved or ())

    def allocate(self) -> str:
        for n in range(self.first, self.last + 1):
            ip = str(ipaddress.ip_address(n))
            if ip not in self.used:
                self.used.add(ip)
                return ip
        raise RuntimeError(f"address pool {self.network} is exhausted")

    def claim(self, ip: str) -> None:
        if ipaddress.ip_address(ip) not in self.network:
            raise ValueError(f"{ip} is not in {self.network}")
        if ip in self.used:
            raise ValueError(f"{ip} is already allocated")
        self.used.add(ip)

    def release(self, ip: str) -> None:
        self.used.discard(ip)


class Cluster:
    """The model plus its controllers. All mutation goes through methods holding ``lock``."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._changed = threading.Condition(self.lock)
        self.state = ClusterState(
            nodes=[
                Node(name, ip, addresses.POD_CIDRS[name], {"kubernetes.io/hostname": name})
                for name, ip in addresses.NODE_IPS.items()
            ]
        )
        self.namespaces: set[str] = {"default", "kube-system"}
        self.state.namespaces = [
            Namespace(n, {"kubernetes.io/metadata.name": n}) for n in sorted(self.namespaces)
        ]
        self.state.network.egress_ips = default_egress_ips()
        # Node and ingress addresses may sit inside a pod CIDR (compose): never hand them out.
        infra = {*addresses.NODE_IPS.values(), addresses.INGRESS_IP, *addresses.RESERVED_POD_IPS}
        self.pod_ips = {n.name: AddressPool(n.pod_cidr, reserved=infra) for n in self.state.nodes}
        self.service_ips = AddressPool(addresses.SERVICE_CIDR, first_host=11)
        self.service_ips.used.add(addresses.DNS_SERVICE_IP)
        self.service_ips.used.add(addresses.KUBERNETES_SERVICE_IP)
        self.lb_ips = AddressPool(addresses.LB_POOL_CIDR, first_host=2)
        self.node_ports: dict[int, str] = {}
        """Allocated NodePort → ``namespace/name`` of its Service."""
        self._probe_ready: dict[tuple[str, str], bool] = {}
        self._template_hashes: dict[tuple[str, str], str] = {}
        self.state.services.append(_kube_dns_service())
        self.state.services.append(_kubernetes_service())
        self._rebuild_endpoints()

    # -- reading -----------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            return self.state.to_dict()

    def wait_for_change(self, after: int, timeout: float) -> dict[str, Any]:
        """Return the state once its version exceeds ``after`` or ``timeout`` passes."""
        deadline = time.monotonic() + max(0.0, timeout)
        with self._changed:
            while self.state.resource_version <= after:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            return self.state.to_dict()

    # -- apply -------------------------------------------------------------------------

    def apply(self, objects: list[ManifestObject]) -> list[str]:
        """Create or update objects (like ``kubectl apply``); return what changed, in words."""
        with self.lock:
            declared = {o.name for o in objects if isinstance(o, Namespace)}
            for obj in objects:
                ns = getattr(obj, "namespace", None)
                if ns is not None and ns not in self.namespaces | declared:
                    raise ManifestError(
                        f"{getattr(obj, 'source', '')}: namespace {ns!r} not found "
                        "(add a Namespace object)"
                    )
            changes: list[str] = []
            for obj in objects:
                if obj is None:
                    continue
                if isinstance(obj, Namespace):
                    verb = "configured" if obj.name in self.namespaces else "created"
                    self.namespaces.add(obj.name)
                    self.state.namespaces = [
                        n for n in self.state.namespaces if n.name != obj.name
                    ] + [obj]
                    changes.append(f"namespace/{obj.name} {verb}")
                elif isinstance(obj, DnsConfig):
                    self.state.dns = obj
                    changes.append(f"cluster DNS configured (ttl {obj.ttl}s)")
                elif isinstance(obj, NetworkConfig):
                    obj.egress_ips = {**default_egress_ips(), **obj.egress_ips}
                    self.state.network = obj
                    changes.append(
                        f"cni configured ({obj.backend} vni {obj.vni}, "
                        f"overlay delay {obj.overlay_delay_ms:g} ms)"
                    )
                elif isinstance(obj, Service):
                    changes.append(self._apply_service(obj))
                elif isinstance(obj, Workload):
                    changes.append(self._apply_workload(obj))
                elif isinstance(obj, Ingress):
                    changes.append(self._replace(self.state.ingresses, obj, "ingress"))
                elif isinstance(obj, NetworkPolicy):
                    changes.append(self._replace(self.state.network_policies, obj, "netpol"))
                elif isinstance(obj, ProxyConfig):
                    self.state.proxy = obj
                    changes.append(f"kube-proxy configured (mode {obj.mode}, {obj.algorithm})")
            self._reconcile()
            self._bump()
            return changes

    def delete(self, objects: list[ManifestObject]) -> list[str]:
        """Remove objects (like ``kubectl delete -f``); pods of a workload terminate."""
        with self.lock:
            changes: list[str] = []
            for obj in objects:
                if isinstance(obj, Service):
                    old = self.state.service(obj.namespace, obj.name)
                    if old is None:
                        changes.append(f"service/{obj.namespace}/{obj.name} not found")
                        continue
                    self.state.services.remove(old)
                    if old.cluster_ip and old.cluster_ip != "None":
                        self.service_ips.release(old.cluster_ip)
                    for ip in old.load_balancer_ingress:
                        self.lb_ips.release(ip)
                    key = f"{old.namespace}/{old.name}"
                    for port in [p for p, owner in self.node_ports.items() if owner == key]:
                        del self.node_ports[port]
                    changes.append(f"service/{key} deleted")
                elif isinstance(obj, Workload):
                    found = [
                        w
                        for w in self.state.workloads
                        if (w.namespace, w.name, w.kind) == (obj.namespace, obj.name, obj.kind)
                    ]
                    for wl in found:
                        self.state.workloads.remove(wl)
                        self._template_hashes.pop((wl.namespace, wl.name), None)
                        for pod in self._owned(wl):
                            self._terminate(pod)
                    verb = "deleted" if found else "not found"
                    changes.append(f"{obj.kind.lower()}.apps/{obj.namespace}/{obj.name} {verb}")
                elif isinstance(obj, (NetworkPolicy, Ingress)):
                    items: list[Any] = (
                        self.state.network_policies
                        if isinstance(obj, NetworkPolicy)
                        else self.state.ingresses
                    )
                    kind = "netpol" if isinstance(obj, NetworkPolicy) else "ingress"
                    found = [i for i in items if (i.namespace, i.name) == (obj.namespace, obj.name)]
                    for item in found:
                        items.remove(item)
                    verb = "deleted" if found else "not found"
                    changes.append(f"{kind}/{obj.namespace}/{obj.name} {verb}")
            self._reconcile()
            self._rebuild_endpoints()
            self._bump()
            return changes

    def _replace(self, items: list[Any], obj: Any, kind: str) -> str:
        for i, old in enumerate(items):
            if old.namespace == obj.namespace and old.name == obj.name:
                if getattr(old, "created", 0):
                    obj.created = old.created  # an update keeps metadata.creationTimestamp
                items[i] = obj
                return f"{kind}/{obj.namespace}/{obj.name} configured"
        items.append(obj)
        return f"{kind}/{obj.namespace}/{obj.name} created"

    def _apply_service(self, svc: Service) -> str:
        old = self.state.service(svc.namespace, svc.name)
        if svc.type == "ExternalName":
            svc.cluster_ip = None
        elif svc.cluster_ip in (None, ""):
            svc.cluster_ip = old.cluster_ip if old and old.cluster_ip else None
            if svc.cluster_ip is None:
                svc.cluster_ip = self.service_ips.allocate()
        elif svc.cluster_ip != "None" and (old is None or old.cluster_ip != svc.cluster_ip):
            try:
                self.service_ips.claim(svc.cluster_ip)
            except ValueError as exc:
                raise ManifestError(f"{svc.source}: spec.clusterIP: {exc}") from None
        if old is not None and old.cluster_ip and old.cluster_ip not in ("None", svc.cluster_ip):
            self.service_ips.release(old.cluster_ip)
        self._allocate_node_ports(svc, old)
        self._allocate_load_balancer(svc, old)
        verb = "configured" if old else "created"
        self._replace(self.state.services, svc, "service")
        return f"service/{svc.namespace}/{svc.name} {verb} ({svc.type} {svc.cluster_ip})"

    def _allocate_node_ports(self, svc: Service, old: Service | None) -> None:
        """NodePorts from 30000-32767: the requested one if free, else the lowest free."""
        key = f"{svc.namespace}/{svc.name}"
        mine = {port for port, owner in self.node_ports.items() if owner == key}
        wants_ports = svc.type in ("NodePort", "LoadBalancer")
        low, high = addresses.NODE_PORT_RANGE
        for port in mine:
            del self.node_ports[port]
        try:
            for i, sp in enumerate(svc.ports):
                if not wants_ports:
                    sp.node_port = None
                    continue
                if sp.node_port is None and old is not None:
                    previous = next((p for p in old.ports if p.name == sp.name), None)
                    if previous and previous.node_port not in self.node_ports:
                        sp.node_port = previous.node_port
                sp.node_port = self._claim_node_port(
                    sp.node_port, key, f"spec.ports[{i}].nodePort", svc.source, low, high
                )
            needs_hc = svc.type == "LoadBalancer" and svc.external_traffic_policy == "Local"
            if needs_hc:
                if svc.health_check_node_port is None and old is not None:
                    svc.health_check_node_port = old.health_check_node_port
                svc.health_check_node_port = self._claim_node_port(
                    svc.health_check_node_port,
                    key,
                    "spec.healthCheckNodePort",
                    svc.source,
                    low,
                    high,
                )
            else:
                svc.health_check_node_port = None
        except ManifestError:
            for port in [p for p, owner in self.node_ports.items() if owner == key]:
                del self.node_ports[port]
            for port in mine:
                self.node_ports[port] = key
            raise

    def _claim_node_port(
        self, wanted: int | None, key: str, field: str, source: str, low: int, high: int
    ) -> int:
        if wanted is not None:
            if not low <= wanted <= high:
                raise ManifestError(
                    f"{source}: {field}: {wanted} is outside the NodePort range {low}-{high}"
                )
            owner = self.node_ports.get(wanted)
            if owner is not None:
                raise ManifestError(
                    f"{source}: {field}: {wanted} is already allocated (to Service {owner})"
                )
            self.node_ports[wanted] = key
            return wanted
        for port in range(low, high + 1):
            if port not in self.node_ports:
                self.node_ports[port] = key
                return port
        raise ManifestError(f"{source}: {field}: the NodePort range {low}-{high} is full")

    def _allocate_load_balancer(self, svc: Service, old: Service | None) -> None:
        """The emulated cloud provider gives each LoadBalancer Service an address."""
        previous = old.load_balancer_ingress if old else []
        if svc.type != "LoadBalancer":
            for ip in previous:
                self.lb_ips.release(ip)
            svc.load_balancer_ingress = []
            return
        if previous:
            svc.load_balancer_ingress = previous
            return
        if svc.load_balancer_ip:
            try:
                self.lb_ips.claim(svc.load_balancer_ip)
            except ValueError as exc:
                raise ManifestError(f"{svc.source}: spec.loadBalancerIP: {exc}") from None
            svc.load_balancer_ingress = [svc.load_balancer_ip]
        else:
            svc.load_balancer_ingress = [self.lb_ips.allocate()]

    def _apply_workload(self, wl: Workload) -> str:
        key = (wl.namespace, wl.name)
        new_hash = template_hash(wl)
        old_hash = self._template_hashes.get(key)
        if old_hash is not None and old_hash != new_hash:
            for pod in self._owned(wl):
                self._terminate(pod)
        self._template_hashes[key] = new_hash
        verb = "configured" if old_hash else "created"
        self._replace(self.state.workloads, wl, wl.kind.lower())
        return f"{wl.kind.lower()}.apps/{wl.namespace}/{wl.name} {verb} ({wl.replicas} replicas)"

    # -- pods --------------------------------------------------------------------------

    def _owned(self, wl: Workload, live_only: bool = True) -> list[Pod]:
        return [
            p
            for p in self.state.pods
            if p.namespace == wl.namespace
            and p.owner_kind == wl.kind
            and p.owner_name == wl.name
            and (not live_only or p.phase != "Terminating")
        ]

    def _reconcile(self) -> None:
        for wl in self.state.workloads:
            pods = self._owned(wl)
            if wl.kind == "StatefulSet":
                names = {p.name for p in self._owned(wl, live_only=False)}
                for ordinal in range(wl.replicas):
                    name = f"{wl.name}-{ordinal}"
                    if name not in names:
                        self._create_pod(wl, name)
                for pod in pods:
                    if int(pod.name.rsplit("-", 1)[1]) >= wl.replicas:
                        self._terminate(pod)
                continue
            for _ in range(wl.replicas - len(pods)):
                name = f"{wl.name}-{self._template_hashes[(wl.namespace, wl.name)]}-"
                name += _suffix(None, 5)
                self._create_pod(wl, name)
            if len(pods) > wl.replicas:
                newest = sorted(pods, key=lambda p: p.created, reverse=True)
                for pod in newest[: len(pods) - wl.replicas]:
                    self._terminate(pod)
        self._rebuild_endpoints()

    def _schedule(self, wl: Workload) -> Node:
        candidates = [
            n
            for n in self.state.nodes
            if all(n.labels.get(k) == v for k, v in wl.template.node_selector.items())
        ]
        if not candidates:
            raise ManifestError(
                f"{wl.source}: spec.template.spec.nodeSelector: no node matches "
                f"{wl.template.node_selector} (nodes: {[n.name for n in self.state.nodes]})"
            )
        siblings = self._owned(wl)

        def load(node: Node) -> tuple[int, int]:
            mine = sum(1 for p in siblings if p.node == node.name)
            total = sum(1 for p in self.state.pods if p.node == node.name)
            return mine, total

        return min(candidates, key=load)

    def _create_pod(self, wl: Workload, name: str) -> Pod:
        node = self._schedule(wl)
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
        )
        if wl.kind == "StatefulSet":
            pod.hostname, pod.subdomain = name, wl.service_name
        self.state.pods.append(pod)
        return pod

    def _terminate(self, pod: Pod) -> None:
        pod.phase = "Terminating"
        pod.ready = False

    def _find(self, namespace: str, name: str) -> Pod:
        pod = self.state.pod(name, namespace)
        if pod is None:
            raise KeyError(f"pod {namespace}/{name} not found")
        return pod

    def pods_to_start(self) -> list[Pod]:
        with self.lock:
            return [p for p in self.state.pods if p.phase == "Pending"]

    def pods_to_stop(self) -> list[Pod]:
        with self.lock:
            return [p for p in self.state.pods if p.phase == "Terminating"]

    def set_pod_running(self, namespace: str, name: str) -> None:
        with self.lock:
            pod = self._find(namespace, name)
            if pod.phase == "Pending":
                pod.phase = "Running"
                self._changed_endpoints()

    def set_pod_ready(self, namespace: str, name: str, ready: bool) -> None:
        """Record the probe result (the kubelet's status update)."""
        with self.lock:
            pod = self.state.pod(name, namespace)
            if pod is None:
                return
            self._probe_ready[(namespace, name)] = ready
            self._update_ready(pod)

    def set_ready_override(self, namespace: str, name: str, ready: bool | None) -> None:
        """Force readiness (``hopscope ready pod``); ``None`` goes back to the probe."""
        with self.lock:
            pod = self._find(namespace, name)
            pod.ready_override = ready
            self._update_ready(pod)
            self._bump()

    def _update_ready(self, pod: Pod) -> None:
        probe = self._probe_ready.get((pod.namespace, pod.name), False)
        effective = pod.ready_override if pod.ready_override is not None else probe
        effective = effective and pod.phase == "Running"
        if effective != pod.ready:
            pod.ready = effective
            self._changed_endpoints()

    def delete_pod(self, namespace: str, name: str) -> None:
        """Delete a pod (``hopscope kill pod``); its controller creates a replacement."""
        with self.lock:
            self._terminate(self._find(namespace, name))
            self._reconcile()
            self._bump()

    def finalize_pod(self, namespace: str, name: str) -> None:
        """The pod's processes are gone: remove it and release its IP."""
        with self.lock:
            pod = self.state.pod(name, namespace)
            if pod is None:
                return
            self.state.pods.remove(pod)
            self.pod_ips[pod.node].release(pod.ip)
            self._probe_ready.pop((namespace, name), None)
            self._changed_endpoints()

    def scale(self, namespace: str, name: str, replicas: int) -> str:
        if replicas < 0:
            raise ValueError("replicas must be 0 or more")
        with self.lock:
            for wl in self.state.workloads:
                if wl.namespace == namespace and wl.name == name:
                    wl.replicas = replicas
                    self._reconcile()
                    self._bump()
                    return f"{wl.kind.lower()}.apps/{namespace}/{name} scaled to {replicas}"
        raise KeyError(f"deployment or statefulset {namespace}/{name} not found")

    # -- endpoints -----------------------------------------------------------------------

    def _changed_endpoints(self) -> None:
        self._rebuild_endpoints()
        self._bump()

    def _bump(self) -> None:
        self.state.resource_version += 1
        self._changed.notify_all()

    def _rebuild_endpoints(self) -> None:
        slices: list[EndpointSlice] = []
        for svc in self.state.services:
            if svc.type == "ExternalName" or not svc.selector:
                continue
            slices.extend(build_endpoint_slices(svc, self.state.pods))
        self.state.endpoint_slices = slices


def build_endpoint_slices(svc: Service, pods: list[Pod]) -> list[EndpointSlice]:
    """The EndpointSlices of one Service, from the pods its selector matches."""
    members = sorted(
        (
            p
            for p in pods
            if p.namespace == svc.namespace and matches(svc.selector, p.labels) and p.ip
        ),
        key=lambda p: p.name,
    )
    endpoints = [
        Endpoint(
            addresses=[p.ip],
            ready=p.ready and p.phase == "Running",
            serving=p.ready or (p.phase == "Terminating"),
            terminating=p.phase == "Terminating",
            pod=p.name,
            node=p.node,
            hostname=p.hostname,
        )
        for p in members
    ]
    ports = [_endpoint_port(sp, members) for sp in svc.ports]
    chunks = [
        endpoints[i : i + MAX_ENDPOINTS_PER_SLICE]
        for i in range(0, len(endpoints), MAX_ENDPOINTS_PER_SLICE)
    ] or [[]]
    return [
        EndpointSlice(
            name=f"{svc.name}-{_suffix(f'{svc.namespace}/{svc.name}/{i}', 5)}",
            namespace=svc.namespace,
            service=svc.name,
            endpoints=chunk,
            ports=ports,
        )
        for i, chunk in enumerate(chunks)
    ]


def _endpoint_port(sp: ServicePort, pods: list[Pod]) -> EndpointPort:
    number: int | None = None
    for pod in pods:
        number = pod.container_port(sp.target_port)
        if number is not None:
            break
    if number is None:
        number = sp.target_port if isinstance(sp.target_port, int) else 0
    return EndpointPort(
        port=number, name=sp.name, protocol=sp.protocol, app_protocol=sp.app_protocol
    )


def default_egress_ips() -> dict[str, str]:
    """One egress SNAT address per node, from the start of the egress pool (compose: the
    control-plane container's address on the external network, for both nodes)."""
    if addresses.PLAN == "compose":
        return {node: addresses.COMPOSE_EGRESS_IP for node in addresses.NODE_IPS}
    hosts = ipaddress.ip_network(addresses.EGRESS_POOL_CIDR).hosts()
    return {node: str(next(hosts)) for node in addresses.NODE_IPS}


def _kubernetes_service() -> Service:
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


def _kube_dns_service() -> Service:
    return Service(
        name="kube-dns",
        namespace="kube-system",
        cluster_ip=addresses.DNS_SERVICE_IP,
        ports=[
            ServicePort(addresses.DNS_PORT, addresses.DNS_PORT, "dns", Protocol.UDP),
            ServicePort(addresses.DNS_PORT, addresses.DNS_PORT, "dns-tcp", Protocol.TCP),
            ServicePort(addresses.DNS_METRICS_PORT, addresses.DNS_METRICS_PORT, "metrics"),
        ],
        labels={"k8s-app": "kube-dns"},
        annotations={SERVED_BY_ANNOTATION: "cluster-dns"},
        source="built-in",
    )

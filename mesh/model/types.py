"""The cluster model: plain data classes shared by controllers, runtimes and the data plane.

The control plane owns one :class:`ClusterState`; kube-proxy, DNS and the CLI receive it
as JSON (``ClusterState.to_dict`` / ``ClusterState.from_dict``) the way real components
watch the API server. Field names follow the Kubernetes API in snake_case.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

SIDECAR_INJECT_ANNOTATION = "sidecar.hopscope.dev/inject"
"""Pod template annotation; ``"false"`` runs the pod without an Envoy sidecar."""

SIDECAR_TIMEOUT_ANNOTATION = "sidecar.hopscope.dev/timeout"
"""Pod template annotation: the inbound route timeout of the pod's sidecar (default 15s),
like an Istio VirtualService ``timeout``; past it the sidecar answers 504 (``UT``)."""

APP_PORT_OFFSET = 10000
"""Mirrors ``mesh.addresses.APP_PORT_OFFSET`` (kept here so the model has no imports)."""


# -- enumerations ---------------------------------------------------------------------------
# The values the API server accepts for the fields the model reads. StrEnum members are
# strings, so comparisons with literals and the JSON form of the state are unchanged.


class ServiceType(enum.StrEnum):
    """``Service.spec.type``."""

    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"
    EXTERNAL_NAME = "ExternalName"


class SessionAffinity(enum.StrEnum):
    """``Service.spec.sessionAffinity``."""

    CLIENT_IP = "ClientIP"
    NONE = "None"


class TrafficPolicy(enum.StrEnum):
    """``Service.spec.externalTrafficPolicy`` and ``internalTrafficPolicy``."""

    CLUSTER = "Cluster"
    LOCAL = "Local"


class IPFamilyPolicy(enum.StrEnum):
    """``Service.spec.ipFamilyPolicy``."""

    SINGLE_STACK = "SingleStack"
    PREFER_DUAL_STACK = "PreferDualStack"
    REQUIRE_DUAL_STACK = "RequireDualStack"


class IPFamily(enum.StrEnum):
    """``Service.spec.ipFamilies[]``."""

    IPV4 = "IPv4"
    IPV6 = "IPv6"


class Protocol(enum.StrEnum):
    """Port ``protocol`` of Services, containers, EndpointSlices and NetworkPolicies."""

    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"


class AddressType(enum.StrEnum):
    """``EndpointSlice.addressType``."""

    IPV4 = "IPv4"
    IPV6 = "IPv6"
    FQDN = "FQDN"


class PathType(enum.StrEnum):
    """``Ingress.spec.rules[].http.paths[].pathType``."""

    EXACT = "Exact"
    PREFIX = "Prefix"
    IMPLEMENTATION_SPECIFIC = "ImplementationSpecific"


class PolicyType(enum.StrEnum):
    """``NetworkPolicy.spec.policyTypes[]``."""

    INGRESS = "Ingress"
    EGRESS = "Egress"


class SelectorOperator(enum.StrEnum):
    """``matchExpressions[].operator`` of a label selector."""

    IN = "In"
    NOT_IN = "NotIn"
    EXISTS = "Exists"
    DOES_NOT_EXIST = "DoesNotExist"


class URIScheme(enum.StrEnum):
    """``httpGet.scheme`` of a probe or lifecycle hook."""

    HTTP = "HTTP"
    HTTPS = "HTTPS"


class PullPolicy(enum.StrEnum):
    """``containers[].imagePullPolicy``."""

    ALWAYS = "Always"
    NEVER = "Never"
    IF_NOT_PRESENT = "IfNotPresent"


class RestartPolicy(enum.StrEnum):
    """``spec.template.spec.restartPolicy`` (a Deployment or StatefulSet allows ``Always``)."""

    ALWAYS = "Always"
    ON_FAILURE = "OnFailure"
    NEVER = "Never"


class DNSPolicy(enum.StrEnum):
    """``spec.template.spec.dnsPolicy``."""

    CLUSTER_FIRST_WITH_HOST_NET = "ClusterFirstWithHostNet"
    CLUSTER_FIRST = "ClusterFirst"
    DEFAULT = "Default"
    NONE = "None"


class TerminationMessagePolicy(enum.StrEnum):
    """``containers[].terminationMessagePolicy``."""

    FILE = "File"
    FALLBACK_TO_LOGS_ON_ERROR = "FallbackToLogsOnError"


class DeploymentStrategyType(enum.StrEnum):
    """``Deployment.spec.strategy.type``."""

    RECREATE = "Recreate"
    ROLLING_UPDATE = "RollingUpdate"


class StatefulSetUpdateStrategyType(enum.StrEnum):
    """``StatefulSet.spec.updateStrategy.type``."""

    ROLLING_UPDATE = "RollingUpdate"
    ON_DELETE = "OnDelete"


class PodManagementPolicy(enum.StrEnum):
    """``StatefulSet.spec.podManagementPolicy``."""

    ORDERED_READY = "OrderedReady"
    PARALLEL = "Parallel"


class PVCRetentionPolicy(enum.StrEnum):
    """``StatefulSet.spec.persistentVolumeClaimRetentionPolicy.whenDeleted|whenScaled``."""

    RETAIN = "Retain"
    DELETE = "Delete"


class TolerationOperator(enum.StrEnum):
    """``tolerations[].operator``."""

    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(enum.StrEnum):
    """``tolerations[].effect``."""

    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


@dataclass
class ContainerPort:
    container_port: int
    name: str | None = None
    protocol: str = Protocol.TCP
    """A :class:`Protocol` value (a plain ``str`` field: callers pass literals)."""


@dataclass
class Probe:
    """A readiness probe: ``kind`` is ``http``, ``tcp`` or ``grpc``."""

    kind: str
    port: int | str
    path: str = "/"
    initial_delay_seconds: float = 0.0
    period_seconds: float = 1.0
    failure_threshold: int = 3
    success_threshold: int = 1


@dataclass
class Container:
    name: str
    image: str
    command: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    ports: list[ContainerPort] = field(default_factory=list)
    readiness_probe: Probe | None = None

    def port_number(self, port: int | str) -> int | None:
        """Resolve a port given by number or by name against this container's ports."""
        if isinstance(port, int):
            return port
        if port.isdigit():
            return int(port)
        for p in self.ports:
            if p.name == port:
                return p.container_port
        return None


@dataclass
class PodTemplate:
    labels: dict[str, str]
    containers: list[Container]
    node_selector: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    service_account: str = "default"
    """``spec.serviceAccountName``: the workload identity its pods' certificates name."""

    @property
    def has_sidecar(self) -> bool:
        return self.annotations.get(SIDECAR_INJECT_ANNOTATION, "true").lower() != "false"


@dataclass
class Workload:
    """A Deployment or StatefulSet."""

    kind: str
    name: str
    namespace: str
    replicas: int
    selector: dict[str, str]
    template: PodTemplate
    service_name: str | None = None
    source: str = ""


@dataclass
class Pod:
    name: str
    namespace: str
    labels: dict[str, str]
    node: str
    ip: str
    containers: list[Container]
    owner_kind: str = ""
    owner_name: str = ""
    phase: str = "Pending"
    """``Pending`` (starting), ``Running``, ``Terminating`` or ``Failed``."""
    ready: bool = False
    ready_override: bool | None = None
    """Set by ``hopscope ready pod NAME true|false``; ``None`` follows the probe."""
    restarts: int = 0
    created: float = 0.0
    hostname: str | None = None
    subdomain: str | None = None
    annotations: dict[str, str] = field(default_factory=dict)
    service_account: str = "default"

    @property
    def has_sidecar(self) -> bool:
        """False when the template says ``sidecar.hopscope.dev/inject: "false"``."""
        return self.annotations.get(SIDECAR_INJECT_ANNOTATION, "true").lower() != "false"

    @property
    def app_port_offset(self) -> int:
        """Where the app listens relative to its containerPort (0 without a sidecar)."""
        return APP_PORT_OFFSET if self.has_sidecar else 0

    def container_port(self, port: int | str) -> int | None:
        """Resolve a (possibly named) port against all containers of the pod."""
        for c in self.containers:
            number = c.port_number(port)
            if number is not None and (isinstance(port, int) or not str(port).isdigit()):
                return number
        return int(port) if isinstance(port, int) or str(port).isdigit() else None


@dataclass
class ServicePort:
    port: int
    target_port: int | str
    name: str | None = None
    protocol: Protocol = Protocol.TCP
    app_protocol: str | None = None
    node_port: int | None = None


@dataclass
class Service:
    name: str
    namespace: str
    type: ServiceType = ServiceType.CLUSTER_IP
    selector: dict[str, str] = field(default_factory=dict)
    ports: list[ServicePort] = field(default_factory=list)
    cluster_ip: str | None = None
    """Allocated VIP; ``"None"`` for headless Services, ``None`` before allocation."""
    session_affinity: SessionAffinity = SessionAffinity.NONE
    affinity_timeout_seconds: int = 10800
    external_traffic_policy: TrafficPolicy = TrafficPolicy.CLUSTER
    external_name: str | None = None
    load_balancer_ip: str | None = None
    health_check_node_port: int | None = None
    """Allocated for ``LoadBalancer`` + ``externalTrafficPolicy: Local``."""
    load_balancer_ingress: list[str] = field(default_factory=list)
    """``status.loadBalancer.ingress[*].ip``, filled by the emulated cloud provider."""
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    source: str = ""
    created: float = 0.0
    """When the object was first applied (``metadata.creationTimestamp``), 0 if unknown."""

    @property
    def headless(self) -> bool:
        return self.cluster_ip == "None"

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{self.namespace}.svc.cluster.local"


@dataclass
class Endpoint:
    addresses: list[str]
    ready: bool
    serving: bool
    terminating: bool
    pod: str
    node: str
    hostname: str | None = None


@dataclass
class EndpointPort:
    port: int
    name: str | None = None
    protocol: Protocol = Protocol.TCP
    app_protocol: str | None = None


@dataclass
class EndpointSlice:
    name: str
    namespace: str
    service: str
    endpoints: list[Endpoint] = field(default_factory=list)
    ports: list[EndpointPort] = field(default_factory=list)
    address_type: AddressType = AddressType.IPV4


@dataclass
class IngressPath:
    path: str
    path_type: PathType
    service: str
    port: int | str


@dataclass
class IngressRule:
    host: str | None
    paths: list[IngressPath]


@dataclass
class IngressTLS:
    """One ``spec.tls`` entry: the hosts a ``kubernetes.io/tls`` Secret's certificate serves."""

    hosts: list[str] = field(default_factory=list)
    secret_name: str | None = None


@dataclass
class Ingress:
    name: str
    namespace: str
    rules: list[IngressRule] = field(default_factory=list)
    ingress_class: str | None = None
    default_backend: IngressPath | None = None
    tls: list[IngressTLS] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)
    source: str = ""
    created: float = 0.0
    """When the object was first applied (``metadata.creationTimestamp``), 0 if unknown."""


@dataclass
class Secret:
    name: str
    namespace: str
    type: str = "Opaque"
    data: dict[str, str] = field(default_factory=dict)
    """Key → base64 value, as the API keeps it (``stringData`` is folded in at load)."""
    source: str = ""
    created: float = 0.0


@dataclass
class ApiObject:
    """An object hopscope keeps as its spec, interpreted where it is used: the mesh's
    policies (Istio-shaped ``PeerAuthentication``, ``DestinationRule``) and the Gateway API.
    Each kind is validated at load against a schema of its own (:mod:`mesh.model.crds`)."""

    name: str
    namespace: str
    spec: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    source: str = ""
    created: float = 0.0


@dataclass
class PeerAuthentication(ApiObject):
    """``security.istio.io/v1``: which connections a workload's sidecar accepts (mTLS mode)."""


@dataclass
class DestinationRule(ApiObject):
    """``networking.istio.io/v1``: how callers' sidecars talk to one Service (TLS, limits)."""


@dataclass
class Gateway(ApiObject):
    """``gateway.networking.k8s.io/v1`` Gateway."""


@dataclass
class HTTPRoute(ApiObject):
    """``gateway.networking.k8s.io/v1`` HTTPRoute."""


@dataclass
class GRPCRoute(ApiObject):
    """``gateway.networking.k8s.io/v1`` GRPCRoute."""


@dataclass
class TLSRoute(ApiObject):
    """``gateway.networking.k8s.io/v1alpha2`` TLSRoute (passthrough by SNI)."""


@dataclass
class NetworkPolicy:
    name: str
    namespace: str
    spec: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    created: float = 0.0
    """When the object was first applied (``metadata.creationTimestamp``), 0 if unknown."""


@dataclass
class Namespace:
    name: str
    labels: dict[str, str] = field(default_factory=dict)
    """Always includes ``kubernetes.io/metadata.name`` (set by the API server since 1.21)."""
    source: str = ""


@dataclass
class NetworkConfig:
    """The CNI's settings: ConfigMap ``kube-system/hopscope-cni`` (see docs/design.md)."""

    backend: str = "vxlan"
    vni: int = 1
    """VXLAN network identifier carried on every encapsulated connection."""
    overlay_delay_ms: float = 0.0
    """Extra one-way delay the tunnel adds to every chunk it forwards across nodes."""
    egress_ips: dict[str, str] = field(default_factory=dict)
    """Node name → the egress SNAT address traffic leaving the cluster from that node gets."""
    source: str = ""


@dataclass
class DnsConfig:
    """From ConfigMap ``kube-system/coredns``: the ``kubernetes`` plugin's ``ttl``."""

    ttl: int | None = None
    """Answer TTL in seconds; None keeps the DNS server's default (5, like CoreDNS)."""
    source: str = ""


@dataclass
class Node:
    name: str
    ip: str
    pod_cidr: str
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class ProxyConfig:
    """The parts of ``KubeProxyConfiguration`` the emulator honours."""

    mode: str = "iptables"
    """``iptables`` or ``ipvs``."""
    scheduler: str = "rr"
    """IPVS scheduler: ``rr``, ``lc`` or ``sh`` (ignored in iptables mode)."""
    min_sync_period: float = 0.0
    """Seconds; at most one rule sync per period (``iptables.minSyncPeriod``)."""

    @property
    def algorithm(self) -> str:
        return self.scheduler if self.mode == "ipvs" else "random"


@dataclass
class ClusterState:
    """Everything the data plane needs, versioned like the API server's resourceVersion."""

    resource_version: int = 0
    nodes: list[Node] = field(default_factory=list)
    workloads: list[Workload] = field(default_factory=list)
    pods: list[Pod] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)
    endpoint_slices: list[EndpointSlice] = field(default_factory=list)
    ingresses: list[Ingress] = field(default_factory=list)
    network_policies: list[NetworkPolicy] = field(default_factory=list)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    namespaces: list[Namespace] = field(default_factory=list)
    secrets: list[Secret] = field(default_factory=list)
    peer_authentications: list[PeerAuthentication] = field(default_factory=list)
    destination_rules: list[DestinationRule] = field(default_factory=list)
    gateways: list[Gateway] = field(default_factory=list)
    http_routes: list[HTTPRoute] = field(default_factory=list)
    grpc_routes: list[GRPCRoute] = field(default_factory=list)
    tls_routes: list[TLSRoute] = field(default_factory=list)

    def namespace_labels(self, name: str) -> dict[str, str]:
        for ns in self.namespaces:
            if ns.name == name:
                return ns.labels
        return {"kubernetes.io/metadata.name": name}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ClusterState:
        return from_dict(cls, data)

    def service(self, namespace: str, name: str) -> Service | None:
        for svc in self.services:
            if svc.namespace == namespace and svc.name == name:
                return svc
        return None

    def pod(self, name: str, namespace: str | None = None) -> Pod | None:
        for pod in self.pods:
            if pod.name == name and (namespace is None or pod.namespace == namespace):
                return pod
        return None

    def pod_by_ip(self, ip: str) -> Pod | None:
        for pod in self.pods:
            if pod.ip == ip:
                return pod
        return None

    def secret(self, namespace: str, name: str) -> Secret | None:
        for secret in self.secrets:
            if secret.namespace == namespace and secret.name == name:
                return secret
        return None

    def slices_for(self, namespace: str, service: str) -> list[EndpointSlice]:
        return [
            s for s in self.endpoint_slices if s.namespace == namespace and s.service == service
        ]


def from_dict(cls: type[T], data: Any) -> T:
    """Build dataclass ``cls`` from plain JSON data (the inverse of ``dataclasses.asdict``)."""
    return typing.cast(T, _convert(cls, data))


def _convert(tp: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        for arg in args:
            if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                return _convert(arg, value)
        return value
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return tp(value)
    if origin is list:
        (item,) = typing.get_args(tp)
        return [_convert(item, v) for v in value]
    if origin is dict:
        return dict(value)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        kwargs = {name: _convert(hint, value[name]) for name, hint in _fields(tp) if name in value}
        return tp(**kwargs)
    return value


@functools.cache
def _fields(tp: type) -> tuple[tuple[str, Any], ...]:
    """A dataclass's fields with their resolved types: ``get_type_hints`` evaluates every
    annotation string, the bulk of a state's conversion when done per object."""
    hints = typing.get_type_hints(tp)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(tp))

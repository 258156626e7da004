"""Load Kubernetes YAML into the cluster model, validating against the official schemas.

Every document is checked with ``kubernetes-validate`` (offline OpenAPI schemas, strict:
unknown fields are errors), then its enumerated fields against the values the API accepts
(:mod:`mesh.model.enum_fields`; the schemas leave enums to prose), before anything is
converted, so ``hopscope up`` and ``hopscope apply`` refuse a bad manifest up front. Errors
name the file, the object and the field, for example::

    shop.yaml: Service shop/catalog: spec.ports[0].port: 'eighty' is not of type 'integer'
    shop.yaml: Service shop/x: spec.type: 'NodePortz' is not one of ClusterIP, NodePort, ...

A few valid fields hopscope accepts but does not act on (a liveness probe, a UDP Service
port) are named in a warning instead (:func:`manifest_warnings`), in the same form.
"""

from __future__ import annotations

import base64
import logging
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from mesh.model.crds import CUSTOM_KINDS, load_custom
from mesh.model.enum_fields import EnumFieldError, check_enum_fields
from mesh.model.types import (
    SIDECAR_TIMEOUT_ANNOTATION,
    ApiObject,
    Container,
    ContainerPort,
    DnsConfig,
    Ingress,
    IngressPath,
    IngressRule,
    IngressTLS,
    Namespace,
    NetworkConfig,
    NetworkPolicy,
    PathType,
    PodTemplate,
    Probe,
    Protocol,
    ProxyConfig,
    Secret,
    Service,
    ServicePort,
    ServiceType,
    SessionAffinity,
    TrafficPolicy,
    Workload,
)

log = logging.getLogger(__name__)

KUBERNETES_VERSION = "1.30.0"
"""Schema version manifests are validated against."""

SUPPORTED_KINDS = {
    ("v1", "Namespace"),
    ("v1", "ConfigMap"),
    ("v1", "Service"),
    ("apps/v1", "Deployment"),
    ("apps/v1", "StatefulSet"),
    ("networking.k8s.io/v1", "Ingress"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
    ("v1", "Secret"),
}

PROXY_CONFIG_KIND = ("kubeproxy.config.k8s.io/v1alpha1", "KubeProxyConfiguration")
PROXY_MODES = ("iptables", "ipvs")
IPVS_SCHEDULERS = ("rr", "lc", "sh")

CNI_CONFIG_MAP = ("kube-system", "hopscope-cni")
"""The ConfigMap the CNI emulator reads (overlay VNI and delay, egress IPs)."""

COREDNS_CONFIG_MAP = ("kube-system", "coredns")
"""The ConfigMap the CNI emulator reads (overlay VNI and delay, egress IPs)."""

ManifestObject = (
    Workload
    | Secret
    | ApiObject
    | Service
    | Ingress
    | NetworkPolicy
    | ProxyConfig
    | Namespace
    | NetworkConfig
    | DnsConfig
    | None
)
"""A loaded object; ``None`` for a document hopscope accepts but does not act on."""


class ManifestError(ValueError):
    """A manifest is unreadable, invalid against the schema, or unsupported."""


def default_manifest_paths() -> list[Path]:
    """The sample cluster shipped with hopscope."""
    return [Path(__file__).resolve().parents[2] / "apps" / "manifests"]


def expand_paths(paths: Iterable[Path]) -> list[Path]:
    """Files as given, directories as their ``*.yaml``/``*.yml`` files in name order."""
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out.extend(sorted(p for p in path.iterdir() if p.suffix in (".yaml", ".yml")))
        elif path.exists():
            out.append(path)
        else:
            raise ManifestError(f"{path}: no such file or directory")
    return out


def load_manifests(
    paths: Iterable[Path],
    schema: bool = True,
    warn: Callable[[str], None] | None = None,
) -> list[ManifestObject]:
    """Read, validate and convert every document in ``paths``; raise ManifestError.

    ``schema=False`` skips the OpenAPI schema check (about 0.3 s for the sample) when the
    caller has just checked the same files; conversion errors are still reported. Each
    :func:`manifest_warnings` line goes to ``warn`` (default: this module's logger).
    """
    warn = warn or log.warning
    objects: list[ManifestObject] = []
    for path in expand_paths(paths):
        try:
            docs = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as exc:
            raise ManifestError(f"{path}: not valid YAML: {exc}") from None
        except OSError as exc:
            raise ManifestError(f"{path}: {exc.strerror}") from None
        for index, doc in enumerate(docs):
            if doc is None:
                continue
            objects.append(load_document(doc, f"{path.name}", index, schema))
            for line in manifest_warnings(doc, path.name):
                warn(line)
    return objects


SERVED_BY_ANNOTATION = "hopscope.dev/served-by"
"""Mirrors :data:`mesh.model.controllers.SERVED_BY_ANNOTATION` (which imports this module)."""

IGNORED_CONTAINER_FIELDS = {
    "livenessProbe": (
        "not run by hopscope: it restarts a container when its process exits, not when a "
        "probe fails"
    ),
    "startupProbe": (
        "not run by hopscope: until a pod is first ready its readinessProbe is tried every "
        "0.2 s instead"
    ),
    "lifecycle": (
        "postStart and preStop hooks are not run by hopscope: it starts the process and "
        "stops it with SIGTERM"
    ),
}
"""Container fields hopscope accepts (the manifest is valid Kubernetes) but does not act on."""


def manifest_warnings(doc: Any, source: str) -> list[str]:
    """One line per field of a valid document that hopscope accepts but does not act on::

    app.yaml: Deployment shop/web: spec.template.spec.containers[0].livenessProbe: not
    run by hopscope: it restarts a container when its process exits, not when ...
    """
    if not isinstance(doc, dict):
        return []
    what, kind = describe(doc), doc.get("kind")
    found: list[tuple[str, str]] = []
    if kind == "Service":
        annotations = (doc.get("metadata") or {}).get("annotations") or {}
        served_by_dns = annotations.get(SERVED_BY_ANNOTATION) == "cluster-dns"
        for i, port in enumerate((doc.get("spec") or {}).get("ports") or []):
            protocol = (port or {}).get("protocol") or "TCP"
            if protocol != "TCP" and not served_by_dns:
                found.append(
                    (
                        f"spec.ports[{i}].protocol",
                        f"{protocol} is published in DNS but not proxied: hopscope's "
                        "kube-proxy forwards TCP only",
                    )
                )
    elif kind in ("Deployment", "StatefulSet"):
        pod_spec = ((doc.get("spec") or {}).get("template") or {}).get("spec") or {}
        for i, container in enumerate(pod_spec.get("containers") or []):
            for name, why in IGNORED_CONTAINER_FIELDS.items():
                if (container or {}).get(name):
                    found.append((f"spec.template.spec.containers[{i}].{name}", why))
    return [f"{source}: {what}: {field}: {why}" for field, why in found]


def describe(doc: dict[str, Any]) -> str:
    raw = doc.get("metadata")
    meta: dict[str, Any] = raw if isinstance(raw, dict) else {}
    kind = doc.get("kind", "object")
    name = meta.get("name", "<unnamed>")
    if kind == "Namespace":
        return f"Namespace {name}"
    return f"{kind} {meta.get('namespace', 'default')}/{name}"


def load_document(doc: Any, source: str, index: int = 0, schema: bool = True) -> ManifestObject:
    """Validate and convert one parsed YAML document."""
    if not isinstance(doc, dict):
        raise ManifestError(f"{source}: document {index + 1} is not a mapping")
    what = describe(doc)
    key = (doc.get("apiVersion"), doc.get("kind"))
    if key == PROXY_CONFIG_KIND:
        return proxy_config(doc, f"{source}: KubeProxyConfiguration")
    if key in CUSTOM_KINDS:
        if not (doc.get("metadata") or {}).get("name"):
            raise ManifestError(f"{source}: {what}: metadata.name: required")
        try:
            return load_custom(doc, f"{source}: {what}")
        except ValueError as exc:
            raise ManifestError(f"{source}: {what}: {exc}") from None
    if key not in SUPPORTED_KINDS:
        kinds = SUPPORTED_KINDS | set(CUSTOM_KINDS)
        known = ", ".join(f"{v} {k}" for v, k in sorted(kinds))
        raise ManifestError(f"{source}: {what}: unsupported apiVersion/kind {key} (known: {known})")
    if schema:
        _validate(doc, f"{source}: {what}")
    try:
        check_enum_fields(doc)
    except EnumFieldError as exc:
        raise ManifestError(f"{source}: {what}: {exc}") from None
    kind = doc["kind"]
    meta = doc["metadata"]
    if not meta.get("name"):
        raise ManifestError(f"{source}: {what}: metadata.name: required")
    origin = f"{source}: {what}"
    try:
        if kind == "Namespace":
            labels = dict(meta.get("labels") or {})
            labels["kubernetes.io/metadata.name"] = meta["name"]
            return Namespace(name=meta["name"], labels=labels, source=origin)
        if kind == "ConfigMap":
            if (meta.get("namespace", "default"), meta["name"]) == CNI_CONFIG_MAP:
                return network_config(doc.get("data") or {}, origin)
            if (meta.get("namespace", "default"), meta["name"]) == COREDNS_CONFIG_MAP:
                return dns_config(str((doc.get("data") or {}).get("Corefile", "")), origin)
            return None
        if kind == "Service":
            return _service(doc, origin)
        if kind in ("Deployment", "StatefulSet"):
            return _workload(doc, origin)
        if kind == "Ingress":
            return _ingress(doc, origin)
        if kind == "Secret":
            return _secret(doc, origin)
        return NetworkPolicy(
            name=meta["name"],
            namespace=meta.get("namespace", "default"),
            spec=doc.get("spec", {}),
            source=origin,
            created=time.time(),
        )
    except _FieldError as exc:
        raise ManifestError(f"{origin}: {exc.field}: {exc.message}") from None


def proxy_config(doc: dict[str, Any], where: str) -> ProxyConfig:
    """``KubeProxyConfiguration``: ``mode``, ``ipvs.scheduler``, ``iptables.minSyncPeriod``.

    It has no OpenAPI schema in kubernetes-validate (it is a component config, not an API
    object), so the fields the emulator reads are checked here; others are refused so a
    typo does not pass silently.
    """
    known = {"apiVersion", "kind", "metadata", "mode", "ipvs", "iptables"}
    for key in doc:
        if key not in known:
            raise ManifestError(f"{where}: {key}: unsupported field (known: {sorted(known)})")
    mode = doc.get("mode") or "iptables"
    if mode not in PROXY_MODES:
        raise ManifestError(f"{where}: mode: {mode!r} is not one of {list(PROXY_MODES)}")
    scheduler = (doc.get("ipvs") or {}).get("scheduler") or "rr"
    if scheduler not in IPVS_SCHEDULERS:
        raise ManifestError(
            f"{where}: ipvs.scheduler: {scheduler!r} is not one of {list(IPVS_SCHEDULERS)}"
        )
    period = (doc.get("iptables") or {}).get("minSyncPeriod", "0s")
    try:
        seconds = parse_duration(str(period))
    except ValueError as exc:
        raise ManifestError(f"{where}: iptables.minSyncPeriod: {exc}") from None
    return ProxyConfig(mode=mode, scheduler=scheduler, min_sync_period=seconds)


NETWORK_KEYS = ("backend", "vni", "overlayDelay", "egressIPs")


def network_config(data: dict[str, str], where: str) -> NetworkConfig:
    """``kube-system/hopscope-cni`` data: ``overlayDelay: 20ms``, ``vni: "1"``,
    ``egressIPs: "node-a=127.60.0.1,node-b=127.60.0.2"``, ``backend: vxlan``."""
    for key in data:
        if key not in NETWORK_KEYS:
            raise ManifestError(
                f"{where}: data.{key}: unsupported key (known: {list(NETWORK_KEYS)})"
            )
    config = NetworkConfig(source=where)
    backend = data.get("backend", "vxlan")
    if backend not in ("vxlan", "host-gw"):
        raise ManifestError(f"{where}: data.backend: {backend!r} is not one of vxlan, host-gw")
    config.backend = backend
    if "vni" in data:
        text = str(data["vni"])
        if not text.isdigit() or not 1 <= int(text) <= 16777215:
            raise ManifestError(f"{where}: data.vni: {text!r} is not a number in 1-16777215")
        config.vni = int(text)
    if "overlayDelay" in data:
        try:
            config.overlay_delay_ms = parse_duration(str(data["overlayDelay"])) * 1000
        except ValueError as exc:
            raise ManifestError(f"{where}: data.overlayDelay: {exc}") from None
        if not 0 <= config.overlay_delay_ms <= 5000:
            raise ManifestError(f"{where}: data.overlayDelay: must be between 0s and 5s")
    if "egressIPs" in data:
        for item in str(data["egressIPs"]).replace(" ", "").split(","):
            node, _, ip = item.partition("=")
            if not node or not ip:
                raise ManifestError(
                    f"{where}: data.egressIPs: {item!r} is not NODE=IP (e.g. node-a=127.60.0.1)"
                )
            config.egress_ips[node] = ip
    return config


def dns_config(corefile: str, where: str) -> DnsConfig:
    """The ``ttl`` of the ``kubernetes`` plugin block in a Corefile (0-3600, as CoreDNS)."""
    config = DnsConfig(source=where)
    depth, in_kubernetes = 0, False
    for raw in corefile.splitlines():
        line = raw.split("#", 1)[0].strip()
        words = line.replace("{", " { ").replace("}", " } ").split()
        if words and words[0] == "kubernetes" and "{" in words:
            in_kubernetes, depth = True, 0
        for word in words:
            depth += (word == "{") - (word == "}")
        if in_kubernetes and words[:1] == ["ttl"]:
            if len(words) != 2 or not words[1].isdigit() or not 0 <= int(words[1]) <= 3600:
                raise ManifestError(
                    f"{where}: data.Corefile: kubernetes plugin: {line!r} "
                    "(expected `ttl SECONDS`, 0-3600)"
                )
            config.ttl = int(words[1])
        if in_kubernetes and depth <= 0 and "}" in words:
            in_kubernetes = False
    return config


def parse_duration(text: str) -> float:
    """A Go-style duration with one unit (``500ms``, ``1s``, ``2m``) in seconds."""
    units = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
    for unit in sorted(units, key=len, reverse=True):
        if text.endswith(unit):
            try:
                return float(text[: -len(unit)]) * units[unit]
            except ValueError:
                break
    raise ValueError(f"{text!r} is not a duration like 500ms, 1s or 2m")


def _validate(doc: dict[str, Any], where: str) -> None:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        field = _path(list(exc.absolute_path)) or "(document)"
        raise ManifestError(f"{where}: {field}: {exc.message}") from None
    except kubernetes_validate.SchemaNotFoundError as exc:
        raise ManifestError(f"{where}: no schema for this kind: {exc}") from None


def _path(parts: list[Any]) -> str:
    out = ""
    for part in parts:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


class _FieldError(Exception):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _service(doc: dict[str, Any], origin: str) -> Service:
    meta, spec = doc["metadata"], doc.get("spec", {})
    ports = []
    for i, p in enumerate(spec.get("ports", [])):
        if len(spec.get("ports", [])) > 1 and not p.get("name"):
            raise _FieldError(f"spec.ports[{i}].name", "required when a Service has several ports")
        ports.append(
            ServicePort(
                port=p["port"],
                target_port=p.get("targetPort", p["port"]),
                name=p.get("name"),
                protocol=Protocol(p.get("protocol") or "TCP"),
                app_protocol=p.get("appProtocol"),
                node_port=p.get("nodePort"),
            )
        )
    affinity = spec.get("sessionAffinityConfig", {}).get("clientIP", {})
    timeout = affinity.get("timeoutSeconds", 10800)
    if not 0 < timeout <= 86400:
        raise _FieldError(
            "spec.sessionAffinityConfig.clientIP.timeoutSeconds", f"{timeout} is not in 1..86400"
        )
    return Service(
        name=meta["name"],
        namespace=meta.get("namespace", "default"),
        type=ServiceType(spec.get("type") or "ClusterIP"),
        selector=dict(spec.get("selector") or {}),
        ports=ports,
        cluster_ip=spec.get("clusterIP"),
        session_affinity=SessionAffinity(spec.get("sessionAffinity") or "None"),
        affinity_timeout_seconds=timeout,
        external_traffic_policy=TrafficPolicy(spec.get("externalTrafficPolicy") or "Cluster"),
        external_name=spec.get("externalName"),
        load_balancer_ip=spec.get("loadBalancerIP"),
        health_check_node_port=spec.get("healthCheckNodePort"),
        labels=dict(meta.get("labels") or {}),
        annotations=dict(meta.get("annotations") or {}),
        source=origin,
        created=time.time(),
    )


def _probe(raw: dict[str, Any] | None, field: str) -> Probe | None:
    if not raw:
        return None
    if "httpGet" in raw:
        kind, port, path = "http", raw["httpGet"]["port"], raw["httpGet"].get("path", "/")
    elif "tcpSocket" in raw:
        kind, port, path = "tcp", raw["tcpSocket"]["port"], "/"
    elif "grpc" in raw:
        kind, port, path = "grpc", raw["grpc"]["port"], "/"
    else:
        raise _FieldError(field, "only httpGet, tcpSocket and grpc probes are supported")
    return Probe(
        kind,
        port,
        path,
        initial_delay_seconds=float(raw.get("initialDelaySeconds", 0)),
        period_seconds=float(raw.get("periodSeconds", 10)),
        failure_threshold=int(raw.get("failureThreshold", 3)),
        success_threshold=int(raw.get("successThreshold", 1)),
    )


def _container(raw: dict[str, Any], field: str) -> Container:
    env = {}
    for i, item in enumerate(raw.get("env", [])):
        if "value" not in item:
            raise _FieldError(f"{field}.env[{i}]", "only literal values are supported")
        env[item["name"]] = str(item["value"])
    return Container(
        name=raw["name"],
        image=raw.get("image", ""),
        command=list(raw.get("command", [])),
        args=list(raw.get("args", [])),
        env=env,
        ports=[
            ContainerPort(p["containerPort"], p.get("name"), Protocol(p.get("protocol") or "TCP"))
            for p in raw.get("ports", [])
        ],
        readiness_probe=_probe(raw.get("readinessProbe"), f"{field}.readinessProbe"),
    )


def _workload(doc: dict[str, Any], origin: str) -> Workload:
    meta, spec = doc["metadata"], doc["spec"]
    selector = dict(spec["selector"].get("matchLabels") or {})
    template = spec["template"]
    labels = dict(template.get("metadata", {}).get("labels") or {})
    if not selector:
        raise _FieldError("spec.selector.matchLabels", "required (matchExpressions unsupported)")
    if any(labels.get(k) != v for k, v in selector.items()):
        raise _FieldError(
            "spec.template.metadata.labels", "`selector` does not match template `labels`"
        )
    annotations = dict(template.get("metadata", {}).get("annotations") or {})
    if SIDECAR_TIMEOUT_ANNOTATION in annotations:
        try:
            timeout = parse_duration(str(annotations[SIDECAR_TIMEOUT_ANNOTATION]))
        except ValueError as exc:
            raise _FieldError(
                f"spec.template.metadata.annotations[{SIDECAR_TIMEOUT_ANNOTATION}]", str(exc)
            ) from None
        if not 0 < timeout <= 3600:
            raise _FieldError(
                f"spec.template.metadata.annotations[{SIDECAR_TIMEOUT_ANNOTATION}]",
                "must be between 1ms and 1h",
            )
    pod_spec = template["spec"]
    if pod_spec.get("initContainers"):
        raise _FieldError(
            "spec.template.spec.initContainers",
            "not supported by hopscope: it does not run init containers, so the pod would "
            "start without what they prepare",
        )
    containers = [
        _container(c, f"spec.template.spec.containers[{i}]")
        for i, c in enumerate(pod_spec["containers"])
    ]
    return Workload(
        kind=doc["kind"],
        name=meta["name"],
        namespace=meta.get("namespace", "default"),
        replicas=int(spec.get("replicas", 1)),
        selector=selector,
        template=PodTemplate(
            labels=labels,
            containers=containers,
            node_selector=dict(pod_spec.get("nodeSelector") or {}),
            annotations=annotations,
            service_account=str(pod_spec.get("serviceAccountName") or "default"),
        ),
        service_name=spec.get("serviceName"),
        source=origin,
    )


def _backend(raw: dict[str, Any], path: str, path_type: PathType, field: str) -> IngressPath:
    service = raw.get("service")
    if not service:
        raise _FieldError(field, "only service backends are supported")
    port = service.get("port", {})
    number = port.get("number", port.get("name"))
    if number is None:
        raise _FieldError(f"{field}.service.port", "number or name required")
    return IngressPath(path=path, path_type=path_type, service=service["name"], port=number)


SSL_REDIRECT_ANNOTATION = "nginx.ingress.kubernetes.io/ssl-redirect"
"""``"true"``: plain HTTP requests for the Ingress's TLS hosts are answered 308 to https."""
FORCE_SSL_REDIRECT_ANNOTATION = "nginx.ingress.kubernetes.io/force-ssl-redirect"
"""``"true"``: every host of the Ingress redirects to https, with a TLS entry or not."""
SSL_PASSTHROUGH_ANNOTATION = "nginx.ingress.kubernetes.io/ssl-passthrough"
"""``"true"``: TLS for the Ingress's hosts is not terminated at the ingress; the connection,
chosen by its SNI, goes whole to the backend, which must speak TLS itself."""
INGRESS_BOOLEAN_ANNOTATIONS = (
    SSL_REDIRECT_ANNOTATION,
    FORCE_SSL_REDIRECT_ANNOTATION,
    SSL_PASSTHROUGH_ANNOTATION,
)
"""The ingress-nginx annotations hopscope's ingress honours; each must be "true" or "false"."""


def annotation_is_true(annotations: dict[str, str], name: str) -> bool:
    return annotations.get(name, "false").strip().lower() == "true"


def _ingress_annotations(meta: dict[str, Any]) -> dict[str, str]:
    annotations = {str(k): str(v) for k, v in (meta.get("annotations") or {}).items()}
    for name in INGRESS_BOOLEAN_ANNOTATIONS:
        if name in annotations and annotations[name].strip().lower() not in ("true", "false"):
            raise _FieldError(
                f"metadata.annotations[{name}]",
                f'must be "true" or "false", not {annotations[name]!r}',
            )
    return annotations


def _ingress_tls(spec: dict[str, Any], rules: list[IngressRule]) -> list[IngressTLS]:
    """``spec.tls``: each entry's hosts (SNI names) and the Secret with their certificate."""
    entries = []
    for i, raw in enumerate(spec.get("tls") or []):
        hosts = [str(h) for h in raw.get("hosts") or []]
        for j, host in enumerate(hosts):
            if not host or (host.startswith("*") and not host.startswith("*.")):
                raise _FieldError(f"spec.tls[{i}].hosts[{j}]", f"{host!r} is not a host name")
        secret = raw.get("secretName")
        if not secret:
            raise _FieldError(
                f"spec.tls[{i}].secretName",
                "required: hopscope's ingress has no default certificate",
            )
        if not hosts:
            # As ingress-nginx does: an entry without hosts serves the rules' hosts.
            hosts = [r.host for r in rules if r.host]
        entries.append(IngressTLS(hosts=hosts, secret_name=str(secret)))
    return entries


def _ingress(doc: dict[str, Any], origin: str) -> Ingress:
    meta, spec = doc["metadata"], doc.get("spec", {})
    annotations = _ingress_annotations(meta)
    rules = []
    for i, rule in enumerate(spec.get("rules", [])):
        paths = [
            _backend(
                p["backend"],
                p.get("path", "/"),
                PathType(p["pathType"]),
                f"spec.rules[{i}].http.paths[{j}].backend",
            )
            for j, p in enumerate(rule.get("http", {}).get("paths", []))
        ]
        rules.append(IngressRule(host=rule.get("host"), paths=paths))
    if annotation_is_true(annotations, SSL_PASSTHROUGH_ANNOTATION) and not any(
        r.host and r.paths for r in rules
    ):
        raise _FieldError(
            f"metadata.annotations[{SSL_PASSTHROUGH_ANNOTATION}]",
            "passthrough picks the backend by SNI: it needs a rule with a host and a path",
        )
    default = spec.get("defaultBackend")
    return Ingress(
        name=meta["name"],
        namespace=meta.get("namespace", "default"),
        rules=rules,
        ingress_class=spec.get("ingressClassName"),
        default_backend=(
            _backend(default, "/", PathType.PREFIX, "spec.defaultBackend") if default else None
        ),
        tls=_ingress_tls(spec, rules),
        annotations=annotations,
        source=origin,
        created=time.time(),
    )


def _secret(doc: dict[str, Any], origin: str) -> Secret:
    """A Secret, ``stringData`` folded into ``data`` (base64) as the API server does."""
    meta = doc["metadata"]
    data = {str(k): str(v) for k, v in (doc.get("data") or {}).items()}
    for key, value in (doc.get("stringData") or {}).items():
        data[str(key)] = base64.b64encode(str(value).encode()).decode()
    for key, value in data.items():
        try:
            base64.b64decode(value, validate=True)
        except ValueError:
            raise _FieldError(f"data.{key}", "not valid base64") from None
    secret_type = str(doc.get("type") or "Opaque")
    if secret_type == "kubernetes.io/tls":
        for key in ("tls.crt", "tls.key"):
            if key not in data:
                raise _FieldError(f"data[{key}]", "required for type kubernetes.io/tls")
    return Secret(
        name=meta["name"],
        namespace=meta.get("namespace", "default"),
        type=secret_type,
        data=data,
        source=origin,
        created=time.time(),
    )

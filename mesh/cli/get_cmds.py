"""``hopscope get``: kubectl-style listings of the cluster model.

Tables (``-o wide`` adds columns) for people; ``-o json`` and ``-o yaml`` print the objects
as the API server would return them (:mod:`mesh.model.k8s_objects`): one object when a
name is given, else a ``kind: List`` like kubectl's.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

import click
import yaml
from rich.console import Console
from rich.table import Table

from mesh.cli._client import APIClient
from mesh.model.k8s_objects import list_object, ready_containers, to_object
from mesh.model.types import (
    ApiObject,
    ClusterState,
    DestinationRule,
    EndpointSlice,
    Gateway,
    Ingress,
    NetworkPolicy,
    PeerAuthentication,
    Pod,
    ProxyConfig,
    Secret,
    Service,
)

out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)

RESOURCE_ALIASES = {
    "pods": "pods",
    "pod": "pods",
    "po": "pods",
    "svc": "services",
    "service": "services",
    "services": "services",
    "endpointslices": "endpointslices",
    "endpointslice": "endpointslices",
    "eps": "endpointslices",
    "ingress": "ingresses",
    "ingresses": "ingresses",
    "ing": "ingresses",
    "netpol": "networkpolicies",
    "networkpolicy": "networkpolicies",
    "networkpolicies": "networkpolicies",
    "peerauthentication": "peerauthentications",
    "peerauthentications": "peerauthentications",
    "pa": "peerauthentications",
    "destinationrule": "destinationrules",
    "destinationrules": "destinationrules",
    "dr": "destinationrules",
    "gateway": "gateways",
    "gateways": "gateways",
    "gtw": "gateways",
    "httproute": "httproutes",
    "httproutes": "httproutes",
    "grpcroute": "grpcroutes",
    "grpcroutes": "grpcroutes",
    "tlsroute": "tlsroutes",
    "tlsroutes": "tlsroutes",
    "secret": "secrets",
    "secrets": "secrets",
}


def _age(created: float) -> str:
    if not created:
        return "-"
    secs = int(time.time() - created)
    if secs < 120:
        return f"{secs}s"
    if secs < 7200:
        return f"{secs // 60}m"
    return f"{secs // 3600}h"


def _ports(svc: Service) -> str:
    parts = []
    for p in svc.ports:
        text = f"{p.port}:{p.node_port}" if p.node_port else str(p.port)
        parts.append(f"{text}/{p.protocol}")
    return ",".join(parts) or "<none>"


def _pod_rows(pods: list[Pod], wide: bool) -> tuple[list[str], list[list[str]]]:
    head = ["NAMESPACE", "NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    if wide:
        head += ["IP", "NODE"]
    rows = []
    for p in pods:
        total = len(p.containers) + (1 if p.has_sidecar else 0)
        ready = ready_containers(p)
        row = [p.namespace, p.name, f"{ready}/{total}", p.phase, str(p.restarts), _age(p.created)]
        if wide:
            row += [p.ip or "<none>", p.node or "<none>"]
        rows.append(row)
    return head, rows


def _svc_rows(
    services: list[Service], wide: bool, proxy: ProxyConfig | None = None
) -> tuple[list[str], list[list[str]]]:
    head = ["NAMESPACE", "NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)"]
    if wide:
        head += ["SELECTOR", "PROXY", "AFFINITY", "POLICY"]
    rows = []
    proxy = proxy or ProxyConfig()
    for s in services:
        external = s.external_name or ",".join(s.load_balancer_ingress)
        if not external:
            external = "<pending>" if s.type == "LoadBalancer" else "<none>"
        cluster_ip = s.cluster_ip or "<none>"
        row = [s.namespace, s.name, s.type, cluster_ip, external, _ports(s)]
        if wide:
            proxied = s.cluster_ip not in (None, "None") and s.type != "ExternalName"
            affinity = str(s.session_affinity)
            if affinity == "ClientIP":
                affinity += f" {s.affinity_timeout_seconds}s"
            policy = s.external_traffic_policy if s.type in ("NodePort", "LoadBalancer") else "-"
            if s.health_check_node_port:
                policy += f" (hc :{s.health_check_node_port})"
            row += [
                ",".join(f"{k}={v}" for k, v in s.selector.items()) or "<none>",
                f"{proxy.mode}/{proxy.algorithm}" if proxied else "-",
                affinity,
                policy,
            ]
        rows.append(row)
    return head, rows


def _slice_rows(slices: list[EndpointSlice], wide: bool) -> tuple[list[str], list[list[str]]]:
    head = ["NAMESPACE", "NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS"]
    if wide:
        head += ["CONDITIONS"]
    rows = []
    for s in slices:
        addrs = [a for e in s.endpoints for a in e.addresses]
        row = [
            s.namespace,
            s.name,
            s.address_type,
            ",".join(str(p.port) for p in s.ports) or "<unset>",
            ",".join(addrs) or "<none>",
        ]
        if wide:
            row += [
                " ".join(
                    f"{e.pod}:{'ready' if e.ready else 'notready'}"
                    f"{',terminating' if e.terminating else ''}"
                    for e in s.endpoints
                )
            ]
        rows.append(row)
    return head, rows


def _ingress_rows(ings: list[Ingress], wide: bool) -> tuple[list[str], list[list[str]]]:
    from mesh import addresses

    head = ["NAMESPACE", "NAME", "CLASS", "HOSTS", "ADDRESS", "PORTS"]
    rows = []
    for i in ings:
        hosts = ",".join(r.host or "*" for r in i.rules) or "*"
        rows.append(
            [
                i.namespace,
                i.name,
                i.ingress_class or "<none>",
                hosts,
                addresses.INGRESS_IP,
                str(addresses.INGRESS_PORT),
            ]
        )
    return head, rows


def _netpol_rows(pols: list[NetworkPolicy], wide: bool) -> tuple[list[str], list[list[str]]]:
    head = ["NAMESPACE", "NAME", "POD-SELECTOR", "POLICY-TYPES"]
    rows = []
    for p in pols:
        sel = p.spec.get("podSelector", {}).get("matchLabels", {})
        types = ",".join(p.spec.get("policyTypes", ["Ingress"]))
        rows.append(
            [p.namespace, p.name, ",".join(f"{k}={v}" for k, v in sel.items()) or "<all>", types]
        )
    return head, rows


def _peer_auth_rows(pas: list[PeerAuthentication], wide: bool) -> tuple[list[str], list[list[str]]]:
    head = ["NAMESPACE", "NAME", "MODE", "SELECTOR", "AGE"]
    rows = []
    for p in pas:
        sel = (p.spec.get("selector") or {}).get("matchLabels") or {}
        mode = (p.spec.get("mtls") or {}).get("mode") or "UNSET"
        ports = p.spec.get("portLevelMtls") or {}
        if ports:
            mode += " (" + ", ".join(f"{k}: {v.get('mode')}" for k, v in ports.items()) + ")"
        selector = ",".join(f"{k}={v}" for k, v in sel.items()) or "<namespace>"
        rows.append([p.namespace, p.name, mode, selector, _age(p.created)])
    return head, rows


def _destination_rule_rows(
    drs: list[DestinationRule], wide: bool
) -> tuple[list[str], list[list[str]]]:
    head = ["NAMESPACE", "NAME", "HOST", "TLS", "CONNECTION-POOL", "AGE"]
    rows = []
    for r in drs:
        policy = r.spec.get("trafficPolicy") or {}
        pool = policy.get("connectionPool") or {}
        limits = {**(pool.get("tcp") or {}), **(pool.get("http") or {})}
        tls = (policy.get("tls") or {}).get("mode") or "<auto>"
        shown = ",".join(f"{k}={v}" for k, v in limits.items()) or "<none>"
        rows.append([r.namespace, r.name, r.spec["host"], tls, shown, _age(r.created)])
    return head, rows


def _gateway_rows(gws: list[Gateway], wide: bool) -> tuple[list[str], list[list[str]]]:
    from mesh import addresses

    head = ["NAMESPACE", "NAME", "CLASS", "ADDRESS", "LISTENERS", "AGE"]
    rows = []
    for g in gws:
        listeners = ",".join(
            f"{li.get('name')}:{li.get('protocol')}/{li.get('port')}"
            for li in g.spec.get("listeners") or []
        )
        rows.append(
            [
                g.namespace,
                g.name,
                str(g.spec.get("gatewayClassName", "")),
                addresses.INGRESS_IP,
                listeners,
                _age(g.created),
            ]
        )
    return head, rows


def _route_rows(routes: list[ApiObject], wide: bool) -> tuple[list[str], list[list[str]]]:
    head = ["NAMESPACE", "NAME", "HOSTNAMES", "PARENTS", "AGE"]
    rows = []
    for r in routes:
        parents = ",".join(
            f"{p.get('kind', 'Gateway')}/{p.get('name')}" for p in r.spec.get("parentRefs") or []
        )
        hostnames = ",".join(r.spec.get("hostnames") or []) or "*"
        rows.append([r.namespace, r.name, hostnames, parents, _age(r.created)])
    return head, rows


def _secret_rows(secrets: list[Secret], wide: bool) -> tuple[list[str], list[list[str]]]:
    head = ["NAMESPACE", "NAME", "TYPE", "DATA", "AGE"]
    rows = [[s.namespace, s.name, s.type, str(len(s.data)), _age(s.created)] for s in secrets]
    return head, rows


Lister = Callable[[Any, bool], tuple[list[str], list[list[str]]]]
_LISTERS: dict[str, tuple[str, Lister]] = {
    "pods": ("pods", _pod_rows),
    "services": ("services", _svc_rows),
    "endpointslices": ("endpoint_slices", _slice_rows),
    "ingresses": ("ingresses", _ingress_rows),
    "networkpolicies": ("network_policies", _netpol_rows),
    "peerauthentications": ("peer_authentications", _peer_auth_rows),
    "destinationrules": ("destination_rules", _destination_rule_rows),
    "gateways": ("gateways", _gateway_rows),
    "httproutes": ("http_routes", _route_rows),
    "grpcroutes": ("grpc_routes", _route_rows),
    "tlsroutes": ("tls_routes", _route_rows),
    "secrets": ("secrets", _secret_rows),
}


@click.command()
@click.argument("resource")
@click.argument("name", required=False)
@click.option("-n", "--namespace", help="Only this namespace (default: all namespaces).")
@click.option(
    "-o",
    "--output",
    type=click.Choice(["table", "wide", "json", "yaml"]),
    default="table",
    help="json/yaml: the objects as the API server returns them (one, or a List).",
)
@click.option("--json", "as_json", is_flag=True, help="Same as -o json.")
def get(resource: str, name: str | None, namespace: str | None, output: str, as_json: bool) -> None:
    """List pods, svc, endpointslices, ingress, netpol, secrets, peerauthentications,
    destinationrules, gateways, httproutes, grpcroutes or tlsroutes (kubectl-style)."""
    kind = RESOURCE_ALIASES.get(resource.lower())
    if kind is None:
        known = ", ".join(sorted(_LISTERS))
        raise click.BadParameter(
            f"unknown resource {resource!r}; use one of {known}", param_hint="RESOURCE"
        )
    state = ClusterState.from_dict(APIClient().get("/api/v1/state"))
    attr, lister = _LISTERS[kind]
    items = [i for i in getattr(state, attr) if namespace in (None, i.namespace)]
    if name:
        items = [i for i in items if i.name == name]
        if not items:
            raise click.ClickException(f"{kind} {name!r} not found")
    if as_json or output in ("json", "yaml"):
        objects = [to_object(i, state) for i in items]
        doc = objects[0] if name else list_object(objects)
        doc = json.loads(json.dumps(doc))  # plain types (enum members become strings)
        if output == "yaml" and not as_json:
            click.echo(yaml.safe_dump(doc, sort_keys=True, default_flow_style=False), nl=False)
        else:
            click.echo(json.dumps(doc, indent=4, sort_keys=True))
        return
    if kind == "services":
        head, rows = _svc_rows(items, output == "wide", state.proxy)
    else:
        head, rows = lister(items, output == "wide")
    if not rows:
        out.print(f"No {kind} found" + (f" in namespace {namespace}." if namespace else "."))
        return
    table = Table(*head, box=None, pad_edge=False, show_edge=False)
    for row in rows:
        table.add_row(*row)
    out.print(table)

"""Break-it scenarios: break one thing, send traffic, check that the telemetry names it.

:func:`run` carries a scenario out from a healthy cluster and always restores it; :func:`reset`
brings the cluster back to the shipped manifests whatever state it is in.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from mesh.scenarios.base import (
    BlameCheck,
    Context,
    Finding,
    ScenarioError,
    lab_docs,
    shipped_docs,
)
from mesh.scenarios.edge import IngressSni as IngressSni  # registers ingress-sni
from mesh.scenarios.library import SCENARIOS, Scenario
from mesh.scenarios.mtls import StrictPlaintext as StrictPlaintext  # registers the mTLS ones
from mesh.scenarios.routing import CanaryTenPercent as CanaryTenPercent  # and the routing ones

__all__ = ["SCENARIOS", "BlameCheck", "Finding", "Scenario", "ScenarioError", "reset", "run"]

SHOP_APPS = {"frontend": 2, "catalog": 2, "reviews": 2, "ratings": 2, "cache": 2}


def run(
    name: str,
    progress: Callable[[str], None] = lambda _m: None,
    blame: BlameCheck | None = None,
) -> dict[str, Any]:
    """Inject, drive, check, restore. ``blame`` overrides the scenario's expectation."""
    if name not in SCENARIOS:
        known = ", ".join(SCENARIOS)
        raise ScenarioError(f"unknown scenario {name!r} (known: {known})")
    scenario = SCENARIOS[name]()
    if blame is not None:
        scenario.blame = blame
    ctx = Context(progress)
    started = time.monotonic()
    try:
        progress(f"breaking: {scenario.breaks}")
        scenario.inject(ctx)
        progress(f"traffic: {scenario.traffic}")
        outcomes = scenario.drive(ctx)
        progress("reading the telemetry")
        finding = scenario.check(ctx, outcomes)
    finally:
        progress("restoring the cluster")
        scenario.restore(ctx)
    statuses: dict[str, int] = {}
    for o in outcomes:
        key = str(o.status or o.error or "error")
        statuses[key] = statuses.get(key, 0) + 1
    return {
        **scenario.describe(),
        "ok": finding.ok,
        "verdict": finding.verdict,
        "evidence": finding.evidence,
        "trace_ids": finding.trace_ids,
        "statuses": statuses,
        "seconds": round(time.monotonic() - started, 1),
        "expected": asdict(scenario.blame) if scenario.blame else None,
    }


def reset(progress: Callable[[str], None] = lambda _m: None) -> list[str]:
    """Back to the shipped cluster: manifests re-applied, overrides cleared, lab removed."""
    ctx = Context(progress)
    done: list[str] = []
    try:
        ctx.kube_proxy_paused(False)
        done.append("kube-proxy rule sync resumed")
    except ScenarioError as exc:
        done.append(f"kube-proxy not reachable ({exc})")
    for pod in ctx.state().pods:
        if pod.ready_override is not None:
            ctx.set_ready(pod.namespace, pod.name, None)
            done.append(f"pod {pod.namespace}/{pod.name} readiness back to its probe")
    mesh_objects = _mesh_objects(ctx)
    if mesh_objects:
        done += ctx.delete(mesh_objects, "mesh policies and routes")
    lab = [d for d in lab_docs("lab.yaml") if d["kind"] != "Namespace"]
    done += [c for c in ctx.delete(lab, "lab.yaml") if "not found" not in c]
    docs = [
        d
        for file in ("cni.yaml", "coredns.yaml", "shop.yaml", "shop-netpol.yaml")
        for d in shipped_docs(file)
    ]
    done += ctx.apply(docs, "shipped manifests")
    for app, replicas in SHOP_APPS.items():
        ctx.wait_ready("shop", app, replicas)
    done.append("every shop pod ready")
    return done


def _mesh_objects(ctx: Context) -> list[dict[str, Any]]:
    """Every mesh policy and Gateway API object in the cluster, as documents to delete (the
    shipped manifests have none)."""
    from mesh.model.crds import CUSTOM_KINDS

    state = ctx.state()
    kinds = {kind.cls: key for key, kind in CUSTOM_KINDS.items()}
    docs = []
    for items in (
        state.peer_authentications,
        state.destination_rules,
        state.http_routes,
        state.grpc_routes,
        state.tls_routes,
        state.gateways,
    ):
        for obj in items:
            api_version, kind = kinds[type(obj)]
            docs.append(
                {
                    "apiVersion": api_version,
                    "kind": kind,
                    "metadata": {"name": obj.name, "namespace": obj.namespace},
                    "spec": obj.spec,
                }
            )
    return docs

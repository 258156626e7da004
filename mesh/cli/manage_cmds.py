"""``hopscope apply``, ``scale``, ``ready``, ``kill`` and ``conntrack``: change and inspect."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
import requests
import yaml
from rich.console import Console
from rich.table import Table

from mesh import addresses
from mesh.cli._client import APIClient

out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)

KUBE_PROXY_ADMIN = f"http://{addresses.NODE_IPS['node-a']}:{addresses.KUBE_PROXY_METRICS_PORT}"


def _split_ref(ref: str, default_ns: str) -> tuple[str, str]:
    ns, sep, name = ref.rpartition("/")
    return (ns if sep else default_ns), name


def _send_manifests(paths: tuple[Path, ...], endpoint: str, verb: str) -> None:
    """Read and validate every document of every file, then post them file by file.

    Nothing is sent unless all of them are valid, so ``nothing applied`` is true even when
    the bad document is in the last of several files. Fields hopscope accepts but does not
    act on are named in ``warning:`` lines (on stderr) before anything is sent.
    """
    from mesh.model.manifests import (
        ManifestError,
        expand_paths,
        load_document,
        manifest_warnings,
    )

    try:
        files = expand_paths(paths)
    except ManifestError as exc:
        raise click.ClickException(str(exc)) from None
    batches: list[tuple[Path, list[Any]]] = []
    warnings: list[str] = []
    for path in files:
        try:
            docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
            for i, doc in enumerate(docs):
                load_document(doc, path.name, i)  # validate before sending anything
                if verb == "applied":
                    warnings.extend(manifest_warnings(doc, path.name))
        except yaml.YAMLError as exc:
            raise click.ClickException(f"{path}: not valid YAML, nothing {verb}: {exc}") from None
        except OSError as exc:
            raise click.ClickException(f"{path}: {exc.strerror}, nothing {verb}") from None
        except ManifestError as exc:
            raise click.ClickException(f"invalid manifest, nothing {verb}: {exc}") from None
        batches.append((path, docs))
    for line in warnings:
        click.echo(f"warning: {line}", err=True)
    client = APIClient()
    for path, docs in batches:
        result = client.post(endpoint, {"source": path.name, "documents": docs})
        for change in result["changes"]:
            click.echo(change)


_FILENAME = click.option(
    "-f",
    "--filename",
    "paths",
    multiple=True,
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="Manifest file or directory (repeatable).",
)


@click.command()
@_FILENAME
def apply(paths: tuple[Path, ...]) -> None:
    """Create or update objects from manifests in the running cluster (like kubectl apply).

    Services, Deployments/StatefulSets, NetworkPolicies, Secrets, ConfigMaps hopscope
    reads (kube-system/hopscope-cni, kube-system/coredns), a KubeProxyConfiguration (e.g.
    `mode: ipvs`), the mesh's PeerAuthentication and DestinationRule and the Gateway API's
    Gateway, HTTPRoute, GRPCRoute and TLSRoute take effect at once (sidecars take theirs
    from files Envoy watches: no restart). Ingresses too, within a second: the ingress
    controller rewrites the ingress Envoy's routes without restarting it (a new host is
    served, a deleted one answers 404). In the compose (docker) runtime the ingress takes
    its routes at start only, so an Ingress is refused there with the reason.

    \b
    Mind what a manifest can do: in local mode every container of a Pod template runs
    as a process of YOUR user, with the manifest's command and args -- like `docker run`.
    Apply only manifests you would run yourself. The API takes this request only with the
    cluster's token (HOPSCOPE_HOME/api-token, readable by the user who ran `hopscope up`).
    """
    _send_manifests(paths, "/api/v1/apply", "applied")


@click.command()
@_FILENAME
def delete(paths: tuple[Path, ...]) -> None:
    """Delete the Services, workloads, NetworkPolicies, Ingresses, Secrets, mesh policies and
    Gateway API objects the manifests name."""
    _send_manifests(paths, "/api/v1/delete", "deleted")


@click.command()
@click.argument("workload")
@click.option("--replicas", type=click.IntRange(min=0), required=True, help="Desired count.")
@click.option("-n", "--namespace", default="shop", show_default=True)
def scale(workload: str, replicas: int, namespace: str) -> None:
    """Set the replicas of a Deployment or StatefulSet (NAME or NAMESPACE/NAME)."""
    ns, name = _split_ref(workload.removeprefix("deployment/"), namespace)
    click.echo(APIClient().post(f"/api/v1/scale/{ns}/{name}", {"replicas": replicas})["message"])


@click.command()
@click.argument("kind", type=click.Choice(["pod"]))
@click.argument("pod")
@click.argument("value", type=click.Choice(["true", "false", "auto"]))
@click.option("-n", "--namespace", default="shop", show_default=True)
def ready(kind: str, pod: str, value: str, namespace: str) -> None:
    """Force a pod ready or unready (its EndpointSlice follows); `auto` returns to its probe."""
    ns, name = _split_ref(pod, namespace)
    body = {"ready": None if value == "auto" else value == "true"}
    APIClient().post(f"/api/v1/pods/{ns}/{name}/ready", body)
    click.echo(f"pod/{name} readiness: {value}")


@click.command("cert")
@click.argument("kind", type=click.Choice(["pod"]))
@click.argument("pod")
@click.option("-n", "--namespace", default="shop", show_default=True)
@click.option("--expire", "change", flag_value="expire", help="Swap in a certificate that expired.")
@click.option("--renew", "change", flag_value="renew", help="Swap in a fresh certificate.")
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
def cert(kind: str, pod: str, namespace: str, change: str | None, output: str) -> None:
    """Show a pod's workload certificate (its SPIFFE identity, validity, rotation time).

    `--expire` hands the sidecar a certificate that expired an hour ago and `--renew` a
    fresh one -- both reach the running Envoy without a restart (the files it watches),
    and the expired one stays until `--renew` or the pod restarts."""
    ns, name = _split_ref(pod, namespace)
    body = {} if change is None else {"expired": change == "expire"}
    info = APIClient().post(f"/api/v1/pods/{ns}/{name}/certificate", body)
    if output == "json":
        click.echo(json.dumps(info, indent=2))
        return
    table = Table("POD", "IDENTITY", "SERIAL", "NOT BEFORE", "NOT AFTER", "ROTATES AT", box=None)
    state = " (EXPIRED)" if info["expired"] else ""
    table.add_row(
        info["pod"],
        info["identity"],
        info["serial"][:16],
        info["not_before"],
        info["not_after"] + state,
        info["rotate_at"],
    )
    out.print(table)


@click.command()
@click.argument("kind", type=click.Choice(["pod"]))
@click.argument("pod")
@click.option("-n", "--namespace", default="shop", show_default=True)
def kill(kind: str, pod: str, namespace: str) -> None:
    """Delete a pod; its Deployment starts a replacement (new name, maybe a reused IP)."""
    ns, name = _split_ref(pod, namespace)
    APIClient().post(f"/api/v1/pods/{ns}/{name}/kill", {})
    click.echo(f"pod/{name} deleted")


def _fetch_conntrack() -> list[dict[str, Any]]:
    try:
        resp = requests.get(f"{KUBE_PROXY_ADMIN}/conntrack", timeout=5)
        resp.raise_for_status()
    except requests.RequestException as exc:
        APIClient().get("/api/v1/status")  # a clearer error if the cluster is not running
        raise click.ClickException(
            f"kube-proxy is not answering at {KUBE_PROXY_ADMIN}: {exc}"
        ) from None
    return resp.json()  # type: ignore[no-any-return]


@click.command()
@click.option("-o", "--output", type=click.Choice(["table", "json"]), default="table")
@click.option("--service", help="Only connections of this Service (NAME or NAMESPACE/NAME).")
@click.option("--live", is_flag=True, help="Only open connections (no TIME_WAIT entries).")
def conntrack(output: str, service: str | None, live: bool) -> None:
    """List proxied connections like `conntrack -L`: tuples, state, timeout, NAT marks.

    On the kernel data path the entries are the kernel's own, read from each node's
    conntrack table (connections kube-proxy's rules translated)."""
    from mesh.cli.kernel_cmds import kernel_status

    status = kernel_status()
    entries = _kernel_conntrack(status) if status else _fetch_conntrack()
    if service:
        entries = [e for e in entries if _service_matches(e["service"], service)]
    if live:
        entries = [e for e in entries if e["state"] == "ESTABLISHED"]
    if output == "json":
        click.echo(json.dumps(entries, indent=2))
        return
    if not entries:
        out.print("no tracked connections")
        return
    table = Table(box=None, pad_edge=False, show_edge=False)
    for col in ("PROTO", "STATE", "TIMEOUT", "ORIGINAL", "REPLY", "MARKS", "SERVICE", "POD", "REQ"):
        table.add_column(col)
    for e in entries:
        marks = ",".join(m for m, on in (("DNAT", e["dnat"]), ("SNAT", e["snat"])) if on)
        table.add_row(
            e["protocol"],
            e["state"],
            str(e["timeout_seconds"]),
            f"src={e['original']['src']} dst={e['original']['dst']}",
            f"src={e['reply']['src']} dst={e['reply']['dst']}",
            marks or "-",
            e["service"],
            e["endpoint_pod"],
            "-" if e["requests"] is None else str(e["requests"]),
        )
    out.print(table)
    out.print(f"[dim]{len(entries)} entries at {time.strftime('%H:%M:%S')}[/]")


def _kernel_conntrack(status: dict[str, Any]) -> list[dict[str, Any]]:
    """The DNATed or SNATed entries of every node's conntrack table."""
    from mesh.kernel.conntrack import entry, table
    from mesh.kubeproxy.rules import build_rules
    from mesh.model.types import ClusterState

    if os.geteuid() != 0:
        raise click.ClickException("reading the nodes' conntrack tables needs root")
    rules = build_rules(ClusterState.from_dict(APIClient().get("/api/v1/state")))
    entries = []
    for node in ("node-a", "node-b"):
        for flow in table(f"{status['netns_prefix']}-{node}"):
            if flow.dnat or flow.snat:
                entries.append(entry(flow, rules, node))
    return entries


def _service_matches(entry_service: str, wanted: str) -> bool:
    """``ns/name[:port]`` against NAME or NAMESPACE/NAME (an entry of no Service: never)."""
    base = entry_service.split(":", 1)[0]
    return bool(base) and wanted in (base, base.rpartition("/")[2])

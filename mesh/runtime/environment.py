"""The environment of what the runtimes start: system processes and pod containers."""

from __future__ import annotations

import os
from pathlib import Path

from mesh import addresses
from mesh.model.types import Container, Pod

PROJECT_ROOT = Path(__file__).resolve().parents[2]

INHERITED = (
    "PATH",
    "HOME",
    "LANG",
    "LC_ALL",
    "TZ",
    "VIRTUAL_ENV",
    "TMPDIR",
    "HOPSCOPE_ADDRESS_PLAN",
    "HOPSCOPE_EXPORT_DELAY_MS",
    "HOPSCOPE_OTLP_LOGS",
)
"""Variables a child process inherits from the control plane."""


def process_env() -> dict[str, str]:
    """What every child process gets: PATH, locale, and the project on PYTHONPATH."""
    env = {k: os.environ[k] for k in INHERITED if k in os.environ}
    python_path = [str(PROJECT_ROOT)]
    if os.environ.get("PYTHONPATH"):
        python_path.append(os.environ["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(python_path)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def app_label(pod: Pod) -> str:
    """The pod's app name: its ``app`` label, else ``app.kubernetes.io/name``, else owner."""
    return pod.labels.get("app") or pod.labels.get("app.kubernetes.io/name") or pod.owner_name


def container_env(pod: Pod, container: Container, otlp_endpoint: str) -> dict[str, str]:
    """The downward-API-like variables an app container gets, over :func:`process_env`."""
    first_port = container.ports[0].container_port if container.ports else 8080
    search = f"{pod.namespace}.svc.cluster.local svc.cluster.local cluster.local"
    return {
        **process_env(),
        **container.env,
        "HOPSCOPE_POD_NAME": pod.name,
        "HOPSCOPE_POD_NAMESPACE": pod.namespace,
        "HOPSCOPE_NODE_NAME": pod.node,
        "HOPSCOPE_POD_IP": pod.ip,
        "HOPSCOPE_APP_PORT": str(first_port + pod.app_port_offset),
        "HOPSCOPE_CONTAINER_PORT": str(first_port),
        "HOPSCOPE_METRICS_PORT": str(addresses.APP_METRICS_PORT),
        "HOPSCOPE_SIDECAR_OUTBOUND": f"{pod.ip}:{addresses.SIDECAR_OUTBOUND_PORT}",
        "HOPSCOPE_DNS_SERVER": f"{addresses.DNS_SERVICE_IP}:{addresses.DNS_PORT}",
        "HOPSCOPE_DNS_SEARCH": search,
        "HOPSCOPE_DNS_NDOTS": "5",
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_endpoint,
        "OTEL_SERVICE_NAME": app_label(pod),
        "HOSTNAME": pod.name,
    }

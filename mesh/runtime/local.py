"""The local runtime: the kubelet role with processes instead of containers.

A pod is its app process plus a real Envoy sidecar, both bound to the pod's own loopback
address. The app binds ``containerPort + APP_PORT_OFFSET`` (its "localhost" port) and the
sidecar owns the containerPort, standing in for the iptables redirect a mesh installs.
System components (cluster DNS, kube-proxy, the ingress controller's Envoy) are processes
too. Nothing here needs root or Docker.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from mesh import addresses
from mesh.model.types import ClusterState, Container, Pod
from mesh.runtime.processes import ChildProcess, ProcessSupervisor

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class SystemComponent:
    """A cluster add-on process (DNS, kube-proxy, ingress) and how to tell it is ready."""

    name: str
    kind: str
    ready_url: str | None = None
    process: str = ""
    """Supervisor name of its process when not ``kube-system/<name>``; ``external`` when it
    is not a process of ours (a container): then only its ``ready_url`` counts."""


class LocalRuntime:
    """Runs pods and system components as local processes."""

    def __init__(self, state_dir: Path, api_url: str, otlp_endpoint: str) -> None:
        self.state_dir = state_dir
        self.api_url = api_url
        self.otlp_endpoint = otlp_endpoint
        self.system_otlp_endpoint = otlp_endpoint
        """Where the node's own components (DNS, kube-proxy, CNI) export spans."""
        self.processes = ProcessSupervisor(state_dir / "logs")
        self.config_dir = state_dir / "envoy"
        self.config_dir.mkdir(parents=True, exist_ok=True)

    # -- pods ---------------------------------------------------------------------------

    def start_pod(self, pod: Pod, state: ClusterState) -> None:
        from mesh.envoy import render_sidecar

        if pod.has_sidecar:
            config = render_sidecar(pod, state, otlp_endpoint=self.otlp_endpoint)
            self._start_envoy(
                f"{pod.namespace}/{pod.name}/envoy", config, pod.name, _app_label(pod)
            )
        for container in pod.containers:
            self.processes.start(
                f"{pod.namespace}/{pod.name}/{container.name}",
                self._container_argv(container),
                self._container_env(pod, container),
                labels={"pod": pod.name, "namespace": pod.namespace, "container": container.name},
            )

    def stop_pod(self, pod: Pod) -> None:
        # The app goes first so in-flight requests drain through a still-running sidecar.
        for container in pod.containers:
            self.processes.stop(f"{pod.namespace}/{pod.name}/{container.name}")
        self.processes.stop(f"{pod.namespace}/{pod.name}/envoy", grace=2.0)

    def restart(self, name: str) -> None:
        """Restart a crashed container (a process here) by its name."""
        self.processes.restart(name)

    def pod_processes(self, pod: Pod) -> list[ChildProcess]:
        names = [f"{pod.namespace}/{pod.name}/{c.name}" for c in pod.containers]
        if pod.has_sidecar:
            names.append(f"{pod.namespace}/{pod.name}/envoy")
        return [p for n in names if (p := self.processes.get(n)) is not None]

    def _container_argv(self, container: Container) -> list[str]:
        argv = [*container.command, *container.args]
        if not argv:
            raise RuntimeError(
                f"container {container.name!r} has no command; local mode runs the command "
                "given in the manifest (image entrypoints are not known here)"
            )
        if argv[0] in ("python", "python3"):
            argv[0] = sys.executable
        return argv

    def _container_env(self, pod: Pod, container: Container) -> dict[str, str]:
        first_port = container.ports[0].container_port if container.ports else 8080
        search = f"{pod.namespace}.svc.cluster.local svc.cluster.local cluster.local"
        env = {
            **_base_env(),
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
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.otlp_endpoint,
            "OTEL_SERVICE_NAME": _app_label(pod),
            "HOSTNAME": pod.name,
        }
        return env

    # -- system components ----------------------------------------------------------------

    def start_cluster_dns(self) -> SystemComponent:
        self.processes.start(
            "kube-system/cluster-dns",
            [sys.executable, "-m", "mesh.dns", "--api", self.api_url],
            {**_base_env(), "OTEL_EXPORTER_OTLP_ENDPOINT": self.system_otlp_endpoint},
        )
        url = f"http://{addresses.DNS_METRICS_IP}:{addresses.DNS_METRICS_PORT}/metrics"
        return SystemComponent("cluster-dns", "dns", url)

    def start_kube_proxy(self) -> SystemComponent:
        node_ip = addresses.NODE_IPS["node-a"]
        self.processes.start(
            "kube-system/kube-proxy",
            [sys.executable, "-m", "mesh.kubeproxy", "--api", self.api_url],
            {**_base_env(), "OTEL_EXPORTER_OTLP_ENDPOINT": self.system_otlp_endpoint},
        )
        url = f"http://{node_ip}:{addresses.KUBE_PROXY_METRICS_PORT}/healthz"
        return SystemComponent("kube-proxy", "kube-proxy", url)

    def start_cni(self) -> SystemComponent:
        self.processes.start(
            "kube-system/cni",
            [sys.executable, "-m", "mesh.cni", "--api", self.api_url],
            {**_base_env(), "OTEL_EXPORTER_OTLP_ENDPOINT": self.system_otlp_endpoint},
        )
        node_ip = addresses.NODE_IPS["node-a"]
        return SystemComponent("cni", "cni", f"http://{node_ip}:{addresses.CNI_METRICS_PORT}/")

    def start_internet(self) -> SystemComponent:
        """The servers outside the cluster that pods reach through egress SNAT."""
        self.processes.start(
            "internet/payments",
            [sys.executable, "-m", "mesh.cni.internet"],
            _base_env(),
        )
        host = addresses.EXTERNAL_HOSTS["payments.example.net."]
        return SystemComponent(
            "payments.example.net", "internet", f"http://{host}:8080/health", "internet/payments"
        )

    def start_ingress(self, state: ClusterState) -> SystemComponent:
        from mesh.envoy import render_ingress

        config = render_ingress(state, otlp_endpoint=self.otlp_endpoint)
        self._start_envoy("hopscope-system/ingress-envoy", config, "ingress-envoy", "ingress")
        url = f"http://{addresses.INGRESS_IP}:{addresses.INGRESS_ADMIN_PORT}/ready"
        return SystemComponent("ingress-envoy", "ingress", url)

    def _start_envoy(self, name: str, config: dict[str, object], node: str, cluster: str) -> None:
        from mesh.envoy import envoy_command

        path = self.config_dir / f"{name.replace('/', '_')}.json"
        path.write_text(json.dumps(config, indent=1))
        argv = envoy_command(path, service_node=node, service_cluster=cluster)
        self.processes.start(name, argv, _base_env())

    def shutdown(self) -> None:
        self.processes.stop_all()


def _app_label(pod: Pod) -> str:
    return pod.labels.get("app") or pod.labels.get("app.kubernetes.io/name") or pod.owner_name


def _base_env() -> dict[str, str]:
    """What every child inherits: PATH, locale, and the project on PYTHONPATH."""
    keep = (
        "PATH",
        "HOME",
        "LANG",
        "LC_ALL",
        "TZ",
        "VIRTUAL_ENV",
        "TMPDIR",
        "HOPSCOPE_ADDRESS_PLAN",
        "HOPSCOPE_EXPORT_DELAY_MS",
    )
    env = {k: os.environ[k] for k in keep if k in os.environ}
    python_path = [str(PROJECT_ROOT)]
    if os.environ.get("PYTHONPATH"):
        python_path.append(os.environ["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(python_path)
    env["PYTHONUNBUFFERED"] = "1"
    return env

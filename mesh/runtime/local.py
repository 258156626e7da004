"""The local runtime: the kubelet role with processes instead of containers.

A pod is its app process plus a real Envoy sidecar, both bound to the pod's own loopback
address. The app binds ``containerPort + APP_PORT_OFFSET`` (its "localhost" port) and the
sidecar owns the containerPort, standing in for the iptables redirect a mesh installs.
System components (cluster DNS, the data path, the ingress controller's Envoy, the
playground internet) are processes too. Nothing here needs root or Docker.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from mesh import addresses
from mesh.model.types import ClusterState, Container, Pod
from mesh.runtime.base import ProcessStatus, Runtime, SidecarFiles, SystemComponent
from mesh.runtime.datapath import DataPath, UserspaceDataPath
from mesh.runtime.environment import app_label, container_env, process_env
from mesh.runtime.processes import ProcessSupervisor
from mesh.runtime.system import SystemProcesses, process_status

INGRESS_PROCESS = "hopscope-system/ingress-envoy"
INGRESS_XDS_DIR = "ingress-xds"
"""Directory of the ingress's xDS resource files, under the Envoy config directory."""
INTERNET_PROCESS = "internet/payments"
SIDECARS_DIR = "sidecars"
"""Per-pod sidecar directories (certificates, xDS files), under the Envoy config directory."""


class LocalRuntime(Runtime):
    """Runs pods and system components as local processes."""

    def __init__(
        self,
        state_dir: Path,
        api_url: str,
        otlp_endpoint: str,
        data_path: DataPath | None = None,
        log_sink: str | None = None,
    ) -> None:
        self.otlp_endpoint = otlp_endpoint
        self.log_sink = log_sink
        """``host:port`` of an OTLP/gRPC logs service for Envoy's access logs (the control
        plane's, when it forwards telemetry); None keeps them on stdout only."""
        self.processes = ProcessSupervisor(state_dir / "logs")
        self.system = SystemProcesses(
            self.processes, api_url, otlp_endpoint, data_path or UserspaceDataPath()
        )
        self.config_dir = state_dir / "envoy"
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.ingress_xds_dir = self.config_dir / INGRESS_XDS_DIR
        # Routes a previous cluster left must not be served before this one publishes its own.
        shutil.rmtree(self.ingress_xds_dir, ignore_errors=True)
        shutil.rmtree(self.config_dir / SIDECARS_DIR, ignore_errors=True)

    # -- pods ---------------------------------------------------------------------------

    def start_pod(self, pod: Pod, state: ClusterState, files: Path | None = None) -> None:
        from mesh.envoy import render_sidecar

        if pod.has_sidecar:
            config = render_sidecar(
                pod, state, otlp_endpoint=self.otlp_endpoint, log_sink=self.log_sink, files=files
            )
            self._start_envoy(_sidecar_name(pod), config, pod.name, app_label(pod), pod)
        for container in pod.containers:
            self.processes.start(
                _container_name(pod, container),
                self.in_pod(pod, _container_argv(container)),
                container_env(pod, container, self.otlp_endpoint),
            )

    def in_pod(self, pod: Pod | None, argv: list[str]) -> list[str]:
        """``argv`` as run in the pod's network (here: the host's, where pods are addresses
        on the loopback; the kernel data path runs it in the pod's namespace)."""
        return argv

    def sidecar_telemetry(self, node: str) -> tuple[str, str | None]:
        return self.otlp_endpoint, self.log_sink

    def sidecar_files_changed(self, pod: Pod, names: list[str]) -> None:
        return None  # the sidecar reads the very directory the control plane writes

    def sidecar_files(self, pod: Pod) -> SidecarFiles:
        directory = self.config_dir / SIDECARS_DIR / f"{pod.namespace}_{pod.name}"
        return SidecarFiles(directory, directory)

    def stop_pod(self, pod: Pod) -> None:
        # The app goes first so in-flight requests drain through a still-running sidecar.
        for container in pod.containers:
            self.processes.stop(_container_name(pod, container))
        self.processes.stop(_sidecar_name(pod), grace=2.0)

    def container_statuses(self, pod: Pod) -> list[ProcessStatus]:
        names = [_container_name(pod, c) for c in pod.containers]
        if pod.has_sidecar:
            names.append(_sidecar_name(pod))
        return [process_status(p) for n in names if (p := self.processes.get(n)) is not None]

    def restart_container(self, name: str) -> None:
        self.processes.restart(name)

    # -- system components ----------------------------------------------------------------

    def start_system_components(self) -> list[SystemComponent]:
        return [*self.system.start(), self._start_internet()]

    def _start_internet(self) -> SystemComponent:
        """The servers outside the cluster that pods reach through egress SNAT."""
        self.processes.start(
            INTERNET_PROCESS, [sys.executable, "-m", "mesh.cni.internet"], process_env()
        )
        host = addresses.EXTERNAL_HOSTS["payments.example.net."]
        url = f"http://{host}:8080/health"
        return SystemComponent("payments.example.net", "internet", url, INTERNET_PROCESS)

    def start_ingress(self, state: ClusterState, identity: Path | None = None) -> SystemComponent:
        from mesh.envoy import render_ingress

        config = render_ingress(
            state,
            otlp_endpoint=self.otlp_endpoint,
            log_sink=self.log_sink,
            xds_dir=self.ingress_xds_dir,
            identity=identity,
        )
        self._start_envoy(INGRESS_PROCESS, config, "ingress-envoy", "ingress")
        url = f"http://{addresses.INGRESS_IP}:{addresses.INGRESS_ADMIN_PORT}/ready"
        return SystemComponent("ingress-envoy", "ingress", url, INGRESS_PROCESS)

    def _start_envoy(
        self, name: str, config: dict[str, object], node: str, cluster: str, pod: Pod | None = None
    ) -> None:
        from mesh.envoy import envoy_command

        path = self.config_dir / f"{name.replace('/', '_')}.json"
        path.write_text(json.dumps(config, indent=1))
        argv = envoy_command(path, service_node=node, service_cluster=cluster)
        self.processes.start(name, self.in_pod(pod, argv), process_env())

    def shutdown(self) -> None:
        self.processes.stop_all()


def _container_name(pod: Pod, container: Container) -> str:
    return f"{pod.namespace}/{pod.name}/{container.name}"


def _sidecar_name(pod: Pod) -> str:
    return f"{pod.namespace}/{pod.name}/envoy"


def _container_argv(container: Container) -> list[str]:
    argv = [*container.command, *container.args]
    if not argv:
        raise RuntimeError(
            f"container {container.name!r} has no command; local mode runs the command "
            "given in the manifest (image entrypoints are not known here)"
        )
    if argv[0] in ("python", "python3"):
        argv[0] = sys.executable
    return argv

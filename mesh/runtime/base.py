"""The runtime interface: what the kubelet and the control plane ask of a runtime.

Two runtimes implement :class:`Runtime`: :class:`~mesh.runtime.local.LocalRuntime` (pods
are processes on loopback addresses) and :class:`~mesh.runtime.docker.DockerRuntime` (pods
are containers sharing a pause container's network namespace). Neither derives from the
other; what they share sits in small parts both hold:

* :mod:`mesh.runtime.environment` — the environment a pod's containers get;
* :mod:`mesh.runtime.system` — cluster DNS and the data path as supervised processes
  (every runtime has one as ``system``; :class:`Runtime` reports and restarts components
  through it);
* :mod:`mesh.runtime.datapath` — the data-path seam: which component starts kube-proxy and
  the CNI (today the userspace relays).

Containers and system components are reported as :class:`ProcessStatus`, the way a CRI's
``ContainerStatus`` reports a container, so the kubelet never sees processes or containers.
"""

from __future__ import annotations

import abc
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mesh.model.types import ClusterState, Pod

if TYPE_CHECKING:
    from mesh.runtime.system import SystemProcesses


@dataclass(frozen=True)
class SystemComponent:
    """A cluster add-on (DNS, kube-proxy, CNI, ingress, the playground internet) and how to
    tell it is ready."""

    name: str
    kind: str
    ready_url: str | None = None
    process: str | None = None
    """Its process's name under the runtime's supervisor; ``None`` when it is not a process
    of ours (a container, a compose service): then only ``ready_url`` counts."""


@dataclass(frozen=True)
class ProcessStatus:
    """A container or system process as the kubelet sees it."""

    name: str
    """The runtime's name for it; :meth:`Runtime.restart_container` takes this."""
    running: bool
    exit_code: int | None = None
    pid: int | None = None
    restarts: int = 0
    log_path: Path | None = None


def ingress_pod() -> Pod:
    """The ingress controller's Envoy as a pod of ``hopscope-system`` (service account
    ``ingress``: its mesh identity when it talks mTLS to workloads)."""
    from mesh import addresses

    return Pod(
        "ingress-envoy",
        "hopscope-system",
        {"app": "ingress"},
        addresses.INGRESS_NODE,
        addresses.INGRESS_IP,
        [],
        service_account="ingress",
    )


@dataclass(frozen=True)
class SidecarFiles:
    """A pod's sidecar directory: certificates and xDS resources the control plane writes
    (``host_dir``, its own view) and the sidecar's Envoy watches (``sidecar_dir``)."""

    host_dir: Path
    sidecar_dir: Path


class Runtime(abc.ABC):
    """Starts and stops pods and the cluster's own components."""

    system: SystemProcesses
    """The components that run as processes of the control plane (DNS, the data path)."""

    ingress_xds_dir: Path | None = None
    """Where the ingress Envoy this runtime starts reads its routes and clusters from (Envoy
    file-based xDS, kept current by :class:`~mesh.controlplane.ingress.IngressController`);
    ``None`` when that Envoy cannot read files the control plane writes; its routes are then
    those rendered into its bootstrap at start."""

    # -- pods ----------------------------------------------------------------------------

    @abc.abstractmethod
    def start_pod(self, pod: Pod, state: ClusterState, files: Path | None = None) -> None:
        """Start the pod's containers (and its Envoy sidecar); raise if it cannot start.

        ``files``: the sidecar's directory as it sees it (:meth:`sidecar_files`), already
        holding its certificate and xDS resources; None renders its config inline."""

    @abc.abstractmethod
    def sidecar_telemetry(self, node: str) -> tuple[str, str | None]:
        """Where a sidecar on ``node`` exports spans (OTLP/HTTP URL) and ships access logs
        (OTLP/gRPC ``host:port``, or None for stdout only)."""

    def sidecar_files(self, pod: Pod) -> SidecarFiles | None:
        """Where the pod's sidecar reads files the control plane keeps current; None when
        this runtime's sidecars cannot read the control plane's files."""
        return None

    @abc.abstractmethod
    def sidecar_files_changed(self, pod: Pod, names: list[str]) -> None:
        """The control plane rewrote these files of the pod's sidecar directory, in this
        order; a runtime whose sidecars see that directory itself has nothing to do."""

    def remove_sidecar_files(self, pod: Pod) -> None:
        """Drop the pod's sidecar directory (the pod is gone)."""
        files = self.sidecar_files(pod)
        if files is not None:
            shutil.rmtree(files.host_dir, ignore_errors=True)

    @abc.abstractmethod
    def stop_pod(self, pod: Pod) -> None:
        """Stop and remove the pod's containers; the app goes before its sidecar."""

    @abc.abstractmethod
    def container_statuses(self, pod: Pod) -> list[ProcessStatus]:
        """The pod's containers (sidecar included) that the runtime knows of."""

    @abc.abstractmethod
    def restart_container(self, name: str) -> None:
        """Restart a container that exited, by its :attr:`ProcessStatus.name`."""

    # -- system components ---------------------------------------------------------------

    @abc.abstractmethod
    def start_system_components(self) -> list[SystemComponent]:
        """Start cluster DNS, the data path (kube-proxy, CNI) and the servers outside the
        cluster; return them in that order."""

    @abc.abstractmethod
    def start_ingress(self, state: ClusterState, identity: Path | None = None) -> SystemComponent:
        """Start the ingress controller's Envoy for the Ingresses in ``state``; with an
        :attr:`ingress_xds_dir`, its routes come from the files there. ``identity``: its
        mesh certificate's directory as it sees it (:func:`ingress_pod`'s sidecar files),
        for mTLS to workloads that ask for it; None: plaintext only."""

    def component_status(self, component: SystemComponent) -> ProcessStatus | None:
        """The component's process; ``None`` when it is not a process of this runtime."""
        return self.system.status(component)

    def restart_component(self, component: SystemComponent) -> None:
        """Restart a system component whose process exited."""
        self.system.restart(component)

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop everything this runtime started."""

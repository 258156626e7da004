"""The cluster's own components as supervised processes of the control plane.

Both runtimes run cluster DNS and the data path this way: they are the node's own
services, not pods. :class:`SystemProcesses` starts them, reports them as
:class:`~mesh.runtime.base.ProcessStatus` and restarts them; which processes make up the
data path is the :class:`~mesh.runtime.datapath.DataPath`'s business.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from mesh import addresses
from mesh.runtime.base import ProcessStatus, SystemComponent
from mesh.runtime.environment import process_env
from mesh.runtime.processes import ChildProcess, ProcessSupervisor

if TYPE_CHECKING:
    from mesh.runtime.datapath import DataPath


def process_status(child: ChildProcess) -> ProcessStatus:
    return ProcessStatus(
        name=child.name,
        running=child.alive(),
        exit_code=child.exit_code(),
        pid=child.pid,
        restarts=child.restarts,
        log_path=child.log_path,
    )


class SystemProcesses:
    """Starts cluster DNS and the data path under ``processes``; they watch the API at
    ``api_url`` and export spans to ``otlp_endpoint``."""

    def __init__(
        self,
        processes: ProcessSupervisor,
        api_url: str,
        otlp_endpoint: str,
        data_path: DataPath,
    ) -> None:
        self.processes = processes
        self.api_url = api_url
        self.otlp_endpoint = otlp_endpoint
        self.data_path = data_path

    def start(self) -> list[SystemComponent]:
        """Cluster DNS, then the data path's components."""
        return [self.start_cluster_dns(), *self.data_path.start(self)]

    def start_cluster_dns(self) -> SystemComponent:
        self.start_module("kube-system/cluster-dns", "mesh.dns")
        url = f"http://{addresses.DNS_METRICS_IP}:{addresses.DNS_METRICS_PORT}/metrics"
        return SystemComponent("cluster-dns", "dns", url, "kube-system/cluster-dns")

    def start_module(self, name: str, module: str) -> None:
        """Run ``python -m <module> --api <api_url>`` as the process ``name``."""
        self.processes.start(
            name,
            [sys.executable, "-m", module, "--api", self.api_url],
            {**process_env(), "OTEL_EXPORTER_OTLP_ENDPOINT": self.otlp_endpoint},
        )

    def status(self, component: SystemComponent) -> ProcessStatus | None:
        child = self.processes.get(component.process) if component.process else None
        return process_status(child) if child is not None else None

    def restart(self, component: SystemComponent) -> None:
        if component.process:
            self.processes.restart(component.process)

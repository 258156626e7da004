"""The EndpointSlice controller: each selector Service's endpoints, from its pods.

An endpoint is ``ready`` when its pod runs and is ready, ``serving`` while it is ready or
terminating, and ``terminating`` once its pod is going. At most
:data:`MAX_ENDPOINTS_PER_SLICE` endpoints go in one slice. Slices are rebuilt whole on
every :meth:`EndpointSliceController.sync`; names are stable per Service and slice index.
"""

from __future__ import annotations

from mesh.model.controllers.names import name_suffix
from mesh.model.types import (
    ClusterState,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Pod,
    Service,
    ServicePort,
    ServiceType,
)

MAX_ENDPOINTS_PER_SLICE = 100
"""The EndpointSlice controller's default ``--max-endpoints-per-slice``."""


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether a non-empty equality selector selects ``labels``."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


class EndpointSliceController:
    def __init__(self, state: ClusterState) -> None:
        self.state = state

    def sync(self) -> None:
        """Recompute every slice from the current Services and pods."""
        slices: list[EndpointSlice] = []
        for svc in self.state.services:
            if svc.type == ServiceType.EXTERNAL_NAME or not svc.selector:
                continue
            slices.extend(build_endpoint_slices(svc, self.state.pods))
        self.state.endpoint_slices = slices


def build_endpoint_slices(svc: Service, pods: list[Pod]) -> list[EndpointSlice]:
    """The EndpointSlices of one Service, from the pods its selector matches."""
    members = sorted(
        (
            p
            for p in pods
            if p.namespace == svc.namespace and matches(svc.selector, p.labels) and p.ip
        ),
        key=lambda p: p.name,
    )
    endpoints = [
        Endpoint(
            addresses=[p.ip],
            ready=p.ready and p.phase == "Running",
            serving=p.ready or (p.phase == "Terminating"),
            terminating=p.phase == "Terminating",
            pod=p.name,
            node=p.node,
            hostname=p.hostname,
        )
        for p in members
    ]
    ports = [_endpoint_port(sp, members) for sp in svc.ports]
    chunks = [
        endpoints[i : i + MAX_ENDPOINTS_PER_SLICE]
        for i in range(0, len(endpoints), MAX_ENDPOINTS_PER_SLICE)
    ] or [[]]
    return [
        EndpointSlice(
            name=f"{svc.name}-{name_suffix(f'{svc.namespace}/{svc.name}/{i}', 5)}",
            namespace=svc.namespace,
            service=svc.name,
            endpoints=chunk,
            ports=ports,
        )
        for i, chunk in enumerate(chunks)
    ]


def _endpoint_port(sp: ServicePort, pods: list[Pod]) -> EndpointPort:
    """The port number behind ``sp.target_port`` (a name is resolved against the pods)."""
    number: int | None = None
    for pod in pods:
        number = pod.container_port(sp.target_port)
        if number is not None:
            break
    if number is None:
        number = sp.target_port if isinstance(sp.target_port, int) else 0
    return EndpointPort(
        port=number, name=sp.name, protocol=sp.protocol, app_protocol=sp.app_protocol
    )

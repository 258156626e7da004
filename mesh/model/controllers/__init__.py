"""Controllers: the parts of the control plane that turn desired state into pods and endpoints.

Shaped like Kubernetes' own, one job per module:

* :mod:`.store` — the one ``ClusterState`` behind a lock; every change bumps
  ``resource_version`` and wakes watchers (the API server's watch).
* :mod:`.kinds` — the kind → handler table's entries; kinds that are only stored, and the
  cluster configuration (Namespaces, CNI/DNS ConfigMaps, kube-proxy config).
* :mod:`.services` — the Service registry: which address fields each Service type has, and
  the ClusterIP, NodePort and load-balancer allocators that fill them.
* :mod:`.allocators` — address pools and port ranges with checkpoints.
* :mod:`.workloads` and :mod:`.scheduler` — Deployment/StatefulSet replicas → pods, and
  which node each new pod goes to.
* :mod:`.pods` — pod lifecycle and the per-node pod IPAM.
* :mod:`.endpointslices` — EndpointSlices from pod readiness.
* :mod:`.cluster` — :class:`Cluster`, the facade that wires them and holds the lock.
"""

from mesh.model.controllers.cluster import Cluster
from mesh.model.controllers.endpointslices import MAX_ENDPOINTS_PER_SLICE, build_endpoint_slices
from mesh.model.controllers.kinds import default_egress_ips
from mesh.model.controllers.services import SERVED_BY_ANNOTATION, SERVICE_TYPES

__all__ = [
    "MAX_ENDPOINTS_PER_SLICE",
    "SERVED_BY_ANNOTATION",
    "SERVICE_TYPES",
    "Cluster",
    "build_endpoint_slices",
    "default_egress_ips",
]

"""The live ingress's routes, clusters and HTTPS listener as Envoy file-based xDS resources.

Envoy subscribes to a file through a ``path_config_source``: it watches the file's directory
and reloads the file whenever a file is *moved* onto that name (a rename is atomic; a write
in place could be read half-done). Each file holds one ``DiscoveryResponse`` in JSON. The
HTTP listener stays in the bootstrap; its routes come from ``rds.json`` (RDS) and the Service
clusters they name from ``cds.json`` (CDS), so a change of Ingresses is applied without a
restart and without draining the listener. The HTTPS listener is ``lds.json`` (LDS): its
filter chains (one per TLS Secret, one per passthrough host) change with the Ingresses and
Secrets, and only the chains that changed are drained. Its terminating chains' routes are
``rds-https.json`` (the HTTP routes without the https redirects). The files hold the TLS
private keys inline, so they are private to the user (``mkstemp`` creates them 0600).

Order matters when a change adds or removes a cluster: new clusters are written before the
routes that name them, and clusters that went away are dropped only after the routes that
named them — so a request never meets a route to a cluster Envoy does not have. The
listener goes after its routes, for the same reason.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from mesh.envoy.ingress import IngressResources

ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"

_Published = tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]
"""HTTP routes, HTTPS routes, clusters, listeners."""


class IngressXds:
    """The resource files of the ingress in ``directory``: ``rds.json``, ``rds-https.json``,
    ``cds.json`` and ``lds.json``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.rds = directory / "rds.json"
        self.rds_https = directory / "rds-https.json"
        self.cds = directory / "cds.json"
        self.lds = directory / "lds.json"
        self.version = time.time_ns() // 1_000_000
        """``version_info`` of the last file written; starts at the clock (in ms) so two
        writers in turn (the bootstrap's first render, then the controller) never reuse one."""
        self._published: _Published | None = None

    def rds_source(self) -> dict[str, Any]:
        """The connection manager's ``rds`` field: routes from ``rds.json``."""
        return {"rds": {"route_config_name": "ingress", "config_source": self._source(self.rds)}}

    def rds_https_source(self) -> dict[str, Any]:
        """The HTTPS chains' ``rds`` field: routes from ``rds-https.json``."""
        from mesh.envoy.ingress import INGRESS_HTTPS_ROUTES

        source = self._source(self.rds_https)
        return {"rds": {"route_config_name": INGRESS_HTTPS_ROUTES, "config_source": source}}

    def lds_source(self) -> dict[str, Any]:
        """The bootstrap's ``dynamic_resources.lds_config``: the HTTPS listener."""
        return self._source(self.lds)

    def cds_source(self) -> dict[str, Any]:
        """The bootstrap's ``dynamic_resources.cds_config``: clusters from ``cds.json``."""
        return self._source(self.cds)

    @staticmethod
    def _source(path: Path) -> dict[str, Any]:
        return {"path_config_source": {"path": str(path)}, "resource_api_version": "V3"}

    def exists(self) -> bool:
        """Every file is there (a restarted Envoy finds what was last published)."""
        return all(p.is_file() for p in (self.rds, self.rds_https, self.cds, self.lds))

    def write(self, resources: IngressResources, listeners: list[dict[str, Any]]) -> bool:
        """Publish routes, clusters and listeners; False when they are what was last
        published."""
        routes, https_routes, clusters = (
            resources.routes,
            resources.https_routes,
            resources.clusters,
        )
        new = (routes, https_routes, clusters, listeners)
        if self._published is not None and self._published == new:
            return False
        self.directory.mkdir(parents=True, exist_ok=True)
        old = self._published
        old_clusters = old[2] if old is not None else []
        names = {c["name"] for c in clusters}
        # Changed and new clusters first, the ones going away kept until the routes moved on.
        union = [*clusters, *(c for c in old_clusters if c["name"] not in names)]
        self.version += 1
        if old is None or union != old_clusters:
            self._publish(self.cds, CLUSTER_TYPE, union)
        if old is None or routes != old[0]:
            self._publish(self.rds, ROUTE_TYPE, [routes])
        if old is None or https_routes != old[1]:
            self._publish(self.rds_https, ROUTE_TYPE, [https_routes])
        if old is None or listeners != old[3]:
            self._publish(self.lds, LISTENER_TYPE, listeners)
        if union != clusters:
            self._publish(self.cds, CLUSTER_TYPE, clusters)
        self._published = new
        return True

    def _publish(self, path: Path, type_url: str, resources: list[dict[str, Any]]) -> None:
        """Write a DiscoveryResponse next to ``path`` and rename it over ``path``."""
        body = {
            "version_info": str(self.version),
            "resources": [{"@type": type_url, **r} for r in resources],
        }
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=self.directory)
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump(body, fh, indent=1)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

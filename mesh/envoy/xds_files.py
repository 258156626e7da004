"""The live ingress's routes and clusters as Envoy file-based xDS resources.

Envoy subscribes to a file through a ``path_config_source``: it watches the file's directory
and reloads the file whenever a file is *moved* onto that name (a rename is atomic; a write
in place could be read half-done). Each file holds one ``DiscoveryResponse`` in JSON. The
listener stays in the bootstrap; its routes come from ``rds.json`` (RDS) and the Service
clusters they name from ``cds.json`` (CDS), so a change of Ingresses is applied without a
restart and without draining the listener.

Order matters when a change adds or removes a cluster: new clusters are written before the
routes that name them, and clusters that went away are dropped only after the routes that
named them — so a request never meets a route to a cluster Envoy does not have.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


class IngressXds:
    """The two resource files of the ingress in ``directory``: ``rds.json`` and ``cds.json``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.rds = directory / "rds.json"
        self.cds = directory / "cds.json"
        self.version = time.time_ns() // 1_000_000
        """``version_info`` of the last file written; starts at the clock (in ms) so two
        writers in turn (the bootstrap's first render, then the controller) never reuse one."""
        self._published: tuple[dict[str, Any], list[dict[str, Any]]] | None = None

    def rds_source(self) -> dict[str, Any]:
        """The connection manager's ``rds`` field: routes from ``rds.json``."""
        return {"rds": {"route_config_name": "ingress", "config_source": self._source(self.rds)}}

    def cds_source(self) -> dict[str, Any]:
        """The bootstrap's ``dynamic_resources.cds_config``: clusters from ``cds.json``."""
        return self._source(self.cds)

    @staticmethod
    def _source(path: Path) -> dict[str, Any]:
        return {"path_config_source": {"path": str(path)}, "resource_api_version": "V3"}

    def exists(self) -> bool:
        """Both files are there (a restarted Envoy finds the routes last published)."""
        return self.rds.is_file() and self.cds.is_file()

    def write(self, routes: dict[str, Any], clusters: list[dict[str, Any]]) -> bool:
        """Publish routes and clusters; False when they are what was last published."""
        if self._published is not None and self._published == (routes, clusters):
            return False
        self.directory.mkdir(parents=True, exist_ok=True)
        old_clusters = self._published[1] if self._published is not None else []
        names = {c["name"] for c in clusters}
        # Changed and new clusters first, the ones going away kept until the routes moved on.
        union = [*clusters, *(c for c in old_clusters if c["name"] not in names)]
        self.version += 1
        if self._published is None or union != old_clusters:
            self._publish(self.cds, CLUSTER_TYPE, union)
        if self._published is None or routes != self._published[0]:
            self._publish(self.rds, ROUTE_TYPE, [routes])
        if union != clusters:
            self._publish(self.cds, CLUSTER_TYPE, clusters)
        self._published = (routes, clusters)
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

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
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mesh.identity.ca import write_atomic

if TYPE_CHECKING:
    from mesh.envoy.ingress import IngressResources

ROUTE_TYPE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CLUSTER_TYPE = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LISTENER_TYPE = "type.googleapis.com/envoy.config.listener.v3.Listener"


def file_source(path: Path) -> dict[str, Any]:
    """An xDS ``ConfigSource`` reading ``path`` (Envoy reloads it when a file is renamed
    onto that name)."""
    return {"path_config_source": {"path": str(path)}, "resource_api_version": "V3"}


def publish(path: Path, type_url: str, resources: list[dict[str, Any]], version: int) -> None:
    """Replace ``path`` with a ``DiscoveryResponse`` of ``resources`` in one rename (0600:
    an ingress listener holds its certificates' keys inline)."""
    body = {
        "version_info": str(version),
        "resources": [{"@type": type_url, **r} for r in resources],
    }
    write_atomic(path, json.dumps(body).encode(), 0o600)


def clusters_kept(old: list[dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``new`` plus the clusters of ``old`` it drops: what to publish before the routes or
    listeners that stop naming them change, so no request meets a cluster Envoy lacks."""
    names = {c["name"] for c in new}
    return [*new, *(c for c in old if c["name"] not in names)]


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
        return file_source(path)

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
        union = clusters_kept(old_clusters, clusters)
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
        publish(path, type_url, resources, self.version)


_SidecarPublished = tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]
"""Listeners, clusters, route configurations."""


class SidecarXds:
    """One sidecar's ``cds.json``, ``rds.json`` and ``lds.json``, in the same order as the
    ingress's: new clusters before the routes and listeners that name them, the ones going
    away after. A change of routes alone leaves ``lds.json`` as it was, so Envoy keeps its
    listener and the connections on it."""

    def __init__(self, directory: Path, published: Callable[[str], None] = lambda _n: None) -> None:
        self.directory = directory
        self.on_published = published
        """Called with each file's name once it is in place (the runtime copies it on)."""
        self.version = time.time_ns() // 1_000_000
        self.published: _SidecarPublished | None = None

    def write(
        self,
        listeners: list[dict[str, Any]],
        clusters: list[dict[str, Any]],
        routes: list[dict[str, Any]] | None = None,
    ) -> bool:
        """Publish; False when nothing changed since the last call."""
        from mesh.envoy.sidecar import CDS_FILE, LDS_FILE, RDS_FILE

        routes = routes or []
        new = (listeners, clusters, routes)
        if self.published == new:
            return False
        old_listeners, old_clusters, old_routes = self.published or ([], [], [])
        union = clusters_kept(old_clusters, clusters)
        self.version += 1
        if self.published is None or union != old_clusters:
            self._publish(CDS_FILE, CLUSTER_TYPE, union)
        if routes and (self.published is None or routes != old_routes):
            self._publish(RDS_FILE, ROUTE_TYPE, routes)
        if self.published is None or listeners != old_listeners:
            self._publish(LDS_FILE, LISTENER_TYPE, listeners)
        if union != clusters:
            self._publish(CDS_FILE, CLUSTER_TYPE, clusters)
        self.published = new
        return True

    def _publish(self, name: str, type_url: str, resources: list[dict[str, Any]]) -> None:
        publish(self.directory / name, type_url, resources, self.version)
        self.on_published(name)

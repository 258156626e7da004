"""The ingress controller: keeps the ingress Envoy's routes equal to the cluster's Ingresses.

Like a real ingress controller it watches the API for Ingresses and the Services they name,
renders the proxy's routes and clusters (:func:`mesh.envoy.ingress_resources`), and hands
them to the running proxy without restarting it — here as Envoy file-based xDS resources
(:mod:`mesh.envoy.xds_files`) that Envoy reloads when a new version is renamed into place.
An Ingress applied with ``hopscope apply -f`` is served, and a deleted one answers 404,
within a few hundred milliseconds.

It runs on a thread of the control plane, reading the cluster state in-process. In
``ControlPlane.start()``, before the runtime starts the ingress Envoy::

    if (ingress := IngressController.for_runtime(self.cluster, self.runtime)) is not None:
        ingress.start()

The runtime says where its ingress Envoy reads the files (``Runtime.ingress_xds_dir``, also
what it renders the bootstrap with), so the controller and the Envoy agree without shared
state. ``for_runtime`` gives None where the ingress Envoy cannot read the control plane's
files (the docker runtime hands Envoy its bootstrap inline, in another container): there the
routes stay those of the bootstrap. It can also watch over the API, as a separate component would
(:meth:`IngressController.over_api`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from mesh.envoy import ingress_resources
from mesh.envoy.xds_files import IngressXds
from mesh.model.types import ClusterState
from mesh.model.watch import fetch_state
from mesh.runtime.base import Runtime

log = logging.getLogger("ingress-controller")

WAIT_SECONDS = 5.0
"""Longest wait for a state change before asking again (a long poll, like a watch)."""


class IngressController:
    """Re-renders the ingress's routes and clusters on every relevant state change."""

    def __init__(
        self, next_state: Callable[[int, float], ClusterState | None], xds_dir: Path
    ) -> None:
        self.next_state = next_state
        """Blocks until the state's version exceeds the given one (or the timeout passes)."""
        self.xds = IngressXds(xds_dir)
        self.version = -1
        self.updates = 0
        """Times the routes or clusters changed since start (a re-render that changed nothing
        writes nothing)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ingress-controller", daemon=True)

    @classmethod
    def in_process(cls, cluster: Any, xds_dir: Path) -> IngressController:
        """Watch the control plane's own ``Cluster`` (``wait_for_change``)."""

        def next_state(after: int, timeout: float) -> ClusterState:
            return ClusterState.from_dict(cluster.wait_for_change(after, timeout))

        return cls(next_state, xds_dir)

    @classmethod
    def for_runtime(cls, cluster: Any, runtime: Runtime) -> IngressController | None:
        """The controller for the files the runtime's ingress Envoy reads
        (:attr:`Runtime.ingress_xds_dir`), or None if it reads none (routes stay inline)."""
        if runtime.ingress_xds_dir is None:
            return None
        return cls.in_process(cluster, runtime.ingress_xds_dir)

    @classmethod
    def over_api(cls, api: str, xds_dir: Path) -> IngressController:
        """Watch the state through the API (``GET /api/v1/state?after=N``)."""

        def next_state(after: int, timeout: float) -> ClusterState | None:
            try:
                return fetch_state(api, after if after >= 0 else None, timeout)
            except (requests.RequestException, ValueError) as exc:
                log.warning("state watch failed, retrying", extra={"error": str(exc)})
                return None

        return cls(next_state, xds_dir)

    def start(self) -> None:
        """Publish the current routes and follow every change from a daemon thread."""
        state = self.next_state(-1, 0.0)
        if state is not None:
            self.version = state.resource_version
            self.sync(state)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def sync(self, state: ClusterState) -> bool:
        """Publish the routes and clusters of ``state``; True if anything changed."""
        routes, clusters = ingress_resources(state)
        changed = self.xds.write(routes, clusters)
        if changed:
            self.updates += 1
            log.info(
                "ingress routes updated",
                extra={
                    "resource_version": state.resource_version,
                    "hosts": [vh["name"] for vh in routes["virtual_hosts"]],
                    "clusters": len(clusters),
                },
            )
        return changed

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                state = self.next_state(self.version, WAIT_SECONDS)
                if state is None:
                    self._stop.wait(0.5)
                    continue
                if state.resource_version == self.version:
                    continue
                self.version = state.resource_version
                self.sync(state)
            except Exception:
                # The controller must outlive a bad object; the next change retries.
                log.exception("ingress sync failed")
                self._stop.wait(0.5)

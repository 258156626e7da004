"""The ingress controller: keeps the ingress Envoy's routes equal to the cluster's Ingresses.

Like a real ingress controller it watches the API for Ingresses, the Services they name and
the TLS Secrets they serve, renders the proxy's routes, clusters and HTTPS listener
(:func:`mesh.envoy.ingress.ingress_config`), and hands them to the running proxy without
restarting it — here as Envoy file-based xDS resources (:mod:`mesh.envoy.xds_files`) that
Envoy reloads when a new version is renamed into place. An Ingress applied with ``hopscope
apply -f`` is served, and a deleted one answers 404, within a few hundred milliseconds.
What an Ingress asks for but cannot be served (a ``spec.tls`` Secret that is missing, of
another type or holding a bad certificate) is logged as a warning, once per change; the
hosts it names then have no HTTPS chain, so a client's handshake is closed.

It runs on a thread of the control plane, reading the cluster state in-process. In
``ControlPlane.start()``, before the runtime starts the ingress Envoy::

    if (ingress := IngressController.for_runtime(self.cluster, self.runtime)) is not None:
        ingress.start()

The runtime says where its ingress Envoy reads the files (``Runtime.ingress_xds_dir``, also
what it renders the bootstrap with), so the controller and the Envoy agree without shared
state. ``for_runtime`` gives None where the ingress Envoy cannot read the control plane's
files (the docker runtime hands Envoy its bootstrap inline, in another container): there the
routes stay those of the bootstrap. It can also watch over the API, as a separate component would
(:meth:`IngressController.over_api`); it then sends the API token, without which the API
blanks the Secrets' values and no certificate could be served.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from mesh import addresses
from mesh.apiclient import read_token
from mesh.envoy.ingress import ingress_config, tls_https_listener
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
        self,
        next_state: Callable[[int, float], ClusterState | None],
        xds_dir: Path,
        telemetry: tuple[str, str | None] = ("", None),
        identity: Path | None = None,
    ) -> None:
        self.next_state = next_state
        self.identity = identity
        """The ingress's mesh certificate directory (mTLS to workloads that take it)."""
        """Blocks until the state's version exceeds the given one (or the timeout passes)."""
        self.xds = IngressXds(xds_dir)
        self.otlp_endpoint, self.log_sink = telemetry
        """Where the HTTPS listener's connection managers send spans and access logs (the
        same as the ingress Envoy's bootstrap: :meth:`Runtime.sidecar_telemetry`)."""
        self.warnings: list[str] = []
        """What the last sync could not serve."""
        self.version = -1
        self.updates = 0
        """Times the routes or clusters changed since start (a re-render that changed nothing
        writes nothing)."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ingress-controller", daemon=True)

    @classmethod
    def in_process(
        cls, cluster: Any, xds_dir: Path, telemetry: tuple[str, str | None] = ("", None)
    ) -> IngressController:
        """Watch the control plane's own ``Cluster`` (``wait_for_change``)."""

        def next_state(after: int, timeout: float) -> ClusterState:
            return ClusterState.from_dict(cluster.wait_for_change(after, timeout))

        return cls(next_state, xds_dir, telemetry)

    @classmethod
    def for_runtime(
        cls, cluster: Any, runtime: Runtime, identity: Path | None = None
    ) -> IngressController | None:
        """The controller for the files the runtime's ingress Envoy reads
        (:attr:`Runtime.ingress_xds_dir`), or None if it reads none (routes stay inline)."""
        if runtime.ingress_xds_dir is None:
            return None
        telemetry = runtime.sidecar_telemetry(addresses.INGRESS_NODE)
        controller = cls.in_process(cluster, runtime.ingress_xds_dir, telemetry)
        controller.identity = identity
        return controller

    @classmethod
    def over_api(
        cls,
        api: str,
        xds_dir: Path,
        telemetry: tuple[str, str | None] = ("", None),
        token: str | None = None,
    ) -> IngressController:
        """Watch the state through the API (``GET /api/v1/state?after=N``) with the API
        ``token`` (default: the state directory's), which the TLS Secrets' values need."""
        token = token if token is not None else read_token()
        if not token:
            log.warning("no API token readable: TLS Secrets come without their values")

        def next_state(after: int, timeout: float) -> ClusterState | None:
            try:
                return fetch_state(api, after if after >= 0 else None, timeout, token=token)
            except (requests.RequestException, ValueError) as exc:
                log.warning("state watch failed, retrying", extra={"error": str(exc)})
                return None

        return cls(next_state, xds_dir, telemetry)

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
        """Publish the routes, clusters and HTTPS listener of ``state``; True if anything
        changed."""
        resources = ingress_config(state, self.identity)
        https = tls_https_listener(
            resources, self.otlp_endpoint, self.log_sink, self.xds.rds_https_source()
        )
        if resources.warnings != self.warnings:
            for warning in resources.warnings:
                log.warning("ingress TLS not served: %s", warning, extra={"problem": warning})
            self.warnings = resources.warnings
        changed = self.xds.write(resources, [https] if https is not None else [])
        if changed:
            self.updates += 1
            log.info(
                "ingress routes updated",
                extra={
                    "resource_version": state.resource_version,
                    "hosts": [vh["name"] for vh in resources.routes["virtual_hosts"]],
                    "tls_hosts": sorted(h for c in resources.tls.terminating for h in c.hosts),
                    "passthrough_hosts": sorted(c.host for c in resources.tls.passthrough),
                    "clusters": len(resources.clusters),
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

"""The mesh controller: each sidecar's certificate and configuration, kept current.

The part of a mesh's control plane (Istio's istiod) hopscope needs: before a pod starts it
issues the pod a workload certificate for its service account (:mod:`mesh.identity.ca`) and
writes the sidecar's listeners, clusters and outbound routes
(:func:`mesh.envoy.sidecar.sidecar_resources`) as Envoy file-based xDS resources into the
pod's sidecar directory; then, on every change of the cluster state (a
``PeerAuthentication``, a ``DestinationRule``, a Service), it re-renders each running
sidecar and rewrites the files whose content changed, and it replaces each certificate
once half its life is gone. Envoy watches the files and applies them without a
restart (:mod:`mesh.identity.sds`, :class:`SidecarXds`).

Where the files go is the runtime's business (:meth:`Runtime.sidecar_files`); a runtime
whose sidecars cannot read them gets ``None`` and its sidecars run with their configuration
inline and without mTLS.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from mesh.envoy.sidecar import sidecar_resources
from mesh.envoy.xds_files import SidecarXds
from mesh.identity.ca import CertificateAuthority, IdentityError, WorkloadCertificate
from mesh.identity.sds import CERT_FILE, ROOT_FILE, write_secrets
from mesh.model.controllers import Cluster
from mesh.model.types import ClusterState, Pod
from mesh.runtime.base import Runtime, SidecarFiles

log = logging.getLogger("mesh-controller")

IDENTITY_DIR = "identity"
"""The cluster CA's directory under the state directory (``root-cert.pem`` is the trust
bundle users hand to ``hopscope curl --cacert``)."""

WAIT_SECONDS = 5.0
"""Longest wait for a state change before the next rotation check."""


@dataclass
class _Sidecar:
    pod: Pod
    files: SidecarFiles
    xds: SidecarXds | None
    """None for a proxy whose config someone else keeps (the ingress: identity only)."""
    cert: WorkloadCertificate | None = None
    removed: bool = False
    """The pod is gone and its directory with it (a sync that raced it writes nothing)."""
    pinned_cert: bool = False
    """A certificate set by hand (:meth:`MeshController.set_certificate_lifetime`): not
    rotated until the pod restarts."""


class MeshController:
    """Certificates and xDS files of every sidecar; a daemon thread follows the state."""

    def __init__(self, cluster: Cluster, runtime: Runtime, identity_dir: Path) -> None:
        self.cluster = cluster
        self.runtime = runtime
        self.ca = CertificateAuthority.load_or_create(identity_dir)
        self.identity_dir = identity_dir
        self.sidecars: dict[tuple[str, str], _Sidecar] = {}
        self.lock = threading.Lock()
        self.version = -1
        self.updates = 0
        self.rotations = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mesh-controller", daemon=True)

    @property
    def root_cert_path(self) -> Path:
        from mesh.identity.ca import ROOT_CERT_FILE

        return self.identity_dir / ROOT_CERT_FILE

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    # -- pods -----------------------------------------------------------------------------

    def prepare(self, pod: Pod, state: ClusterState | None, xds: bool = True) -> Path | None:
        """Certificate (and with ``xds``, listener and cluster files) for a pod about to
        start; the directory as its proxy sees it, or None when the runtime offers none
        (inline config, no mTLS). The ingress takes only its identity (``xds=False``)."""
        if not pod.has_sidecar:
            return None
        files = self.runtime.sidecar_files(pod)
        if files is None:
            return None
        writer = SidecarXds(files.host_dir, lambda name: self._copied(pod, [name]))
        sidecar = _Sidecar(pod, files, writer if xds else None)
        with self.lock:
            self.sidecars.pop((pod.namespace, pod.name), None)  # a restart: files anew
        files.host_dir.mkdir(parents=True, exist_ok=True)
        self._issue(sidecar)
        if state is not None:
            self._render(sidecar, state)
        with self.lock:
            self.sidecars[(pod.namespace, pod.name)] = sidecar
        return files.sidecar_dir

    def forget(self, pod: Pod) -> None:
        with self.lock:
            sidecar = self.sidecars.pop((pod.namespace, pod.name), None)
            if sidecar is not None:
                sidecar.removed = True
        if sidecar is not None:
            self.runtime.remove_sidecar_files(pod)

    def certificate(self, namespace: str, name: str) -> WorkloadCertificate | None:
        with self.lock:
            sidecar = self.sidecars.get((namespace, name))
        return sidecar.cert if sidecar else None

    def set_certificate_lifetime(
        self, namespace: str, name: str, expired: bool
    ) -> WorkloadCertificate:
        """Hand a pod a certificate that expired an hour ago (``expired``) or a fresh one;
        a break-it scenario's lever. The choice holds until the pod restarts."""
        with self.lock:
            sidecar = self.sidecars.get((namespace, name))
        if sidecar is None:
            raise KeyError(f"pod {namespace}/{name} has no sidecar managed by the mesh")
        now = dt.datetime.now(dt.UTC)
        if expired:
            cert = self.ca.issue(
                sidecar.pod.namespace,
                sidecar.pod.service_account,
                ttl=dt.timedelta(minutes=1),
                now=now - dt.timedelta(hours=1),
            )
        else:
            cert = self.ca.issue(sidecar.pod.namespace, sidecar.pod.service_account)
        sidecar.pinned_cert = expired
        self._deliver(sidecar, cert)
        return cert

    # -- keeping current --------------------------------------------------------------------

    def sync(self, state: ClusterState) -> int:
        """Re-render every known sidecar; how many changed."""
        with self.lock:
            sidecars = list(self.sidecars.values())
        changed = 0
        for sidecar in sidecars:
            current = state.pod(sidecar.pod.name, sidecar.pod.namespace)
            if current is None or sidecar.xds is None:
                continue
            sidecar.pod = current
            try:
                if self._render(sidecar, state):
                    changed += 1
            except OSError:
                if not sidecar.removed:  # else: the pod went away while this sync ran
                    log.exception("sidecar files not written", extra={"pod": sidecar.pod.name})
            except Exception:
                log.exception("sidecar config render failed", extra={"pod": sidecar.pod.name})
        if changed:
            self.updates += changed
            log.info(
                "sidecar configs updated",
                extra={"resource_version": state.resource_version, "sidecars": changed},
            )
        return changed

    def rotate_due(self, now: dt.datetime | None = None) -> int:
        """Replace every certificate past half its life; how many."""
        with self.lock:
            sidecars = list(self.sidecars.values())
        rotated = 0
        for sidecar in sidecars:
            cert = sidecar.cert
            if sidecar.pinned_cert or cert is None or not cert.needs_rotation(now):
                continue
            try:
                self._issue(sidecar)
            except OSError:
                if not sidecar.removed:
                    log.exception("certificate not written", extra={"pod": sidecar.pod.name})
                continue
            rotated += 1
        self.rotations += rotated
        return rotated

    def _issue(self, sidecar: _Sidecar) -> None:
        try:
            cert = self.ca.issue(sidecar.pod.namespace, sidecar.pod.service_account)
        except IdentityError as exc:
            log.error("certificate not issued", extra={"pod": sidecar.pod.name, "error": str(exc)})
            return
        self._deliver(sidecar, cert)

    def _deliver(self, sidecar: _Sidecar, cert: WorkloadCertificate) -> None:
        write_secrets(sidecar.files.host_dir, cert)
        self._copied(sidecar.pod, [ROOT_FILE, CERT_FILE])
        sidecar.cert = cert
        log.info(
            "workload certificate issued",
            extra={
                "pod": sidecar.pod.name,
                "identity": cert.spiffe_id,
                "not_after": cert.not_after.isoformat(),
                "serial": f"{cert.serial:x}",
            },
        )

    def _copied(self, pod: Pod, names: list[str]) -> None:
        """Hand rewritten files to the runtime (a container runtime copies them in)."""
        with self.lock:
            started = (pod.namespace, pod.name) in self.sidecars
        if started:  # before the start, the runtime takes the whole directory at once
            self.runtime.sidecar_files_changed(pod, names)

    def _render(self, sidecar: _Sidecar, state: ClusterState) -> bool:
        if sidecar.xds is None:
            return False
        pod = sidecar.pod
        otlp, sink = self.runtime.sidecar_telemetry(pod.node)
        resources = sidecar_resources(pod, state, otlp, sink, sidecar.files.sidecar_dir)
        return sidecar.xds.write(*resources)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                raw = self.cluster.wait_for_change(self.version, WAIT_SECONDS)
                if raw["resource_version"] != self.version:
                    self.version = raw["resource_version"]
                    self.sync(ClusterState.from_dict(raw))
                self.rotate_due()
            except Exception:
                # The controller must outlive a bad object; the next change retries.
                log.exception("mesh sync failed")
                self._stop.wait(0.5)

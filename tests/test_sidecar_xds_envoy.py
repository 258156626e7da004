"""A running sidecar (the real Envoy) through a Service change: its listener stays put.

The frontend's sidecar of the sample shop reads its xDS files as in a cluster. An app keeps
its connection to the outbound listener alive; then a Service is added, which changes the
outbound routes. The routes are RDS (``rds.json``), so the listener is not replaced: no
drain, and the kept-alive connection still carries requests after the drain time, instead
of being closed under whatever request it carries then.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh import addresses
from mesh.envoy import envoy_command
from mesh.envoy.sidecar import CDS_FILE, LDS_FILE, RDS_FILE, render_sidecar, sidecar_resources
from mesh.envoy.xds_files import SidecarXds
from mesh.identity.ca import CertificateAuthority
from mesh.identity.sds import write_secrets
from mesh.model.controllers import Cluster
from mesh.model.manifests import default_manifest_paths, load_document, load_manifests
from mesh.model.types import Pod

IP = "127.61.7.2"
OTLP = "http://127.61.7.1:4318"
DRAIN_TIME_S = 1.0  # envoy_flags' --drain-time-s


def _request(conn: socket.socket, vip: str) -> bytes:
    """One kept-alive request on ``conn`` to the Service at ``vip`` (as an app sends it: the
    address it resolved in the original-destination header); the response head, or b"" if
    the connection closed."""
    conn.sendall(
        f"GET /items HTTP/1.1\r\nHost: catalog:8080\r\n"
        f"{addresses.ORIGINAL_DST_HEADER}: {vip}:8080\r\n\r\n".encode()
    )
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    while len(body) < length:
        body += conn.recv(65536)
    return head


class _Sidecar:
    def __init__(self, tmp: Path, cluster: Cluster, pod: Pod) -> None:
        self.cluster, self.pod, self.files = cluster, pod, tmp / "sidecar"
        write_secrets(self.files, CertificateAuthority.create().issue("shop", "default"))
        self.xds = SidecarXds(self.files)
        self.render()
        config = render_sidecar(pod, cluster.state, OTLP, files=self.files)
        path = tmp / "envoy.json"
        path.write_text(json.dumps(config))
        self.log = tmp / "envoy.log"
        self.proc = subprocess.Popen(
            envoy_command(path, pod.name, "frontend"),
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("w"),
        )

    def render(self) -> bool:
        return self.xds.write(
            *sidecar_resources(self.pod, self.cluster.state, OTLP, files=self.files)
        )

    def stat(self, name: str) -> int:
        url = f"http://{IP}:{addresses.SIDECAR_ADMIN_PORT}/stats?filter=^{name}$"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        return int(text.split(":")[1]) if ":" in text else 0

    def until(self, condition: object, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log.read_text()[-2000:]
            try:
                if condition():  # type: ignore[operator]
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"not true within {timeout}s: {self.log.read_text()[-2000:]}")


@pytest.fixture()
def sidecar(tmp_path: Path) -> Iterator[_Sidecar]:
    cluster = Cluster()
    cluster.apply(load_manifests(default_manifest_paths()))
    frontend = next(p for p in cluster.state.pods if p.labels.get("app") == "frontend")
    pod = dataclasses.replace(frontend, ip=IP)
    running = _Sidecar(tmp_path, cluster, pod)
    try:
        running.until(lambda: running.stat("listener_manager.total_listeners_active") >= 2)
        yield running
    finally:
        running.proc.terminate()
        running.proc.wait(10)


def test_a_service_change_reaches_the_routes_without_draining_the_apps_connection(
    sidecar: _Sidecar,
) -> None:
    catalog = sidecar.cluster.state.service("shop", "catalog")
    assert catalog is not None and catalog.cluster_ip
    conn = socket.create_connection((IP, addresses.SIDECAR_OUTBOUND_PORT), timeout=5)
    with conn:
        first = _request(conn, catalog.cluster_ip)
        assert first.startswith(b"HTTP/1.1 "), first
        assert b"connection: close" not in first.lower(), first
        lds_before = (sidecar.files / LDS_FILE).stat().st_mtime_ns
        updates = sidecar.stat("http.outbound.rds.outbound.update_success")
        extra = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "extra", "namespace": "shop"},
            "spec": {"selector": {"app": "extra"}, "ports": [{"port": 8080, "name": "http"}]},
        }
        sidecar.cluster.apply([load_document(extra, "extra.yaml", 0)])
        assert sidecar.render()  # the outbound routes changed
        assert (sidecar.files / LDS_FILE).stat().st_mtime_ns == lds_before  # the listener did not
        assert (sidecar.files / CDS_FILE).is_file() and (sidecar.files / RDS_FILE).is_file()
        sidecar.until(lambda: sidecar.stat("http.outbound.rds.outbound.update_success") > updates)
        assert "extra.shop.svc.cluster.local" in (sidecar.files / RDS_FILE).read_text()
        time.sleep(DRAIN_TIME_S + 1.0)  # a replaced listener would have closed it by now
        later = _request(conn, catalog.cluster_ip)
        assert later.startswith(b"HTTP/1.1 "), "the sidecar closed the app's connection"
        assert b"connection: close" not in later.lower(), later
    assert sidecar.stat("listener_manager.listener_modified") == 0

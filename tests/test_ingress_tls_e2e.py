"""``hopscope curl https://…`` through the local cluster's real ingress, and the trace.

A ``kubernetes.io/tls`` Secret (a certificate for ``tls.shop.local`` from the cluster CA in
``$HOPSCOPE_HOME/identity``) and an Ingress naming it are applied to the running cluster;
the ingress controller serves them without a restart. The request's trace must show that
TLS ended at the ingress, and the CLI must fail like curl when the certificate cannot be
checked (60) or no certificate is served for the SNI (35).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.controlplane.mesh import IDENTITY_DIR
from mesh.identity.ca import CertificateAuthority
from tests.e2e_support import api_get, hopscope, poll_until

pytestmark = pytest.mark.e2e

HOST = "tls.shop.local"

INGRESS = f"""
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {{name: tls-e2e, namespace: shop}}
spec:
  ingressClassName: hopscope
  tls: [{{hosts: [{HOST}], secretName: tls-e2e}}]
  rules:
    - host: {HOST}
      http:
        paths:
          - path: /
            pathType: Prefix
            backend: {{service: {{name: frontend, port: {{number: 8080}}}}}}
"""


@pytest.fixture(scope="module")
def tls_ingress(
    cluster: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Path]:
    """The manifest applied (and deleted afterwards); yields the cluster CA's root file."""
    identity = Path(cluster["HOPSCOPE_HOME"]) / IDENTITY_DIR
    ca = CertificateAuthority.load_or_create(identity)
    cert, key = ca.issue_server_certificate([HOST])
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "tls-e2e", "namespace": "shop"},
        "type": "kubernetes.io/tls",
        "data": {
            "tls.crt": base64.b64encode(cert).decode(),
            "tls.key": base64.b64encode(key).decode(),
        },
    }
    manifest = tmp_path_factory.mktemp("tls") / "tls.yaml"
    manifest.write_text(yaml.safe_dump(secret) + "---\n" + INGRESS)
    hopscope("apply", "-f", str(manifest), env=cluster)
    try:
        yield identity / "root-cert.pem"
    finally:
        hopscope("delete", "-f", str(manifest), env=cluster, check=False)


def _curl(cluster: dict[str, str], *args: str) -> Any:
    return hopscope("curl", *args, env=cluster, check=False)


def test_curl_https_ends_tls_at_the_ingress_and_the_trace_says_so(
    cluster: dict[str, str], tls_ingress: Path
) -> None:
    url = f"https://{HOST}/"

    def served() -> Any:
        proc = _curl(cluster, "--json", "--cacert", str(tls_ingress), url)
        return json.loads(proc.stdout) if proc.returncode == 0 else None

    page = poll_until(served, timeout=20, interval=0.5)
    assert page["status"] == 200
    assert page["tls"]["server.names"] == HOST
    assert page["tls"]["protocol.version"].startswith("TLSv1.")

    def ingress_span() -> dict[str, Any] | None:
        view = api_get(f"/api/v1/traces/{page['trace_id']}")
        return next(
            (
                s
                for s in view["spans"]
                if s["attributes"].get("hopscope.hop") == "ingress"
                and s["attributes"].get("hopscope.tls.terminated_by") == "ingress"
            ),
            None,
        )

    span = poll_until(ingress_span, timeout=10, interval=0.3)
    attrs = span["attributes"]
    assert attrs["tls.client.server_name"] == HOST
    assert attrs["hopscope.tls.secret"] == "shop/tls-e2e"
    assert attrs["tls.protocol.version"] == page["tls"]["protocol.version"]


def test_curl_https_fails_like_curl(cluster: dict[str, str], tls_ingress: Path) -> None:
    unverified = _curl(cluster, f"https://{HOST}/")  # the system roots do not know the CA
    assert unverified.returncode == 60, unverified.stderr
    assert "certificate" in unverified.stderr and "--cacert" in unverified.stderr
    assert "Traceback" not in unverified.stderr
    insecure = _curl(cluster, "-k", "--json", f"https://{HOST}/")
    assert insecure.returncode == 0 and json.loads(insecure.stdout)["status"] == 200
    no_cert = _curl(cluster, "--cacert", str(tls_ingress), "https://shop.local/")
    assert no_cert.returncode == 35, no_cert.stderr
    assert "SNI 'shop.local'" in no_cert.stderr


def test_the_sni_check_fails_when_a_host_got_another_certificate(
    cluster: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scenario's check reads real handshakes: expecting secure.shop.local's
    certificate on www.shop.local must fail it."""
    from mesh.scenarios.base import Context
    from mesh.scenarios.edge import IngressSni

    monkeypatch.setenv("HOPSCOPE_HOME", cluster["HOPSCOPE_HOME"])  # runs in this process
    scenario, ctx = IngressSni(), Context()
    try:
        scenario.inject(ctx)
        outcomes = scenario.drive(ctx)
        assert scenario.check(ctx, outcomes).ok
        scenario.serials["www.shop.local"] = scenario.serials["secure.shop.local"]
        finding = scenario.check(ctx, outcomes)
    finally:
        scenario.restore(ctx)
    assert not finding.ok
    assert sum("NOT the expected one" in line for line in finding.evidence) == 3

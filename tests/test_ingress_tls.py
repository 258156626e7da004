"""Ingress TLS served by the real Envoy: SNI picks the certificate, redirects, passthrough.

The ingress bootstrap is rendered from the model (sample manifests plus the Ingresses and
``kubernetes.io/tls`` Secrets below), then moved onto test addresses so it can run beside a
local cluster; its clusters point at servers this test starts. The handshakes are real
(Python's ``ssl`` against Envoy's BoringSSL, and against a backend of our own).

Address plan:

| what | address |
| --- | --- |
| ingress HTTP / HTTPS / admin | 127.62.0.1:18080 / :18443 / :18901 |
| frontend Service's stand-in (plain HTTP) | 127.62.0.2:18081 |
| vault Service's stand-in (terminates TLS itself) | 127.62.0.2:18444 |
| OTLP (nothing listens: spans are not the point here) | 127.62.0.9:4318 |

Hosts: ``a.example`` (Secret site-a, redirects http → https), ``b.example`` (Secret
site-b, no redirect), ``c.example`` (ssl-passthrough to vault).
"""

from __future__ import annotations

import http.client
import http.server
import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from mesh import addresses
from mesh.envoy import envoy_command, render_ingress, validate_config
from mesh.envoy.ingress import ingress_config
from mesh.identity.ca import CertificateAuthority
from mesh.model.controllers import Cluster
from mesh.model.k8s_objects import tls_secret_document
from mesh.model.manifests import (
    ManifestError,
    default_manifest_paths,
    load_document,
    load_manifests,
)
from tests.e2e_support import QuietHandler

IP, BACKEND_IP = "127.62.0.1", "127.62.0.2"
HTTP, HTTPS, ADMIN = 18080, 18443, 18901
FRONTEND, VAULT = 18081, 18444
OTLP = "http://127.62.0.9:4318"

INGRESSES = """
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: site-a
  namespace: shop
  annotations: {nginx.ingress.kubernetes.io/ssl-redirect: "true"}
spec:
  ingressClassName: hopscope
  tls: [{hosts: [a.example], secretName: site-a}]
  rules:
    - host: a.example
      http:
        paths:
          - {path: /, pathType: Prefix, backend: {service: {name: frontend, port: {number: 8080}}}}
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: site-b, namespace: shop}
spec:
  ingressClassName: hopscope
  tls: [{hosts: [b.example], secretName: site-b}]
  rules:
    - host: b.example
      http:
        paths:
          - {path: /, pathType: Prefix, backend: {service: {name: frontend, port: {number: 8080}}}}
---
apiVersion: v1
kind: Service
metadata: {name: vault, namespace: shop}
spec:
  selector: {app: vault}
  ports: [{name: https, port: 443, targetPort: 8443}]
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata:
  name: vault
  namespace: shop
  annotations: {nginx.ingress.kubernetes.io/ssl-passthrough: "true"}
spec:
  ingressClassName: hopscope
  rules:
    - host: c.example
      http:
        paths:
          - {path: /, pathType: Prefix, backend: {service: {name: vault, port: {number: 443}}}}
"""


def tls_secret(name: str, cert_pem: bytes, key_pem: bytes, namespace: str = "shop") -> dict:
    return tls_secret_document(namespace, name, cert_pem, key_pem)


class _Frontend(QuietHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        proto = self.headers.get("x-forwarded-proto")
        self.answer(f"frontend {self.headers.get('Host')} {proto}".encode())


class _Vault(QuietHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.answer(b"vault answered over its own TLS")


class _Ingress:
    def __init__(self, tmp: Path) -> None:
        self.ca = CertificateAuthority.create()
        hosts = ("a.example", "b.example", "c.example")
        self.certs = {h: self.ca.issue_server_certificate([h]) for h in hosts}
        cluster = Cluster()
        docs = [d for d in yaml.safe_load_all(INGRESSES) if d]
        docs += [
            tls_secret("site-a", *self.certs["a.example"]),
            tls_secret("site-b", *self.certs["b.example"]),
        ]
        cluster.apply(
            load_manifests(default_manifest_paths())
            + [load_document(d, "test.yaml", schema=False) for d in docs]
        )
        self.state = cluster.state
        config = render_ingress(self.state, OTLP)
        self.config = _retarget(config)
        self.backends = [
            http.server.ThreadingHTTPServer((BACKEND_IP, FRONTEND), _Frontend),
            _tls_server(tmp, *self.certs["c.example"]),
        ]
        for server in self.backends:
            threading.Thread(target=server.serve_forever, daemon=True).start()
        path = tmp / "ingress.json"
        path.write_text(json.dumps(self.config))
        self.log = tmp / "envoy.out"
        self.proc = subprocess.Popen(
            envoy_command(path, "ingress-envoy", "ingress"),
            stdout=self.log.open("w"),
            stderr=subprocess.STDOUT,
        )

    def handshake(self, sni: str, cafile: bytes | None = None) -> tuple[x509.Certificate, bytes]:
        """Connect to the HTTPS port with ``sni``; the certificate served and the reply."""
        context = ssl.create_default_context(cadata=(cafile or self.ca.root_pem).decode())
        with (
            socket.create_connection((IP, HTTPS), timeout=5) as raw,
            context.wrap_socket(raw, server_hostname=sni) as tls,
        ):
            der = tls.getpeercert(binary_form=True) or b""
            tls.sendall(f"GET /x HTTP/1.1\r\nHost: {sni}\r\nConnection: close\r\n\r\n".encode())
            reply = b""
            while chunk := tls.recv(65536):
                reply += chunk
        return x509.load_der_x509_certificate(der), reply

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        for server in self.backends:
            server.shutdown()
            server.server_close()


def _tls_server(tmp: Path, cert_pem: bytes, key_pem: bytes) -> http.server.ThreadingHTTPServer:
    (tmp / "vault.crt").write_bytes(cert_pem)
    (tmp / "vault.key").write_bytes(key_pem)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp / "vault.crt", tmp / "vault.key")

    class _TlsServer(http.server.ThreadingHTTPServer):
        def get_request(self) -> tuple[Any, Any]:
            sock, addr = super().get_request()
            return context.wrap_socket(sock, server_side=True), addr

    return _TlsServer((BACKEND_IP, VAULT), _Vault)


def _retarget(config: dict[str, Any]) -> dict[str, Any]:
    """Move the rendered ingress onto the test addresses, its Services onto our servers."""
    ports = {addresses.INGRESS_PORT: HTTP, addresses.INGRESS_TLS_PORT: HTTPS}
    for listener in config["static_resources"]["listeners"]:
        address = listener["address"]["socket_address"]
        address["address"], address["port_value"] = IP, ports[address["port_value"]]
    config["admin"]["address"]["socket_address"].update(address=IP, port_value=ADMIN)
    for cluster in config["static_resources"]["clusters"]:
        name = cluster["name"]
        if name.startswith(("ingress|", "ingress-passthrough|")):
            port = VAULT if "vault" in name else FRONTEND
            (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
            endpoint["endpoint"]["address"]["socket_address"].update(
                address=BACKEND_IP, port_value=port
            )
            cluster["upstream_bind_config"]["source_address"]["address"] = IP
    return config


@pytest.fixture(scope="module")
def ingress(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_Ingress]:
    running = _Ingress(tmp_path_factory.mktemp("ingress-tls"))
    try:
        deadline = time.monotonic() + 20
        while not _listening(HTTPS):
            assert running.proc.poll() is None, running.log.read_text()[-3000:]
            assert time.monotonic() < deadline, running.log.read_text()[-3000:]
            time.sleep(0.1)
        yield running
    finally:
        running.stop()


def _listening(port: int) -> bool:
    try:
        socket.create_connection((IP, port), timeout=0.5).close()
        return True
    except OSError:
        return False


def _san(cert: x509.Certificate) -> list[str]:
    ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    return list(ext.value.get_values_for_type(x509.DNSName))


def test_the_rendered_ingress_with_tls_is_valid_envoy_config(ingress: _Ingress) -> None:
    ok, output = validate_config(ingress.config)
    assert ok, output
    https = ingress.config["static_resources"]["listeners"][1]
    names = [c["filter_chain_match"]["server_names"] for c in https["filter_chains"]]
    assert names == [["a.example"], ["b.example"], ["c.example"]]


@pytest.mark.parametrize("host", ["a.example", "b.example"])
def test_sni_picks_the_certificate_and_tls_ends_at_the_ingress(
    ingress: _Ingress, host: str
) -> None:
    cert, reply = ingress.handshake(host)
    assert _san(cert) == [host]
    expected = x509.load_pem_x509_certificate(ingress.certs[host][0])
    assert cert.serial_number == expected.serial_number
    # the backend got plain HTTP, and Envoy told it the client came over https
    assert reply.startswith(b"HTTP/1.1 200"), reply[:200]
    assert f"frontend {host} https".encode() in reply


def test_an_unknown_sni_is_closed_in_the_handshake(ingress: _Ingress) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError)):
        ingress.handshake("shop.local")


def test_a_certificate_from_another_ca_is_refused_by_the_client(ingress: _Ingress) -> None:
    other = CertificateAuthority.create()
    with pytest.raises(ssl.SSLCertVerificationError):
        ingress.handshake("a.example", cafile=other.root_pem)


def test_plain_http_redirects_only_where_the_ingress_asks(ingress: _Ingress) -> None:
    def get(host: str) -> http.client.HTTPResponse:
        conn = http.client.HTTPConnection(IP, HTTP, timeout=5)
        conn.request("GET", "/cart?x=1", headers={"Host": host})
        return conn.getresponse()

    redirected = get("a.example")
    assert redirected.status == 308
    assert redirected.getheader("location") == (
        f"https://a.example:{addresses.INGRESS_TLS_PORT}/cart?x=1"
    )
    plain = get("b.example")
    assert plain.status == 200
    assert plain.read() == b"frontend b.example http"


def test_passthrough_reaches_the_backend_that_terminates_tls_itself(ingress: _Ingress) -> None:
    cert, reply = ingress.handshake("c.example")
    backend = x509.load_pem_x509_certificate(ingress.certs["c.example"][0])
    assert cert.serial_number == backend.serial_number  # the backend's own certificate
    assert reply.startswith(b"HTTP/1.1 200") and b"vault answered" in reply
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [json.loads(x) for x in ingress.log.read_text().splitlines() if '"sni"' in x]
        passed = [x for x in lines if x.get("tls_mode") == "passthrough"]
        if passed:
            break
        time.sleep(0.2)
    entry = passed[-1]
    assert entry["sni"] == "c.example"
    assert entry["upstream_host"] == f"{BACKEND_IP}:{VAULT}"
    assert int(entry["bytes_received"]) > 0 and int(entry["bytes_sent"]) > 0


def test_what_cannot_be_served_is_a_warning_not_a_crash() -> None:
    ca = CertificateAuthority.create()
    cert, key = ca.issue_server_certificate(["d.example"])
    _, other_key = ca.issue_server_certificate(["d.example"])
    ingress = """
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: d, namespace: shop}
spec:
  tls:
    - {hosts: [d.example], secretName: missing}
    - {hosts: [e.example], secretName: opaque}
    - {hosts: [f.example], secretName: mismatched}
  rules: [{host: d.example, http: {paths: [{path: /, pathType: Prefix,
           backend: {service: {name: frontend, port: {number: 8080}}}}]}}]
"""
    opaque = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "opaque", "namespace": "shop"},
        "stringData": {"password": "x"},
    }
    docs = [yaml.safe_load(ingress), opaque, tls_secret("mismatched", cert, other_key)]
    cluster = Cluster()
    cluster.apply(
        load_manifests(default_manifest_paths())
        + [load_document(d, "t.yaml", schema=False) for d in docs]
    )
    resources = ingress_config(cluster.state)
    text = "\n".join(resources.warnings)
    assert "secret shop/missing does not exist" in text
    assert "secret shop/opaque is of type Opaque, not kubernetes.io/tls" in text
    assert "secret shop/mismatched has a tls.key that is not the key of its tls.crt" in text
    assert resources.tls.empty
    ok, output = validate_config(render_ingress(cluster.state, OTLP))
    assert ok, output
    del key


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"metadata": {"annotations": {"nginx.ingress.kubernetes.io/ssl-redirect": "yes"}}},
            'ssl-redirect]: must be "true" or "false"',
        ),
        ({"spec": {"tls": [{"hosts": ["a.example"]}]}}, "spec.tls[0].secretName: required"),
        (
            {
                "metadata": {
                    "annotations": {"nginx.ingress.kubernetes.io/ssl-passthrough": "true"}
                },
                "spec": {"rules": []},
            },
            "passthrough picks the backend by SNI",
        ),
    ],
)
def test_apply_refuses_bad_tls_fields(change: dict[str, Any], message: str) -> None:
    doc = yaml.safe_load(INGRESSES.split("---")[0])
    for key, value in change.items():
        doc[key].update(value)
    with pytest.raises(ManifestError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_document(doc, "bad.yaml")


def test_the_controller_publishes_the_https_listener_when_its_secret_arrives(
    tmp_path: Path,
) -> None:
    from mesh.controlplane.ingress import IngressController

    cluster = Cluster()
    cluster.apply(load_manifests(default_manifest_paths()))
    controller = IngressController.in_process(cluster, tmp_path, (OTLP, None))

    def lds() -> list[dict[str, Any]]:
        controller.sync(cluster.state)
        return list(json.loads((tmp_path / "lds.json").read_text())["resources"])

    assert lds() == []
    site_b = [d for d in yaml.safe_load_all(INGRESSES) if d["metadata"]["name"] == "site-b"]
    cluster.apply([load_document(site_b[0], "b.yaml", schema=False)])
    assert lds() == []  # its Secret is missing: no chain, and a warning says why
    assert controller.warnings == [
        "Ingress shop/site-b: spec.tls secret shop/site-b does not exist; "
        "TLS for b.example is not served"
    ]
    cert, key = CertificateAuthority.create().issue_server_certificate(["b.example"])
    cluster.apply([load_document(tls_secret("site-b", cert, key), "s.yaml", schema=False)])
    (listener,) = lds()
    assert controller.warnings == []
    (chain,) = listener["filter_chains"]
    assert chain["filter_chain_match"]["server_names"] == ["b.example"]
    rds = chain["filters"][0]["typed_config"]["rds"]["config_source"]["path_config_source"]
    assert rds["path"] == str(tmp_path / "rds-https.json")
    https_routes = json.loads((tmp_path / "rds-https.json").read_text())["resources"][0]
    assert any("b.example" in vh["domains"] for vh in https_routes["virtual_hosts"])

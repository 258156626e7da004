"""The cluster CA and workload certificates, checked with real TLS handshakes.

Two sockets on loopback do mutual TLS with Python's ``ssl`` (OpenSSL): a server that requires
a client certificate from the cluster's root, and clients presenting certificates issued by
that root, by a stranger's root, or already expired. The identity a server sees is read from
the peer certificate's URI SAN, as a sidecar does.
"""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from mesh.identity.ca import (
    CertificateAuthority,
    IdentityError,
    WorkloadCertificate,
    peer_identity,
    spiffe_id,
)

SERVER_IP = "127.61.0.1"


def _files(tmp: Path, name: str, cert: WorkloadCertificate) -> tuple[Path, Path, Path]:
    paths = (tmp / f"{name}.crt", tmp / f"{name}.key", tmp / f"{name}-root.pem")
    for path, data in zip(paths, (cert.cert_pem, cert.key_pem, cert.root_pem), strict=True):
        path.write_bytes(data)
    return paths


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


class _MTLSServer:
    """Accepts one connection at a time, requires a client certificate, records the peer."""

    def __init__(self, tmp: Path, cert: WorkloadCertificate) -> None:
        crt, key, root = _files(tmp, "server", cert)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self.context.load_cert_chain(crt, key)
        self.context.load_verify_locations(root)
        self.context.verify_mode = ssl.CERT_REQUIRED
        self.sock = socket.create_server((SERVER_IP, 0))
        self.port = self.sock.getsockname()[1]
        self.peers: list[str | None] = []
        self.errors: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self.sock.accept()
            except OSError:
                return
            try:
                with self.context.wrap_socket(raw, server_side=True) as tls:
                    der = tls.getpeercert(binary_form=True)
                    self.peers.append(peer_identity(der) if der else None)
                    tls.sendall(b"hello " + tls.version().encode())  # type: ignore[union-attr]
            except (ssl.SSLError, OSError) as exc:
                self.errors.append(str(exc))
                raw.close()


@pytest.fixture()
def server(ca: CertificateAuthority, tmp_path: Path) -> Iterator[_MTLSServer]:
    srv = _MTLSServer(tmp_path, ca.issue("shop", "catalog"))
    yield srv
    srv.sock.close()


def _client(tmp: Path, cert: WorkloadCertificate, trust: bytes, port: int) -> str:
    crt, key, _ = _files(tmp, "client", cert)
    root = tmp / "trust.pem"
    root.write_bytes(trust)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False  # identities are SPIFFE URIs, checked below
    context.load_cert_chain(crt, key)
    context.load_verify_locations(root)
    with (
        socket.create_connection((SERVER_IP, port), timeout=5) as raw,
        context.wrap_socket(raw) as tls,
    ):
        server_id = peer_identity(tls.getpeercert(binary_form=True) or b"")
        return f"{server_id} {tls.recv(64).decode()}"


def test_two_workloads_of_one_root_do_mutual_tls_and_learn_each_others_identity(
    ca: CertificateAuthority, server: _MTLSServer, tmp_path: Path
) -> None:
    frontend = ca.issue("shop", "frontend")
    answer = _client(tmp_path, frontend, ca.root_pem, server.port)
    assert answer.startswith("spiffe://cluster.local/ns/shop/sa/catalog hello TLSv1.")
    assert server.peers == ["spiffe://cluster.local/ns/shop/sa/frontend"]


def test_a_certificate_from_another_root_is_refused(
    ca: CertificateAuthority, server: _MTLSServer, tmp_path: Path
) -> None:
    stranger = CertificateAuthority.create().issue("shop", "frontend")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _client(tmp_path, stranger, ca.root_pem, server.port)
    _wait_for(lambda: bool(server.errors))
    assert "certificate verify failed" in server.errors[0]
    assert server.peers == []


def test_an_expired_certificate_is_refused(
    ca: CertificateAuthority, server: _MTLSServer, tmp_path: Path
) -> None:
    past = dt.datetime.now(dt.UTC) - dt.timedelta(hours=3)
    expired = ca.issue("shop", "frontend", ttl=dt.timedelta(hours=1), now=past)
    with pytest.raises((ssl.SSLError, ConnectionError)):
        _client(tmp_path, expired, ca.root_pem, server.port)
    _wait_for(lambda: bool(server.errors))
    assert "certificate has expired" in server.errors[0]


def test_the_workload_certificate_has_only_its_spiffe_identity(ca: CertificateAuthority) -> None:
    issued = ca.issue("shop", "reviews", ttl=dt.timedelta(hours=2))
    cert = x509.load_pem_x509_certificate(issued.cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical and cert.subject == x509.Name([])
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://cluster.local/ns/shop/sa/reviews"
    ]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    cert.verify_directly_issued_by(ca.cert)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime == dt.timedelta(hours=2, minutes=1)  # the TTL plus the skew allowance
    # Rotation is due at half the lifetime, not before.
    assert not issued.needs_rotation(issued.not_before + dt.timedelta(minutes=59))
    assert issued.needs_rotation(issued.not_before + dt.timedelta(minutes=62))


def test_the_root_is_kept_with_a_private_key_only_root_can_read(tmp_path: Path) -> None:
    first = CertificateAuthority.load_or_create(tmp_path / "ca")
    again = CertificateAuthority.load_or_create(tmp_path / "ca")
    assert again.root_pem == first.root_pem
    key_mode = stat.S_IMODE((tmp_path / "ca" / "root-key.pem").stat().st_mode)
    assert key_mode == 0o600
    (tmp_path / "ca" / "root-key.pem").write_bytes(
        CertificateAuthority.create().issue("a", "b").key_pem
    )
    with pytest.raises(IdentityError, match="is not the key of"):
        CertificateAuthority.load_or_create(tmp_path / "ca")


@pytest.mark.parametrize(
    ("namespace", "account"), [("", "default"), ("shop", ""), ("a/b", "default")]
)
def test_names_that_cannot_form_an_identity_are_refused(namespace: str, account: str) -> None:
    with pytest.raises(IdentityError, match="cannot be part of a SPIFFE ID"):
        spiffe_id(namespace, account)


def _wait_for(condition: object, timeout: float = 5.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():  # type: ignore[operator]
            return
        time.sleep(0.02)
    raise AssertionError("condition not met in time")

"""The cluster's certificate authority: workload identities for mutual TLS between sidecars.

Like a mesh's control plane (Istio's istiod, Linkerd's identity service), hopscope keeps one
root of trust and issues every pod a short-lived certificate whose only name is a SPIFFE ID
derived from the pod's namespace and service account —
``spiffe://cluster.local/ns/<namespace>/sa/<serviceaccount>`` — in a URI subject alternative
name (the subject itself is empty, so the extension is critical, RFC 5280 §4.2.1.6). A
sidecar presents it as a server and as a client; its peer checks the chain against the root
and reads the identity from the SAN.

Keys are ECDSA P-256, what the common meshes use by default. The root's key is written with
mode 0600 and never leaves the control plane; only the root certificate (the trust bundle)
and each pod's own key and certificate are handed out.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "cluster.local"
"""The SPIFFE trust domain: the cluster domain, as in Istio's default."""

ROOT_TTL = dt.timedelta(days=3650)
WORKLOAD_TTL = dt.timedelta(hours=24)
"""A workload certificate's lifetime (Istio's default)."""
ROTATE_AT = 0.5
"""Share of a certificate's lifetime after which it is replaced (Istio's default grace
ratio): a sidecar always holds a certificate with at least half its life left."""
CLOCK_SKEW = dt.timedelta(minutes=1)
"""Certificates are valid from this long before they are issued, for clocks a little apart."""

ROOT_CERT_FILE = "root-cert.pem"
ROOT_KEY_FILE = "root-key.pem"


class IdentityError(Exception):
    """A certificate could not be issued or loaded; the message says why."""


def spiffe_id(namespace: str, service_account: str, trust_domain: str = TRUST_DOMAIN) -> str:
    """``spiffe://<trust domain>/ns/<namespace>/sa/<service account>``."""
    for label, value in (("namespace", namespace), ("service account", service_account)):
        if not value or "/" in value:
            raise IdentityError(f"{label} {value!r} cannot be part of a SPIFFE ID")
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _key_usage(signs_certificates: bool) -> x509.KeyUsage:
    """A root signs certificates (and CRLs); a workload's EC key only signs handshakes."""
    return x509.KeyUsage(
        digital_signature=not signs_certificates,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=signs_certificates,
        crl_sign=signs_certificates,
        encipher_only=False,
        decipher_only=False,
    )


@dataclass(frozen=True)
class WorkloadCertificate:
    """One pod's identity: its key, its certificate, and the root to check peers against."""

    spiffe_id: str
    cert_pem: bytes
    key_pem: bytes
    root_pem: bytes
    not_before: dt.datetime
    not_after: dt.datetime
    serial: int

    @property
    def rotate_at(self) -> dt.datetime:
        """When a replacement is due (:data:`ROTATE_AT` of the lifetime)."""
        issued = self.not_before + CLOCK_SKEW
        return issued + (self.not_after - issued) * ROTATE_AT

    def needs_rotation(self, now: dt.datetime | None = None) -> bool:
        return (now or _now()) >= self.rotate_at


class CertificateAuthority:
    """The root key and certificate, and what they sign."""

    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        cert: x509.Certificate,
        trust_domain: str = TRUST_DOMAIN,
    ) -> None:
        self.key = key
        self.cert = cert
        self.trust_domain = trust_domain
        self.root_pem = cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create(
        cls, trust_domain: str = TRUST_DOMAIN, now: dt.datetime | None = None
    ) -> CertificateAuthority:
        """A new self-signed root."""
        now = now or _now()
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, trust_domain),
                x509.NameAttribute(NameOID.COMMON_NAME, "hopscope root CA"),
            ]
        )
        public = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + ROOT_TTL)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(signs_certificates=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert, trust_domain)

    @classmethod
    def load_or_create(
        cls, directory: Path, trust_domain: str = TRUST_DOMAIN
    ) -> CertificateAuthority:
        """The root kept in ``directory``, made (and saved) the first time."""
        cert_path, key_path = directory / ROOT_CERT_FILE, directory / ROOT_KEY_FILE
        if not cert_path.exists() and not key_path.exists():
            ca = cls.create(trust_domain)
            ca.save(directory)
            return ca
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise IdentityError(f"cannot load the cluster CA from {directory}: {exc}") from None
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key().public_bytes(
            der, spki
        ) != cert.public_key().public_bytes(der, spki):
            raise IdentityError(f"{key_path} is not the key of {cert_path}")
        return cls(key, cert, trust_domain)

    def save(self, directory: Path) -> None:
        """Write the root certificate (0644) and key (0600), each replaced atomically."""
        directory.mkdir(parents=True, exist_ok=True)
        write_atomic(directory / ROOT_CERT_FILE, self.root_pem, 0o644)
        write_atomic(directory / ROOT_KEY_FILE, _pem_key(self.key), 0o600)

    def issue(
        self,
        namespace: str,
        service_account: str,
        ttl: dt.timedelta = WORKLOAD_TTL,
        now: dt.datetime | None = None,
    ) -> WorkloadCertificate:
        """A new key and a certificate for ``spiffe://…/ns/<namespace>/sa/<sa>``."""
        if ttl <= dt.timedelta(0):
            raise IdentityError(f"a certificate's lifetime must be positive, not {ttl}")
        identity = spiffe_id(namespace, service_account, self.trust_domain)
        now = now or _now()
        not_before, not_after = now - CLOCK_SKEW, now + ttl
        if not_after > self.cert.not_valid_after_utc:
            raise IdentityError("the certificate would outlive the cluster CA")
        key = ec.generate_private_key(ec.SECP256R1())
        serial = x509.random_serial_number()
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]),
                critical=True,
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(signs_certificates=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return WorkloadCertificate(
            spiffe_id=identity,
            cert_pem=cert.public_bytes(serialization.Encoding.PEM),
            key_pem=_pem_key(key),
            root_pem=self.root_pem,
            not_before=not_before,
            not_after=not_after,
            serial=serial,
        )

    def issue_server_certificate(
        self,
        hostnames: list[str],
        ttl: dt.timedelta = dt.timedelta(days=90),
        now: dt.datetime | None = None,
    ) -> tuple[bytes, bytes]:
        """A new key and a TLS server certificate for ``hostnames`` (DNS SANs, the first also
        the subject's common name): the ``tls.crt`` and ``tls.key`` of a ``kubernetes.io/tls``
        Secret an Ingress (or a pod terminating TLS itself) serves. PEM, certificate first."""
        if not hostnames or not all(hostnames):
            raise IdentityError("a server certificate needs at least one host name")
        if ttl <= dt.timedelta(0):
            raise IdentityError(f"a certificate's lifetime must be positive, not {ttl}")
        now = now or _now()
        if now + ttl > self.cert.not_valid_after_utc:
            raise IdentityError("the certificate would outlive the cluster CA")
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostnames[0])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + ttl)
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(h) for h in hostnames]), critical=False
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(signs_certificates=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def peer_identity(cert_der: bytes) -> str | None:
    """The SPIFFE ID in a peer certificate's URI SAN, or None."""
    try:
        cert = x509.load_der_x509_certificate(cert_der)
    except ValueError:
        return None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return next((u for u in uris if u.startswith("spiffe://")), None)


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` in one rename, so a watcher never reads half a file.

    The data goes to a new private file in the same directory (created with ``mode``, never
    following a link), is flushed to disk, then renamed over ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise

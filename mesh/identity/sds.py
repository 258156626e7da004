"""Delivering workload certificates to Envoy without restarts: file-based SDS.

Envoy's secret discovery can read a secret from a file and watch a directory: when a file is
moved into it, Envoy reads the secret again and uses it for new handshakes. The files hold a
``DiscoveryResponse`` with one ``Secret`` each — the workload's certificate and key
(:data:`CERT_SECRET`) and the root to check peers against (:data:`ROOT_SECRET`, the names
Istio's agent uses) — and are replaced with one rename (:func:`~mesh.identity.ca.write_atomic`),
so Envoy never reads half a file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mesh.identity.ca import WorkloadCertificate, write_atomic

SECRET_TYPE = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
CERT_SECRET = "default"
ROOT_SECRET = "ROOTCA"
CERT_FILE = "cert.json"
ROOT_FILE = "root.json"
TLS_SOCKET = "envoy.transport_sockets.tls"


def write_secrets(directory: Path, cert: WorkloadCertificate) -> None:
    """Write (or replace) a workload's two secret files in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    tls = {
        "certificate_chain": {"inline_string": cert.cert_pem.decode()},
        "private_key": {"inline_string": cert.key_pem.decode()},
    }
    root = {"trusted_ca": {"inline_string": cert.root_pem.decode()}}
    # The root first: a new certificate is never served before its root is trusted.
    write_atomic(directory / ROOT_FILE, _response(ROOT_SECRET, "validation_context", root), 0o600)
    write_atomic(directory / CERT_FILE, _response(CERT_SECRET, "tls_certificate", tls), 0o600)


def _response(name: str, field: str, value: dict[str, Any]) -> bytes:
    secret = {"@type": SECRET_TYPE, "name": name, field: value}
    return json.dumps({"resources": [secret]}).encode()


def _sds(directory: Path, name: str, file: str) -> dict[str, Any]:
    return {
        "name": name,
        "sds_config": {
            "path_config_source": {
                "path": str(directory / file),
                "watched_directory": {"path": str(directory)},
            },
            "resource_api_version": "V3",
        },
    }


def common_tls_context(directory: Path, peer_ids: list[str] | None = None) -> dict[str, Any]:
    """Our certificate and the root from ``directory``; with ``peer_ids``, only a peer
    whose certificate names one of them is accepted."""
    validation: dict[str, Any] = _sds(directory, ROOT_SECRET, ROOT_FILE)
    context: dict[str, Any] = {
        "tls_certificate_sds_secret_configs": [_sds(directory, CERT_SECRET, CERT_FILE)],
        "tls_params": {
            "tls_minimum_protocol_version": "TLSv1_2",
            # Envoy's client side stops at 1.2 unless told; the mesh speaks 1.3.
            "tls_maximum_protocol_version": "TLSv1_3",
        },
    }
    if peer_ids:
        context["combined_validation_context"] = {
            "default_validation_context": {
                "match_typed_subject_alt_names": [
                    {"san_type": "URI", "matcher": {"exact": peer}} for peer in peer_ids
                ]
            },
            "validation_context_sds_secret_config": validation,
        }
    else:
        context["validation_context_sds_secret_config"] = validation
    return context


def downstream_tls(directory: Path, require_client_certificate: bool = True) -> dict[str, Any]:
    """The transport socket of a listener that terminates mutual TLS."""
    return {
        "name": TLS_SOCKET,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
            "DownstreamTlsContext",
            "require_client_certificate": require_client_certificate,
            "common_tls_context": common_tls_context(directory),
        },
    }


def upstream_tls(directory: Path, peer_ids: list[str] | None = None) -> dict[str, Any]:
    """The transport socket of a cluster that originates mutual TLS."""
    return {
        "name": TLS_SOCKET,
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
            "UpstreamTlsContext",
            "common_tls_context": common_tls_context(directory, peer_ids),
        },
    }

"""An echo server that terminates TLS itself: the backend of an ssl-passthrough Ingress.

Its certificate and key come from ``TLS_CERT`` and ``TLS_KEY`` (PEM text in the container's
env: hopscope's pods have no volumes, so this stands in for a mounted ``kubernetes.io/tls``
Secret). Run it without a sidecar (``sidecar.hopscope.dev/inject: "false"``): the TLS it
ends is the client's own, passed through the ingress untouched. Its ``app`` span says so —
``hopscope.tls.terminated_by: app`` with the TLS version, cipher and the SNI the client
sent — because no proxy on the way could read the request.
"""

from __future__ import annotations

import os
import ssl
import sys
import tempfile
import weakref
from pathlib import Path
from typing import Any

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue
from opentelemetry import trace

from apps.common import PodIdentity, instrument_flask, start_telemetry

CERT_ENV = "TLS_CERT"
"""PEM certificate chain the server presents (required)."""
KEY_ENV = "TLS_KEY"
"""PEM private key of that certificate (required)."""

_SNI: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
"""The server name each TLS connection asked for, by connection."""


def create_app(pod: PodIdentity) -> Flask:
    app = Flask("tlsecho")
    instrument_flask(app, pod)

    @app.before_request
    def _mark_tls() -> None:
        sock = request.environ.get("werkzeug.socket")
        if not isinstance(sock, ssl.SSLSocket):
            return
        span = trace.get_current_span()
        span.set_attributes(
            {
                "hopscope.tls.terminated_by": "app",
                "tls.protocol.version": sock.version() or "",
                "tls.cipher": (sock.cipher() or ("",))[0],
                "tls.client.server_name": _SNI.get(sock, ""),
            }
        )

    @app.get("/healthz")
    def healthz() -> ResponseReturnValue:
        return "ok\n"

    @app.route("/", defaults={"path": ""}, methods=["GET", "POST"])
    @app.route("/<path:path>", methods=["GET", "POST"])
    def echo(path: str) -> ResponseReturnValue:
        sock = request.environ.get("werkzeug.socket")
        return jsonify(
            pod=pod.name,
            node=pod.node,
            peer=request.remote_addr,
            path="/" + path,
            host=request.host,
            tls=sock.version() if isinstance(sock, ssl.SSLSocket) else None,
            sni=_SNI.get(sock, "") if sock is not None else "",
        )

    return app


def server_context(cert_pem: str, key_pem: str) -> ssl.SSLContext:
    """A server context with the given certificate that remembers each connection's SNI."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = Path(tmp) / "tls.crt", Path(tmp) / "tls.key"
        cert.write_text(cert_pem)
        key.write_text(key_pem)
        context.load_cert_chain(cert, key)

    def remember(sock: Any, name: str | None, _context: ssl.SSLContext) -> None:
        if name:
            _SNI[sock] = name

    context.sni_callback = remember
    return context


def main() -> None:
    from werkzeug.serving import make_server

    cert, key = os.environ.get(CERT_ENV, ""), os.environ.get(KEY_ENV, "")
    if not cert or not key:
        sys.exit(f"tlsecho: {CERT_ENV} and {KEY_ENV} must hold a PEM certificate and key")
    try:
        context = server_context(cert, key)
    except (ssl.SSLError, OSError) as exc:
        sys.exit(f"tlsecho: cannot use the certificate in {CERT_ENV}/{KEY_ENV}: {exc}")
    pod = PodIdentity.from_env("tlsecho")
    start_telemetry(pod)
    server = make_server(
        pod.ip, pod.listen_port, create_app(pod), threaded=True, ssl_context=context
    )
    server.serve_forever()


if __name__ == "__main__":
    main()

"""An echo server for experiments: answers with who served the request and who asked.

Its JSON reply names the pod, its node and the TCP peer it saw — what a learner needs to
check SNAT, ``externalTrafficPolicy`` and session affinity. Run it without a sidecar
(``sidecar.hopscope.dev/inject: "false"``) to see the peer exactly as kube-proxy left it.
"""

from __future__ import annotations

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue

from apps.common import PodIdentity, instrument_flask, run_http_app


def create_app(pod: PodIdentity) -> Flask:
    app = Flask("echo")
    instrument_flask(app, pod)

    @app.get("/healthz")
    def healthz() -> ResponseReturnValue:
        return "ok\n"

    @app.route("/", defaults={"path": ""}, methods=["GET", "POST"])
    @app.route("/<path:path>", methods=["GET", "POST"])
    def echo(path: str) -> ResponseReturnValue:
        return jsonify(
            pod=pod.name,
            node=pod.node,
            pod_ip=pod.ip,
            peer=request.remote_addr,
            path="/" + path,
            host=request.host,
        )

    return app


def main() -> None:
    run_http_app("echo", create_app)


if __name__ == "__main__":
    main()

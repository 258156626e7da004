"""The catalog service: a Flask app listing products over HTTP (``GET /items``)."""

from __future__ import annotations

from flask import Flask, abort, jsonify
from flask.typing import ResponseReturnValue

from apps.common import PodIdentity, instrument_flask, serve_flask, start_telemetry

ITEMS = [
    {"id": "p1", "name": "Packet socks", "price": 9.5},
    {"id": "p2", "name": "VIP mug", "price": 12.0},
    {"id": "p3", "name": "Conntrack cap", "price": 18.0},
]


def create_app(pod: PodIdentity) -> Flask:
    app = Flask("catalog")
    instrument_flask(app, pod)

    @app.get("/healthz")
    def healthz() -> ResponseReturnValue:
        return "ok\n"

    @app.get("/items")
    def items() -> ResponseReturnValue:
        return jsonify(items=ITEMS, served_by=pod.name)

    @app.get("/items/<item_id>")
    def item(item_id: str) -> ResponseReturnValue:
        for entry in ITEMS:
            if entry["id"] == item_id:
                return jsonify(item=entry, served_by=pod.name)
        abort(404)

    return app


def main() -> None:
    pod = PodIdentity.from_env("catalog")
    start_telemetry(pod)
    serve_flask(create_app(pod), pod)


if __name__ == "__main__":
    main()

"""The cache: a StatefulSet of two shards behind a headless Service.

Each replica has a stable name and DNS record (``cache-0.cache.shop.svc.cluster.local``);
clients pick the shard for a key themselves and talk to that pod's IP directly, the way
Redis or memcached clients do — no Service VIP and no kube-proxy on the way.
"""

from __future__ import annotations

import threading
import time

from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue

from apps.common import PodIdentity, instrument_flask, run_http_app

PORT = 6380


def create_app(pod: PodIdentity) -> Flask:
    app = Flask("cache")
    instrument_flask(app, pod)
    store: dict[str, tuple[str, float]] = {}
    lock = threading.Lock()

    @app.get("/healthz")
    def healthz() -> ResponseReturnValue:
        return "ok\n"

    @app.get("/keys/<key>")
    def get(key: str) -> ResponseReturnValue:
        with lock:
            entry = store.get(key)
        if entry is None or entry[1] < time.time():
            # a miss is an answer, not an error (like Redis's nil)
            return jsonify(key=key, hit=False, shard=pod.name)
        return jsonify(key=key, hit=True, value=entry[0], shard=pod.name)

    @app.put("/keys/<key>")
    def put(key: str) -> ResponseReturnValue:
        ttl = min(float(request.args.get("ttl", "30")), 3600.0)
        with lock:
            store[key] = (request.get_data(as_text=True)[:65536], time.time() + ttl)
        return jsonify(key=key, stored=True, shard=pod.name)

    return app


def main() -> None:
    run_http_app("cache", create_app)


if __name__ == "__main__":
    main()

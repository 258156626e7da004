"""The catalog service: a Flask app listing products over HTTP (``GET /items``).

It keeps the rendered list in the ``cache`` StatefulSet, sharding keys over the two cache
pods by name (``cache-N.cache``) and talking to the chosen pod directly, as a Redis client
would: that is the headless-Service, pod-to-pod path (no VIP, no kube-proxy).
"""

from __future__ import annotations

import json
import logging
import zlib

from flask import Flask, abort, jsonify
from flask.typing import ResponseReturnValue
from opentelemetry.instrumentation.urllib3 import URLLib3Instrumentor
from urllib3.exceptions import HTTPError

from apps.common import PodIdentity, instrument_flask, run_http_app
from apps.podnet import ServiceHTTPClient
from mesh.dns.resolver import ResolveError

CACHE_SHARDS = 2
CACHE_PORT = 6380
CACHE_TTL_SECONDS = 600

log = logging.getLogger("catalog")


class CacheError(Exception):
    """The cache shard answered with an error status."""


def cache_url(key: str) -> str:
    """The shard for ``key``: a stable pod name under the headless Service."""
    shard = zlib.crc32(key.encode()) % CACHE_SHARDS
    return f"http://cache-{shard}.cache:{CACHE_PORT}/keys/{key}"


ITEMS = [
    {"id": "p1", "name": "Packet socks", "price": 9.5},
    {"id": "p2", "name": "VIP mug", "price": 12.0},
    {"id": "p3", "name": "Conntrack cap", "price": 18.0},
]


def create_app(pod: PodIdentity) -> Flask:
    app = Flask("catalog")
    instrument_flask(app, pod)
    URLLib3Instrumentor().instrument()
    resolver = pod.resolver()
    http = ServiceHTTPClient(resolver, pod.sidecar_outbound, pod.ip)

    def cached_items() -> str:
        """Look the list up in its cache shard; store it there on a miss."""
        url = cache_url("items")
        try:
            resp = http.get(url, timeout=3)
            if resp.status >= 400:
                raise CacheError(f"{url} answered {resp.status}")
            if resp.json().get("hit"):
                return "hit"
            http.request("PUT", f"{url}?ttl={CACHE_TTL_SECONDS}", data=json.dumps(ITEMS))
            return "miss"
        except (ResolveError, HTTPError, CacheError, ValueError) as exc:
            # A cache is an optimisation: serve without it, but say so.
            log.warning("cache unavailable", extra={"error": str(exc)})
            return "unavailable"

    @app.get("/healthz")
    def healthz() -> ResponseReturnValue:
        return "ok\n"

    @app.get("/items")
    def items() -> ResponseReturnValue:
        return jsonify(items=ITEMS, served_by=pod.name, cache=cached_items())

    @app.get("/items/<item_id>")
    def item(item_id: str) -> ResponseReturnValue:
        for entry in ITEMS:
            if entry["id"] == item_id:
                return jsonify(item=entry, served_by=pod.name)
        abort(404)

    return app


def main() -> None:
    run_http_app("catalog", create_app)


if __name__ == "__main__":
    main()

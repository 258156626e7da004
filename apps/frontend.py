"""The frontend: a Flask app calling catalog over HTTP and reviews over gRPC."""

from __future__ import annotations

import logging
import os
from typing import Any

import grpc
from flask import Flask, jsonify
from flask.typing import ResponseReturnValue
from opentelemetry.instrumentation.grpc import client_interceptor, grpcext
from opentelemetry.instrumentation.urllib3 import URLLib3Instrumentor
from urllib3.exceptions import HTTPError

from apps.common import PodIdentity, instrument_flask, run_http_app
from apps.grpc_gen import shop_pb2, shop_pb2_grpc
from apps.podnet import ServiceHTTPClient, grpc_call, grpc_channel
from mesh.dns.resolver import ResolveError

CATALOG_URL = os.environ.get("CATALOG_URL", "http://catalog:8080/items")
"""Overridable from the Deployment's env (the dns-typo scenario misspells it)."""
PAYMENTS_URL = "http://payments:8080/authorize"
"""An ExternalName Service: DNS answers with a CNAME to payments.example.net, outside."""
REVIEWS = ("reviews", 50051)

log = logging.getLogger("frontend")


def create_app(pod: PodIdentity) -> Flask:
    app = Flask("frontend")
    instrument_flask(app, pod)
    URLLib3Instrumentor().instrument()
    resolver = pod.resolver()
    http = ServiceHTTPClient(resolver, pod.sidecar_outbound, pod.ip)
    channel = grpc_channel(pod.sidecar_outbound, f"{REVIEWS[0]}:{REVIEWS[1]}")
    reviews = shop_pb2_grpc.ReviewsStub(grpcext.intercept_channel(channel, client_interceptor()))

    @app.get("/healthz")
    def healthz() -> ResponseReturnValue:
        return "ok\n"

    def product_reviews_or_error(product: str) -> tuple[dict[str, Any] | None, Any]:
        """Reviews of ``product`` over gRPC: (fields for the page, None) or (None, error)."""
        try:
            reply = grpc_call(
                resolver,
                *REVIEWS,
                lambda md: reviews.GetReviews(
                    shop_pb2.ReviewsRequest(product_id=product), metadata=md, timeout=5
                ),
            )
        except ResolveError as exc:
            return None, (jsonify(error=f"reviews: {exc}", served_by=pod.name), 502)
        except grpc.RpcError as exc:
            log.error("reviews failed", extra={"code": str(exc.code())})
            return None, (jsonify(error=f"reviews: {exc.code()} {exc.details()}"), 502)
        fields = {
            "reviews": [
                {"author": r.author, "text": r.text, "stars": r.stars} for r in reply.reviews
            ],
            "reviews_served_by": reply.served_by,
        }
        return fields, None

    @app.get("/")
    def index() -> ResponseReturnValue:
        try:
            resp = http.get(CATALOG_URL)
        except (ResolveError, HTTPError) as exc:
            log.error("catalog unreachable", extra={"error": str(exc)})
            return jsonify(error=f"catalog: {exc}", served_by=pod.name), 502
        if resp.status != 200:
            log.error("catalog failed", extra={"status": resp.status})
            return jsonify(error=f"catalog answered {resp.status}", served_by=pod.name), 502
        catalog = resp.json()
        fields, error = product_reviews_or_error(catalog["items"][0]["id"])
        if fields is None:
            return error  # type: ignore[no-any-return]
        return jsonify(
            served_by=pod.name,
            items=catalog["items"],
            catalog_served_by=catalog.get("served_by"),
            **fields,
        )

    @app.get("/reviews/<product>")
    def product_reviews(product: str) -> ResponseReturnValue:
        """gRPC only: frontend → reviews → ratings."""
        fields, error = product_reviews_or_error(product)
        if fields is None:
            return error  # type: ignore[no-any-return]
        return jsonify(served_by=pod.name, **fields)

    @app.get("/checkout")
    def checkout() -> ResponseReturnValue:
        try:
            resp = http.request("POST", PAYMENTS_URL, data=b'{"amount": 9.5}')
        except (ResolveError, HTTPError) as exc:
            log.error("payments unreachable", extra={"error": str(exc)})
            return jsonify(error=f"payments: {exc}", served_by=pod.name), 502
        if resp.status != 200:
            log.error("payments failed", extra={"status": resp.status})
            return jsonify(error=f"payments answered {resp.status}"), 502
        return jsonify(served_by=pod.name, payment=resp.json())

    return app


def main() -> None:
    run_http_app("frontend", create_app)


if __name__ == "__main__":
    main()

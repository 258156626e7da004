"""The reviews service (gRPC): a product's reviews, with stars from the ratings service."""

from __future__ import annotations

from typing import Any

import grpc
from opentelemetry.instrumentation.grpc import client_interceptor, grpcext

from apps.common import PodIdentity, app_rpc, run_grpc_app
from apps.grpc_gen import shop_pb2, shop_pb2_grpc
from apps.podnet import grpc_call, grpc_channel
from mesh.dns.resolver import ResolveError

RATINGS = ("ratings", 50051)


class Reviews(shop_pb2_grpc.ReviewsServicer):
    def __init__(self, pod: PodIdentity) -> None:
        self.pod = pod
        self.resolver = pod.resolver()
        channel = grpc_channel(pod.sidecar_outbound, f"{RATINGS[0]}:{RATINGS[1]}")
        self.ratings = shop_pb2_grpc.RatingsStub(
            grpcext.intercept_channel(channel, client_interceptor())
        )

    @app_rpc("/hopscope.shop.v1.Reviews/GetReviews")
    def GetReviews(self, request: Any, context: Any) -> Any:
        try:
            rating = grpc_call(
                self.resolver,
                *RATINGS,
                lambda md: self.ratings.GetRating(
                    shop_pb2.RatingRequest(product_id=request.product_id),
                    metadata=md,
                    timeout=5,
                ),
            )
        except ResolveError as exc:
            context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        except grpc.RpcError as exc:
            context.abort(exc.code(), f"ratings: {exc.details()}")
        stars = round(rating.average)
        return shop_pb2.ReviewsReply(
            product_id=request.product_id,
            reviews=[
                shop_pb2.Review(author="ana", text="Routes packets beautifully.", stars=stars),
                shop_pb2.Review(author="raj", text="Survived a NetworkPolicy.", stars=stars),
            ],
            served_by=f"{self.pod.name} (ratings by {rating.served_by})",
        )


def main() -> None:
    run_grpc_app(
        "reviews",
        lambda server, pod: shop_pb2_grpc.add_ReviewsServicer_to_server(Reviews(pod), server),
    )


if __name__ == "__main__":
    main()

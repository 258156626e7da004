"""The ratings service (gRPC): average stars of a product."""

from __future__ import annotations

import zlib
from typing import Any

from apps.common import PodIdentity, app_rpc, run_grpc_app
from apps.grpc_gen import shop_pb2, shop_pb2_grpc


class Ratings(shop_pb2_grpc.RatingsServicer):
    def __init__(self, pod: PodIdentity) -> None:
        self.pod = pod

    @app_rpc("/hopscope.shop.v1.Ratings/GetRating")
    def GetRating(self, request: Any, context: Any) -> Any:
        seed = zlib.crc32(request.product_id.encode())
        return shop_pb2.RatingReply(
            product_id=request.product_id,
            average=3.0 + (seed % 20) / 10,
            count=10 + seed % 90,
            served_by=self.pod.name,
        )


def main() -> None:
    run_grpc_app(
        "ratings",
        lambda server, pod: shop_pb2_grpc.add_RatingsServicer_to_server(Ratings(pod), server),
    )


if __name__ == "__main__":
    main()

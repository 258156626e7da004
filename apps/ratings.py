"""The ratings service (gRPC): average stars of a product."""

from __future__ import annotations

import zlib
from typing import Any

from apps.common import PodIdentity, serve_grpc, start_telemetry, traced_grpc_method
from apps.grpc_gen import shop_pb2, shop_pb2_grpc


class Ratings(shop_pb2_grpc.RatingsServicer):
    def __init__(self, pod: PodIdentity) -> None:
        self.pod = pod

    def GetRating(self, request: Any, context: Any) -> Any:  # noqa: N802 (gRPC naming)
        seed = zlib.crc32(request.product_id.encode())
        return shop_pb2.RatingReply(
            product_id=request.product_id,
            average=3.0 + (seed % 20) / 10,
            count=10 + seed % 90,
            served_by=self.pod.name,
        )


def main() -> None:
    pod = PodIdentity.from_env("ratings")
    start_telemetry(pod)
    Ratings.GetRating = traced_grpc_method(pod, "/hopscope.shop.v1.Ratings/GetRating",
                                           Ratings.GetRating)

    def register(server: Any) -> None:
        shop_pb2_grpc.add_RatingsServicer_to_server(Ratings(pod), server)

    serve_grpc(register, pod)


if __name__ == "__main__":
    main()

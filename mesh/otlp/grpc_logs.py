"""OTLP/gRPC logs in (Envoy's OpenTelemetry access logger), OTLP/HTTP logs out.

Envoy ships access logs over OTLP/gRPC (``envoy.access_loggers.open_telemetry``), so when
hopscope forwards telemetry the control plane also listens on the standard OTLP/gRPC port
(4317) of its address with a ``LogsService`` (grpcio and the ``*_pb2_grpc`` stubs of
``opentelemetry-proto``) and hands every export to the forwarder as a protobuf
``/v1/logs`` body. It serves nothing when not forwarding: the embedded store keeps traces.
"""

from __future__ import annotations

from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc

from mesh.otlp.forward import Forwarder
from mesh.otlp.intake import Intake

OTLP_GRPC_PORT = 4317
"""The standard OTLP/gRPC port."""


class _LogsService(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, intake: Intake, forwarder: Forwarder) -> None:
        self.intake = intake
        self.forwarder = forwarder

    def Export(
        self, request: logs_service_pb2.ExportLogsServiceRequest, context: Any
    ) -> logs_service_pb2.ExportLogsServiceResponse:
        if not self.intake.accepting:
            self.intake.requests.labels("logs", "unavailable").inc()
            context.abort(grpc.StatusCode.UNAVAILABLE, "the OTLP receiver is stopped")
        records = sum(len(s.log_records) for r in request.resource_logs for s in r.scope_logs)
        self.forwarder.submit(
            "logs", request.SerializeToString(), "application/x-protobuf", None, records
        )
        self.intake.requests.labels("logs", "accepted").inc()
        return logs_service_pb2.ExportLogsServiceResponse()


class GrpcLogsReceiver:
    """A ``LogsService`` on ``host:port`` feeding the forwarder."""

    def __init__(self, intake: Intake, forwarder: Forwarder, host: str, port: int) -> None:
        self.intake = intake
        self.forwarder = forwarder
        self.address = f"{host}:{port}"
        self._server: grpc.Server | None = None

    def start(self) -> None:
        if self._server is not None:
            return
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="otlp-grpc")
        )
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(
            _LogsService(self.intake, self.forwarder), server
        )
        try:
            port = server.add_insecure_port(self.address)
        except RuntimeError:
            port = 0
        if port == 0:
            raise OSError(f"cannot listen on {self.address} (OTLP/gRPC)")
        self.address = f"{self.address.rsplit(':', 1)[0]}:{port}"
        server.start()
        self._server = server

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop(grace=1).wait(2)
            self._server = None

"""JSON log lines with the current trace context (``trace_id`` 32-hex, ``span_id`` 16-hex)."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from opentelemetry import trace

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message"}


class JsonFormatter(logging.Formatter):
    """Formats a record as one JSON object; extra ``fields`` are merged in."""

    def __init__(self, static: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.static = static or {}

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **self.static,
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            entry["trace_id"] = format(ctx.trace_id, "032x")
            entry["span_id"] = format(ctx.span_id, "016x")
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_json_logging(static: dict[str, Any] | None = None, level: int = logging.INFO) -> None:
    """Send every log record to stdout as JSON, with ``static`` fields on each line."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(static))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # werkzeug logs one INFO line per request it serves: probes, API polls, scrapes. The
    # apps log the requests worth reading themselves (with their trace ids).
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    if os.environ.get(HOPSCOPE_OTLP_LOGS) == "1" and os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        root.addHandler(_otlp_handler(static or {}))


HOPSCOPE_OTLP_LOGS = "HOPSCOPE_OTLP_LOGS"
"""``1``: also ship log records over OTLP (compose: through the Collector to Loki), each
with the trace and span id of the span it was written in."""


def _otlp_handler(static: dict[str, Any]) -> logging.Handler:
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
    from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
    from opentelemetry.sdk.resources import Resource

    from telemetry.export_counts import CountingBatchLogRecordProcessor, default_counters
    from telemetry.tracing import receiver_session

    endpoint = os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"].rstrip("/") + "/v1/logs"
    name = os.environ.get("OTEL_SERVICE_NAME") or str(static.get("component", "hopscope"))
    resource = {"service.name": name}
    for key, env in (
        ("k8s.pod.name", "HOPSCOPE_POD_NAME"),
        ("k8s.namespace.name", "HOPSCOPE_POD_NAMESPACE"),
        ("k8s.node.name", "HOPSCOPE_NODE_NAME"),
    ):
        if os.environ.get(env):
            resource[key] = os.environ[env]
    provider = LoggerProvider(resource=Resource.create(resource))
    exporter = OTLPLogExporter(endpoint=endpoint, timeout=5, session=receiver_session())
    provider.add_log_record_processor(
        CountingBatchLogRecordProcessor(exporter, default_counters().log_records)
    )
    handler = LoggingHandler(level=logging.INFO, logger_provider=provider)
    handler.addFilter(_mark_app_record)
    return handler


LOG_KIND = "app"
"""``log_kind`` attribute of every record a hopscope process ships (Envoy's are ``access``)."""


def _mark_app_record(record: logging.LogRecord) -> bool:
    """Tag the record ``log_kind="app"`` (an OTLP attribute; Loki structured metadata)."""
    record.log_kind = LOG_KIND
    return True

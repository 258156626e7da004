"""Decoding OTLP/HTTP trace exports into plain span records.

Both encodings OTLP/HTTP allows are accepted: binary protobuf (what the Python SDK and
Envoy send) and JSON. Envoy names a few attributes after the older OpenTracing tags
(``http.status_code``, ``peer.address``, ``upstream_address``); :func:`normalize` adds the
OpenTelemetry semantic-convention names next to them so every consumer reads one vocabulary.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

SPAN_KINDS = {
    0: "unspecified",
    1: "internal",
    2: "server",
    3: "client",
    4: "producer",
    5: "consumer",
}
STATUS_CODES = {0: "unset", 1: "ok", 2: "error"}


class OTLPDecodeError(ValueError):
    """The request body is not a valid OTLP trace export."""


@dataclass
class SpanRecord:
    """One span as stored: ids in lowercase hex, times in Unix nanoseconds."""

    trace_id: str
    span_id: str
    parent_span_id: str
    name: str
    kind: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any] = field(default_factory=dict)
    resource: dict[str, Any] = field(default_factory=dict)
    status: str = "unset"
    status_message: str = ""
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def duration_ms(self) -> float:
        return max(0, self.end_ns - self.start_ns) / 1e6

    def to_dict(self) -> dict[str, Any]:
        return {
            "trace_id": self.trace_id,
            "span_id": self.span_id,
            "parent_span_id": self.parent_span_id,
            "name": self.name,
            "kind": self.kind,
            "start_ns": self.start_ns,
            "end_ns": self.end_ns,
            "duration_ms": round(self.duration_ms, 3),
            "attributes": self.attributes,
            "resource": self.resource,
            "status": self.status,
            "status_message": self.status_message,
            "events": self.events,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpanRecord:
        fields = {k: v for k, v in data.items() if k != "duration_ms"}
        return cls(**fields)


def decode_export(body: bytes, content_type: str) -> list[SpanRecord]:
    """Decode one ``/v1/traces`` request body (protobuf or JSON) into span records."""
    request = ExportTraceServiceRequest()
    try:
        if "json" in content_type:
            json_format.Parse(body.decode("utf-8"), request)
        else:
            request.ParseFromString(body)
    except (DecodeError, json_format.ParseError, UnicodeDecodeError) as exc:
        raise OTLPDecodeError(f"not an OTLP trace export: {exc}") from exc
    spans: list[SpanRecord] = []
    for resource_spans in request.resource_spans:
        resource = _attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                record = SpanRecord(
                    trace_id=span.trace_id.hex(),
                    span_id=span.span_id.hex(),
                    parent_span_id=span.parent_span_id.hex(),
                    name=span.name,
                    kind=SPAN_KINDS.get(span.kind, "unspecified"),
                    start_ns=span.start_time_unix_nano,
                    end_ns=span.end_time_unix_nano,
                    attributes=_attributes(span.attributes),
                    resource=resource,
                    status=STATUS_CODES.get(span.status.code, "unset"),
                    status_message=span.status.message,
                    events=[
                        {"name": e.name, "time_ns": e.time_unix_nano, **_attributes(e.attributes)}
                        for e in span.events
                    ],
                )
                spans.append(normalize(record))
    return spans


def _attributes(items: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in items if isinstance(kv, KeyValue)}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return value.bytes_value.hex()
    return getattr(value, kind) if kind else None


_ENVOY_TO_SEMCONV = {
    "peer.address": "network.peer.address",
    "http.method": "http.request.method",
    "http.protocol": "network.protocol.version",
    "upstream_address": "hopscope.upstream.address",
}


def normalize(record: SpanRecord) -> SpanRecord:
    """Add semantic-convention attribute names next to Envoy's OpenTracing-era ones."""
    attrs = record.attributes
    for old, new in _ENVOY_TO_SEMCONV.items():
        if old in attrs and new not in attrs:
            attrs[new] = attrs[old]
    status = attrs.get("http.status_code")
    if status is not None and "http.response.status_code" not in attrs:
        with contextlib.suppress(TypeError, ValueError):
            attrs["http.response.status_code"] = int(status)
    for key in ("k8s.pod.name", "k8s.namespace.name", "k8s.node.name", "service.name"):
        if key not in attrs and key in record.resource:
            attrs[key] = record.resource[key]
    return record

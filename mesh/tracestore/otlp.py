"""OTLP trace exports: parsing request bodies, and turning stored spans into plain records.

Both encodings OTLP/HTTP allows are parsed: binary protobuf (what the Python SDK, Envoy and
the Collector send) and OTLP/JSON, whose trace and span ids are hex strings rather than the
base64 that protobuf's own JSON mapping would use. The store keeps spans as protobuf bytes;
:func:`span_record` decodes one into a :class:`SpanRecord` only when someone reads it.

Envoy names a few attributes after the older OpenTracing tags (``http.status_code``,
``peer.address``, ``upstream_address``); :func:`normalize` adds the OpenTelemetry
semantic-convention names next to them so every consumer reads one vocabulary.
"""

from __future__ import annotations

import base64
import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

SPAN_KINDS = {
    0: "unspecified",
    1: "internal",
    2: "server",
    3: "client",
    4: "producer",
    5: "consumer",
}
STATUS_CODES = {0: "unset", 1: "ok", 2: "error"}

_HEX_ID_FIELDS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


class OTLPDecodeError(ValueError):
    """The request body is not a valid OTLP trace export."""


@dataclass
class SpanRecord:
    """One span as read: ids in lowercase hex, times in Unix nanoseconds."""

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
    paired_with: str = ""
    """Set on a span of another trace shown in this one because conntrack-style pairing
    matched its connection (:meth:`~mesh.tracestore.store.TraceStore.get`): the span id of
    the proxy span whose upstream connection it is. Empty for the trace's own spans."""
    lifetime_ns: tuple[int, int] | None = None
    """For a paired span: its own start and end. ``start_ns``/``end_ns`` are then clipped to
    the request it carried (a pooled connection outlives many requests)."""

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
            "paired_with": self.paired_with,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SpanRecord:
        fields = {k: v for k, v in data.items() if k != "duration_ms"}
        if isinstance(fields.get("lifetime_ns"), list):
            fields["lifetime_ns"] = tuple(fields["lifetime_ns"])
        return cls(**fields)


def parse_export(body: bytes, json_body: bool) -> ExportTraceServiceRequest:
    """One ``/v1/traces`` body (already decompressed) as an ``ExportTraceServiceRequest``."""
    request = ExportTraceServiceRequest()
    if not json_body:
        try:
            request.ParseFromString(body)
        except DecodeError as exc:
            raise OTLPDecodeError(f"not an OTLP trace export (protobuf): {exc}") from None
        return request
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise OTLPDecodeError(f"not an OTLP trace export (JSON): {exc}") from None
    if not isinstance(doc, dict):
        raise OTLPDecodeError("not an OTLP trace export (JSON): the body must be an object")
    _hex_ids_to_base64(doc)
    try:
        # Receivers must ignore fields they do not know (OTLP/JSON is forward compatible).
        json_format.ParseDict(doc, request, ignore_unknown_fields=True)
    except (json_format.ParseError, TypeError, ValueError) as exc:
        raise OTLPDecodeError(f"not an OTLP trace export (JSON): {exc}") from None
    return request


def _hex_ids_to_base64(doc: dict[str, Any]) -> None:
    """OTLP/JSON writes ids as hex; protobuf's JSON parser wants base64 for bytes fields."""
    for rs in _objects(doc, "resourceSpans", "resource_spans"):
        for ss in _objects(rs, "scopeSpans", "scope_spans"):
            for span in _objects(ss, "spans"):
                _convert_ids(span)
                for link in _objects(span, "links"):
                    _convert_ids(link)


def _objects(parent: dict[str, Any], *keys: str) -> list[dict[str, Any]]:
    for key in keys:
        value = parent.get(key)
        if isinstance(value, list):
            return [v for v in value if isinstance(v, dict)]
    return []


def _convert_ids(obj: dict[str, Any]) -> None:
    for key in _HEX_ID_FIELDS:
        value = obj.get(key)
        if isinstance(value, str):
            try:
                obj[key] = base64.b64encode(bytes.fromhex(value)).decode("ascii")
            except ValueError:
                raise OTLPDecodeError(
                    f"not an OTLP trace export (JSON): {key} {value!r} is not hex"
                ) from None


def span_record(trace_id: str, span: Span, resource: dict[str, Any]) -> SpanRecord:
    """A stored span (trace id kept apart, as the store keys it) as a normalized record."""
    record = SpanRecord(
        trace_id=trace_id,
        span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex(),
        name=span.name,
        kind=SPAN_KINDS.get(span.kind, "unspecified"),
        start_ns=span.start_time_unix_nano,
        end_ns=span.end_time_unix_nano,
        attributes=attributes(span.attributes),
        resource=dict(resource),
        status=STATUS_CODES.get(span.status.code, "unset"),
        status_message=span.status.message,
        events=[
            {"name": e.name, "time_ns": e.time_unix_nano, **attributes(e.attributes)}
            for e in span.events
        ],
    )
    return normalize(record)


def decode_export(body: bytes, content_type: str) -> list[SpanRecord]:
    """Every span of one uncompressed ``/v1/traces`` body, as records (for tools and tests)."""
    request = parse_export(body, "json" in content_type)
    spans: list[SpanRecord] = []
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(span_record(span.trace_id.hex(), span, resource))
    return spans


def attributes(items: Any) -> dict[str, Any]:
    """OTLP ``KeyValue`` list as a plain dict."""
    return {kv.key: _value(kv.value) for kv in items}


def any_value(value: Any) -> AnyValue:
    """A Python value as an OTLP ``AnyValue`` (bool, int, float, list, else its string)."""
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, list):
        out = AnyValue()
        out.array_value.values.extend(any_value(v) for v in value)
        return out
    return AnyValue(string_value=str(value))


def key_values(attrs: dict[str, Any]) -> list[KeyValue]:
    """Attributes as OTLP ``KeyValue``s."""
    return [KeyValue(key=k, value=any_value(v)) for k, v in attrs.items()]


def add_key_values(target: Any, attrs: dict[str, Any]) -> None:
    """Append attributes to a repeated ``KeyValue`` field (a span's ``attributes``) in place:
    a third of the cost of ``extend(key_values(…))``, which builds each message and then
    copies it in."""
    add = target.add
    for key, value in attrs.items():
        if type(value) is str:
            add(key=key).value.string_value = value
        else:
            add(key=key, value=any_value(value))


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


__all__ = [
    "OTLPDecodeError",
    "SpanRecord",
    "attributes",
    "decode_export",
    "normalize",
    "parse_export",
    "span_record",
]

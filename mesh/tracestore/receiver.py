"""The OTLP/HTTP trace receiver, apart from any web framework.

:func:`receive` takes a ``/v1/traces`` body with its ``Content-Type`` and
``Content-Encoding`` headers and returns the HTTP answer OTLP/HTTP prescribes; the Flask
handler in :mod:`mesh.controlplane.api` only moves bytes in and out. What it accepts, as the
OTLP specification says a receiver must:

* ``application/x-protobuf`` (also ``application/protobuf``; a body with no content type is
  read as protobuf) and ``application/json`` (OTLP/JSON: hex trace and span ids, unknown
  fields ignored);
* ``Content-Encoding: gzip`` or none (``identity``). Another encoding gets 415.
  Decompression stops at :data:`MAX_BODY_BYTES`: a larger body — or a gzip bomb — gets 413
  without ever being held in memory;
* a successful export is answered with an ``ExportTraceServiceResponse`` in the request's
  encoding, whose ``partial_success`` says how many spans were rejected and why;
  a failed one with a ``google.rpc.Status`` carrying the message, as 400/413/415.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass

from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from mesh.tracestore.otlp import OTLPDecodeError, parse_export
from mesh.tracestore.store import TraceStore

MAX_BODY_BYTES = 32 * 2**20
"""Largest export accepted, after decompression (the Collector's own default limit is
20 MiB uncompressed for its exporters' batches, well under this)."""

PROTOBUF = "application/x-protobuf"
JSON = "application/json"
_MEDIA_TYPES = {"application/x-protobuf": PROTOBUF, "application/protobuf": PROTOBUF, JSON: JSON}


@dataclass
class Answer:
    """An HTTP answer: status, body and content type."""

    status: int
    body: bytes
    content_type: str
    spans: int = 0
    """Spans stored (for the caller's own counters)."""


class ReceiverError(Exception):
    """The export was refused as a whole; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def media_type(content_type: str | None) -> str:
    """``PROTOBUF`` or ``JSON`` for a ``Content-Type`` header; ReceiverError(415) otherwise."""
    raw = (content_type or "").split(";", 1)[0].strip().lower()
    if not raw:
        return PROTOBUF
    try:
        return _MEDIA_TYPES[raw]
    except KeyError:
        raise ReceiverError(
            415,
            f"unsupported Content-Type {raw!r}: OTLP/HTTP takes application/x-protobuf "
            "or application/json",
        ) from None


def decompress(body: bytes, content_encoding: str | None, limit: int = MAX_BODY_BYTES) -> bytes:
    """The body as sent before ``Content-Encoding``; ReceiverError(413/415/400) if it cannot be."""
    encoding = (content_encoding or "").strip().lower()
    if encoding in ("", "identity"):
        if len(body) > limit:
            raise ReceiverError(413, _too_large(limit))
        return body
    if encoding not in ("gzip", "x-gzip"):
        raise ReceiverError(
            415, f"unsupported Content-Encoding {encoding!r}: OTLP/HTTP takes gzip or none"
        )
    out = bytearray()
    data = body
    try:
        while data:
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            out += inflater.decompress(data, limit + 1 - len(out))
            if len(out) > limit:
                raise ReceiverError(413, _too_large(limit))
            if not inflater.eof:
                raise ReceiverError(400, "gzip body is truncated")
            data = inflater.unused_data  # concatenated gzip members are one stream
    except zlib.error as exc:
        raise ReceiverError(400, f"body is not valid gzip: {exc}") from None
    return bytes(out)


def _too_large(limit: int) -> str:
    return f"export too large: more than {limit // 2**20} MiB once decompressed"


def error_answer(status: int, message: str, media: str) -> Answer:
    """A ``google.rpc.Status`` body in the request's encoding, as OTLP/HTTP asks."""
    if media == JSON:
        body = json.dumps({"code": _grpc_code(status), "message": message}).encode()
        return Answer(status, body, JSON)
    return Answer(
        status, Status(code=_grpc_code(status), message=message).SerializeToString(), PROTOBUF
    )


def _grpc_code(status: int) -> int:
    return {400: 3, 413: 8, 415: 3}.get(status, 13)  # INVALID_ARGUMENT, RESOURCE_EXHAUSTED


def receive(
    store: TraceStore, body: bytes, content_type: str | None, content_encoding: str | None
) -> Answer:
    """Decode, store and answer one ``POST /v1/traces``."""
    media = PROTOBUF
    try:
        media = media_type(content_type)
        raw = decompress(body, content_encoding)
        request = parse_export(raw, media == JSON)
    except ReceiverError as exc:
        return error_answer(exc.status, exc.message, media)
    except OTLPDecodeError as exc:
        return error_answer(400, str(exc), media)
    stored, rejected = store.add_export(request)
    response = ExportTraceServiceResponse()
    if any(rejected.values()):
        response.partial_success.rejected_spans = sum(rejected.values())
        response.partial_success.error_message = "; ".join(
            f"{n} {_REJECTION_WORDS[reason]}" for reason, n in rejected.items() if n
        )
    if media == JSON:
        from google.protobuf import json_format

        doc = json_format.MessageToDict(response)
        return Answer(200, json.dumps(doc).encode(), JSON, stored)
    return Answer(200, response.SerializeToString(), PROTOBUF, stored)


_REJECTION_WORDS = {
    "invalid_id": "spans with a trace id that is not 16 bytes (or all zero) or a span id "
    "that is not 8 bytes",
    "trace_span_limit": "spans past the per-trace limit",
}

"""How an app reaches a Service (:mod:`apps.podnet`): resolved by the pod's resolver, sent
to its sidecar with the original destination, from the pod's address, traced."""

from __future__ import annotations

import http.server
import json
from collections.abc import Iterator

import pytest
import urllib3
from opentelemetry.instrumentation.urllib3 import URLLib3Instrumentor
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from apps.podnet import ServiceHTTPClient
from mesh import addresses
from tests.http_stub import serving

POD_IP = "127.244.1.77"


class _Sidecar(http.server.BaseHTTPRequestHandler):
    """Stands where the sidecar's outbound listener is: echoes what reached it."""

    protocol_version = "HTTP/1.1"
    peers: list[tuple[str, int]] = []

    def _echo(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.dumps(
            {
                "method": self.command,
                "path": self.path,
                "host": self.headers["Host"],
                "original_dst": self.headers[addresses.ORIGINAL_DST_HEADER],
                "traceparent": self.headers.get("traceparent"),
                "body": self.rfile.read(length).decode(),
            }
        ).encode()
        self.peers.append(self.client_address)
        self.send_response(404 if self.path.startswith("/missing") else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_PUT = do_POST = _echo

    def log_message(self, *_: object) -> None:
        pass


class _Resolver:
    def resolve(self, name: str) -> list[str]:
        return {"catalog": ["127.96.0.12"], "cache-0.cache": ["127.244.2.9"]}[name]


@pytest.fixture()
def sidecar() -> Iterator[http.server.ThreadingHTTPServer]:
    _Sidecar.peers = []
    with serving(_Sidecar) as server:
        yield server


def test_a_call_goes_to_the_sidecar_naming_the_resolved_service_and_is_traced(
    sidecar: http.server.ThreadingHTTPServer,
) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    URLLib3Instrumentor().instrument(tracer_provider=provider)
    try:
        client = ServiceHTTPClient(_Resolver(), f"127.0.0.1:{sidecar.server_port}", POD_IP)  # type: ignore[arg-type]
        first = client.get("http://catalog:8080/items?page=2")
        second = client.request("PUT", "http://cache-0.cache:6380/keys/k?ttl=5", data=b"v")
        missing = client.get("http://catalog:8080/missing")
    finally:
        URLLib3Instrumentor().uninstrument()
    echoed = first.json()
    assert (first.status, echoed["method"], echoed["path"]) == (200, "GET", "/items?page=2")
    assert echoed["host"] == "catalog:8080"
    assert echoed["original_dst"] == "127.96.0.12:8080"
    assert second.json()["original_dst"] == "127.244.2.9:6380"
    assert second.json()["body"] == "v"
    assert missing.status == 404  # an answer, not an exception: the app decides
    # from the pod's own address, over one kept-alive connection
    assert {peer[0] for peer in _Sidecar.peers} == {POD_IP}
    assert len({peer[1] for peer in _Sidecar.peers}) == 1
    spans = exporter.get_finished_spans()
    assert [s.kind for s in spans] == [SpanKind.CLIENT] * 3
    trace_id = format(spans[0].context.trace_id, "032x")
    assert echoed["traceparent"].split("-")[1] == trace_id  # the context reaches the sidecar


def test_no_answer_is_an_urllib3_error_without_retries(
    sidecar: http.server.ThreadingHTTPServer,
) -> None:
    port = sidecar.server_port
    sidecar.shutdown()
    sidecar.server_close()
    client = ServiceHTTPClient(_Resolver(), f"127.0.0.1:{port}", POD_IP)  # type: ignore[arg-type]
    with pytest.raises(urllib3.exceptions.HTTPError):
        client.get("http://catalog:8080/items", timeout=1)
    with pytest.raises(ValueError, match="not a URL"):
        client.get("catalog")

"""The OTLP/HTTP receiver as the spec and a Collector see it, and the store's byte bound.

Bodies are built with opentelemetry-proto and compressed with gzip exactly as the
Collector's ``otlphttp`` exporter sends them, then posted to the control plane's API app on a
real socket; what arrived is read back through ``/api/v1/traces/<id>``.
"""

from __future__ import annotations

import base64
import gzip
import json
import os
import threading
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from google.protobuf import json_format
from google.rpc.status_pb2 import Status
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from prometheus_client.parser import text_string_to_metric_families
from werkzeug.serving import make_server

from mesh.controlplane.api import create_app
from mesh.model.types import ClusterState
from mesh.tracestore.receiver import MAX_BODY_BYTES
from mesh.tracestore.store import RESOURCE_LIMIT, TraceStore, format_size, parse_size

PROTOBUF = {"Content-Type": "application/x-protobuf"}
GZIP_PROTOBUF = {**PROTOBUF, "Content-Encoding": "gzip"}
JSON = {"Content-Type": "application/json"}


class _NoCluster:
    lock = threading.Lock()
    state = ClusterState()

    def snapshot(self) -> dict[str, Any]:
        return {"resource_version": 0}


def _serve(store: TraceStore) -> Iterator[str]:
    app = create_app(_NoCluster(), store, status=lambda: {"trace_store": store.stats()})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


@pytest.fixture()
def base() -> Iterator[str]:
    yield from _serve(TraceStore(budget_bytes=8 * 2**20))


def _kv(key: str, value: Any) -> KeyValue:
    if isinstance(value, int):
        return KeyValue(key=key, value=AnyValue(int_value=value))
    return KeyValue(key=key, value=AnyValue(string_value=str(value)))


def _export(
    trace_id: bytes, spans: int = 3, pod: str = "frontend-abc"
) -> ExportTraceServiceRequest:
    """An Envoy-shaped export: one resource, ``spans`` spans of one trace, many attributes."""
    request = ExportTraceServiceRequest()
    rs = request.resource_spans.add()
    rs.resource.attributes.extend(
        [_kv("service.name", "frontend"), _kv("k8s.pod.name", pod), _kv("k8s.node.name", "node-a")]
    )
    scope = rs.scope_spans.add()
    for i in range(spans):
        span = scope.spans.add(
            trace_id=trace_id,
            span_id=os.urandom(8),
            name=f"egress catalog.shop.svc:80 #{i}",
            kind=3,
            start_time_unix_nano=1_700_000_000_000_000_000 + i,
            end_time_unix_nano=1_700_000_000_002_000_000 + i,
        )
        span.attributes.extend(
            [
                _kv("hopscope.hop", "sidecar-outbound"),
                _kv("http.status_code", "200"),
                _kv("peer.address", f"127.244.1.{i % 250}"),
                _kv("upstream_address", "127.96.0.12:80"),
                _kv("response_flags", "-"),
                _kv("http.url", f"http://catalog.shop.svc/products/{i}"),
                _kv("guid:x-request-id", os.urandom(16).hex()),
            ]
        )
    return request


def _post(base: str, body: bytes, headers: dict[str, str]) -> requests.Response:
    return requests.post(f"{base}/v1/traces", data=body, headers=headers, timeout=10)


def _trace(base: str, trace_id: bytes) -> dict[str, Any]:
    resp = requests.get(f"{base}/api/v1/traces/{trace_id.hex()}", timeout=10)
    assert resp.status_code == 200, resp.text
    return resp.json()  # type: ignore[no-any-return]


def _otlp_json(request: ExportTraceServiceRequest) -> bytes:
    """OTLP/JSON as the spec writes it: ids in hex (protobuf's own mapping would use base64)."""
    doc = json_format.MessageToDict(request)
    for rs in doc["resourceSpans"]:
        for span in rs["scopeSpans"][0]["spans"]:
            for key in ("traceId", "spanId"):
                span[key] = base64.b64decode(span[key]).hex()
    return json.dumps(doc).encode()


# -- encodings ------------------------------------------------------------------------------


def test_gzip_protobuf_as_the_collector_sends_it(base: str) -> None:
    trace_id = os.urandom(16)
    resp = _post(base, gzip.compress(_export(trace_id).SerializeToString()), GZIP_PROTOBUF)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "application/x-protobuf"
    answer = ExportTraceServiceResponse.FromString(resp.content)
    assert not answer.HasField("partial_success")
    view = _trace(base, trace_id)
    assert view["span_count"] == 3
    span = view["spans"][0]
    assert span["trace_id"] == trace_id.hex()
    assert span["attributes"]["http.response.status_code"] == 200  # normalized on read
    assert span["resource"]["k8s.pod.name"] == "frontend-abc"


def test_plain_protobuf_and_concatenated_gzip_members(base: str) -> None:
    first, second = os.urandom(16), os.urandom(16)
    assert _post(base, _export(first).SerializeToString(), PROTOBUF).status_code == 200
    # A gzip stream may hold several members; together they are one body.
    body = _export(second, spans=2).SerializeToString()
    members = gzip.compress(body[:10]) + gzip.compress(body[10:])
    assert _post(base, members, GZIP_PROTOBUF).status_code == 200
    assert _trace(base, first)["span_count"] == 3
    assert _trace(base, second)["span_count"] == 2


@pytest.mark.parametrize("compressed", [False, True])
def test_otlp_json_with_hex_ids(base: str, compressed: bool) -> None:
    trace_id = os.urandom(16)
    body = _otlp_json(_export(trace_id))
    headers = {**JSON, "Content-Encoding": "gzip"} if compressed else JSON
    resp = _post(base, gzip.compress(body) if compressed else body, headers)
    assert resp.status_code == 200, resp.text
    assert resp.headers["Content-Type"] == "application/json"
    assert resp.json() == {}
    view = _trace(base, trace_id)
    assert view["span_count"] == 3 and view["spans"][0]["trace_id"] == trace_id.hex()


def test_partial_success_names_what_was_rejected(base: str) -> None:
    good = os.urandom(16)
    request = _export(good, spans=2)
    bad = request.resource_spans[0].scope_spans[0].spans.add(trace_id=b"\x01" * 8, name="short")
    bad.span_id = os.urandom(8)
    resp = _post(base, request.SerializeToString(), PROTOBUF)
    assert resp.status_code == 200
    answer = ExportTraceServiceResponse.FromString(resp.content)
    assert answer.partial_success.rejected_spans == 1
    assert "trace id that is not 16 bytes" in answer.partial_success.error_message
    assert _trace(base, good)["span_count"] == 2


# -- refusals -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "headers", "status", "words"),
    [
        (b"\xff\x00garbage", PROTOBUF, 400, "not an OTLP trace export (protobuf)"),
        (b"\xff\x00garbage", GZIP_PROTOBUF, 400, "not valid gzip"),
        (gzip.compress(b"x" * 1000)[:-12], GZIP_PROTOBUF, 400, "truncated"),
        (b"{not json", JSON, 400, "not an OTLP trace export (JSON)"),
        (
            b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}',
            JSON,
            400,
            "traceId 'zz' is not hex",
        ),
        (b"[]", JSON, 400, "must be an object"),
        (b"x", {**PROTOBUF, "Content-Encoding": "br"}, 415, "unsupported Content-Encoding 'br'"),
        (b"x", {"Content-Type": "text/plain"}, 415, "unsupported Content-Type 'text/plain'"),
    ],
)
def test_bad_bodies_get_a_clear_status_and_the_server_keeps_serving(
    base: str, body: bytes, headers: dict[str, str], status: int, words: str
) -> None:
    resp = _post(base, body, headers)
    assert resp.status_code == status
    if resp.headers["Content-Type"] == "application/json":
        message = resp.json()["message"]
    else:
        message = Status.FromString(resp.content).message
    assert words in message
    trace_id = os.urandom(16)
    assert _post(base, _export(trace_id).SerializeToString(), PROTOBUF).status_code == 200
    assert _trace(base, trace_id)["span_count"] == 3


def test_gzip_bomb_gets_413_without_being_inflated(base: str) -> None:
    bomb = gzip.compress(b"\0" * (MAX_BODY_BYTES + 2**20), compresslevel=9)
    assert len(bomb) < 100_000
    resp = _post(base, bomb, GZIP_PROTOBUF)
    assert resp.status_code == 413
    assert "export too large" in Status.FromString(resp.content).message
    trace_id = os.urandom(16)
    assert _post(base, _export(trace_id).SerializeToString(), PROTOBUF).status_code == 200


# -- the byte bound -------------------------------------------------------------------------


def test_store_stays_within_its_budget_and_evicts_the_oldest_first() -> None:
    store = TraceStore(budget_bytes=256 * 2**10)
    sent = [os.urandom(16) for _ in range(200)]
    for trace_id in sent:
        store.add_export(_export(trace_id, spans=5))
        assert store.stats()["bytes"] <= store.budget_bytes
    stats = store.stats()
    assert 0 < stats["evicted_traces"] < len(sent)
    held = {bytes.fromhex(t) for t in store.find_prefix("")}
    # exactly the newest traces are held, the oldest went first
    assert held == set(sent[stats["evicted_traces"] :])
    assert stats["traces"] + stats["evicted_traces"] == len(sent)
    assert stats["spans"] == 5 * stats["traces"]
    assert all(store.was_evicted(t.hex()) for t in sent[: stats["evicted_traces"]])
    assert not store.was_evicted(sent[-1].hex())


def test_a_trace_still_receiving_spans_is_not_the_next_to_go() -> None:
    store = TraceStore(budget_bytes=128 * 2**10)
    first = os.urandom(16)
    store.add_export(_export(first, spans=2))
    for _ in range(60):
        store.add_export(_export(os.urandom(16), spans=5))
        store.add_export(_export(first, spans=1))  # late spans keep it recent
    assert store.stats()["evicted_traces"] > 0
    assert len(store.get(first.hex())) > 2


def test_accounted_bytes_track_what_python_really_holds() -> None:
    exports = [_export(os.urandom(16), spans=25).SerializeToString() for _ in range(200)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store = TraceStore(budget_bytes=2**30)
        for body in exports:
            store.add_export(ExportTraceServiceRequest.FromString(body))
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    accounted = store.stats()["bytes"]
    assert 0.8 < accounted / used < 1.25, (accounted, used)


def test_the_bound_holds_past_the_intern_table_whatever_resources_arrive() -> None:
    """Once the intern table is full, a new resource is kept with its trace: a sender that
    puts a big, unique resource on every export must still be held to the budget."""
    budget = 16 * 2**20
    small = [_export(os.urandom(16), spans=1, pod=f"pod-{i}") for i in range(RESOURCE_LIMIT)]
    big = []
    for i in range(400):
        export = _export(os.urandom(16), spans=1, pod=f"{i}-" + "x" * 50_000)
        big.append(export.SerializeToString())
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        store = TraceStore(budget_bytes=budget)
        for export in small:
            store.add_export(export)
        del small
        ratios = []
        for n, body in enumerate(big, 1):
            store.add_export(ExportTraceServiceRequest.FromString(body))
            assert store.stats()["bytes"] <= budget
            if n in (100, len(big)):  # while the table is full; after evictions freed it
                used = tracemalloc.get_traced_memory()[0] - before
                ratios.append((store.stats()["bytes"] / used, store.stats()["evicted_traces"]))
    finally:
        tracemalloc.stop()
    (full_table, evicted_then), (at_end, evicted) = ratios
    assert evicted_then == 0 and evicted > 0, ratios
    assert 0.8 < full_table < 1.25 and 0.8 < at_end < 1.25, ratios


def test_the_store_reaches_back_to_the_earliest_start_it_holds() -> None:
    """Not the start of the trace updated longest ago: a trace that began earlier but got
    its spans later is held too, and older."""
    store = TraceStore(budget_bytes=2**20)
    store.add_export(_export(os.urandom(16), spans=1))
    start = store.stats()["oldest_start_ns"]
    export = _export(os.urandom(16), spans=1)
    export.resource_spans[0].scope_spans[0].spans[0].start_time_unix_nano = start - 60 * 10**9
    store.add_export(export)  # the most recently updated trace began a minute earlier
    assert store.stats()["oldest_start_ns"] == start - 60 * 10**9


def test_evicted_trace_says_so_and_how_far_back_the_store_reaches() -> None:
    store = TraceStore(budget_bytes=96 * 2**10)
    for server_base in _serve(store):
        first = os.urandom(16)
        _post(server_base, _export(first).SerializeToString(), PROTOBUF)
        while not store.was_evicted(first.hex()):
            _post(server_base, _export(os.urandom(16), spans=5).SerializeToString(), PROTOBUF)
        for asked in (first.hex(), first.hex()[:10]):
            resp = requests.get(f"{server_base}/api/v1/traces/{asked}", timeout=10)
            assert resp.status_code == 404
            error = resp.json()["error"]
            assert f"trace {asked} was evicted from the store (budget 96 KiB;" in error
            assert "the store now reaches back to 2023-11-14" in error
        never = requests.get(f"{server_base}/api/v1/traces/{'ab' * 16}", timeout=10).json()
        assert "not found" in never["error"] and "evicted" not in never["error"]
        page = requests.get(f"{server_base}/", timeout=10).text
        assert "it reaches back to" in page and "96 KiB budget" in page
        assert "older traces were evicted" in page
        assert "HOPSCOPE_TRACE_STORE_BUDGET" in page  # what sets it in the compose stack


def test_store_metrics_on_the_control_plane_metrics_endpoint() -> None:
    store = TraceStore(budget_bytes=64 * 2**10)
    for server_base in _serve(store):
        for _ in range(100):
            _post(server_base, _export(os.urandom(16), spans=4).SerializeToString(), PROTOBUF)
        bad = _export(os.urandom(16), spans=1)
        bad.resource_spans[0].scope_spans[0].spans[0].trace_id = b""
        _post(server_base, bad.SerializeToString(), PROTOBUF)
        text = requests.get(f"{server_base}/metrics", timeout=10).text
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }
        stats = store.stats()
        assert samples[("hopscope_tracestore_traces", ())] == stats["traces"]
        assert samples[("hopscope_tracestore_spans", ())] == stats["spans"]
        assert samples[("hopscope_tracestore_bytes", ())] == stats["bytes"]
        assert samples[("hopscope_tracestore_budget_bytes", ())] == 64 * 2**10
        assert samples[("hopscope_tracestore_evicted_traces_total", ())] == stats["evicted_traces"]
        assert samples[("hopscope_tracestore_evicted_traces_total", ())] > 0
        assert samples[("hopscope_tracestore_spans_received_total", ())] == 100 * 4 + 1
        rejected = ("hopscope_tracestore_spans_rejected_total", (("reason", "invalid_id"),))
        assert samples[rejected] == 1
        assert samples[("hopscope_otlp_spans_received_total", ())] == 100 * 4


# -- the budget setting ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [("256MiB", 256 * 2**20), ("64MB", 64_000_000), ("1048576", 2**20), ("1.5 GiB", 3 * 2**29)],
)
def test_budget_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size


def test_up_refuses_a_budget_that_is_not_a_size() -> None:
    from mesh.cli import cli

    result = CliRunner().invoke(cli, ["up", "--trace-store-budget", "lots"])
    assert result.exit_code == 2
    assert "'lots' is not a size" in result.output
    result = CliRunner().invoke(cli, ["up"], env={"HOPSCOPE_TRACE_STORE_BUDGET": "0"})
    assert result.exit_code == 2 and "HOPSCOPE_TRACE_STORE_BUDGET" in result.output


def test_budget_floor_and_the_env_var_named_in_its_errors(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mesh.cli import cli
    from mesh.controlplane.__main__ import parse_args

    result = CliRunner().invoke(cli, ["up", "--trace-store-budget", "1"])
    assert result.exit_code == 2 and "'1' is too small for the trace store" in result.output
    # the compose path sets the variable, not the flag: the error says so
    base_argv = ["-f", "manifests", "--state-dir", "state"]
    for value, words in (("bad", "'bad' is not a size"), ("512KiB", "too small")):
        monkeypatch.setenv("HOPSCOPE_TRACE_STORE_BUDGET", value)
        with pytest.raises(SystemExit) as exit_:
            parse_args(base_argv)
        assert exit_.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("python -m mesh.controlplane: error: HOPSCOPE_TRACE_STORE_BUDGET:")
        assert words in error
    # the flag wins over the variable
    assert parse_args([*base_argv, "--trace-store-budget", "2MiB"]).trace_store_budget == 2**21
    monkeypatch.setenv("HOPSCOPE_TRACE_STORE_BUDGET", "48MiB")
    assert parse_args(base_argv).trace_store_budget == 48 * 2**20


@pytest.mark.parametrize(
    ("options", "env", "budget"),
    [
        (["--trace-store-budget", "64MiB"], {}, 64 * 2**20),
        ([], {"HOPSCOPE_TRACE_STORE_BUDGET": "48MiB"}, 48 * 2**20),
    ],
)
def test_a_budget_given_to_up_detached_reaches_the_running_store(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    options: list[str],
    env: dict[str, str],
    budget: int,
) -> None:
    """``up -d`` → the control plane's command line → its store, and its status."""
    from prometheus_client import CollectorRegistry

    from mesh.cli.cluster_cmds import DEFAULT_MANIFESTS, controlplane_argv, up
    from mesh.controlplane.__main__ import parse_args
    from mesh.controlplane.server import ControlPlane

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    params = up.make_context("up", ["-d", *options]).params
    argv = controlplane_argv([DEFAULT_MANIFESTS], tmp_path, params["budget"])
    monkeypatch.delenv("HOPSCOPE_TRACE_STORE_BUDGET", raising=False)  # the child's env aside
    assert argv[1:3] == ["-m", "mesh.controlplane"]
    args = parse_args(argv[3:])
    plane = ControlPlane(
        args.filename,
        args.state_dir,
        args.schema_checked,
        trace_store_budget=args.trace_store_budget,
        registry=CollectorRegistry(),
    )
    assert plane.status()["trace_store"]["budget_bytes"] == budget


def _status(store: TraceStore) -> dict[str, Any]:
    return {
        "ready": True,
        "summary": "10/10 pods ready",
        "components": [],
        "api": "http://127.10.0.254:8001",
        "ingress": "http://127.10.0.1:80",
        "pod_errors": {},
        "trace_store": store.stats(),
    }


def test_status_and_trace_commands_tell_of_the_store_and_an_evicted_trace(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The CLI against a real served store: ``status`` shows its size, budget and reach;
    ``trace`` of an evicted id (or its prefix) says evicted, not "not found"."""
    import time

    from mesh.apiclient import APIClient
    from mesh.cli import cli

    store = TraceStore(budget_bytes=96 * 2**10)
    first = os.urandom(16)
    store.add_export(_export(first))
    while not store.was_evicted(first.hex()):
        store.add_export(_export(os.urandom(16), spans=5))
    app = create_app(_NoCluster(), store, status=lambda: _status(store))
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_port}"
    monkeypatch.setattr(APIClient.__init__, "__defaults__", (url, 10.0, None))
    try:
        runner = CliRunner()
        stats = store.stats()
        reach = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stats["oldest_start_ns"] / 1e9))
        result = runner.invoke(cli, ["status"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        line = next(li for li in result.output.splitlines() if li.startswith("trace store:"))
        assert line == (
            f"trace store: {stats['traces']:,} traces ({stats['spans']:,} spans), "
            f"{format_size(stats['bytes'])} of 96 KiB; reaches back to {reach} "
            f"({stats['evicted_traces']:,} older traces evicted)"
        )
        for asked in (first.hex(), first.hex()[:8]):
            result = runner.invoke(cli, ["trace", asked], env={"COLUMNS": "200"})
            assert result.exit_code == 1
            assert result.output.strip() == (
                f"Error: trace {asked} was evicted from the store "
                f"(budget 96 KiB; the store now reaches back to {reach})"
            )
        never = runner.invoke(cli, ["trace", "ab" * 16])
        assert never.exit_code == 1 and "not found" in never.output
        assert "evicted" not in never.output
    finally:
        server.shutdown()

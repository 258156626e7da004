"""Trace-store benchmark: what a stored span costs in memory, and what ingesting it costs in CPU.

Spans are the cluster's own: the sample cluster is started, driven with the default traffic
mix, and a few dozen complete traces are read back (attributes, resources, events). They are
turned back into OTLP export bodies grouped per resource, the way the SDK's batch processor
and Envoy send them, and replayed with fresh trace ids:

1. **in process** — a store is filled through the receiver's decode path; ``tracemalloc``
   measures what each held span really costs, next to what the store itself accounts.
2. **receiver process** — a child process serves the control plane's receiver + store
   (``--receiver-budget``) on real sockets, on both of its listeners: the OTLP receiver's
   own (``mesh.otlp.server``, what the cluster's components send to) and the API app's
   ``/v1/traces`` (werkzeug + Flask). For each listener, protobuf, gzip protobuf and JSON
   bodies are posted to ``/v1/traces`` and the child's CPU time (from /proc) per span is
   reported, for the replayed bodies and for small bodies of 8 spans (the size of a busy
   Envoy's 200 ms flush); then the store is filled past its budget and the child's RSS read.
3. **control plane** — while the cluster still runs, its own store (default budget, or
   ``--budget``) is filled the same way and the control plane's steady-state RSS read.

Usage: .venv/bin/python bench/store.py [--budget 256MiB] [--receiver-budget 64MiB] [--json]
Run it under the cluster lock. The last line printed is one JSON object; a failed measurement
is named under ``errors`` and the exit status is 1.
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: E402
    ExportTraceServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import KeyValue  # noqa: E402
from opentelemetry.proto.trace.v1.trace_pb2 import ResourceSpans, Span  # noqa: E402

from mesh import addresses  # noqa: E402
from mesh.tracestore.otlp import key_values  # noqa: E402

API = f"http://{addresses.CONTROL_PLANE_IP}:{addresses.CONTROL_PLANE_PORT}"
PROTOBUF_TYPE = "application/x-protobuf"
BATCH_SPANS = 256
"""Spans per export body: the batch size the cluster's SDKs use (``telemetry/tracing.py``)."""

GOALS = {
    "bytes_per_span_resident": 1024,
    "bytes_per_span_rss": 1024,
    "ingest_cpu_us_per_span": 20.0,
}
"""Per span: what Python holds (tracemalloc) and what the receiver process grows by (RSS);
both must stay within 1 KiB."""
KINDS = {"unspecified": 0, "internal": 1, "server": 2, "client": 3, "producer": 4, "consumer": 5}
STATUS = {"unset": 0, "ok": 1, "error": 2}
# What the receiver adds on decode (semantic-convention twins, resource copies): dropped
# again so the replayed spans carry what the senders really sent.
ADDED_TWINS = {
    "network.peer.address": "peer.address",
    "http.request.method": "http.method",
    "network.protocol.version": "http.protocol",
    "hopscope.upstream.address": "upstream_address",
    "http.response.status_code": "http.status_code",
}
RESOURCE_COPIES = ("k8s.pod.name", "k8s.namespace.name", "k8s.node.name", "service.name")


class BenchError(RuntimeError):
    """A measurement could not be made; the message says which and why."""


# -- turning captured traces back into OTLP bodies ------------------------------------------


def _kvs(attrs: dict[str, Any]) -> list[KeyValue]:
    return key_values(attrs)


def _wire_attributes(span: dict[str, Any]) -> dict[str, Any]:
    attrs = dict(span["attributes"])
    for new, old in ADDED_TWINS.items():
        if new in attrs and old in attrs and str(attrs[new]) == str(attrs[old]):
            del attrs[new]
    for key in RESOURCE_COPIES:
        if key in attrs and attrs[key] == span["resource"].get(key):
            del attrs[key]
    return attrs


def _span(span: dict[str, Any]) -> Span:
    out = Span(
        trace_id=bytes.fromhex(span["trace_id"]),
        span_id=bytes.fromhex(span["span_id"]),
        parent_span_id=bytes.fromhex(span["parent_span_id"] or ""),
        name=span["name"],
        kind=KINDS.get(span["kind"], 0),  # type: ignore[arg-type]
        start_time_unix_nano=span["start_ns"],
        end_time_unix_nano=span["end_ns"],
        attributes=_kvs(_wire_attributes(span)),
    )
    out.status.code = STATUS.get(span["status"], 0)  # type: ignore[assignment]
    out.status.message = span["status_message"]
    for event in span["events"]:
        extra = {k: v for k, v in event.items() if k not in ("name", "time_ns")}
        out.events.add(name=event["name"], time_unix_nano=event["time_ns"], attributes=_kvs(extra))
    return out


class Replay:
    """Captured traces as OTLP export bodies; each round gives them fresh trace ids."""

    def __init__(self, traces: list[list[dict[str, Any]]]) -> None:
        by_resource: dict[str, list[tuple[int, dict[str, Any]]]] = {}
        for index, spans in enumerate(traces):
            for span in spans:
                key = json.dumps(span["resource"], sort_keys=True)
                by_resource.setdefault(key, []).append((index, span))
        self.traces = len(traces)
        self.spans = sum(len(t) for t in traces)
        self.bodies: list[tuple[ExportTraceServiceRequest, list[tuple[Span, int]]]] = []
        for key, items in by_resource.items():
            for start in range(0, len(items), BATCH_SPANS):
                request = ExportTraceServiceRequest()
                rs: ResourceSpans = request.resource_spans.add()
                rs.resource.attributes.extend(_kvs(json.loads(key)))
                scope = rs.scope_spans.add()
                scope.scope.name = "hopscope"
                refs = []
                for index, span in items[start : start + BATCH_SPANS]:
                    scope.spans.append(_span(span))
                    refs.append((scope.spans[-1], index))
                self.bodies.append((request, refs))
        sizes = [len(s.SerializeToString()) for _, refs in self.bodies for s, _ in refs]
        self.wire_bytes_per_span = sum(sizes) / len(sizes)

    def rounds(self) -> Iterator[list[tuple[bytes, int]]]:
        """Endless rounds: every captured trace once, as (protobuf body, span count) pairs."""
        while True:
            ids = [random.randbytes(16) for _ in range(self.traces)]
            out = []
            for request, refs in self.bodies:
                for span, index in refs:
                    span.trace_id = ids[index]
                out.append((request.SerializeToString(), len(refs)))
            yield out


def to_otlp_json(body: bytes) -> bytes:
    """An OTLP/JSON body as the spec writes it: lowerCamelCase keys, hex trace and span ids."""
    from google.protobuf import json_format

    request = ExportTraceServiceRequest.FromString(body)
    doc = json_format.MessageToDict(request)
    for rs in doc.get("resourceSpans", []):
        for ss in rs.get("scopeSpans", []):
            for span in ss.get("spans", []):
                for key in ("traceId", "spanId", "parentSpanId"):
                    if key in span:
                        span[key] = bytes.fromhex(_b64_to_hex(span[key])).hex()
    return json.dumps(doc).encode()


def _b64_to_hex(value: str) -> str:
    import base64

    return base64.b64decode(value).hex()


# -- capture from the running cluster -------------------------------------------------------


def capture(cli: list[str], env: dict[str, str], want: int) -> list[list[dict[str, Any]]]:
    proc = subprocess.run(
        [*cli, "traffic", "--rps", "15", "--duration", "4", "--json", "--seed", "7"],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if proc.returncode != 0:
        raise BenchError(f"hopscope traffic failed: {proc.stderr.strip()[-500:]}")
    time.sleep(3)  # the SDKs' batch processors flush
    recent = requests.get(f"{API}/api/v1/traces", params={"limit": want}, timeout=10).json()
    traces = []
    for row in recent:
        view = requests.get(f"{API}/api/v1/traces/{row['trace_id']}", timeout=10).json()
        traces.append(view["spans"])
    if len(traces) < want // 2:
        raise BenchError(f"captured only {len(traces)} traces (wanted {want})")
    return traces


def _store_stats(base: str) -> dict[str, Any]:
    status = requests.get(f"{base}/api/v1/status", timeout=10).json()
    if "trace_store" not in status:
        raise BenchError(f"{base}/api/v1/status has no trace_store key")
    return status["trace_store"]  # type: ignore[no-any-return]


def fill(
    base: str,
    replay: Replay,
    until: Callable[[dict[str, Any], int], bool],
    stats_from: str | None = None,
) -> int:
    """Post replay rounds to ``base`` until ``until(stats, spans_sent)`` (stats read from
    ``stats_from``, by default ``base``); returns spans sent."""
    sent = 0
    session = requests.Session()
    headers = {"Content-Type": "application/x-protobuf"}
    for round_ in replay.rounds():
        for body, count in round_:
            resp = session.post(f"{base}/v1/traces", data=body, headers=headers, timeout=30)
            if resp.status_code != 200:
                raise BenchError(f"/v1/traces answered {resp.status_code}: {resp.text[:200]}")
            sent += count
        if until(_store_stats(stats_from or base), sent):
            return sent
    raise AssertionError("unreachable")


def _full(stats: dict[str, Any], _sent: int) -> bool:
    """Steady state: the store has evicted a quarter of what it holds."""
    return bool(stats["evicted_traces"] > max(1, stats["traces"] // 4))


def _tree_rss(pid: int) -> float:
    return float(psutil.Process(pid).memory_info().rss)


# -- the receiver in a child process --------------------------------------------------------


def serve(budget: str) -> None:
    """Child process: the control plane's receiver + store: the API app and the OTLP
    receiver's own listener, each on an ephemeral port (printed: ``api_port otlp_port``)."""
    import logging

    from prometheus_client import CollectorRegistry
    from werkzeug.serving import make_server

    from mesh.controlplane.api import create_app
    from mesh.otlp.pipeline import TelemetryPipeline
    from mesh.tracestore.store import TraceStore, parse_size

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # as in the control plane

    class _NoCluster:
        lock = threading.Lock()

        def snapshot(self) -> dict[str, Any]:
            return {"resource_version": 0}

    store = TraceStore(parse_size(budget))

    def status() -> dict[str, Any]:
        return {"trace_store": store.stats()}

    registry = CollectorRegistry()
    pipeline = TelemetryPipeline(store, registry, host="127.0.0.1", port=0)
    pipeline.start()
    app = create_app(_NoCluster(), store, status=status, registry=registry, pipeline=pipeline)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    print(server.server_port, pipeline.server.port, flush=True)
    server.serve_forever()


def _cpu(proc: psutil.Process) -> float:
    t = proc.cpu_times()
    return float(t.user + t.system)


def _receiver_child(budget: str) -> tuple[subprocess.Popen[str], int, int]:
    child = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--receiver-budget", budget],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    api_port, otlp_port = map(int, child.stdout.readline().split())
    time.sleep(0.5)
    return child, api_port, otlp_port


def _stop(child: subprocess.Popen[str]) -> None:
    child.terminate()
    child.wait(timeout=10)


def receiver_process(replay: Replay, budget: str, spans_per_encoding: int) -> dict[str, Any]:
    """CPU per span on both listeners (one child), then resident memory per held span in a
    fresh child filled through the OTLP listener, as the cluster's components send: the
    CPU trials' own leftovers (JSON decoding, werkzeug threads) are not a span's cost."""
    child, api_port, otlp_port = _receiver_child(budget)
    try:
        proc = psutil.Process(child.pid)
        out: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for listener, port in (("otlp_listener", otlp_port), ("api", api_port)):
            out[listener] = _ingest_cpu(
                proc, f"http://127.0.0.1:{port}", replay, spans_per_encoding, errors
            )
        out["spans_per_body"] = round(replay.spans / len(replay.bodies), 1)
    finally:
        _stop(child)
    child, api_port, otlp_port = _receiver_child(budget)
    try:
        out["rss_empty_mib"] = round(_tree_rss(child.pid) / 2**20, 1)
        sent = fill(
            f"http://127.0.0.1:{otlp_port}",
            replay,
            _full,
            stats_from=f"http://127.0.0.1:{api_port}",
        )
        time.sleep(1)
        stats = _store_stats(f"http://127.0.0.1:{api_port}")
        rss_full = _tree_rss(child.pid)
        spans_held = stats["spans"]
        out.update(
            {
                "budget": budget,
                "spans_sent_to_fill": sent,
                "store": stats,
                "rss_full_mib": round(rss_full / 2**20, 1),
                "bytes_per_span_rss": round(
                    (rss_full - out["rss_empty_mib"] * 2**20) / spans_held, 1
                ),
            }
        )
        if errors:
            out["errors"] = errors
        return out
    finally:
        _stop(child)


def _small_bodies(replay: Replay, per_body: int, spans_wanted: int) -> list[tuple[bytes, int]]:
    """Replayed spans re-cut into bodies of ``per_body`` spans (one resource each)."""
    out: list[tuple[bytes, int]] = []
    for round_ in replay.rounds():
        for body, _n in round_:
            request = ExportTraceServiceRequest()
            request.ParseFromString(body)
            for rs in request.resource_spans:
                spans = [s for ss in rs.scope_spans for s in ss.spans]
                for i in range(0, len(spans), per_body):
                    small = ExportTraceServiceRequest()
                    part = small.resource_spans.add()
                    part.resource.CopyFrom(rs.resource)
                    part.scope_spans.add().spans.extend(spans[i : i + per_body])
                    out.append((small.SerializeToString(), len(spans[i : i + per_body])))
        if sum(n for _, n in out) >= spans_wanted:
            return out
    return out


def _ingest_cpu(
    proc: psutil.Process, base: str, replay: Replay, spans_per_encoding: int, errors: dict[str, str]
) -> dict[str, Any]:
    """Receiver CPU per span on one listener, per encoding and for small bodies."""
    out: dict[str, Any] = {}
    session = requests.Session()
    encodings: dict[str, tuple[str, Callable[[bytes], bytes], str]] = {
        "protobuf": ("application/x-protobuf", lambda b: b, ""),
        "gzip_protobuf": ("application/x-protobuf", gzip.compress, "gzip"),
        "json": ("application/json", to_otlp_json, ""),
        "gzip_json": ("application/json", lambda b: gzip.compress(to_otlp_json(b)), "gzip"),
    }
    cases = {
        name: ([(encode(b), n) for b, n in _first_bodies(replay, spans_per_encoding)], ctype, enc)
        for name, (ctype, encode, enc) in encodings.items()
    }
    cases["protobuf_8_spans_per_body"] = (
        _small_bodies(replay, 8, spans_per_encoding // 4),
        PROTOBUF_TYPE,
        "",
    )
    for name, (bodies, ctype, encoding) in cases.items():
        headers = {"Content-Type": ctype}
        if encoding:
            headers["Content-Encoding"] = encoding
        before = _cpu(proc)
        spans = 0
        for body, count in bodies:
            resp = session.post(f"{base}/v1/traces", data=body, headers=headers, timeout=30)
            if resp.status_code != 200:
                errors[f"{base}.{name}"] = f"{resp.status_code}: {resp.text[:160]!r}"
                break
            spans += count
        else:
            out[f"ingest_cpu_us_per_span_{name}"] = round((_cpu(proc) - before) / spans * 1e6, 2)
    empty = ExportTraceServiceRequest().SerializeToString()
    before = _cpu(proc)
    for _ in range(200):
        session.post(f"{base}/v1/traces", data=empty, headers={"Content-Type": PROTOBUF_TYPE})
    out["cpu_ms_per_request_without_spans"] = round((_cpu(proc) - before) / 200 * 1e3, 3)
    return out


def _first_bodies(replay: Replay, spans_wanted: int) -> list[tuple[bytes, int]]:
    bodies: list[tuple[bytes, int]] = []
    for round_ in replay.rounds():
        bodies += round_
        if sum(n for _, n in bodies) >= spans_wanted:
            break
    return bodies


# -- in process, with tracemalloc -----------------------------------------------------------


def in_process(replay: Replay, spans_wanted: int) -> dict[str, Any]:
    from mesh.tracestore.receiver import PROTOBUF, receive
    from mesh.tracestore.store import TraceStore

    bodies: list[tuple[bytes, int]] = []
    for round_ in replay.rounds():
        bodies += round_
        if sum(n for _, n in bodies) >= spans_wanted:
            break

    def fill_store() -> TraceStore:
        store = TraceStore(budget_bytes=2**40)
        for body, _ in bodies:
            answer = receive(store, body, PROTOBUF, "")
            if answer.status != 200:
                raise BenchError(f"the receiver refused a replayed body: {answer.body[:200]!r}")
        return store

    cpu0 = time.process_time()
    fill_store()  # CPU without tracemalloc, which slows every allocation
    cpu = time.process_time() - cpu0
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    store = fill_store()
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    stats = store.stats()
    spans = stats["spans"]
    if spans != sum(n for _, n in bodies):
        raise BenchError(f"the store holds {spans} spans of {sum(n for _, n in bodies)} sent")
    read0 = time.process_time()
    for trace_id, _ in store.recent(50):
        store.get(trace_id)
    read = time.process_time() - read0
    return {
        "spans_held": spans,
        "bytes_per_span_tracemalloc": round(used / spans, 1),
        "bytes_per_span_accounted": round(stats["bytes"] / spans, 1),
        "accounted_over_measured": round(stats["bytes"] / used, 3),
        "ingest_cpu_us_per_span_decode_and_store": round(cpu / spans * 1e6, 2),
        "read_cpu_ms_50_traces": round(read * 1e3, 1),
    }


# -- the control plane of a running cluster --------------------------------------------------


def control_plane(replay: Replay) -> dict[str, Any]:
    status = requests.get(f"{API}/api/v1/status", timeout=10).json()
    pid = status["pid"]
    proc = psutil.Process(pid)
    rss_before = _tree_rss(pid)
    t0, cpu0 = time.monotonic(), _cpu(proc)
    sent = fill(API, replay, _full)
    took, cpu = time.monotonic() - t0, _cpu(proc) - cpu0
    time.sleep(2)
    samples = []
    for _ in range(3):  # steady state: keep traffic going and sample
        fill(API, replay, lambda _s, n: n >= replay.spans)
        samples.append(_tree_rss(pid))
    return {
        "rss_before_fill_mib": round(rss_before / 2**20, 1),
        "rss_full_mib": round(max(samples) / 2**20, 1),
        "spans_sent_to_fill": sent,
        "fill_seconds": round(took, 1),
        "cpu_us_per_span_during_fill": round(cpu / sent * 1e6, 2),
        "store": _store_stats(API),
    }


def _port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex((host, port)) != 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budget", default="", help="control plane's store budget (default: its own)"
    )
    parser.add_argument("--receiver-budget", default="64MiB")
    parser.add_argument("--traces", type=int, default=40, help="traces to capture")
    parser.add_argument("--spans", type=int, default=30000, help="spans per measurement")
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    args = parser.parse_args()
    if args.serve:
        serve(args.receiver_budget)
        return 0
    result: dict[str, Any] = {"benchmark": "store", "goals": GOALS, "cpus": os.cpu_count()}
    errors: dict[str, str] = {}
    if not _port_free(addresses.CONTROL_PLANE_IP, addresses.CONTROL_PLANE_PORT):
        errors["cluster"] = "a cluster is already running; stop it (`hopscope down`) first"
        print(json.dumps({**result, "errors": errors}))
        return 1
    replay = None
    with tempfile.TemporaryDirectory(prefix="hopscope-bench-") as home:
        env = {**os.environ, "HOPSCOPE_HOME": home}
        if args.budget:
            env["HOPSCOPE_TRACE_STORE_BUDGET"] = args.budget
        cli = [sys.executable, "-m", "mesh.cli"]
        up = subprocess.run([*cli, "up", "--detach"], env=env, cwd=ROOT, capture_output=True)
        try:
            if up.returncode != 0:
                raise BenchError(f"hopscope up failed: {up.stderr.decode()[-500:]}")
            traces = capture(cli, env, args.traces)
            replay = Replay(traces)
            result["captured"] = {
                "traces": replay.traces,
                "spans": replay.spans,
                "spans_per_trace": round(replay.spans / replay.traces, 1),
                "wire_bytes_per_span": round(replay.wire_bytes_per_span, 1),
            }
            result["control_plane"] = control_plane(replay)
        except (BenchError, requests.RequestException, KeyError) as exc:
            errors["cluster"] = str(exc)
        finally:
            subprocess.run([*cli, "down"], env=env, cwd=ROOT, capture_output=True, timeout=90)
    if replay is not None:
        for name, measure in (
            ("in_process", lambda: in_process(replay, args.spans)),
            (
                "receiver_process",
                lambda: receiver_process(replay, args.receiver_budget, args.spans),
            ),
        ):
            try:
                result[name] = measure()
            except (BenchError, requests.RequestException, OSError, ValueError) as exc:
                errors[name] = str(exc)
            for encoding, message in result.get(name, {}).pop("errors", {}).items():
                errors[f"{name}.{encoding}"] = message
    summary = {
        "bytes_per_span_resident": result.get("in_process", {}).get("bytes_per_span_tracemalloc"),
        "bytes_per_span_rss": result.get("receiver_process", {}).get("bytes_per_span_rss"),
        "ingest_cpu_us_per_span": result.get("receiver_process", {})
        .get("otlp_listener", {})
        .get("ingest_cpu_us_per_span_protobuf"),
        "ingest_cpu_us_per_span_8_per_body": result.get("receiver_process", {})
        .get("otlp_listener", {})
        .get("ingest_cpu_us_per_span_protobuf_8_spans_per_body"),
        "ingest_cpu_us_per_span_api_port": result.get("receiver_process", {})
        .get("api", {})
        .get("ingest_cpu_us_per_span_protobuf"),
        "control_plane_rss_full_mib": result.get("control_plane", {}).get("rss_full_mib"),
    }
    result["summary"] = summary
    if errors:
        result["errors"] = errors
    else:
        result["meets_goals"] = all(
            summary[name] is not None and summary[name] <= goal for name, goal in GOALS.items()
        )
    print(json.dumps(result))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

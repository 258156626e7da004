"""What one sidecar pass costs Envoy, and which part of its configuration costs what.

A request crosses Envoy about ten times in the sample cluster (the ingress, then each
caller's outbound and each callee's inbound listener), which makes Envoy the largest single
share of the cluster's CPU per request (``bench/e2e.py``). This bench takes the HTTP
connection manager hopscope renders for a sidecar's outbound listener
(:func:`mesh.envoy.common.http_connection_manager`: tracing with the hop's span tags, the
JSON access log, a request id) in front of a backend Envoy answering ``200 ok``, drives it
with wrk over kept-alive connections, and reads the subject Envoy's CPU time from /proc:

* ``as_rendered``      — the sidecar as hopscope configures it: a new upstream connection
  per request (``max_requests_per_connection: 1``, so kube-proxy balances every request,
  see "Connection reuse is part of the lesson" in ``docs/design.md``);
* ``upstream_keep_alive`` — the same, upstream connections reused;
* ``no_tracing``       — as rendered, without the tracer;
* ``no_access_log``    — as rendered, without the access log.

Each variant runs ``--rounds`` times, interleaved with the others (the machine's noise
spreads over all of them); the figure is the median of CPU microseconds per request. The
``share_us`` figures are what each feature adds to ``as_rendered``. This is saturation
(wrk as fast as it can): at the cluster's rates Envoy wakes up per request and each pass
costs more, but the shares hold. A wrk error, a non-2xx answer or an Envoy that dies fails
the run (``errors`` in the JSON, exit 1).

Usage: .venv/bin/python bench/envoy_pass.py [--seconds 5] [--rounds 3] [--json]
Needs wrk (Debian package ``wrk``). Listens on 127.78.0.0/24 only.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.kubeproxy import WrkError, _envoy_config, _wait_http, wrk  # noqa: E402
from mesh.envoy import envoy_binary  # noqa: E402
from mesh.envoy.common import (  # noqa: E402
    RUNTIME,
    http_connection_manager,
    http_listener,
    otlp_cluster,
    static_cluster,
)

BACKEND = ("127.78.0.10", 18080)
SUBJECT = ("127.78.0.11", 18080)
VARIANTS = ("as_rendered", "upstream_keep_alive", "no_tracing", "no_access_log")
CONNECTIONS = 4


def subject_config(variant: str) -> dict[str, Any]:
    """The subject Envoy: one outbound listener as a sidecar's, routing to the backend."""
    routes = {
        "virtual_hosts": [
            {
                "name": "all",
                "domains": ["*"],
                "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "backend"}}],
            }
        ]
    }
    tags = {"k8s.pod.name": "bench-0", "k8s.namespace.name": "bench", "k8s.node.name": "node-a"}
    hcm = http_connection_manager(
        "outbound", "sidecar-outbound", routes, "bench", f"http://{BACKEND[0]}:{BACKEND[1]}", tags
    )
    config = hcm["typed_config"]
    if variant == "no_tracing":
        del config["tracing"]
    if variant == "no_access_log":
        del config["access_log"]
    backend = static_cluster(
        "backend", *BACKEND, one_request_per_connection=variant != "upstream_keep_alive"
    )
    return {
        "admin": {"address": {"socket_address": {"address": SUBJECT[0], "port_value": 19001}}},
        "static_resources": {
            "listeners": [http_listener("outbound", *SUBJECT, "OUTBOUND", hcm)],
            # the tracer's exports go to the backend too: it answers any POST with 200
            "clusters": [backend, otlp_cluster(f"http://{BACKEND[0]}:{BACKEND[1]}")],
        },
        "layered_runtime": {"layers": [{"name": "static", "static_layer": RUNTIME}]},
    }


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Envoys:
    """The backend for the whole run and one subject at a time, started from this process
    (a long-lived parent) and stopped at the end, also after an error or Ctrl-C."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, config: dict[str, Any], listen: tuple[str, int]) -> Any:
        path = self.workdir / f"{name}.json"
        path.write_text(json.dumps(config))
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(
            [envoy_binary(), "-c", str(path), "--concurrency", "1", "--disable-hot-restart",
             "--base-id", str(len(self.procs) + 40), "--log-level", "error"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.procs.append(proc)
        _wait_http(listen)
        return proc

    def stop(self, proc: Any) -> None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                self.stop(proc)


def measure(envoys: Envoys, variant: str, seconds: float) -> dict[str, Any]:
    """One round of one variant: CPU microseconds per request of the subject Envoy."""
    proc = envoys.start(f"subject-{variant}", subject_config(variant), SUBJECT)
    try:
        wrk(SUBJECT, 1, CONNECTIONS)  # warm-up: connections, stats, the tracer's first export
        before, started = cpu_seconds(proc.pid), time.monotonic()
        result = wrk(SUBJECT, seconds, CONNECTIONS)
        used, elapsed = cpu_seconds(proc.pid) - before, time.monotonic() - started
        if proc.poll() is not None:
            raise WrkError(f"the subject Envoy exited ({proc.returncode}) during the run")
    finally:
        envoys.stop(proc)
    if result["socket_errors"] or result["non_2xx"]:
        raise WrkError(f"{variant}: {result['socket_errors']} {result['non_2xx']} non-2xx")
    requests = result["requests_per_second"] * elapsed
    return {"requests": round(requests), "cpu_us_per_request": used / requests * 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per round and variant")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print only the JSON")
    args = parser.parse_args()
    if args.seconds <= 0 or args.rounds < 1:
        parser.error("--seconds must be positive and --rounds at least 1")
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed (Debian: apt-get install wrk)")
    report: dict[str, Any] = {"benchmark": "envoy_pass", "connections": CONNECTIONS}
    errors: list[str] = []
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    workdir = Path(tempfile.mkdtemp(prefix="hopscope-envoy-pass-"))
    envoys = Envoys(workdir)
    try:
        envoys.start("backend", _envoy_config(BACKEND, 19000, None), BACKEND)
        for round_no in range(args.rounds):
            for variant in VARIANTS:
                try:
                    figure = measure(envoys, variant, args.seconds)
                except WrkError as exc:
                    errors.append(f"round {round_no + 1}, {variant}: {exc}")
                    continue
                samples[variant].append(figure["cpu_us_per_request"])
                if not args.json:
                    print(f"round {round_no + 1} {variant}: {figure}", file=sys.stderr)
    except KeyboardInterrupt:
        errors.append("interrupted")
    finally:
        envoys.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    medians = {v: round(statistics.median(s), 1) if s else None for v, s in samples.items()}
    report["cpu_us_per_request"] = medians
    rendered = medians["as_rendered"]
    report["share_us"] = {
        "new_upstream_connection": _minus(rendered, medians["upstream_keep_alive"]),
        "tracing": _minus(rendered, medians["no_tracing"]),
        "access_log": _minus(rendered, medians["no_access_log"]),
    }
    report["rounds"] = {v: [round(x, 1) for x in s] for v, s in samples.items()}
    report["errors"] = errors
    print(json.dumps(report))
    if errors or None in medians.values():
        sys.exit(1)


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else round(a - b, 1)


if __name__ == "__main__":
    main()

"""Traffic generator benchmark: what does `hopscope traffic` cost at a given rate?

Runs `hopscope traffic --rps R --duration S --json` against a fast local backend (an Envoy
answering ``200 ok`` with ``direct_response``), with the generator's client spans exported
over OTLP to a local sink that only counts them, and reports the generator's CPU use
(user + system time over wall time), the achieved rate and the latency it measured.
Goal: 500 req/s in at most one core.

Usage: .venv/bin/python bench/traffic.py [--rps 500] [--seconds 10]
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.kubeproxy import _envoy_config, _wait_http  # noqa: E402
from mesh.envoy import envoy_binary  # noqa: E402

BACKEND = ("127.0.0.1", 19180)
SINK = ("127.0.0.1", 19181)


class _Sink(BaseHTTPRequestHandler):
    exports = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length") or 0))
        type(self).exports += 1
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rps", type=float, default=500)
    parser.add_argument("--seconds", type=float, default=10)
    args = parser.parse_args()
    sink = ThreadingHTTPServer(SINK, _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "backend.json"
        config.write_text(json.dumps(_envoy_config(BACKEND, 19182, None)))
        envoy = subprocess.Popen(
            [envoy_binary(), "-c", str(config), "--concurrency", "1", "-l", "error"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            _wait_http(BACKEND)
            env = {**os.environ, "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{SINK[0]}:{SINK[1]}"}
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "mesh.cli",
                    "traffic",
                    "--json",
                    "--rps",
                    str(args.rps),
                    "--duration",
                    str(args.seconds),
                    "--target",
                    f"http://{BACKEND[0]}:{BACKEND[1]}/x",
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=args.seconds + 120,
            )
        finally:
            envoy.terminate()
            envoy.wait(timeout=10)
    if proc.returncode != 0:
        sys.exit(f"hopscope traffic failed:\n{proc.stderr[-2000:]}")
    summary = json.loads(proc.stdout)
    result = {
        "benchmark": "traffic",
        "requested_rps": args.rps,
        "achieved_rps": summary["achieved_rps"],
        "requests": summary["requests"],
        "failures": summary["failures"],
        "generator_cpu_cores": summary["generator_cpu_cores"],
        "latency_ms": summary["latency_ms"],
        "otlp_exports": _Sink.exports,
        "goals": {"generator_cpu_cores_at_500_rps": 1.0},
        "meets_goals": summary["generator_cpu_cores"] <= 1.0,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""kube-proxy emulator benchmark: throughput, latency, new connections, endpoint propagation.

One run measures every path side by side against the same backend (an Envoy answering
``200 ok`` with ``direct_response``), with wrk as the load generator:

* ``direct``                — wrk → backend
* ``envoy_tcp_proxy``       — wrk → Envoy ``tcp_proxy`` → backend
* ``kube_proxy_telemetry_off`` — wrk → emulator (connections spliced as TCP) → backend
* ``kube_proxy_telemetry_on``  — wrk → emulator (HTTP parsed, a hop span per request,
  traces sampled at ``--sample-ratio``, spans exported over OTLP) → backend

Per path: keep-alive throughput (``-c`` connections), p50/p99 latency at one connection,
and the new-connection rate (``Connection: close``). Then, unless ``--skip-propagation``,
it starts the sample cluster, lets the bench client reach catalog (the sample's policies
deny everything else: the bench adds one NetworkPolicy), marks a catalog pod unready
through the API again and again, and measures how long new connections through the
catalog ClusterIP still reach it (probing until the victim has been left alone for a
while, up to 5 s). A trial in which any probe fails, or in which new connections still
reach the victim at 5 s, counts as failed: the goal is then unmet, the errors are in the
JSON, and the bench exits non-zero.

Usage: .venv/bin/python bench/kubeproxy.py --seconds 5 [--json] [--only-propagation]
The last line printed on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mesh import addresses  # noqa: E402
from mesh.envoy import envoy_binary  # noqa: E402
from mesh.model.types import (  # noqa: E402
    ClusterState,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Service,
    ServicePort,
)

BACKEND = ("127.77.0.10", 18080)
TCP_PROXY = ("127.77.0.11", 18080)
KP_OFF = ("127.77.1.1", 18080)
KP_ON = ("127.77.1.2", 18080)
OTLP_SINK = ("127.77.0.30", 14318)
CLIENT_IP = "127.100.0.77"

PROPAGATION_ERRORS: list[str] = []
"""Requests that failed during the propagation trials (reported, not hidden)."""

GOALS = {
    "ratio_vs_envoy_tcp_proxy": 0.75,
    "added_p50_ms": 0.25,
    "new_conn_ratio": 0.5,
    "endpoint_propagation_p99_ms": 250.0,
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- processes under test ----------------------------------------------------------------


def _envoy_config(
    listen: tuple[str, int], admin_port: int, upstream: tuple[str, int] | None
) -> dict[str, Any]:
    if upstream is None:
        hcm = {
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network."
                "http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "backend",
                "route_config": {
                    "virtual_hosts": [
                        {
                            "name": "all",
                            "domains": ["*"],
                            "routes": [
                                {
                                    "match": {"prefix": "/"},
                                    "direct_response": {
                                        "status": 200,
                                        "body": {"inline_string": "ok\n"},
                                    },
                                }
                            ],
                        }
                    ]
                },
                "http_filters": [
                    {
                        "name": "envoy.filters.http.router",
                        "typed_config": {
                            "@type": "type.googleapis.com/"
                            "envoy.extensions.filters.http.router.v3.Router"
                        },
                    }
                ],
            },
        }
        filters = [hcm]
        clusters: list[dict[str, Any]] = []
    else:
        filters = [
            {
                "name": "envoy.filters.network.tcp_proxy",
                "typed_config": {
                    "@type": "type.googleapis.com/"
                    "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
                    "stat_prefix": "tcp",
                    "cluster": "backend",
                },
            }
        ]
        clusters = [
            {
                "name": "backend",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": "backend",
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {
                                    "endpoint": {
                                        "address": {
                                            "socket_address": {
                                                "address": upstream[0],
                                                "port_value": upstream[1],
                                            }
                                        }
                                    }
                                }
                            ]
                        }
                    ],
                },
            }
        ]
    return {
        "admin": {"address": {"socket_address": {"address": listen[0], "port_value": admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "main",
                    "address": {"socket_address": {"address": listen[0], "port_value": listen[1]}},
                    "filter_chains": [{"filters": filters}],
                }
            ],
            "clusters": clusters,
        },
    }


def _state_for(vip: tuple[str, int]) -> dict[str, Any]:
    endpoint = Endpoint([BACKEND[0]], True, True, False, "backend", "node-a")
    state = ClusterState(
        resource_version=1,
        services=[
            Service(
                "bench", "bench", cluster_ip=vip[0], ports=[ServicePort(vip[1], BACKEND[1], "http")]
            )
        ],
        endpoint_slices=[
            EndpointSlice(
                "bench-1", "bench", "bench", [endpoint], [EndpointPort(BACKEND[1], "http")]
            )
        ],
    )
    return state.to_dict()


class _Sink(BaseHTTPRequestHandler):
    """Accepts OTLP exports and counts them (a stand-in for a collector)."""

    spans_posts = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        _Sink.spans_posts += 1
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


class Rig:
    def __init__(self, workdir: Path, sample_ratio: float) -> None:
        self.workdir = workdir
        self.sample_ratio = sample_ratio
        self.procs: list[subprocess.Popen[bytes]] = []
        self.sink: ThreadingHTTPServer | None = None

    def start(self) -> None:
        self.sink = ThreadingHTTPServer(OTLP_SINK, _Sink)
        threading.Thread(target=self.sink.serve_forever, daemon=True).start()
        self._envoy("backend", _envoy_config(BACKEND, 19000, None))
        self._envoy("tcp_proxy", _envoy_config(TCP_PROXY, 19000, BACKEND))
        self._kube_proxy("off", KP_OFF, "127.77.0.21")
        self._kube_proxy("on", KP_ON, "127.77.0.22")
        for target in (BACKEND, TCP_PROXY, KP_OFF, KP_ON):
            _wait_http(target)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        out = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        self.procs.append(
            subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        )

    def _envoy(self, name: str, config: dict[str, Any]) -> None:
        path = self.workdir / f"{name}.json"
        path.write_text(json.dumps(config))
        argv = [envoy_binary(), "-c", str(path), "--concurrency", "1", "--disable-hot-restart"]
        self._spawn(name, [*argv, "--log-level", "error"])

    def _kube_proxy(self, telemetry: str, vip: tuple[str, int], metrics_ip: str) -> None:
        state = self.workdir / f"state-{telemetry}.json"
        state.write_text(json.dumps(_state_for(vip)))
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{OTLP_SINK[0]}:{OTLP_SINK[1]}",
        }
        argv = [
            sys.executable,
            "-m",
            "mesh.kubeproxy",
            "--state-file",
            str(state),
            "--hop-telemetry",
            telemetry,
            "--trace-sample-ratio",
            str(self.sample_ratio),
            "--metrics-address",
            metrics_ip,
        ]
        self._spawn(f"kube-proxy-{telemetry}", argv, env)

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
        if self.sink is not None:
            self.sink.shutdown()


def _wait_http(target: tuple[str, int], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection(*target, timeout=1)
            conn.request("GET", "/")
            if conn.getresponse().status == 200:
                conn.close()
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"nothing answers on {target[0]}:{target[1]} after {timeout:.0f}s")


# -- wrk ------------------------------------------------------------------------------------

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"unexpected latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def wrk(
    target: tuple[str, int], seconds: float, connections: int, close: bool = False
) -> dict[str, float]:
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{target[0]}:{target[1]}/")
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "requests_per_second": rps,
        "p50_ms": round(_ms(lat["50"]), 4),
        "p99_ms": round(_ms(lat["99"]), 4),
        "socket_errors": errors.group(1) if errors else "",  # type: ignore[dict-item]
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }


def measure_paths(seconds: float, connections: int, rounds: int) -> dict[str, dict[str, Any]]:
    """Every path, ``rounds`` times interleaved; the median of each figure is reported.

    Interleaving spreads the machine's noise (two cores shared by wrk, the backend and the
    proxy under test) over all paths instead of penalising whichever ran at a bad moment.
    """
    paths = {
        "direct": BACKEND,
        "envoy_tcp_proxy": TCP_PROXY,
        "kube_proxy_telemetry_off": KP_OFF,
        "kube_proxy_telemetry_on": KP_ON,
    }
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
    for round_no in range(1, rounds + 1):
        for name, target in paths.items():
            log(f"  round {round_no}/{rounds} {name}…")
            keep_alive = wrk(target, seconds, connections)
            single = wrk(target, max(1.0, seconds / 2), 1)
            fresh = wrk(target, seconds, connections, close=True)
            samples[name].append(
                {
                    "keep_alive_rps": keep_alive["requests_per_second"],
                    "keep_alive_p50_ms": keep_alive["p50_ms"],
                    "keep_alive_p99_ms": keep_alive["p99_ms"],
                    "single_connection_p50_ms": single["p50_ms"],
                    "single_connection_p99_ms": single["p99_ms"],
                    "new_connections_per_second": fresh["requests_per_second"],
                    "errors": bool(
                        keep_alive["socket_errors"] or keep_alive["non_2xx"] or fresh["non_2xx"]
                    ),
                }
            )
    results: dict[str, dict[str, Any]] = {}
    for name, runs in samples.items():
        results[name] = {
            key: statistics.median(run[key] for run in runs) for key in runs[0] if key != "errors"
        }
        results[name]["keep_alive_rps_runs"] = [run["keep_alive_rps"] for run in runs]
        results[name]["errors"] = any(run["errors"] for run in runs)
    return results


# -- endpoint propagation through a real cluster ----------------------------------------------


PROBE_POLICY = "bench-propagation-probe"
"""The NetworkPolicy the bench adds so its probes may reach catalog (the sample denies all
other traffic): from the bench client and the node addresses kube-proxy may masquerade to."""


def _probe_policy() -> dict[str, Any]:
    sources = [CLIENT_IP, *addresses.NODE_IPS.values()]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": PROBE_POLICY, "namespace": "shop"},
        "spec": {
            "podSelector": {"matchLabels": {"app": "catalog"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"ipBlock": {"cidr": f"{ip}/32"}} for ip in sources],
                    "ports": [{"port": "http"}],
                }
            ],
        },
    }


def _probe(vip: str) -> tuple[str | None, str | None]:
    """(pod that served, None) or (None, the error) for one fresh connection."""
    try:
        return _served_by(vip), None
    except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def _wait_for_probe(vip: str, timeout: float = 15.0) -> None:
    """Fail unless a probe through the ClusterIP is answered (policy in effect, pods up)."""
    deadline = time.monotonic() + timeout
    error: str | None = "no probe sent"
    while time.monotonic() < deadline:
        served, error = _probe(vip)
        if served:
            return
        time.sleep(0.2)
    raise SystemExit(f"the propagation probe through {vip}:8080 never succeeded: {error}")


WINDOW_S = 1.0
"""Shortest probing window of a propagation trial."""
SETTLE_S = 0.5
"""The window ends once the victim has served no probe for this long ..."""
SETTLE_PROBES = 5
"""... and at least this many answered probes in a row went elsewhere."""
MAX_WINDOW_S = 5.0
"""A victim still served this long after it turned unready fails the trial."""


def measure_propagation(trials: int) -> list[dict[str, Any]]:
    """Per trial: ms from "pod unready" (API call) until new connections stop reaching it.

    A trial is valid only if every probe was answered: a probe that fails (reset, refused,
    timed out) proves nothing about where new connections go, so the trial counts as
    failed and its errors go to the report. A probe counts from the moment it connects
    (when kube-proxy picks the endpoint), so the figure is the start of the last probe that
    still reached the victim, or of the first probe if none did (an upper bound).

    The window is at least :data:`WINDOW_S` and lasts until the victim has not served a
    probe for :data:`SETTLE_S` (and :data:`SETTLE_PROBES` answered probes): a victim still
    served at the end of a fixed window would cap the figure at the window's length. A
    victim still served after :data:`MAX_WINDOW_S` fails the trial.
    """
    home = Path(tempfile.mkdtemp(prefix="hopscope-bench-"))
    env = {**os.environ, "HOPSCOPE_HOME": str(home)}
    cli = [sys.executable, "-m", "mesh.cli"]
    subprocess.run([*cli, "up", "--detach"], env=env, check=True, capture_output=True, cwd=ROOT)
    api = f"http://{addresses.CONTROL_PLANE_IP}:{addresses.CONTROL_PLANE_PORT}"
    import requests

    from mesh.apiclient import APIClient, read_token

    client = APIClient(api, timeout=5, token=read_token(home))
    try:
        client.post("/api/v1/apply", {"source": "bench", "documents": [_probe_policy()]})
        state = client.get("/api/v1/state")
        vip = next(s["cluster_ip"] for s in state["services"] if s["name"] == "catalog")
        pods = [p["name"] for p in state["pods"] if p["name"].startswith("catalog")]
        _wait_for_probe(vip)
        results = []
        for trial in range(trials):
            victim = pods[trial % len(pods)]
            t0 = time.monotonic()
            client.post(f"/api/v1/pods/shop/{victim}/ready", {"ready": False})
            last_hit: float | None = None
            first_probe: float | None = None
            answered, since_hit, errors = 0, 0, []
            settled = False
            while (now := time.monotonic()) - t0 < MAX_WINDOW_S:
                quiet = now - (last_hit if last_hit is not None else t0)
                if now - t0 >= WINDOW_S and quiet >= SETTLE_S and since_hit >= SETTLE_PROBES:
                    settled = True
                    break
                started = time.monotonic()
                served, error = _probe(vip)
                if error:
                    errors.append(error)
                    continue
                answered += 1
                since_hit += 1
                first_probe = started if first_probe is None else first_probe
                if served == victim:
                    last_hit = started  # kube-proxy picks the endpoint as the probe connects
                    since_hit = 0
            end = last_hit if last_hit is not None else first_probe
            if not settled:
                errors.append(
                    f"new connections still reached {victim} within the last "
                    f"{SETTLE_S:.1f} s of a {MAX_WINDOW_S:.0f} s window"
                )
            results.append(
                {
                    "victim": victim,
                    "ms": None if end is None else round((end - t0) * 1000, 1),
                    "window_ms": round((time.monotonic() - t0) * 1000, 1),
                    "probes_answered": answered,
                    "errors": errors[:5],
                    "failed": bool(errors) or end is None,
                }
            )
            PROPAGATION_ERRORS.extend(f"trial {trial}: {e}" for e in errors)
            client.post(f"/api/v1/pods/shop/{victim}/ready", {"ready": None})
            _wait_ready(api, victim)
        status = requests.get(f"{api}/api/v1/status", timeout=5).json()
        restarts = {c["name"]: c["restarts"] for c in status["components"]}
        if any(restarts.values()):
            PROPAGATION_ERRORS.append(f"component restarts during the trials: {restarts}")
        return results
    finally:
        subprocess.run([*cli, "down"], env=env, capture_output=True, cwd=ROOT)
        shutil.rmtree(home, ignore_errors=True)


def _served_by(vip: str) -> str:
    conn = http.client.HTTPConnection(vip, 8080, timeout=2, source_address=(CLIENT_IP, 0))
    try:
        conn.request("GET", "/items", headers={"Host": "catalog"})
        return str(json.loads(conn.getresponse().read())["served_by"])
    finally:
        conn.close()


def _wait_ready(api: str, pod: str) -> None:
    import requests

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pods = requests.get(f"{api}/api/v1/state", timeout=5).json()["pods"]
        if any(p["name"] == pod and p["ready"] for p in pods):
            return
        time.sleep(0.05)
    PROPAGATION_ERRORS.append(f"{pod} was not ready again 10s after the trial")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each wrk run")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (-c)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (median)")
    parser.add_argument("--sample-ratio", type=float, default=0.01, help="trace sample ratio (on)")
    parser.add_argument("--trials", type=int, default=20, help="endpoint propagation trials")
    parser.add_argument("--skip-propagation", action="store_true")
    parser.add_argument("--json", action="store_true", help="only the JSON line on stdout")
    parser.add_argument(
        "--only-propagation", action="store_true", help="skip the wrk paths (no wrk needed)"
    )
    args = parser.parse_args()
    report: dict[str, Any] = {"benchmark": "kubeproxy", "cpus": os.cpu_count()}
    if not args.only_propagation:
        report.update(_measure_paths(args))
    failed = 0
    if not args.skip_propagation:
        log(f"endpoint propagation: {args.trials} trials through the sample cluster…")
        failed = _report_propagation(report, measure_propagation(args.trials))
    report["goals"] = GOALS
    report["meets_goals"] = {
        key: (report[key] <= goal if key.endswith("_ms") else report[key] >= goal)
        for key, goal in GOALS.items()
        if report.get(key) is not None
    }
    if "endpoint_propagation_p99_ms" in report and (failed or PROPAGATION_ERRORS):
        report["meets_goals"]["endpoint_propagation_p99_ms"] = False
    if not args.json and "paths" in report:
        for name, values in report["paths"].items():
            log(
                f"{name:28} {values['keep_alive_rps']:>9.0f} req/s  "
                f"p50(1 conn) {values['single_connection_p50_ms']:.3f} ms  "
                f"new conn {values['new_connections_per_second']:>7.0f}/s"
            )
    print(json.dumps(report))
    if failed or PROPAGATION_ERRORS:
        raise SystemExit(
            f"endpoint propagation: {failed} of {args.trials} trials failed "
            f"({len(PROPAGATION_ERRORS)} errors, see endpoint_propagation_errors)"
        )


def _measure_paths(args: argparse.Namespace) -> dict[str, Any]:
    if shutil.which("wrk") is None:
        raise SystemExit("wrk is not installed: apt-get install -y wrk")
    workdir = Path(tempfile.mkdtemp(prefix="hopscope-kpbench-"))
    rig = Rig(workdir, args.sample_ratio)
    log(f"starting backend, Envoy tcp_proxy and two kube-proxy emulators (logs: {workdir})…")
    try:
        rig.start()
        paths = measure_paths(args.seconds, args.connections, args.rounds)
    finally:
        rig.stop()
    # The logs are kept only when the measurement failed (the exception leaves them).
    shutil.rmtree(workdir, ignore_errors=True)
    on, envoy, direct = (
        paths["kube_proxy_telemetry_on"],
        paths["envoy_tcp_proxy"],
        paths["direct"],
    )
    return {
        "seconds": args.seconds,
        "connections": args.connections,
        "rounds": args.rounds,
        "sample_ratio": args.sample_ratio,
        "paths": paths,
        "ratio_vs_envoy_tcp_proxy": round(on["keep_alive_rps"] / envoy["keep_alive_rps"], 3),
        "ratio_vs_envoy_tcp_proxy_telemetry_off": round(
            paths["kube_proxy_telemetry_off"]["keep_alive_rps"] / envoy["keep_alive_rps"], 3
        ),
        "added_p50_ms": round(
            on["single_connection_p50_ms"] - direct["single_connection_p50_ms"], 4
        ),
        "new_conn_ratio": round(
            on["new_connections_per_second"] / envoy["new_connections_per_second"], 3
        ),
        "otlp_exports": _Sink.spans_posts,
    }


def _report_propagation(report: dict[str, Any], trials: list[dict[str, Any]]) -> int:
    """Add the propagation figures to ``report``; return how many trials failed."""
    samples = [t["ms"] for t in trials if not t["failed"]]
    failed = len(trials) - len(samples)
    report["endpoint_propagation_trials"] = trials
    report["endpoint_propagation_failed_trials"] = failed
    report["endpoint_propagation_ms"] = samples
    report["endpoint_propagation_p50_ms"] = (
        round(statistics.median(samples), 1) if samples else None
    )
    report["endpoint_propagation_p99_ms"] = (
        round(_percentile(samples, 0.99), 1) if samples else None
    )
    report["endpoint_propagation_errors"] = PROPAGATION_ERRORS[:20]
    return failed


if __name__ == "__main__":
    main()

"""kube-proxy benchmark: throughput, latency, new connections, endpoint propagation.

One run measures every path side by side against the same backend (an Envoy answering
``200 ok`` with ``direct_response``), with wrk as the load generator, on one or both data
paths (``--dataplane``). The **userspace** data path runs on the host's loopback (127/8):

* ``direct``                — wrk → backend
* ``envoy_tcp_proxy``       — wrk → Envoy ``tcp_proxy`` → backend
* ``kube_proxy_telemetry_off`` — wrk → emulator (connections spliced as TCP) → backend
* ``kube_proxy_telemetry_on``  — wrk → emulator (HTTP parsed, a hop span per request,
  traces sampled at ``--sample-ratio``, spans exported over OTLP) → backend

The **kernel** data path builds its own network namespaces (prefix ``hsbench``: one node
with its ``cni0`` bridge, and three pods on it: the client, the backend and an Envoy
``tcp_proxy``), loads into the node the rules the project's iptables renderer writes for
one ClusterIP Service with one endpoint (the backend pod), and runs wrk inside the client
pod, so all three paths cross the same veths, bridge and netfilter hooks:

* ``direct``                — client pod → backend pod IP (bridged, no DNAT)
* ``envoy_tcp_proxy``       — client pod → Envoy ``tcp_proxy`` pod → backend pod
* ``kube_proxy_iptables``   — client pod → ClusterIP; the node's nat rules (KUBE-SERVICES,
  KUBE-SVC-…, KUBE-SEP-…) DNAT the connection to the backend pod, conntrack un-DNATs the
  replies

A conntrack entry of a request sent through the ClusterIP before the measurement proves
that the rules did the DNAT (``kernel.rule_chains`` names the chains it went through).
The namespaces are removed at the end, also after an error or Ctrl-C, and leftovers of a
crashed run (namespaces and the processes still in them) are removed at the start.

Per path: keep-alive throughput (``-c`` connections), p50/p99 latency at one connection,
and the new-connection rate (``Connection: close``). On the kernel path:

* ``kernel.added_p50_us`` — p50 latency at one keep-alive connection through the ClusterIP
  minus the same through the pod IP: what the kernel hop adds to a request on an
  established connection (its packets are routed through the node instead of bridged,
  looked up in conntrack and rewritten).
* ``kernel.kube_proxy_hop_self_us_p50`` — the kube-proxy hop's self-time: there is no
  relay, so it is the time the DNAT adds to a whole connection. The client pod opens
  ``--hop-connections`` fresh connections to the pod IP and as many to the ClusterIP, one
  at a time and alternating, and times each from ``connect()`` until the answer to one
  ``GET`` is complete (handshake, request, ``200 ok``; the close is not timed). The figure
  is the p50 through the ClusterIP minus the p50 to the pod IP, in microseconds: the first
  packet's walk through kube-proxy's nat chains (KUBE-SERVICES → KUBE-SVC → KUBE-SEP →
  DNAT), the new conntrack entry, the rewrite of every packet both ways and the routed
  detour through the node. Python's own cost is the same on both sides and cancels out.
* ``kernel.new_conn_ratio_vs_envoy_tcp_proxy`` — new connections per second through the
  ClusterIP over those through the Envoy ``tcp_proxy`` pod.

Any wrk socket error or timeout, non-2xx answer, wrk failure, or failed hop connection on
a kernel path fails the run: its errors are in ``kernel.errors``, its goals are unmet, and
the bench exits non-zero (a trial with errors is not a zero).

Then, unless ``--skip-propagation``, it starts the sample cluster, lets the bench client
reach catalog (the sample's policies deny everything else: the bench adds one
NetworkPolicy), marks a catalog pod unready through the API again and again, and measures
how long new connections through the catalog ClusterIP still reach it (probing until the
victim has been left alone for a while, up to 5 s). A trial in which any probe fails, or in
which new connections still reach the victim at 5 s, counts as failed: the goal is then
unmet, the errors are in the JSON, and the bench exits non-zero.

Usage: .venv/bin/python bench/kubeproxy.py --seconds 5 [--dataplane kernel|userspace|both]
       [--skip-propagation | --only-propagation] [--json]
The kernel data path needs root (``--dataplane`` defaults to both as root, else userspace).
The last line printed on stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
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
from mesh.kernel import ProxyNode  # noqa: E402
from mesh.kernel.conntrack import service_flow_attributes, table  # noqa: E402
from mesh.kernel.forward import in_netns, socket_in  # noqa: E402
from mesh.kernel.proxier import KernelProxier  # noqa: E402
from mesh.kernel.topology import KernelNetwork, NodeNet, kernel_support  # noqa: E402
from mesh.kubeproxy.rules import build_rules  # noqa: E402
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
USERSPACE_PATHS = {
    "direct": BACKEND,
    "envoy_tcp_proxy": TCP_PROXY,
    "kube_proxy_telemetry_off": KP_OFF,
    "kube_proxy_telemetry_on": KP_ON,
}

KERNEL_PREFIX = "hsbench"
"""Every namespace of the kernel paths starts with ``hsbench-`` (only those are removed)."""
KERNEL_NODE = NodeNet("node-a", "10.10.0.1", "10.244.1.0/24")
KERNEL_CLUSTER_CIDR = "10.244.0.0/16"
KERNEL_POD_NAMESPACE = "bench"
KERNEL_PODS = {"client": "10.244.1.10", "backend": "10.244.1.20", "tcp-proxy": "10.244.1.30"}
KERNEL_BACKEND = (KERNEL_PODS["backend"], 8080)
KERNEL_TCP_PROXY = (KERNEL_PODS["tcp-proxy"], 8080)
KERNEL_VIP = ("10.96.0.10", 80)
KERNEL_PATHS = {
    "direct": KERNEL_BACKEND,
    "envoy_tcp_proxy": KERNEL_TCP_PROXY,
    "kube_proxy_iptables": KERNEL_VIP,
}
KERNEL_CLIENT_SYSCTLS = {"net.ipv4.ip_local_port_range": "1024 65535", "net.ipv4.tcp_tw_reuse": "1"}
"""In the pods that open connections (the client, the Envoy ``tcp_proxy``): they close
first, so every connection leaves a TIME_WAIT socket for 60 s; thousands of new
connections a second must not run out of source ports (the host's loopback reuses them
already, ``tcp_tw_reuse=2``)."""
WRK_GRACE_S = 30.0
"""A wrk run still going this long after its duration counts as failed (timed out)."""

PROPAGATION_ERRORS: list[str] = []
"""Requests that failed during the propagation trials (reported, not hidden)."""

GOALS = {
    "ratio_vs_envoy_tcp_proxy": 0.75,
    "added_p50_ms": 0.25,
    "new_conn_ratio": 0.5,
    "endpoint_propagation_p99_ms": 250.0,
    "kernel.kube_proxy_hop_self_us_p50": 50.0,
    "kernel.new_conn_ratio_vs_envoy_tcp_proxy": 0.5,
}
"""Keys are paths into the report (``kernel.x`` is ``report["kernel"]["x"]``); a latency
goal (``_ms``, ``_us``) is a ceiling, every other goal a floor."""


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


def _state_for(vip: tuple[str, int], backend: tuple[str, int] = BACKEND) -> ClusterState:
    """One ClusterIP Service at ``vip`` whose EndpointSlice holds one ready ``backend``."""
    endpoint = Endpoint([backend[0]], True, True, False, "backend", KERNEL_NODE.name)
    return ClusterState(
        resource_version=1,
        services=[
            Service(
                "bench", "bench", cluster_ip=vip[0], ports=[ServicePort(vip[1], backend[1], "http")]
            )
        ],
        endpoint_slices=[
            EndpointSlice(
                "bench-1", "bench", "bench", [endpoint], [EndpointPort(backend[1], "http")]
            )
        ],
    )


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

    def _spawn(
        self,
        name: str,
        argv: list[str],
        env: dict[str, str] | None = None,
        netns: str | None = None,
    ) -> None:
        """Start ``argv`` (inside network namespace ``netns``, if given), logging to a file."""
        if netns is not None:
            argv = KernelNetwork.exec_argv(netns, argv)
        out = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
        self.procs.append(
            subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        )

    def _envoy(self, name: str, config: dict[str, Any], netns: str | None = None) -> None:
        path = self.workdir / f"{name}.json"
        path.write_text(json.dumps(config))
        argv = [envoy_binary(), "-c", str(path), "--concurrency", "1", "--disable-hot-restart"]
        self._spawn(name, [*argv, "--log-level", "error"], netns=netns)

    def _kube_proxy(self, telemetry: str, vip: tuple[str, int], metrics_ip: str) -> None:
        state = self.workdir / f"state-{telemetry}.json"
        state.write_text(json.dumps(_state_for(vip).to_dict()))
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


class KernelRig(Rig):
    """The kernel paths: one node namespace holding kube-proxy's rules, three pods on it."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, sample_ratio=0.0)
        self.net = KernelNetwork(prefix=KERNEL_PREFIX, backend="host-gw")
        self.node = ProxyNode(KERNEL_NODE.name, cluster_cidr=KERNEL_CLUSTER_CIDR)
        self.proxier = KernelProxier(self.net, self.node)

    @property
    def client_netns(self) -> str:
        return self._pod("client")

    def _pod(self, name: str) -> str:
        return self.net.pod_netns(KERNEL_POD_NAMESPACE, name)

    def start(self) -> None:
        removed = self.cleanup()
        if removed:
            log(f"  removed what an earlier run left: {', '.join(removed)}")
        self.net.add_node(KERNEL_NODE)
        for pod, ip in KERNEL_PODS.items():
            self.net.add_pod(KERNEL_POD_NAMESPACE, pod, KERNEL_NODE.name, ip)
        for pod in ("client", "tcp-proxy"):
            for key, value in KERNEL_CLIENT_SYSCTLS.items():
                self.net.sysctl(self._pod(pod), key, value)
        rules = build_rules(
            _state_for(KERNEL_VIP, KERNEL_BACKEND), {KERNEL_NODE.name: KERNEL_NODE.node_ip}
        )
        self.proxier.sync(rules)
        self._envoy("backend", _envoy_config(KERNEL_BACKEND, 19000, None), self._pod("backend"))
        self._envoy(
            "tcp_proxy",
            _envoy_config(KERNEL_TCP_PROXY, 19000, KERNEL_BACKEND),
            self._pod("tcp-proxy"),
        )
        with in_netns(self.client_netns):
            for target in KERNEL_PATHS.values():
                _wait_http(target)

    def dnat_chains(self) -> list[str]:
        """The nat chains a request to the ClusterIP went through (from its conntrack
        entry); raises SystemExit unless the node's rules DNATed it to the backend pod."""
        vip, backend = _address(KERNEL_VIP), _address(KERNEL_BACKEND)
        flows = [f for f in table(self.net.node_netns(KERNEL_NODE.name)) if f.original_dst == vip]
        dnat = [f for f in flows if f.dnat and f.translated_dst == backend]
        attrs = (
            service_flow_attributes(dnat[0], self.proxier.rules, self.node)
            if dnat and self.proxier.rules
            else None
        )
        if attrs is None:
            raise SystemExit(
                f"no conntrack entry shows {vip} DNATed to {backend} by the Service's rules "
                f"(entries to {vip}: {[f.line() for f in flows]})"
            )
        return list(attrs["hopscope.rule.chains"])

    def cleanup(self) -> list[str]:
        """Stop the processes left in this bench's namespaces, then remove the namespaces
        (this run's, or a crashed run's); other prefixes are never touched."""
        for name in _netns_names(f"{KERNEL_PREFIX}-"):
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
            for pid in pids.stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        return self.net.cleanup()

    def stop(self) -> None:
        try:
            super().stop()
        finally:
            self.cleanup()


def _netns_names(prefix: str) -> list[str]:
    from pyroute2 import netns

    return sorted(name for name in netns.listnetns() if name.startswith(prefix))


# -- wrk ------------------------------------------------------------------------------------

_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"unexpected latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


class WrkError(RuntimeError):
    """A wrk run that failed or did not finish: no figures, one error."""


def wrk(
    target: tuple[str, int],
    seconds: float,
    connections: int,
    close: bool = False,
    netns: str | None = None,
) -> dict[str, Any]:
    """One wrk run (inside network namespace ``netns``, if given); raises WrkError."""
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{target[0]}:{target[1]}/")
    if netns is not None:
        argv = KernelNetwork.exec_argv(netns, argv)
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=max(1, round(seconds)) + WRK_GRACE_S
        )
    except subprocess.TimeoutExpired:
        raise WrkError(f"wrk did not finish within {WRK_GRACE_S:.0f} s of its duration") from None
    out = done.stdout
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)$", out, re.M))
    if done.returncode != 0 or rps is None or not {"50", "99"} <= lat.keys():
        raise WrkError(f"wrk exited {done.returncode}: {(done.stderr or out).strip()[-300:]}")
    errors = re.search(r"Socket errors: (.*)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "requests_per_second": float(rps.group(1)),
        "p50_ms": round(_ms(lat["50"]), 4),
        "p99_ms": round(_ms(lat["99"]), 4),
        "socket_errors": errors.group(1) if errors else "",
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
    }


FIGURES = {
    "keep_alive": {
        "keep_alive_rps": "requests_per_second",
        "keep_alive_p50_ms": "p50_ms",
        "keep_alive_p99_ms": "p99_ms",
    },
    "single_connection": {
        "single_connection_p50_ms": "p50_ms",
        "single_connection_p99_ms": "p99_ms",
    },
    "new_connections": {"new_connections_per_second": "requests_per_second"},
}
"""The three wrk runs per path and round, and which of each run's figures are reported."""


def measure_paths(
    paths: dict[str, tuple[str, int]],
    seconds: float,
    connections: int,
    rounds: int,
    netns: str | None = None,
) -> dict[str, dict[str, Any]]:
    """Every path, ``rounds`` times interleaved; the median of each figure is reported.

    Interleaving spreads the machine's noise (two cores shared by wrk, the backend and the
    proxy under test) over all paths instead of penalising whichever ran at a bad moment.
    A run with socket errors, timeouts or non-2xx answers, or one that failed, is listed in
    the path's ``error_details`` (a failed run has no figures: medians are of the others).
    """
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name in paths}
    problems: dict[str, list[str]] = {name: [] for name in paths}
    for round_no in range(1, rounds + 1):
        for name, target in paths.items():
            log(f"  round {round_no}/{rounds} {name}…")
            sample: dict[str, Any] = {}
            for run, figures in FIGURES.items():
                try:
                    result = wrk(
                        target,
                        max(1.0, seconds / 2) if run == "single_connection" else seconds,
                        1 if run == "single_connection" else connections,
                        close=run == "new_connections",
                        netns=netns,
                    )
                except WrkError as exc:
                    problems[name].append(f"round {round_no} {run}: {exc}")
                    continue
                if result["socket_errors"]:
                    problems[name].append(
                        f"round {round_no} {run}: socket errors {result['socket_errors']}"
                    )
                if result["non_2xx"]:
                    problems[name].append(f"round {round_no} {run}: {result['non_2xx']} non-2xx")
                sample.update({figure: result[field] for figure, field in figures.items()})
            samples[name].append(sample)
    results: dict[str, dict[str, Any]] = {}
    for name, runs in samples.items():
        keys = [figure for figures in FIGURES.values() for figure in figures]
        results[name] = {key: _median([run.get(key) for run in runs]) for key in keys}
        results[name]["keep_alive_rps_runs"] = [run.get("keep_alive_rps") for run in runs]
        results[name]["errors"] = bool(problems[name])
        results[name]["error_details"] = problems[name][:20]
    return results


def _median(values: list[float | None]) -> float | None:
    measured = [v for v in values if v is not None]
    return statistics.median(measured) if measured else None


def connection_latencies_us(
    netns: str, targets: dict[str, tuple[str, int]], count: int
) -> tuple[dict[str, list[float]], list[str]]:
    """µs per fresh connection, ``count`` per target, one connection at a time, alternating
    between the targets: from ``connect()`` until the answer to one ``GET`` is complete
    (handshake, request, answer; the close that follows is not timed). The sockets belong
    to ``netns``; any failure (refused, timed out, reset, not ``200``) is returned as an
    error, not timed."""
    request = b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
    samples: dict[str, list[float]] = {name: [] for name in targets}
    errors: list[str] = []
    for _ in range(count):
        for name, target in targets.items():
            sock = socket_in(netns)
            sock.settimeout(2.0)
            try:
                started = time.perf_counter_ns()
                sock.connect(target)
                sock.sendall(request)
                reply = _read_response(sock)
                elapsed_ns = time.perf_counter_ns() - started
            except (OSError, ValueError) as exc:
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            finally:
                sock.close()
            if not reply.startswith(b"HTTP/1.1 200 "):
                errors.append(f"{name}: answered {reply[:40]!r}")
                continue
            samples[name].append(elapsed_ns / 1000)
    return samples, errors


def _read_response(sock: socket.socket) -> bytes:
    """One HTTP/1.1 response with a ``Content-Length`` body, read to its last byte."""
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += _recv(sock)
    head, _, body = reply.partition(b"\r\n\r\n")
    length = re.search(rb"(?im)^content-length:\s*(\d+)\s*$", head)
    if length is None:
        raise ValueError(f"no Content-Length in {head[:200]!r}")
    while len(body) < int(length.group(1)):
        body += _recv(sock)
    return reply


def _recv(sock: socket.socket) -> bytes:
    chunk = sock.recv(4096)
    if not chunk:
        raise ConnectionError("closed before the answer was complete")
    return chunk


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
    parser.add_argument(
        "--dataplane",
        choices=("kernel", "userspace", "both"),
        help="data paths to measure (default: both as root where the kernel path can run, "
        "else userspace)",
    )
    parser.add_argument(
        "--hop-connections",
        type=int,
        default=2000,
        help="fresh connections timed per target for the kernel hop's self-time",
    )
    parser.add_argument("--skip-propagation", action="store_true")
    parser.add_argument("--json", action="store_true", help="only the JSON line on stdout")
    parser.add_argument(
        "--only-propagation", action="store_true", help="skip the wrk paths (no wrk needed)"
    )
    args = parser.parse_args()
    report: dict[str, Any] = {"benchmark": "kubeproxy", "cpus": os.cpu_count()}
    if not args.only_propagation:
        userspace, kernel = _dataplanes(args)
        if shutil.which("wrk") is None:
            raise SystemExit("wrk is not installed: apt-get install -y wrk")
        report["dataplane"] = args.dataplane
        if userspace:
            report.update(_measure_paths(args))
        if kernel:
            report["kernel"] = _measure_kernel_paths(args)
    kernel_errors = report.get("kernel", {}).get("errors", [])
    failed = 0
    if not args.skip_propagation:
        log(f"endpoint propagation: {args.trials} trials through the sample cluster…")
        failed = _report_propagation(report, measure_propagation(args.trials))
    report["goals"] = GOALS
    report["meets_goals"] = _meets_goals(report)
    if "endpoint_propagation_p99_ms" in report and (failed or PROPAGATION_ERRORS):
        report["meets_goals"]["endpoint_propagation_p99_ms"] = False
    if not args.json:
        _log_paths("userspace", report.get("paths", {}))
        _log_paths("kernel", report.get("kernel", {}).get("paths", {}))
        if "kernel" in report:
            hop_self = report["kernel"]["kube_proxy_hop_self_us_p50"]
            log(f"kernel    kube-proxy hop self-time p50 {hop_self} µs per connection")
    print(json.dumps(report))
    problems = []
    userspace_errors = [name for name, path in report.get("paths", {}).items() if path["errors"]]
    if userspace_errors:  # a trial with errors is not a measurement
        problems.append(f"userspace paths with errors: {', '.join(userspace_errors)}")
    if kernel_errors:
        problems.append(f"kernel data path: {len(kernel_errors)} errors (see kernel.errors)")
    if failed or PROPAGATION_ERRORS:
        problems.append(
            f"endpoint propagation: {failed} of {args.trials} trials failed "
            f"({len(PROPAGATION_ERRORS)} errors, see endpoint_propagation_errors)"
        )
    if problems:
        raise SystemExit("; ".join(problems))


def _dataplanes(args: argparse.Namespace) -> tuple[bool, bool]:
    """(userspace, kernel): which data paths to measure; settles ``args.dataplane``."""
    unsupported = kernel_support()
    if args.dataplane is None:
        args.dataplane = "userspace" if unsupported else "both"
        if unsupported:
            log(f"--dataplane userspace only: the kernel data path cannot run here ({unsupported})")
    elif args.dataplane != "userspace" and unsupported:
        raise SystemExit(f"--dataplane {args.dataplane}: {unsupported}")
    return args.dataplane != "kernel", args.dataplane != "userspace"


CEILING = re.compile(r"_(ms|us)(_|$)")
"""Goals on a latency (milliseconds, microseconds) are ceilings."""


def _meets_goals(report: dict[str, Any]) -> dict[str, bool]:
    """Each goal whose figure is in the report: met or not. A kernel run with errors meets
    none of its goals (a trial with errors is not a zero)."""
    kernel_failed = bool(report.get("kernel", {}).get("errors"))
    meets: dict[str, bool] = {}
    for key, goal in GOALS.items():
        value: Any = report
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is None:
            continue
        meets[key] = value <= goal if CEILING.search(key) else value >= goal
        if key.startswith("kernel.") and kernel_failed:
            meets[key] = False
    return meets


def _log_paths(dataplane: str, paths: dict[str, dict[str, Any]]) -> None:
    def show(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    for name, values in paths.items():
        log(
            f"{dataplane:9} {name:28} {show(values['keep_alive_rps'], '>9.0f')} req/s  "
            f"p50(1 conn) {show(values['single_connection_p50_ms'], '.3f')} ms  "
            f"new conn {show(values['new_connections_per_second'], '>7.0f')}/s"
            + ("  ERRORS" if values["errors"] else "")
        )


def _measure_paths(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="hopscope-kpbench-"))
    rig = Rig(workdir, args.sample_ratio)
    log(f"starting backend, Envoy tcp_proxy and two kube-proxy emulators (logs: {workdir})…")
    try:
        rig.start()
        paths = measure_paths(USERSPACE_PATHS, args.seconds, args.connections, args.rounds)
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
        "ratio_vs_envoy_tcp_proxy": _ratio(on["keep_alive_rps"], envoy["keep_alive_rps"]),
        "ratio_vs_envoy_tcp_proxy_telemetry_off": _ratio(
            paths["kube_proxy_telemetry_off"]["keep_alive_rps"], envoy["keep_alive_rps"]
        ),
        "added_p50_ms": _minus(
            on["single_connection_p50_ms"], direct["single_connection_p50_ms"], 4
        ),
        "new_conn_ratio": _ratio(
            on["new_connections_per_second"], envoy["new_connections_per_second"]
        ),
        "otlp_exports": _Sink.spans_posts,
    }


def _measure_kernel_paths(args: argparse.Namespace) -> dict[str, Any]:
    """The kernel paths in namespaces of their own, removed again whatever happens."""
    workdir = Path(tempfile.mkdtemp(prefix=f"{KERNEL_PREFIX}-"))
    rig = KernelRig(workdir)
    log(
        f"kernel data path: namespaces {KERNEL_PREFIX}-*, kube-proxy's iptables rules for "
        f"{_address(KERNEL_VIP)} -> {_address(KERNEL_BACKEND)} (logs: {workdir})…"
    )
    previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        rig.start()
        chains = rig.dnat_chains()
        paths = measure_paths(
            KERNEL_PATHS, args.seconds, args.connections, args.rounds, rig.client_netns
        )
        log(f"  {args.hop_connections} fresh connections each to the pod IP and the ClusterIP…")
        latencies, hop_errors = connection_latencies_us(
            rig.client_netns,
            {"direct": KERNEL_BACKEND, "kube_proxy_iptables": KERNEL_VIP},
            args.hop_connections,
        )
    finally:
        log(f"  removing the {KERNEL_PREFIX}-* namespaces…")
        rig.stop()
        signal.signal(signal.SIGTERM, previous)
    errors = [f"{name}: {e}" for name, path in paths.items() for e in path["error_details"]]
    errors += [f"hop connection to {e}" for e in hop_errors[:20]]
    if len(hop_errors) > 20:
        errors.append(f"hop connections: {len(hop_errors) - 20} more errors")
    if not errors:
        shutil.rmtree(workdir, ignore_errors=True)
    hop = {
        name: {
            "connections": len(values),
            "p50_us": round(statistics.median(values), 1) if values else None,
            "p99_us": round(_percentile(values, 0.99), 1) if values else None,
        }
        for name, values in latencies.items()
    }
    direct, envoy, dnat = (
        paths["direct"],
        paths["envoy_tcp_proxy"],
        paths["kube_proxy_iptables"],
    )
    added_p50_ms = _minus(dnat["single_connection_p50_ms"], direct["single_connection_p50_ms"], 4)
    return {
        "service": f"{_address(KERNEL_VIP)} -> {_address(KERNEL_BACKEND)}",
        "rule_chains": chains,
        "paths": paths,
        "added_p50_us": None if added_p50_ms is None else round(added_p50_ms * 1000, 1),
        "ratio_vs_envoy_tcp_proxy": _ratio(dnat["keep_alive_rps"], envoy["keep_alive_rps"]),
        "new_conn_ratio_vs_envoy_tcp_proxy": _ratio(
            dnat["new_connections_per_second"], envoy["new_connections_per_second"]
        ),
        "hop_connections": hop,
        "kube_proxy_hop_self_us_p50": _minus(
            hop["kube_proxy_iptables"]["p50_us"], hop["direct"]["p50_us"], 1
        ),
        "errors": errors,
        "logs": str(workdir) if errors else None,
    }


MAIN_PID = os.getpid()


def _exit_on_signal(signum: int, frame: Any) -> None:
    """SIGTERM ends the run like Ctrl-C does: through the ``finally`` that cleans up.

    pyroute2 forks short-lived helpers (they inherit this handler) and ends them with
    SIGTERM: such a child must die on the spot, not unwind into the bench's cleanup."""
    if os.getpid() != MAIN_PID:
        os._exit(128 + signum)
    raise SystemExit(128 + signum)


def _address(target: tuple[str, int]) -> str:
    return f"{target[0]}:{target[1]}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else round(a / b, 3)


def _minus(a: float | None, b: float | None, digits: int) -> float | None:
    return None if a is None or b is None else round(a - b, digits)


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

"""End-to-end capacity benchmark: the sample cluster under stepped load through the ingress.

Starts the sample cluster (``hopscope up --detach`` in a throw-away state directory), drives
the ingress with the default traffic mix of ``hopscope traffic`` (the same open-model
generator, run in this process), and for each offered rate reports:

* asked and achieved rate, p50/p99 latency from the scheduled send time, error count
  (no response, or a status of 400 or more);
* the share of complete traces: a sample of the step's requests (``--trace-sample``) is read
  back from ``/api/v1/traces/<id>`` and checked against its route's expected journey
  (:data:`ROUTE_EDGES`; see :func:`check_trace`);
* CPU milliseconds per request per component: user + system time from /proc of every
  process below the control plane, summed by component, between the start of the step and
  the moment the trace store stops growing after it; the generator's own CPU (this
  process, with its span exporter) is reported apart.

Then ``max_sustained_rps`` (the highest step with p99 ≤ 100 ms, no errors and ≥ 99.9 %
complete traces), ``cpu_ms_per_request`` at 50 req/s, ``unloaded_p50_ms`` (``GET /`` at
5 req/s) and the median self-time (duration minus its child hops') of kube-proxy and
cni-overlay hops.

``--connections keep-alive`` first applies a ``DestinationRule`` per Service a ``GET /``
crosses through kube-proxy (:data:`KEEP_ALIVE_SERVICES`) with
``connectionPool.http.maxRequestsPerConnection: 0``: the callers' sidecars and the ingress
then reuse their connections, where the shop as shipped opens one per HTTP/1.1 request
(see "Connection reuse is part of the lesson" in ``docs/design.md``). The JSON names the
setting it measured (``connections``).

A step that cannot be measured (cluster not ready, generator failure, no trace readable)
ends the run: the error is in the JSON and the exit status is 1. Nothing unmeasured is
reported as a number.

Usage: flock /tmp/hopscope-cluster.lock .venv/bin/python bench/e2e.py \\
           [--steps 25,50,100,200,400] [--seconds-per-step 10] [--json]
The last line printed on stdout is one JSON object; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mesh import addresses  # noqa: E402
from mesh.apiclient import API_URL, HOPSCOPE_HOME, read_token  # noqa: E402
from mesh.traffic.engine import Generator, Outcome, Target  # noqa: E402

GOALS = {
    "cpu_ms_per_request": 8.0,
    "max_sustained_rps": 200.0,
    "unloaded_p50_ms": 15.0,
}
SUSTAINED = {"p99_ms": 100.0, "errors": 0, "complete_share": 0.999}
"""What a step must meet to count as sustained."""

FIXED_RPS = 50.0
"""``cpu_ms_per_request`` is the CPU per request at this rate."""
UNLOADED_RPS = 5.0

ROUTE_EDGES: dict[str, tuple[tuple[str, str, bool], ...]] = {
    "/": (
        ("ingress", "frontend", True),
        ("frontend", "catalog", True),
        ("catalog", "cache", False),
        ("frontend", "reviews", True),
        ("reviews", "ratings", True),
    ),
    "/reviews/": (
        ("ingress", "frontend", True),
        ("frontend", "reviews", True),
        ("reviews", "ratings", True),
    ),
    "/checkout": (
        ("ingress", "frontend", True),
        ("frontend", "egress", False),
    ),
}
"""Per route (longest prefix of the path), the calls its journey must show:
``(caller, callee, through a Service VIP)``. ``ingress`` is the ingress hop, ``egress``
an ``egress-snat`` hop; other names are app ``service.name``s. The catalog reaches its
cache shard by pod DNS name (headless Service), so no kube-proxy hop there."""

KEEP_ALIVE_SERVICES = ("frontend", "catalog", "reviews", "ratings")
"""The shop's Services behind kube-proxy (namespace ``shop``) that ``--connections
keep-alive`` gives a rule reusing connections."""


def keep_alive_rules() -> str:
    """One ``DestinationRule`` per :data:`KEEP_ALIVE_SERVICES`: unlimited requests per
    connection (Istio's default), connections idle for up to 30 s."""
    pool = "{connectionPool: {http: {maxRequestsPerConnection: 0, idleTimeout: 30s}}}"
    return "".join(
        f"---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
        f"metadata: {{name: {name}-keep-alive, namespace: shop}}\n"
        f"spec: {{host: {name}, trafficPolicy: {pool}}}\n"
        for name in KEEP_ALIVE_SERVICES
    )


NAT_HOPS = ("kube-proxy", "cni-overlay")
COMPONENT_ORDER = (
    "control-plane",
    "frontend",
    "catalog",
    "reviews",
    "ratings",
    "cache",
    "envoy",
    "kube-proxy",
    "cni",
    "forward",
    "dns",
    "internet",
)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class BenchError(Exception):
    """A measurement that could not be made; the message says which and why."""


# -- processes and their CPU -------------------------------------------------------------


def component_of(proc: psutil.Process) -> str:
    """The component a cluster process belongs to, from its command line."""
    argv = proc.cmdline()
    if argv and os.path.basename(argv[0]) == "envoy":
        cluster = argv[argv.index("--service-cluster") + 1] if "--service-cluster" in argv else ""
        return "envoy-ingress" if cluster == "ingress" else "envoy-sidecars"
    if "-m" in argv:
        module = argv[argv.index("-m") + 1]
        if module.startswith("apps."):
            return module.removeprefix("apps.")
        known = {
            "mesh.controlplane": "control-plane",
            "mesh.kubeproxy": "kube-proxy",
            "mesh.kernel.kubeproxy": "kube-proxy",
            "mesh.kernel.forward": "forward",
            "mesh.cni.internet": "internet",
            "mesh.cni": "cni",
            "mesh.dns": "dns",
        }
        if module in known:
            return known[module]
        return module
    return f"other:{proc.name()}"


Snapshot = dict[tuple[int, float], tuple[str, float, float]]
"""``(pid, start time) → (component, user + system seconds, system seconds)``."""


def cpu_snapshot(root_pid: int) -> Snapshot:
    """CPU used so far by every process of the cluster tree (from /proc)."""
    root = psutil.Process(root_pid)
    out: Snapshot = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            with proc.oneshot():
                times = proc.cpu_times()
                key = (proc.pid, proc.create_time())
                out[key] = (component_of(proc), times.user + times.system, times.system)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return out


def cpu_delta(
    before: Snapshot, after: Snapshot
) -> tuple[dict[str, float], dict[str, float], list[str]]:
    """CPU seconds per component between two snapshots (all, and in the kernel); processes
    that exited are named (their CPU in the window is lost, so those numbers are too low)."""
    used: dict[str, float] = defaultdict(float)
    system: dict[str, float] = defaultdict(float)
    for key, (component, cpu, sys_cpu) in after.items():
        _, cpu0, sys0 = before.get(key, (component, 0.0, 0.0))
        used[component] += cpu - cpu0
        system[component] += sys_cpu - sys0
    exited = [f"{c} (pid {k[0]})" for k, (c, _, _) in before.items() if k not in after]
    return dict(used), dict(system), exited


def by_component(seconds: dict[str, float], requests_done: int) -> dict[str, float]:
    """ms per request per component, envoys summed, in a stable order."""
    merged = dict(seconds)
    merged["envoy"] = merged.pop("envoy-ingress", 0.0) + merged.pop("envoy-sidecars", 0.0)
    names = [c for c in COMPONENT_ORDER if c in merged] + sorted(
        c for c in merged if c not in COMPONENT_ORDER
    )
    return {c: round(merged[c] * 1000 / requests_done, 3) for c in names}


def machine_cpu() -> dict[str, float]:
    """Machine-wide CPU seconds by kind from /proc/stat (softirq time, where the loopback
    network stack does much of its work, is not charged to any process)."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:9]]
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = (f / tick for f in fields)
    return {
        "user": user + nice,
        "system": system,
        "softirq": softirq + irq,
        "steal": steal,
        "idle": idle + iowait,
    }


def machine_delta(
    before: dict[str, float], after: dict[str, float], window: float
) -> dict[str, float]:
    """Cores of the whole machine used per kind over ``window`` seconds."""
    return {k: round((after[k] - before[k]) / window, 3) for k in before}


def _rusage_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# -- trace completeness ------------------------------------------------------------------


def expected_edges(path: str) -> tuple[tuple[str, str, bool], ...]:
    for prefix in sorted(ROUTE_EDGES, key=len, reverse=True):
        if path == prefix or (prefix.endswith("/") and prefix != "/" and path.startswith(prefix)):
            return ROUTE_EDGES[prefix]
    raise BenchError(f"no expected journey for route {path!r}")


def check_trace(view: dict[str, Any], path: str) -> str:
    """What the trace lacks of its route's journey; "" when it holds every hop.

    For each expected call the journey must show: the caller's hop (the ingress, or a
    ``sidecar-outbound`` below the caller's ``app`` hop, with a ``dns`` hop beside each: the
    sample apps resolve the name for every call), a
    ``kube-proxy`` hop when the call goes through a Service VIP, a ``cni-overlay`` hop when
    the callee runs on another node than the caller's side of the call, then the callee's
    ``sidecar-inbound`` hop with its ``app`` hop below (or an ``egress-snat`` hop).
    """
    hops = [h for h in view.get("hops", []) if not h.get("derived")]
    spans = {s["span_id"]: s for s in view.get("spans", [])}
    kids: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for hop in hops:
        kids[hop["parent_hop_id"]].append(hop)

    def attr(hop: dict[str, Any], key: str) -> Any:
        span = spans.get(hop["span_id"], {})
        return span.get("attributes", {}).get(key) or span.get("resource", {}).get(key)

    def chains(caller: dict[str, Any]) -> list[list[dict[str, Any]]]:
        """Every path below ``caller`` through NAT hops to the hop that ends the call."""
        out: list[list[dict[str, Any]]] = []
        for kid in kids[caller["span_id"]]:
            if kid["hop"] in NAT_HOPS:
                out.extend([kid, *rest] for rest in chains(kid) or [[]])
            elif kid["hop"] in ("sidecar-inbound", "egress-snat"):
                out.append([kid])
        return out

    counts = Counter(h["hop"] for h in hops)
    if counts["client"] != 1 or counts["ingress"] != 1:
        return "no single client and ingress hop"
    apps: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for hop in hops:
        if hop["hop"] == "app":
            apps[str(attr(hop, "service.name"))].append(hop)
    for caller, callee, via_service in expected_edges(path):
        if caller == "ingress":
            callers = [h for h in hops if h["hop"] == "ingress"]
        else:
            callers = []
            for app in apps.get(caller, []):
                below = kids[app["span_id"]]
                outbound = [h for h in below if h["hop"] == "sidecar-outbound"]
                if sum(h["hop"] == "dns" for h in below) < len(outbound):
                    return f"{caller}: fewer dns hops than outbound calls"
                callers.extend(outbound)
        if not callers:
            return f"{caller} → {callee}: no caller hop"
        found = False
        for hop in callers:
            for chain in chains(hop):
                end = chain[-1]
                if callee == "egress":
                    if end["hop"] != "egress-snat":
                        continue
                else:
                    app_kids = [k for k in kids[end["span_id"]] if k["hop"] == "app"]
                    if end["hop"] != "sidecar-inbound" or not app_kids:
                        continue
                    if str(attr(app_kids[0], "service.name")) != callee:
                        continue
                found = True
                kinds = [h["hop"] for h in chain]
                if via_service and "kube-proxy" not in kinds:
                    return f"{caller} → {callee}: no kube-proxy hop"
                first = chain[0] if caller == "ingress" else hop
                if attr(first, "k8s.node.name") != attr(end, "k8s.node.name") and (
                    "cni-overlay" not in kinds
                ):
                    return f"{caller} → {callee}: cross-node without cni-overlay hop"
        if not found:
            return f"{caller} → {callee}: callee hop missing"
    return ""


def self_times(view: dict[str, Any]) -> dict[str, list[float]]:
    """Per NAT hop kind, each hop's own time: its duration minus its child hops'."""
    hops = [h for h in view.get("hops", []) if not h.get("derived")]
    child_ms: dict[str, float] = defaultdict(float)
    for hop in hops:
        child_ms[hop["parent_hop_id"]] += float(hop["duration_ms"] or 0.0)
    out: dict[str, list[float]] = defaultdict(list)
    for hop in hops:
        if hop["hop"] in NAT_HOPS and hop["span_id"] in child_ms:
            out[hop["hop"]].append(float(hop["duration_ms"]) - child_ms[hop["span_id"]])
    return out


def emulation_costs(view: dict[str, Any]) -> dict[str, list[float]]:
    """Per NAT hop kind, the emulator's own share each hop reports (``emulation_ms``)."""
    out: dict[str, list[float]] = defaultdict(list)
    for hop in view.get("hops", []):
        if hop["hop"] in NAT_HOPS and hop.get("emulation_ms") is not None:
            out[hop["hop"]].append(float(hop["emulation_ms"]))
    return out


def summary(values: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {
        kind: {
            "median": round(statistics.median(v), 3),
            "p90": round(sorted(v)[int(len(v) * 0.9)], 3),
            "hops": len(v),
        }
        for kind, v in sorted(values.items())
        if v
    }


# -- the cluster -------------------------------------------------------------------------


class Cluster:
    """The sample cluster in a throw-away state directory; ``down`` always runs."""

    def __init__(self) -> None:
        self.tmp = tempfile.TemporaryDirectory(prefix="hopscope-e2e-")
        self.home = self.tmp.name
        self.env = {**os.environ, HOPSCOPE_HOME: self.home}
        self.session = requests.Session()
        self.pid = 0
        self.dataplane = "userspace"

    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "mesh.cli", *args],
            env=self.env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def up(self) -> None:
        try:
            requests.get(f"{API_URL}/api/v1/status", timeout=2)
        except requests.RequestException:
            pass
        else:
            raise BenchError(f"a cluster already answers at {API_URL}; stop it first")
        t0 = time.monotonic()
        proc = self.cli("up", "--detach", "--dataplane", self.dataplane)
        if proc.returncode != 0:
            raise BenchError(f"hopscope up failed: {proc.stderr.strip()[-500:]}")
        token = read_token(Path(self.home))
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        status = self.status()
        if not status.get("ready"):
            raise BenchError(f"cluster not ready after up: {status.get('summary')}")
        self.pid = int(status["pid"])
        log(f"cluster up in {time.monotonic() - t0:.1f}s: {status.get('summary')}")

    def down(self) -> None:
        proc = self.cli("down", timeout=120)
        if proc.returncode != 0:
            log(f"hopscope down failed: {proc.stderr.strip()[-300:]}")
        self.tmp.cleanup()

    def status(self) -> dict[str, Any]:
        resp = self.session.get(f"{API_URL}/api/v1/status", timeout=10)
        resp.raise_for_status()
        return dict(resp.json())

    def restarts(self) -> int:
        return sum(int(c.get("restarts", 0)) for c in self.status().get("components", []))

    def trace(self, trace_id: str) -> dict[str, Any] | None:
        resp = self.session.get(f"{API_URL}/api/v1/traces/{trace_id}", timeout=10)
        if resp.status_code == 404:
            return None
        resp.raise_for_status()
        return dict(resp.json())

    def settle(self, limit: float = 20.0) -> float:
        """Wait until the trace store has stopped growing; seconds waited."""
        t0 = time.monotonic()
        last = -1
        while time.monotonic() - t0 < limit:
            spans = int(self.status().get("trace_store", {}).get("spans", 0))
            if spans == last:
                break
            last = spans
            time.sleep(1.0)
        return time.monotonic() - t0


# -- one step ----------------------------------------------------------------------------


@dataclass
class StepConfig:
    rps: float
    seconds: float
    concurrency: int
    trace_sample: int
    seed: int
    fixed_path: str | None = None


def run_generator(cfg: StepConfig, provider: Any) -> Generator:
    target = Target(
        addresses.INGRESS_IP,
        addresses.INGRESS_PORT,
        "shop.local",
        addresses.EXTERNAL_CLIENT_IP,
        "ingress (shop.local)",
        cfg.fixed_path,
    )
    gen = Generator(
        target,
        cfg.rps,
        cfg.seconds,
        cfg.concurrency,
        provider.get_tracer("hopscope.bench.e2e"),
        seed=cfg.seed,
        keep_outcomes=True,
    )
    import uvloop

    uvloop.run(gen.run())
    if not provider.force_flush(10_000):
        raise BenchError("the generator's client spans could not be flushed")
    return gen


def read_traces(
    cluster: Cluster, outcomes: list[Outcome], sample: int, seed: int
) -> dict[str, Any]:
    """Check a sample of the step's traces; incomplete ones are read again after a pause
    (a span may still be on its way), and counted incomplete if they still are."""
    chosen = outcomes if len(outcomes) <= sample else random.Random(seed).sample(outcomes, sample)
    verdicts: dict[str, str] = {}
    views: dict[str, dict[str, Any]] = {}
    pending = list(chosen)
    for attempt in range(3):
        if attempt:
            time.sleep(3.0)
        retry = []
        for outcome in pending:
            view = cluster.trace(outcome.trace_id)
            if view is None:
                verdicts[outcome.trace_id] = "trace not found"
            else:
                views[outcome.trace_id] = view
                verdicts[outcome.trace_id] = (
                    check_trace(view, outcome.route)
                    if outcome.status == 200
                    else f"request failed ({outcome.status or outcome.error})"
                )
            if verdicts[outcome.trace_id]:
                retry.append(outcome)
        pending = retry
        if not pending:
            break
    if not views:
        raise BenchError(f"none of the {len(chosen)} sampled traces could be read")
    reasons = Counter(v for v in verdicts.values() if v)
    selfs: dict[str, list[float]] = defaultdict(list)
    emulation: dict[str, list[float]] = defaultdict(list)
    for view in views.values():
        for kind, values in self_times(view).items():
            selfs[kind].extend(values)
        for kind, values in emulation_costs(view).items():
            emulation[kind].extend(values)
    complete = len(chosen) - sum(reasons.values())
    return {
        "sampled": len(chosen),
        "complete": complete,
        "complete_share": round(complete / len(chosen), 4),
        "incomplete_reasons": dict(reasons.most_common(8)),
        "self_time_ms": summary(selfs),
        "emulation_ms": summary(emulation),
    }


def run_step(cluster: Cluster, cfg: StepConfig, provider: Any) -> dict[str, Any]:
    label = f"{cfg.rps:g} req/s" + (f" GET {cfg.fixed_path}" if cfg.fixed_path else " mix")
    log(f"step {label} for {cfg.seconds:g}s …")
    restarts = cluster.restarts()
    load = os.getloadavg()
    before = cpu_snapshot(cluster.pid)
    machine0 = machine_cpu()
    gen_cpu0 = _rusage_seconds()
    t0 = time.monotonic()
    try:
        gen = run_generator(cfg, provider)
    except (OSError, RuntimeError, ValueError) as exc:
        raise BenchError(f"generator failed at {label}: {exc}") from None
    gen_cpu = _rusage_seconds() - gen_cpu0
    settle = cluster.settle()
    after = cpu_snapshot(cluster.pid)
    machine = machine_delta(machine0, machine_cpu(), time.monotonic() - t0)
    window = time.monotonic() - t0
    stats = gen.stats
    if not stats.done:
        raise BenchError(f"no request completed at {label}")
    used, system, exited = cpu_delta(before, after)
    outcomes = stats.outcomes or []
    errors = sum(1 for o in outcomes if o.status == 0 or o.status >= 400)
    wall = (gen.finished or 0.0) - (gen.started or 0.0)
    h = stats.histogram
    traces = read_traces(cluster, outcomes, cfg.trace_sample, cfg.seed)
    cluster_ms = sum(used.values()) * 1000 / stats.done
    step = {
        "asked_rps": cfg.rps,
        "path": cfg.fixed_path or "mix",
        "requests": stats.done,
        "achieved_rps": round(stats.done / wall, 1),
        "p50_ms": round(h.get_value_at_percentile(50) / 1000, 3),
        "p99_ms": round(h.get_value_at_percentile(99) / 1000, 3),
        "errors": errors,
        "statuses": dict(sorted(stats.statuses.items())),
        "waited_for_slot": stats.waited_for_slot,
        **{k: traces[k] for k in ("sampled", "complete_share", "incomplete_reasons")},
        "self_time_ms": traces["self_time_ms"],
        "emulation_ms": traces["emulation_ms"],
        "cpu_ms_per_request": round(cluster_ms, 3),
        "cpu_ms_per_request_by_component": by_component(used, stats.done),
        "kernel_share_by_component": {
            c: round(system_ms / total_ms, 2) if total_ms else None
            for (c, total_ms), system_ms in zip(
                by_component(used, 1).items(), by_component(system, 1).values(), strict=True
            )
        },
        "kernel_share": round(sum(system.values()) / sum(used.values()), 3),
        "cluster_cores": round(sum(used.values()) / window, 3),
        "machine_cores": machine,
        "generator_cpu_ms_per_request": round(gen_cpu * 1000 / stats.done, 3),
        "cpu_window_s": round(window, 2),
        "settle_s": round(settle, 2),
        "loadavg_1m_at_start": round(load[0], 2),
        "component_restarts": cluster.restarts() - restarts,
        "processes_exited": exited,
    }
    log(
        f"  achieved {step['achieved_rps']} req/s, p50 {step['p50_ms']} ms, p99 "
        f"{step['p99_ms']} ms, errors {errors}, complete {traces['complete_share']:.1%} of "
        f"{traces['sampled']}, cluster CPU {cluster_ms:.1f} ms/req "
        f"({step['cluster_cores']} cores), load {load[0]:.2f}"
    )
    return step


def sustained(step: dict[str, Any]) -> bool:
    return bool(
        step["p99_ms"] <= SUSTAINED["p99_ms"]
        and step["errors"] <= SUSTAINED["errors"]
        and step["complete_share"] >= SUSTAINED["complete_share"]
    )


def idle_cpu(cluster: Cluster, seconds: float) -> dict[str, float]:
    """Cores each component uses with no traffic (probes, watches, exporters)."""
    before = cpu_snapshot(cluster.pid)
    time.sleep(seconds)
    used, _, _ = cpu_delta(before, cpu_snapshot(cluster.pid))
    return {c: round(ms / seconds, 1) for c, ms in by_component(used, 1).items()}


# -- the run -----------------------------------------------------------------------------


def measure(args: argparse.Namespace, result: dict[str, Any]) -> None:
    cluster = Cluster()
    cluster.dataplane = args.dataplane
    try:
        cluster.up()
        result["dataplane"] = cluster.status().get("dataplane", "userspace")
        result["connections"] = args.connections
        if args.connections == "keep-alive":
            rules = Path(cluster.home) / "keep-alive.yaml"
            rules.write_text(keep_alive_rules())
            proc = cluster.cli("apply", "-f", str(rules))
            if proc.returncode != 0:
                raise BenchError(f"hopscope apply failed: {proc.stderr.strip()[-500:]}")
            log(f"applied {len(KEEP_ALIVE_SERVICES)} DestinationRules reusing connections")
        os.environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = API_URL
        from telemetry.tracing import setup_tracing

        provider = setup_tracing(
            "hopscope-traffic", {"hopscope.client": "bench-e2e"}, set_global=False
        )

        def cfg(rps: float, seconds: float, path: str | None = None) -> StepConfig:
            return StepConfig(
                rps, seconds, args.concurrency, args.trace_sample, args.seed, fixed_path=path
            )

        log("warm-up: 10 req/s for 5s (not reported)")
        run_generator(cfg(10, 5), provider)
        cluster.settle()
        result["idle_cpu_ms_per_s"] = idle_cpu(cluster, 5.0)
        unloaded = run_step(cluster, cfg(UNLOADED_RPS, args.unloaded_seconds, "/"), provider)
        result["unloaded"] = unloaded
        result["unloaded_p50_ms"] = unloaded["p50_ms"]
        steps = result["steps"]
        for rps in args.steps:
            steps.append(run_step(cluster, cfg(rps, args.seconds_per_step), provider))
        fixed = next((s for s in steps if s["asked_rps"] == FIXED_RPS), None)
        if fixed is None:
            fixed = run_step(cluster, cfg(FIXED_RPS, args.seconds_per_step), provider)
            result["fixed_rate_step"] = fixed
        result["cpu_ms_per_request"] = fixed["cpu_ms_per_request"]
        result["cpu_ms_per_request_by_component"] = fixed["cpu_ms_per_request_by_component"]
        result["generator_cpu_ms_per_request"] = fixed["generator_cpu_ms_per_request"]
        for kind in NAT_HOPS:
            # Headline from the unloaded step (the hop's own cost, no queueing behind it).
            name = kind.replace("-", "_")
            for key, field, step in (
                (f"{name}_self_ms_median", "self_time_ms", unloaded),
                (f"{name}_self_ms_at_50", "self_time_ms", fixed),
                (f"{name}_emulation_ms_median", "emulation_ms", unloaded),
            ):
                st = step[field].get(kind)
                result[key] = st["median"] if st else None
        ok = [s["asked_rps"] for s in steps if sustained(s)]
        result["max_sustained_rps"] = max(ok) if ok else None
        if not ok:
            result["max_sustained_note"] = "no step met p99 ≤ 100 ms, 0 errors, ≥ 99.9 % complete"
        provider.shutdown()
    finally:
        cluster.down()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps",
        default="25,50,100,200,400",
        help="offered rates in req/s, comma-separated (default: %(default)s)",
    )
    parser.add_argument("--seconds-per-step", type=float, default=10.0)
    parser.add_argument("--unloaded-seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64, help="as hopscope traffic")
    parser.add_argument("--trace-sample", type=int, default=300, help="traces checked per step")
    parser.add_argument("--seed", type=int, default=13)
    parser.add_argument(
        "--dataplane",
        choices=["auto", "userspace", "kernel"],
        default="auto",
        help="the data path `hopscope up` runs (as its --dataplane; the one that ran is reported)",
    )
    parser.add_argument(
        "--connections",
        choices=["per-request", "keep-alive"],
        default="per-request",
        help="the shop as shipped (a new connection per HTTP/1.1 request through kube-proxy), "
        "or with DestinationRules reusing connections (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="no summary table on stderr")
    args = parser.parse_args()
    try:
        args.steps = [float(s) for s in args.steps.split(",") if s.strip()]
        if not args.steps or min(args.steps) <= 0:
            raise ValueError
    except ValueError:
        parser.error(f"--steps {args.steps!r}: give positive rates, e.g. 25,50,100")
    if args.seconds_per_step <= 0 or args.concurrency <= 0 or args.trace_sample <= 0:
        parser.error("--seconds-per-step, --concurrency and --trace-sample must be positive")
    result: dict[str, Any] = {
        "benchmark": "e2e",
        "cpus": os.cpu_count(),
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "steps": [],
        "goals": {**GOALS, "sustained_means": SUSTAINED},
    }
    error = None
    try:
        measure(args, result)
    except BenchError as exc:
        error = str(exc)
    except (requests.RequestException, psutil.Error, subprocess.TimeoutExpired) as exc:
        error = f"{type(exc).__name__}: {exc}"
    except KeyboardInterrupt:
        error = "interrupted"
    result["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if error:
        result["error"] = error
        log(f"error: {error}")
    else:
        result["meets_goals"] = bool(
            result["cpu_ms_per_request"] <= GOALS["cpu_ms_per_request"]
            and (result["max_sustained_rps"] or 0) >= GOALS["max_sustained_rps"]
            and result["unloaded_p50_ms"] <= GOALS["unloaded_p50_ms"]
        )
        if not args.json:
            print_table(result)
    print(json.dumps(result))
    if error:
        sys.exit(1)


def print_table(result: dict[str, Any]) -> None:
    steps = result["steps"]
    components = list(steps[0]["cpu_ms_per_request_by_component"]) if steps else []
    log(
        "\nasked  achieved  p50 ms   p99 ms  errors  complete  cpu ms/req  " + "  ".join(components)
    )
    for s in steps:
        per = s["cpu_ms_per_request_by_component"]
        log(
            f"{s['asked_rps']:>5g}  {s['achieved_rps']:>8}  {s['p50_ms']:>6}  {s['p99_ms']:>7}  "
            f"{s['errors']:>6}  {s['complete_share']:>8.2%}  {s['cpu_ms_per_request']:>10}  "
            + "  ".join(f"{per.get(c, 0):>{len(c)}}" for c in components)
        )
    log(
        f"max_sustained_rps {result['max_sustained_rps']}  cpu_ms_per_request "
        f"{result['cpu_ms_per_request']}  unloaded_p50_ms {result['unloaded_p50_ms']}  "
        f"kube-proxy self {result['kube_proxy_self_ms_median']} ms "
        f"(emulation {result['kube_proxy_emulation_ms_median']})  "
        f"cni-overlay self {result['cni_overlay_self_ms_median']} ms "
        f"(emulation {result['cni_overlay_emulation_ms_median']})"
    )


if __name__ == "__main__":
    main()

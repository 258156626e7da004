"""``python -m mesh.kernel.kubeproxy --api URL``: kube-proxy in iptables mode, for real.

Watches the control plane's state the way kube-proxy watches the API server, turns every
new version into the rule set (:func:`~mesh.kubeproxy.rules.build_rules`, the same one the
userspace proxy serves) and loads it into each node's namespace with one atomic
``iptables-restore`` per node (:class:`~mesh.kernel.proxier.KernelProxier`). Bursts of
changes are coalesced: a sync starts at most every ``--min-sync-period`` seconds, like
kube-proxy's ``minSyncPeriod``.

Serves ``/healthz`` (JSON: the last synced version and when) and ``/metrics`` with
kube-proxy's own sync metrics on ``--metrics-address:--metrics-port``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, generate_latest

from mesh import addresses
from mesh.kernel.conntrack import (
    NFLOG_COPY,
    VXLAN_LOG_CHAIN,
    ConntrackWatcher,
    Flow,
    dump,
    nflog_socket,
    parse_nflog,
    recent_hits,
    vxlan_log_rules,
)
from mesh.kernel.flowmetrics import REFRESH_S, FlowMetrics
from mesh.kernel.forward import in_netns
from mesh.kernel.healthcheck import HealthCheckServers
from mesh.kernel.iptables import NO_LOCAL_PREFIX, IptablesRenderer
from mesh.kernel.policy import NFLOG_GROUP
from mesh.kernel.proxier import KernelProxier
from mesh.kernel.renderer import ProxyNode
from mesh.kernel.topology import KernelNetwork, KernelNetworkError
from mesh.kubeproxy.rules import RuleSet, build_rules
from mesh.model.types import ClusterState
from mesh.model.watch import StateWatcher
from mesh.otlp import OTLP_HTTP_PORT
from mesh.otlp.grpc_logs import OTLP_GRPC_PORT

log = logging.getLogger("kube-proxy")

RESTORE = ("iptables-restore", "--noflush")
XT_RECENT = "/proc/thread-self/net/xt_recent"
"""The ``recent`` match's lists, of the network namespace of the thread reading them."""

SYNC_DURATION = Histogram(
    "kubeproxy_sync_proxy_rules_duration_seconds",
    "SyncProxyRules latency in seconds (render plus iptables-restore, all nodes)",
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2),
)
NETWORK_PROGRAMMING = Histogram(
    "kubeproxy_network_programming_duration_seconds",
    "In-cluster network programming latency in seconds (a change seen to its rules loaded)",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
LAST_SYNC = Gauge(
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
    "The last time proxy rules were successfully synced",
)
SYNC_FAILURES = Counter(
    "kubeproxy_sync_proxy_rules_iptables_restore_failures",
    "Cumulative proxy iptables restore failures",
)


class KernelKubeProxy:
    """Keeps every node's rules equal to the newest cluster state."""

    def __init__(self, network: KernelNetwork, min_sync_period: float = 0.05) -> None:
        self.network = network
        self.min_sync_period = min_sync_period
        self.proxiers: dict[str, KernelProxier] = {}
        self._policy_loaded: dict[str, str] = {}
        """Node -> the policy document it holds (to delete the chains of pods gone)."""
        self.synced_version: int | None = None
        self.synced_at: float | None = None
        self.last_error: str | None = None
        self.overlay_delay_ms = 0.0
        self.overlay_error: str | None = None
        """Why the ConfigMap's ``overlayDelay`` could not be put on the VXLAN devices."""
        self.paused = False
        """Rule sync stopped (``POST /debug/sync?paused=true``): kube-proxy cut off from the
        API server keeps the rules it has, as a real one does."""
        self.affinity = False
        """Whether some Service has ClientIP affinity (the nodes keep ``recent`` lists)."""
        self.rules: RuleSet | None = None
        """The rule set the nodes hold (the last successful sync's)."""
        self.requested_mode = "iptables"
        """What the KubeProxyConfiguration asks for (only iptables is done here)."""
        self.synced_hooks: list[Callable[[RuleSet], None]] = []
        self.latest: ClusterState | None = None
        """The newest state from the watch."""
        self._received: float | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sync", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def on_state(self, state: ClusterState) -> None:
        """From the watch thread: remember the newest state, wake the sync loop."""
        if self._received is None:
            self._received = time.monotonic()  # the oldest change the next sync carries
        self.latest = state
        self._wake.set()

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        log.warning("rule sync " + ("paused" if paused else "resumed"))
        if not paused:
            self._wake.set()  # catch up with everything that changed meanwhile

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            state, received = self.latest, self._received
            if state is not None and not self.paused:
                self._received = None
                if self.sync(state) and received is not None:
                    NETWORK_PROGRAMMING.observe(time.monotonic() - received)
            time.sleep(self.min_sync_period)

    def sync(self, state: ClusterState) -> bool:
        """Load the rules for ``state`` into every node; whether it worked."""
        started = time.perf_counter()
        rules = build_rules(state, dict(addresses.NODE_IPS))
        self.affinity = any(r.session_affinity == "ClientIP" for r in rules.rules.values())
        if state.proxy.mode != self.requested_mode:
            self.requested_mode = state.proxy.mode
            if self.requested_mode != "iptables":
                log.warning(
                    "KubeProxyConfiguration asks for another mode: this kernel has no IPVS, "
                    "the kernel data path runs iptables mode (ipvs: `hopscope up --dataplane "
                    "userspace`)",
                    extra={"mode": self.requested_mode},
                )
        try:
            for node in addresses.NODE_IPS:
                proxier = self.proxiers.get(node)
                if proxier is None:
                    proxy_node = ProxyNode(
                        node,
                        cluster_cidr=addresses.POD_NETWORK_CIDR,
                        drop_log_group=NFLOG_GROUP,  # the trace names what was dropped
                    )
                    proxier = self.proxiers[node] = KernelProxier(self.network, proxy_node)
                proxier.sync(rules)
                self._sync_policies(state, node)
            self._sync_overlay_delay(state.network.overlay_delay_ms)
        except KernelNetworkError as exc:
            SYNC_FAILURES.inc()
            self.last_error = str(exc)
            log.error(
                "rule sync failed", extra={"version": state.resource_version, "error": str(exc)}
            )
            return False
        took = time.perf_counter() - started
        self.rules = rules
        for hook in self.synced_hooks:
            hook(rules)
        SYNC_DURATION.observe(took)
        LAST_SYNC.set_to_current_time()
        self.synced_version, self.synced_at, self.last_error = (
            state.resource_version,
            time.time(),
            None,
        )
        log.info(
            "rules synced",
            extra={
                "version": state.resource_version,
                "services": len(rules.rules),
                "ms": round(took * 1000, 2),
            },
        )
        return True

    def _sync_overlay_delay(self, delay_ms: float) -> None:
        """The CNI ConfigMap's ``overlayDelay`` as a netem qdisc on each node's VXLAN device
        (a slow or congested underlay)."""
        if delay_ms == self.overlay_delay_ms:
            return
        import subprocess

        from mesh.kernel.topology import VXLAN_DEVICE

        self.overlay_error = None
        for node in addresses.NODE_IPS:
            netns = self.network.node_netns(node)
            tc = ["tc", "qdisc", "replace", "dev", VXLAN_DEVICE, "root", "netem"]
            argv = [*tc, "delay", f"{delay_ms:g}ms"] if delay_ms else [
                "tc", "qdisc", "del", "dev", VXLAN_DEVICE, "root",
            ]  # fmt: skip
            done = subprocess.run(
                self.network.exec_argv(netns, argv), capture_output=True, text=True, check=False
            )
            if done.returncode != 0 and delay_ms:
                reason = done.stderr.strip() or f"tc exited {done.returncode}"
                if "unknown" in reason.lower():
                    reason = "this kernel has no netem qdisc (sch_netem)"
                self.overlay_error = f"cannot delay {VXLAN_DEVICE} on {node}: {reason}"
                log.error("overlay delay not applied", extra={"error": self.overlay_error})
                return
        self.overlay_delay_ms = delay_ms

    def _sync_policies(self, state: ClusterState, node: str) -> None:
        """The CNI's policy agent, beside kube-proxy: the node's NetworkPolicy rules."""
        from mesh.kernel import policy

        if node not in self._policy_loaded:
            if f"\n:{policy.POLICY_CHAIN} " not in self.network.save(node, "filter"):
                self.network.restore(node, RESTORE, policy.setup())
            self._policy_loaded[node] = ""
        document = policy.render(
            state,
            node,
            addresses.CLUSTER_HOST_IP,
            (addresses.CONTROL_PLANE_PORT, OTLP_HTTP_PORT, OTLP_GRPC_PORT),
            (addresses.SIDECAR_ADMIN_PORT, addresses.APP_METRICS_PORT),
            addresses.SERVICE_CIDR,
        )
        load = IptablesRenderer().delete_stale(document, self._policy_loaded[node])
        self.network.restore(node, RESTORE, load)
        self._policy_loaded[node] = document

    def health(self) -> dict[str, Any]:
        rules = self.rules.rules.values() if self.rules is not None else ()
        return {
            "mode": "iptables",
            "requestedMode": self.requested_mode,
            "dataplane": "kernel",
            # Service addresses whose rules REJECT (no ready endpoint), as the relay lists
            "rejecting": sorted(
                f"{r.vip}:{r.port} ({r.namespace}/{r.name})" for r in rules if not r.ready_endpoints
            ),
            "synced_version": self.synced_version,
            "synced_at": self.synced_at,
            "last_error": self.last_error,
            "lastUpdated": self.synced_at,
            "currentTime": time.time(),
            "healthy": self.synced_version is not None and not self.paused,
            "syncPaused": self.paused,
            "overlayDelayMs": self.overlay_delay_ms,
            "overlayDelayError": self.overlay_error,
        }


EVENTS = Counter(
    "hopscope_kernel_conntrack_events",
    "Conntrack events read from a node namespace",
    ["node", "event"],
)
DENIES = Counter(
    "hopscope_kernel_policy_denied_packets",
    "Packets a node's NetworkPolicy rules (or kube-proxy's no-local-endpoint rule) dropped",
    ["node"],
)
OVERRUNS = Counter(
    "hopscope_kernel_conntrack_overruns",
    "Times a node's conntrack event socket overflowed (events lost, ENOBUFS)",
    ["node"],
)


class FlowReporter:
    """Watches each node's conntrack events; sends the NATed TCP flows to the control
    plane's socket (one JSON list per datagram), after a dump of what is already there."""

    def __init__(
        self,
        network: KernelNetwork,
        path: str,
        affinity: Callable[[], bool] = lambda: True,
        metrics: FlowMetrics | None = None,
    ) -> None:
        self.network = network
        self.path = path
        self.affinity = affinity  # False: no recent lists to read
        self.metrics = metrics
        self.sent = 0
        self.unsent = 0
        self._out = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._stop = threading.Event()

    def start(self) -> None:
        for node in addresses.NODE_IPS:
            for target, name in ((self._watch, "ct"), (self._denies, "nflog")):
                threading.Thread(
                    target=target, args=(node,), name=f"{name}-{node}", daemon=True
                ).start()
        if self.metrics is not None:
            threading.Thread(target=self._refresh, name="ct-bytes", daemon=True).start()

    def _refresh(self) -> None:
        """Open connections' byte counts, from a dump of each node that has some (only
        their entries are read: a busy node's table is mostly ``TIME_WAIT``)."""
        assert self.metrics is not None
        while not self._stop.wait(REFRESH_S):
            for node, ids in sorted(self.metrics.open_ids().items()):
                try:
                    self.metrics.refresh(node, dump(self.network.node_netns(node), ids))
                except OSError as exc:  # the namespace is going away
                    log.debug("conntrack dump failed", extra={"node": node, "error": str(exc)})

    def _denies(self, node: str) -> None:
        """Packets the node's NetworkPolicy rules dropped, and external packets dropped for
        want of a local endpoint (one NFLOG group, told apart by prefix)."""
        netns = self.network.node_netns(node)
        while not self._stop.is_set():
            try:
                self._log_vxlan(node)
                sock = nflog_socket(netns, NFLOG_GROUP, copy_range=NFLOG_COPY)
            except OSError as exc:
                log.warning("NFLOG watch restarting", extra={"node": node, "error": str(exc)})
                self._stop.wait(1.0)
                continue
            sock.settimeout(0.5)
            try:
                while not self._stop.is_set():
                    try:
                        data = sock.recv(1 << 16)
                    except TimeoutError:
                        continue
                    logged = parse_nflog(data, time.time_ns())
                    tunnels = [d for d in logged if d.vni is not None]
                    if tunnels:  # the overlay's packets that opened connections
                        self._post(
                            [
                                {**dataclasses.asdict(d), "kind": "vxlan", "node": node}
                                for d in tunnels
                            ]
                        )
                        logged = [d for d in logged if d.vni is None]
                    DENIES.labels(node).inc(len(logged))
                    for packet in logged:
                        if self.metrics is not None:
                            self.metrics.denied(packet)
                        no_local = packet.prefix.startswith(NO_LOCAL_PREFIX)
                        log.warning(
                            "dropped: no local endpoint"
                            if no_local
                            else "dropped by NetworkPolicy",
                            extra={
                                "node": node,
                                "rule": packet.prefix,
                                "src": packet.src,
                                "dst": packet.dst,
                            },
                        )
                    self._post(
                        [{**dataclasses.asdict(d), "kind": "deny", "node": node} for d in logged]
                    )
            except OSError as exc:
                log.warning("NFLOG watch restarting", extra={"node": node, "error": str(exc)})
                self._stop.wait(1.0)
            finally:
                sock.close()

    def _log_vxlan(self, node: str) -> None:
        """Once per node: log each VXLAN packet leaving it whose inner packet opens a TCP
        connection, for the overlay hop's outer tuple (the outer source port is the kernel's
        hash of the inner flow: only the packet says it)."""
        try:
            if VXLAN_LOG_CHAIN not in self.network.save(node, "filter"):
                self.network.restore(node, RESTORE, vxlan_log_rules(NFLOG_GROUP))
        except KernelNetworkError as exc:
            log.warning("cannot log VXLAN packets", extra={"node": node, "error": str(exc)})

    def stop(self) -> None:
        self._stop.set()

    def _watch(self, node: str) -> None:
        netns = self.network.node_netns(node)
        while not self._stop.is_set():
            watcher = ConntrackWatcher(netns)
            try:
                watcher.open()
                # A plain netlink dump: pyroute2's netns sockets fork a helper and stop it
                # with SIGTERM, and a forked child shares our asyncio signal wake-up
                # descriptor, so its SIGTERM would read as ours and stop kube-proxy.
                self._send(node, dump(netns))
                while not self._stop.is_set():
                    before = watcher.overruns
                    flows = watcher.read(timeout=0.5)
                    if watcher.overruns != before:
                        OVERRUNS.labels(node).inc()
                    for flow in flows:
                        EVENTS.labels(node, flow.event).inc()
                    if self.metrics is not None:
                        self.metrics.observe(node, flows)
                    self._send(node, flows)
            except OSError as exc:  # the namespace is going away, or netlink failed
                log.warning("conntrack watch restarting", extra={"node": node, "error": str(exc)})
                self._stop.wait(1.0)
            finally:
                watcher.close()

    def _send(self, node: str, flows: list[Flow]) -> None:
        flows = self._with_recent(node, flows)
        records = [
            {**vars(f), "node": node}  # flat fields: no deep copy as asdict() makes
            for f in flows
            # the joiner keeps only NATed flows: another's destroy event has nothing to close
            if f.protocol == "tcp" and (f.dnat or f.snat)
        ]
        self._post(records)

    def _with_recent(self, node: str, flows: list[Flow]) -> list[Flow]:
        """New DNATed flows with what the node's ``recent`` lists (ClientIP affinity) hold for
        their client, read right after the rule that set them ran."""
        if not self.affinity() or not any(f.event == "new" and f.dnat for f in flows):
            return flows
        lists: dict[str, str] = {}
        with in_netns(self.network.node_netns(node)):
            try:
                for name in os.listdir(XT_RECENT):
                    with open(os.path.join(XT_RECENT, name)) as fh:
                        lists[name] = fh.read()
            except OSError:
                return flows  # no recent lists: no Service with affinity on this node
        if not lists:
            return flows
        out = []
        for flow in flows:
            if flow.event == "new" and flow.dnat:
                hits = recent_hits(lists, flow.original_src.rsplit(":", 1)[0])
                flow = dataclasses.replace(flow, recent=hits) if hits else flow
            out.append(flow)
        return out

    def _post(self, records: list[dict[str, Any]]) -> None:
        for start in range(0, len(records), 200):
            try:
                self._out.sendto(json.dumps(records[start : start + 200]).encode(), self.path)
                self.sent += 1
            except OSError:
                self.unsent += 1  # the control plane is not listening (yet, or any more)


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def admin_app(proxy: KernelKubeProxy) -> Callable[..., Iterable[bytes]]:
    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            start_response("200 OK", [("Content-Type", "text/plain; version=0.0.4")])
            return [generate_latest(REGISTRY)]
        if path == "/healthz":
            healthy = proxy.synced_version is not None and proxy.last_error is None
            body = json.dumps(proxy.health()).encode()
            start_response(
                "200 OK" if healthy else "503 Service Unavailable",
                [("Content-Type", "application/json")],
            )
            return [body]
        if path == "/debug/sync":
            # POST ?paused=true|false: kube-proxy losing (or regaining) the API server
            if environ.get("REQUEST_METHOD") == "POST":
                proxy.set_paused("paused=true" in environ.get("QUERY_STRING", ""))
            body = json.dumps({"paused": proxy.paused, "lastUpdated": proxy.synced_at}).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /healthz, /metrics or /debug/sync\n"]

    return app


def main(argv: list[str] | None = None) -> None:
    from mesh.signals import wait_for_stop_signal
    from telemetry.logs import setup_json_logging

    parser = argparse.ArgumentParser(
        prog="python -m mesh.kernel.kubeproxy", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--api", required=True, help="control-plane API URL to watch")
    parser.add_argument("--prefix", default="hopscope", help="namespace name prefix of the cluster")
    parser.add_argument("--metrics-address", default="127.10.0.1")
    parser.add_argument("--metrics-port", type=int, default=addresses.KUBE_PROXY_METRICS_PORT)
    parser.add_argument("--min-sync-period", type=float, default=0.05, metavar="SECONDS")
    parser.add_argument(
        "--flows-socket", metavar="PATH", help="the control plane's socket for conntrack flows"
    )
    args = parser.parse_args(argv)
    setup_json_logging({"component": "kube-proxy"})
    proxy = KernelKubeProxy(KernelNetwork(prefix=args.prefix), args.min_sync_period)
    proxy.start()
    server = make_server(
        args.metrics_address, args.metrics_port, admin_app(proxy), handler_class=_Quiet
    )
    threading.Thread(target=server.serve_forever, name="admin", daemon=True).start()
    health = HealthCheckServers(proxy.network.node_netns)  # healthCheckNodePorts
    proxy.synced_hooks.append(health.sync)
    watcher = StateWatcher(args.api, proxy.on_state)
    watcher.start()
    reporter = None
    if args.flows_socket:
        metrics = FlowMetrics(
            lambda: proxy.rules,
            lambda: proxy.overlay_delay_ms / 1000,
            state=lambda: proxy.latest,
        )
        proxy.synced_hooks.append(metrics.on_rules)
        reporter = FlowReporter(proxy.network, args.flows_socket, lambda: proxy.affinity, metrics)
    if reporter is not None:
        reporter.start()
    log.info("kube-proxy started", extra={"mode": "iptables", "dataplane": "kernel"})
    import asyncio

    received = asyncio.run(wait_for_stop_signal())
    log.info("kube-proxy stopping", extra={"signal": received})
    watcher.stop()
    if reporter is not None:
        reporter.stop()
    proxy.stop()
    health.stop()
    server.shutdown()


if __name__ == "__main__":
    main()

"""TCP forwarders between network namespaces: how the host reaches the cluster's namespaces.

A socket belongs to the network namespace its creator was in when it was made, for its
whole life. So one process can listen on the host's loopback and connect inside a node's
namespace: it switches its thread into the target namespace (``setns``) just long enough to
create each socket (:func:`socket_in`). Nothing is added to the host's own network.

``python -m mesh.kernel.forward LISTEN=CONNECT ...`` runs forwarders until killed; each side
is ``[NETNS/]IP:PORT`` (no ``NETNS/``: the process's own namespace). A cluster without root
cannot enter the user's namespace: ``--port-broker NETNS=SOCKET`` has the listeners there
bound by the port broker of :mod:`mesh.kernel.rootless` instead. Bytes are copied both
ways, with half-closes passed on; a target that refuses or cannot be reached closes the
client's connection at once, and the forwarder keeps serving the others.

A client that half-closes (or gives up) while the target is still answering leaves its
side out of the event loop: asyncio then holds the relay only weakly, and the garbage
collector used to end it mid-way ("Task was destroyed but it is pending!"), cutting the
answer off. Each connection's task is held until it ends (:func:`connection_handler`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mesh import addresses
from mesh.cni.streams import connection_handler

if TYPE_CHECKING:
    from mesh.model.types import ClusterState, Service

log = logging.getLogger("hopscope.forward")

NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
_switch = threading.Lock()
_brokers: dict[str, str] = {}
"""Namespace name -> the socket of the port broker that listens there (rootless clusters)."""


@dataclass(frozen=True)
class Endpoint:
    netns: str | None
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Endpoint:
        """``[NETNS/]IP:PORT``; raises ValueError with what is wrong."""
        netns, _, address = text.rpartition("/")
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{text!r}: expected [NETNS/]IP:PORT")
        return cls(netns or None, host, int(port))

    def __str__(self) -> str:
        return f"{self.netns + '/' if self.netns else ''}{self.host}:{self.port}"


def _setns(libc: ctypes.CDLL, name: str) -> None:
    """Move the calling thread into namespace ``name`` (a name under /run/netns)."""
    path = os.path.join(NETNS_DIR, name)
    try:
        target = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise OSError(f"no network namespace {name} ({path})") from None
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(target)


@contextlib.contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the block with this thread in namespace ``name`` (None: stay)."""
    if name is None:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    with _switch:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            _setns(libc, name)
            try:
                yield
            finally:
                if libc.setns(home, CLONE_NEWNET) != 0:  # pragma: no cover - cannot fail back
                    os._exit(70)
        finally:
            os.close(home)


def enter_netns(name: str) -> None:
    """Move the calling thread into namespace ``name`` for good (threads and processes it
    starts afterwards are born there)."""
    _setns(ctypes.CDLL(None, use_errno=True), name)


def socket_in(
    netns: str | None,
    kind: int = socket.SOCK_STREAM,
    proto: int = 0,
    family: int = socket.AF_INET,
) -> socket.socket:
    """A new socket that belongs to namespace ``netns`` (IPv4 unless ``family`` says)."""
    with in_netns(netns):
        return socket.socket(family, kind, proto)


def use_port_broker(netns: str, path: str) -> None:
    """Listeners in ``netns`` come from the port broker at ``path`` from now on."""
    _brokers[netns] = path


def listener_in(endpoint: Endpoint, backlog: int = 512) -> socket.socket:
    """A non-blocking socket listening on ``endpoint`` in its namespace (bound by the port
    broker when one serves that namespace)."""
    broker = _brokers.get(endpoint.netns or "")
    if broker is not None:
        from mesh.kernel.rootless import request_listener

        sock = request_listener(broker, endpoint.host, endpoint.port, backlog)
        sock.setblocking(False)
        return sock
    sock = socket_in(endpoint.netns)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((endpoint.host, endpoint.port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {endpoint}: {exc.strerror}") from None
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


async def open_in(
    endpoint: Endpoint, timeout: float = 5.0, source: tuple[str, int] | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to ``endpoint`` from inside its namespace (from ``source`` if given: its
    port if free, else any)."""
    sock = socket_in(endpoint.netns)
    sock.setblocking(False)
    try:
        if source is not None:
            _bind_source(sock, source)
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, (endpoint.host, endpoint.port)), timeout)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


def _bind_source(sock: socket.socket, source: tuple[str, int]) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(source)
    except OSError:
        sock.bind((source[0], 0))


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()


class LoadBalancerReport:
    """Tells the control plane's hop joiner (:mod:`mesh.kernel.hops`) which connections a
    load balancer address carried: the flow conntrack reports shows only the node's NodePort
    it was sent to, and a plain client (no span of its own) says nowhere which address it
    dialed. One JSON datagram per connection on the joiner's flows socket; best effort."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)

    def sent(self, client: str, address: str, node: str) -> None:
        """``client`` (``ip:port`` inside the cluster) was sent from ``address`` to ``node``."""
        record = {"kind": "lb", "node": node, "client": client, "address": address}
        try:
            self._socket.sendto(json.dumps([record]).encode(), self.path)
        except OSError as exc:  # no control plane listening (yet), or its buffer is full
            log.debug("load balancer report lost", extra={"error": str(exc)})


class Forwarder:
    """Accepts on one endpoint and relays each connection to another."""

    def __init__(
        self,
        listen: Endpoint,
        target: Endpoint,
        clients: bool = False,
        report: tuple[LoadBalancerReport, str, str] | None = None,
    ) -> None:
        self.listen = listen
        self.target = target
        self.clients = clients
        """Connect from the client's inner address (:func:`addresses.kernel_client_address`)
        and port, so the pod sees which external client it serves."""
        self.report = report
        """For a load balancer address: where to report each connection, the address as
        ``ip:port`` and the node it sends to."""
        self.connections = 0
        self.failures = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, sock=listener_in(self.listen))

    @connection_handler  # referenced until it ends: see the module's notes on half-closes
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        source = None
        if self.clients:
            peer = writer.get_extra_info("peername")
            inner = addresses.kernel_client_address(peer[0]) if peer else ""
            source = (inner, peer[1]) if peer and inner != peer[0] else None
        try:
            up_reader, up_writer = await open_in(self.target, source=source)
        except (TimeoutError, OSError) as exc:
            self.failures += 1
            log.warning(
                "forward failed",
                extra={
                    "listen": str(self.listen),
                    "target": str(self.target),
                    "error": str(exc) or type(exc).__name__,
                },
            )
            writer.transport.abort()
            return
        if self.report is not None:
            report, address, node = self.report
            local = up_writer.get_extra_info("sockname")
            if local:
                report.sent(f"{local[0]}:{local[1]}", address, node)
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class ServiceForwards:
    """Forwarders that follow the cluster's Services: each NodePort on each node's host
    address (:data:`addresses.HOST_NODE_IPS`), and each LoadBalancer address, to the node
    inside (a cloud load balancer sends to a node's NodePort, preferring nodes with a local
    endpoint when ``externalTrafficPolicy: Local``). Clients keep their identity
    (``clients=True``)."""

    def __init__(self, api: str, host_netns: str, flows_socket: str | None = None) -> None:
        self.api = api
        self.host_netns = host_netns
        self.report = LoadBalancerReport(flows_socket) if flows_socket else None
        self.active: dict[Endpoint, Forwarder] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        from mesh.model.watch import StateWatcher

        self._loop = asyncio.get_running_loop()
        StateWatcher(self.api, self._on_state).start()

    def _on_state(self, state: Any) -> None:
        assert self._loop is not None
        wanted = service_forwards(state, self.host_netns)
        asyncio.run_coroutine_threadsafe(self.apply(wanted), self._loop)

    async def apply(self, wanted: dict[Endpoint, Endpoint]) -> None:
        for listen in list(self.active):
            if wanted.get(listen) != self.active[listen].target:
                await self.active.pop(listen).close()
        for listen, target in wanted.items():
            if listen in self.active:
                continue
            report = None
            if self.report is not None and listen.host not in _HOST_NODE_IPS:
                node = _NODE_BY_IP.get(target.host)  # a load balancer address: to that node
                if node is not None:
                    report = (self.report, f"{listen.host}:{listen.port}", node)
            forwarder = Forwarder(listen, target, clients=True, report=report)
            try:
                await forwarder.start()
            except OSError as exc:
                log.warning("cannot forward", extra={"listen": str(listen), "error": str(exc)})
                continue
            self.active[listen] = forwarder
            log.info("forwarding", extra={"listen": str(listen), "target": str(target)})


_HOST_NODE_IPS = frozenset(addresses.HOST_NODE_IPS.values())
_NODE_BY_IP = {ip: node for node, ip in addresses.NODE_IPS.items()}


def service_forwards(state: Any, host_netns: str) -> dict[Endpoint, Endpoint]:
    """Host address → node address for every NodePort and LoadBalancer port of ``state``."""
    wanted: dict[Endpoint, Endpoint] = {}
    for svc in state.services:
        if svc.type not in ("NodePort", "LoadBalancer"):
            continue
        lb_node = load_balancer_node(state, svc)
        for port in svc.ports:
            if not port.node_port or port.protocol != "TCP":
                continue
            for node, host_ip in addresses.HOST_NODE_IPS.items():
                target = Endpoint(None, addresses.NODE_IPS[node], port.node_port)
                wanted[Endpoint(host_netns, host_ip, port.node_port)] = target
            for lb_ip in svc.load_balancer_ingress:
                if lb_ip == addresses.INGRESS_IP:
                    continue  # the ingress controller's address has its own forwarder
                target = Endpoint(None, addresses.NODE_IPS[lb_node], port.node_port)
                wanted[Endpoint(host_netns, lb_ip, port.port)] = target
        if svc.health_check_node_port:  # kube-proxy answers it on each node
            hc = svc.health_check_node_port
            for node, host_ip in addresses.HOST_NODE_IPS.items():
                wanted[Endpoint(host_netns, host_ip, hc)] = Endpoint(
                    None, addresses.NODE_IPS[node], hc
                )
    return wanted


def load_balancer_node(state: ClusterState, svc: Service) -> str:
    """The node a LoadBalancer address sends to: the first with a ready local endpoint
    under ``externalTrafficPolicy: Local`` (its health check says 200), else the first."""
    nodes = list(addresses.NODE_IPS)
    if svc.external_traffic_policy == "Local":
        ready = {
            e.node
            for eps in state.endpoint_slices
            if eps.namespace == svc.namespace and eps.service == svc.name
            for e in eps.endpoints
            if e.ready and e.node
        }
        return next((n for n in nodes if n in ready), nodes[0])
    return nodes[0]


def load_balancer_target(state: ClusterState, address: str) -> tuple[Service, str, str] | None:
    """For ``LB-IP:port`` of a LoadBalancer Service: the Service, the node the load
    balancer sends to and that node's ``node-IP:nodePort`` (inside); None otherwise."""
    ip, _, port = address.rpartition(":")
    for svc in state.services:
        if svc.type != "LoadBalancer" or ip not in svc.load_balancer_ingress:
            continue
        for sp in svc.ports:
            if str(sp.port) == port and sp.node_port:
                node = load_balancer_node(state, svc)
                return svc, node, f"{addresses.NODE_IPS[node]}:{sp.node_port}"
    return None


def parse_rule(text: str) -> tuple[Endpoint, Endpoint]:
    listen, sep, target = text.partition("=")
    if not sep:
        raise ValueError(f"{text!r}: expected LISTEN=TARGET")
    return Endpoint.parse(listen), Endpoint.parse(target)


async def serve(
    rules: list[tuple[Endpoint, Endpoint]],
    ready: asyncio.Event | None = None,
    services: ServiceForwards | None = None,
    clients: frozenset[Endpoint] = frozenset(),
) -> None:
    forwarders = [Forwarder(listen, target, listen in clients) for listen, target in rules]
    for forwarder in forwarders:
        await forwarder.start()
    if services is not None:
        services.start()
    print("forwarding " + ", ".join(f"{f.listen} -> {f.target}" for f in forwarders), flush=True)
    if ready is not None:
        ready.set()
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mesh.kernel.forward", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "rules", nargs="+", metavar="LISTEN=TARGET", help="[NETNS/]IP:PORT=[NETNS/]IP:PORT"
    )
    parser.add_argument(
        "--services",
        metavar="API_URL",
        help="also forward every NodePort and LoadBalancer port of the cluster behind this API",
    )
    parser.add_argument(
        "--host-netns",
        metavar="NAME",
        help="the namespace the --services forwarders listen in (the user's)",
    )
    parser.add_argument(
        "--flows-socket",
        metavar="PATH",
        help="report each connection a LoadBalancer address carried to the control plane's "
        "hop joiner at this socket (with --services)",
    )
    parser.add_argument(
        "--clients",
        action="append",
        default=[],
        metavar="LISTEN",
        help="a listening endpoint whose clients keep their address (may repeat)",
    )
    parser.add_argument(
        "--port-broker",
        action="append",
        default=[],
        metavar="NETNS=SOCKET",
        help="listen in NETNS through the port broker at SOCKET (rootless clusters)",
    )
    args = parser.parse_args(argv)
    try:
        rules = [parse_rule(r) for r in args.rules]
        clients = frozenset(Endpoint.parse(c) for c in args.clients)
    except ValueError as exc:
        parser.error(str(exc))
    if args.services and not args.host_netns:
        parser.error("--services needs --host-netns")
    for spec in args.port_broker:
        netns, sep, path = spec.partition("=")
        if not sep or not netns or not path:
            parser.error(f"--port-broker {spec!r}: expected NETNS=SOCKET")
        use_port_broker(netns, path)
    from telemetry.logs import setup_json_logging

    setup_json_logging({"component": "forward"})
    try:
        services = (
            ServiceForwards(args.services, args.host_netns, args.flows_socket)
            if args.services
            else None
        )
        asyncio.run(serve(rules, services=services, clients=clients))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

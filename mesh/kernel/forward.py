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
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import logging
import os
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

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
    endpoint: Endpoint, timeout: float = 5.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Connect to ``endpoint`` from inside its namespace."""
    sock = socket_in(endpoint.netns)
    sock.setblocking(False)
    try:
        loop = asyncio.get_running_loop()
        await asyncio.wait_for(loop.sock_connect(sock, (endpoint.host, endpoint.port)), timeout)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        writer.transport.abort()


class Forwarder:
    """Accepts on one endpoint and relays each connection to another."""

    def __init__(self, listen: Endpoint, target: Endpoint) -> None:
        self.listen = listen
        self.target = target
        self.connections = 0
        self.failures = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, sock=listener_in(self.listen))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await open_in(self.target)
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
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


def parse_rule(text: str) -> tuple[Endpoint, Endpoint]:
    listen, sep, target = text.partition("=")
    if not sep:
        raise ValueError(f"{text!r}: expected LISTEN=TARGET")
    return Endpoint.parse(listen), Endpoint.parse(target)


async def serve(rules: list[tuple[Endpoint, Endpoint]], ready: asyncio.Event | None = None) -> None:
    forwarders = [Forwarder(listen, target) for listen, target in rules]
    for forwarder in forwarders:
        await forwarder.start()
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
        "--port-broker",
        action="append",
        default=[],
        metavar="NETNS=SOCKET",
        help="listen in NETNS through the port broker at SOCKET (rootless clusters)",
    )
    args = parser.parse_args(argv)
    try:
        rules = [parse_rule(r) for r in args.rules]
    except ValueError as exc:
        parser.error(str(exc))
    for spec in args.port_broker:
        netns, sep, path = spec.partition("=")
        if not sep or not netns or not path:
            parser.error(f"--port-broker {spec!r}: expected NETNS=SOCKET")
        use_port_broker(netns, path)
    from telemetry.logs import setup_json_logging

    setup_json_logging({"component": "forward"})
    try:
        asyncio.run(serve(rules))
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())

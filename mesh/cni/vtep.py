"""The overlay: one VXLAN-style tunnel endpoint (VTEP) per node, really forwarding bytes.

flannel's vxlan backend gives each node a VTEP (``flannel.1``, UDP 8472) and routes every
other node's pod CIDR through it: a packet for a pod on another node is wrapped in an outer
packet from this node's IP to that node's IP, carrying the VNI, and unwrapped there.

hopscope keeps the shape with TCP streams on loopback: the sender (kube-proxy, after DNAT)
connects to its *own* node's VTEP and names the inner destination in one preamble line::

    HOPSCOPE-VXLAN/1 vni=1 src=127.244.1.5 dst=127.244.2.7:8080

The local VTEP opens the outer connection from its node IP to the remote node's VTEP, which
opens the inner connection to the pod *from the original source address* (the pod sees the
real peer, as after decapsulation) and answers ``OK`` with both tuples::

    OK vni=1 inner=127.244.1.5:41234 outer=127.10.0.1:50110->127.10.0.2:8472

after which bytes flow through both VTEPs. Each VTEP delays what it sends into the tunnel
by the configured overlay delay, so a cross-node round trip costs twice the one-way delay.
Malformed preambles get ``ERR`` and a close; the VTEP keeps serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import time
from dataclasses import dataclass

from mesh import addresses
from mesh.cni.streams import connection_handler, write, write_eof
from mesh.datapath_metrics import OverlayMetrics
from mesh.netutil import open_from

log = logging.getLogger("cni")

PREAMBLE_MAGIC = "HOPSCOPE-VXLAN/1"
PREAMBLE_LIMIT = 512
READ_SIZE = 65536
CONNECT_TIMEOUT = 2.0

_PREAMBLE = re.compile(
    r"^HOPSCOPE-VXLAN/1 vni=(?P<vni>\d+) src=(?P<src>[\d.]+) dst=(?P<dst>[\d.]+):(?P<port>\d+)"
    r"(?: outer=(?P<outer>[\d.]+:\d+))?$"
)
_REPLY = re.compile(
    r"^OK vni=(?P<vni>\d+) inner=(?P<inner>[\d.]+:\d+) "
    r"outer=(?P<osrc>[\d.]+:\d+)->(?P<odst>[\d.]+:\d+)$"
)

_OVERLAY = OverlayMetrics.build()
TUNNELS, TUNNEL_BYTES, ACTIVE_TUNNELS, DELAY = (
    _OVERLAY.tunnels,
    _OVERLAY.bytes,
    _OVERLAY.active,
    _OVERLAY.delay,
)


class OverlayError(Exception):
    """The tunnel could not carry the connection (bad preamble, unreachable pod or node)."""


@dataclass
class TunnelInfo:
    """What the sender learns from the VTEP's answer (goes on the ``cni-overlay`` span)."""

    vni: int
    inner_src: str
    outer_src: str
    outer_dst: str
    src_node: str
    dst_node: str
    started_ns: int = 0
    """Wall clock when the sender began to open the tunnel, in ns."""
    setup_seconds: float = 0.0
    """From the sender's connect to the VTEP until the far end's answer came back: three
    connects and two preamble round trips that a kernel VXLAN device does not make."""


def overlay_attributes(
    tunnel: TunnelInfo, inner_dst: str, delay_ms: float, pod: str = ""
) -> dict[str, object]:
    """The ``cni-overlay`` hop: inner tuple as sent, outer tuple between the node VTEPs."""
    attrs: dict[str, object] = {
        "hopscope.hop": "cni-overlay",
        "k8s.node.name": tunnel.src_node,
        "hopscope.overlay.backend": "vxlan",
        "hopscope.overlay.vni": tunnel.vni,
        "hopscope.overlay.src_node": tunnel.src_node,
        "hopscope.overlay.dst_node": tunnel.dst_node,
        "hopscope.overlay.outer.src": tunnel.outer_src,
        "hopscope.overlay.outer.dst": tunnel.outer_dst,
        "hopscope.overlay.delay_ms": delay_ms,
        "hopscope.nat.original.src": tunnel.inner_src,
        "hopscope.nat.original.dst": inner_dst,
        "hopscope.nat.translated.src": tunnel.outer_src,
        "hopscope.nat.translated.dst": tunnel.outer_dst,
        "network.peer.address": tunnel.inner_src.rsplit(":", 1)[0],
    }
    if pod:
        attrs["hopscope.endpoint.pod"] = pod
    return attrs


@dataclass
class OverlaySettings:
    vni: int = 1
    port: int = 8472
    delay_ms: float = 0.0


def _pod_node(ip: str) -> str | None:
    addr = ipaddress.ip_address(ip)
    for node, cidr in addresses.POD_CIDRS.items():
        if addr in ipaddress.ip_network(cidr):
            return node
    return None


async def _read_line(reader: asyncio.StreamReader) -> str:
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            line = await reader.readuntil(b"\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as exc:
        raise OverlayError(f"no tunnel preamble ({type(exc).__name__})") from None
    if len(line) > PREAMBLE_LIMIT:
        raise OverlayError("tunnel preamble too long")
    return line.decode("ascii", "replace").strip()


async def _open(
    ip: str, port: int, source: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    """Connect from ``source`` (any port) and return the streams and our local ``ip:port``."""
    try:
        reader, writer, local = await open_from(ip, port, source, CONNECT_TIMEOUT, READ_SIZE * 4)
    except OSError as exc:
        raise OverlayError(f"cannot reach {ip}:{port} from {source}: {exc}") from None
    return reader, writer, "{}:{}".format(*local)


async def open_tunnel(
    settings: OverlaySettings, src_node: str, source: str, dst_ip: str, dst_port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, TunnelInfo]:
    """Sender side: reach ``dst_ip:dst_port`` through ``src_node``'s VTEP."""
    vtep = addresses.NODE_IPS[src_node]
    started_ns, started = time.time_ns(), time.perf_counter()
    reader, writer, _local = await _open(vtep, settings.port, source)
    writer.write(
        f"{PREAMBLE_MAGIC} vni={settings.vni} src={source} dst={dst_ip}:{dst_port}\n".encode()
    )
    try:
        line = await _read_line(reader)
    except OverlayError:
        writer.close()
        raise
    match = _REPLY.match(line)
    if match is None:
        writer.close()
        raise OverlayError(line.removeprefix("ERR ") or "tunnel refused the connection")
    info = TunnelInfo(
        vni=int(match["vni"]),
        inner_src=match["inner"],
        outer_src=match["osrc"],
        outer_dst=match["odst"],
        src_node=src_node,
        dst_node=_pod_node(dst_ip) or "",
        started_ns=started_ns,
        setup_seconds=time.perf_counter() - started,
    )
    return reader, writer, info


class Vtep:
    """The tunnel endpoint of one node: encapsulates outgoing, decapsulates incoming."""

    def __init__(self, node: str, settings: OverlaySettings) -> None:
        self.node = node
        self.ip = addresses.NODE_IPS[node]
        self.settings = settings
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(
            self._handle, self.ip, self.settings.port, reuse_address=True, backlog=1024
        )

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    @connection_handler
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await _read_line(reader)
            match = _PREAMBLE.match(line)
            if match is None:
                raise OverlayError(f"malformed tunnel preamble {line[:80]!r}")
            if int(match["vni"]) != self.settings.vni:
                raise OverlayError(
                    f"VNI {match['vni']} is not this overlay's ({self.settings.vni})"
                )
            if match["outer"] is None:
                await self._encapsulate(match, reader, writer)
            else:
                await self._decapsulate(match, reader, writer)
        except (OverlayError, ValueError, OverflowError) as exc:  # bad addresses or ports too
            log.warning("tunnel refused", extra={"node": self.node, "error": str(exc)})
            write(writer, f"ERR {exc}\n".encode())
            writer.close()
        except (ConnectionError, OSError):
            writer.close()

    async def _encapsulate(
        self, match: re.Match[str], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """A local sender's connection: carry it to the destination pod's node."""
        dst_node = _pod_node(match["dst"])
        if dst_node is None:
            raise OverlayError(f"{match['dst']} is in no node's pod CIDR")
        if dst_node == self.node:
            raise OverlayError(f"{match['dst']} is on this node; no encapsulation needed")
        remote = addresses.NODE_IPS[dst_node]
        try:
            up_r, up_w, outer_src = await _open(remote, self.settings.port, self.ip)
        except OverlayError:
            TUNNELS.labels(self.node, dst_node, "unreachable").inc()
            raise
        up_w.write(f"{match.group(0)} outer={outer_src}\n".encode())
        reply = await _read_line(up_r)
        if not reply.startswith("OK "):
            TUNNELS.labels(self.node, dst_node, "refused").inc()
            up_w.close()
            raise OverlayError(reply.removeprefix("ERR "))
        TUNNELS.labels(self.node, dst_node, "ok").inc()
        writer.write(f"{reply} outer={outer_src}->{remote}:{self.settings.port}\n".encode())
        log.info(
            "encapsulated",
            extra={
                "inner": f"{match['src']} -> {match['dst']}:{match['port']}",
                "outer": f"{outer_src} -> {remote}:{self.settings.port}",
                "vni": self.settings.vni,
                "src_node": self.node,
                "dst_node": dst_node,
            },
        )
        ACTIVE_TUNNELS.inc()
        try:
            await self._splice((reader, writer), (up_r, up_w), dst_node, delay_outward=True)
        finally:
            ACTIVE_TUNNELS.dec()

    async def _decapsulate(
        self, match: re.Match[str], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """From a remote VTEP: open the inner connection to the pod, from the inner source."""
        if _pod_node(match["dst"]) != self.node:
            raise OverlayError(f"{match['dst']} is not a pod of {self.node}")
        pod_r, pod_w, inner = await _open(match["dst"], int(match["port"]), match["src"])
        writer.write(f"OK vni={self.settings.vni} inner={inner}\n".encode())
        src_node = _pod_node(match["src"]) or addresses.node_for_ip(match["src"]) or ""
        await self._splice((reader, writer), (pod_r, pod_w), src_node, delay_outward=False)

    async def _splice(
        self,
        near: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        far: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        node: str,
        delay_outward: bool,
    ) -> None:
        """Carry bytes both ways until both are done; the overlay's delay applies once per
        direction, on the sending node (``delay_outward``: near → far is the sending side)."""
        try:
            await asyncio.gather(
                self._pipe(near[0], far[1], node, delayed=delay_outward),
                self._pipe(far[0], near[1], node, delayed=not delay_outward),
            )
        finally:
            far[1].close()
            near[1].close()

    async def _pipe(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer_node: str,
        delayed: bool,
    ) -> None:
        """Copy one direction; ``delayed`` is the direction this VTEP sends into the tunnel.

        Chunks keep their order and each is held until ``arrival + delay``, so the delay
        adds latency without throttling a stream of chunks.
        """
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def sender() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            write_eof(writer)

        send = asyncio.ensure_future(sender())
        try:
            while data := await reader.read(READ_SIZE):
                delay = self.settings.delay_ms / 1000 if delayed else 0.0
                if delayed:
                    TUNNEL_BYTES.labels(self.node, peer_node).inc(len(data))
                queue.put_nowait((time.monotonic() + delay, data))
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait((0.0, b""))
            with contextlib.suppress(ConnectionError, OSError):
                await send

"""The node's pod-network gateway: direct pod-to-pod traffic and egress SNAT.

Traffic that does not go to a Service VIP is the CNI's business on a real node: packets
to another pod are routed (through the overlay if the pod is on another node) and checked
against NetworkPolicy; packets leaving the cluster are masqueraded to an egress IP
(flannel's ``--ip-masq``, ip-masq-agent, or an egress gateway with a fixed egress IP).

Here each node has a gateway on ``node-ip:15080``. A pod's sidecar sends it every HTTP/1
request whose destination (``x-envoy-original-dst-host``) is a pod IP or an address outside
the cluster, one request per connection, from the pod's own address. The gateway

* checks NetworkPolicy (egress of the sending pod, ingress of a destination pod); a denied
  connection gets a ``network-policy`` span with ``hopscope.policy.verdict=deny`` and is reset;
* to a pod on another node, opens the connection through this node's VTEP (``cni-overlay``
  span), to a pod on this node directly — both from the sending pod's address;
* outside the cluster, connects *from the node's egress IP*, so the external server really
  sees that address, and records an ``egress-snat`` span with both tuples.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from mesh import addresses
from mesh.cni.passthrough import TRACE_HEADERS, forward_headers, parent_context
from mesh.cni.streams import connection_handler, endpoints, write_eof
from mesh.cni.vtep import OverlayError, OverlaySettings, open_tunnel, overlay_attributes
from mesh.datapath_metrics import NodeRoutingMetrics
from mesh.model.policy import PolicyEngine, Verdict
from mesh.model.types import ClusterState, NetworkConfig
from mesh.netutil import open_from, reset
from mesh.policy_metrics import PolicyEnforcementMetrics

log = logging.getLogger("cni")

HEAD_LIMIT = 65536
READ_SIZE = 65536
_STATUS = re.compile(rb"^HTTP/\d\.\d (\d{3})")
_POD_NETWORKS = [ipaddress.ip_network(c) for c in addresses.POD_CIDRS.values()]

_ROUTING = NodeRoutingMetrics.build()
SNAT_CONNECTIONS, POD_CONNECTIONS = _ROUTING.snat, _ROUTING.pods


@dataclass
class NetworkView:
    """What every gateway reads: the CNI settings and the policy engine, swapped on sync."""

    config: NetworkConfig = field(default_factory=NetworkConfig)
    policy: PolicyEngine = field(default_factory=lambda: PolicyEngine(ClusterState()))


def is_pod_ip(ip: str) -> bool:
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return False
    return any(addr in net for net in _POD_NETWORKS)


def _ip_port(host: str, port: str) -> bool:
    """An IPv4 address and a port number, as a destination must be."""
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return port.isdigit() and 0 < int(port) < 65536


def _absolute_form(first_line: bytes) -> tuple[bytes, str]:
    """``GET http://10.0.0.5:8080/x HTTP/1.1`` (a sidecar that picked the pod itself, going
    through the gateway as a proxy): the origin-form line to forward and ``ip:port``;
    any other request line unchanged, with no destination."""
    parts = first_line.split(b" ")
    if len(parts) != 3 or not parts[1].startswith(b"http://"):
        return first_line, ""
    authority, slash, path = parts[1][len(b"http://") :].partition(b"/")
    origin = b" ".join((parts[0], slash + path or b"/", parts[2]))
    return origin, authority.decode("latin-1")


def _error_response(status: int, reason: str, message: str) -> bytes:
    body = f"hopscope node gateway: {message}\n".encode()
    return (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: text/plain\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    ).encode() + body


@dataclass
class _Request:
    peer: str
    target: str
    host: str
    port: int
    first_line: bytes
    lines: list[bytes]
    """Header lines to forward (trace headers and the destination header removed)."""
    headers: dict[str, str]
    tunnel: bool = False
    """An HTTP ``CONNECT``: after the 200, the bytes are opaque (TLS between sidecars)."""

    @property
    def peer_ip(self) -> str:
        return self.peer.rsplit(":", 1)[0]

    def base_attributes(self, node: str) -> dict[str, Any]:
        attributes: dict[str, Any] = {
            "k8s.node.name": node,
            "hopscope.nat.original.src": self.peer,
            "hopscope.nat.original.dst": self.target,
            "network.peer.address": self.peer_ip,
            "server.address": self.host,
            "server.port": self.port,
        }
        if self.tunnel:  # opaque bytes: the connection is what can be told
            attributes["hopscope.conn.client"] = self.peer
            attributes["hopscope.tls.opaque"] = True
        else:
            method, _, rest = self.first_line.partition(b" ")
            attributes["http.request.method"] = method.decode("latin-1")
            attributes["url.path"] = rest.rsplit(b" ", 1)[0].decode("latin-1")
        return attributes

    def head(self, hop_span: Any | None) -> bytes:
        """The request head to send on: the caller's trace context unchanged, and with a
        span of ours, ``x-hopscope-via`` naming it (:mod:`mesh.cni.passthrough`)."""
        lines = [self.first_line, *self.lines]
        if hop_span is None:
            carrier = {k: v for k, v in self.headers.items() if k in TRACE_HEADERS}
        else:
            carrier = forward_headers(self.headers, hop_span)
        lines += [f"{k}: {v}".encode("latin-1") for k, v in carrier.items()]
        return b"\r\n".join(lines) + b"\r\n\r\n"


class NodeGateway:
    """The pod-network gateway of one node (direct pod traffic and egress SNAT)."""

    def __init__(
        self,
        node: str,
        egress_ip: str,
        tracer: Any,
        view: NetworkView,
        policy_metrics: PolicyEnforcementMetrics,
    ) -> None:
        self.node = node
        self.ip = addresses.NODE_IPS[node]
        self.egress_ip = egress_ip
        self.tracer = tracer
        self.view = view
        self.policy_metrics = policy_metrics
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(
            self._handle,
            self.ip,
            addresses.EGRESS_GATEWAY_PORT,
            reuse_address=True,
            limit=HEAD_LIMIT,
        )

    def close(self) -> None:
        if self.server is not None:
            self.server.close()

    @connection_handler
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await self._read_request(reader, writer)
            if request is None:
                return
            if is_pod_ip(request.host):
                await self._to_pod(request, reader, writer)
            else:
                await self._egress(request, reader, writer)
        except (ConnectionError, OSError):
            writer.close()

    async def _read_request(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> _Request | None:
        ends = endpoints(writer)
        if ends is None:  # reset by the client before we got to it
            writer.close()
            return None
        peer = "{}:{}".format(*ends[1])
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            writer.write(_error_response(400, "Bad Request", "no complete request head"))
            writer.close()
            return None
        lines = head[:-4].split(b"\r\n")
        if lines[0].startswith(b"CONNECT "):
            return self._tunnel_request(peer, lines[0], writer)
        headers: dict[str, str] = {}
        kept = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                continue
            key = name.strip().lower().decode("latin-1")
            headers[key] = value.strip().decode("latin-1")
            if key not in (addresses.ORIGINAL_DST_HEADER, *TRACE_HEADERS):
                kept.append(line)
        first_line, target = _absolute_form(lines[0])
        if not target:
            target = headers.get(addresses.ORIGINAL_DST_HEADER, "")
        host, _, port_text = target.rpartition(":")
        if not _ip_port(host, port_text):
            writer.write(
                _error_response(
                    400,
                    "Bad Request",
                    f"{addresses.ORIGINAL_DST_HEADER} (or an absolute-form target) must be ip:port",
                )
            )
            writer.close()
            return None
        return _Request(peer, target, host, int(port_text), first_line, kept, headers)

    @staticmethod
    def _tunnel_request(
        peer: str, first_line: bytes, writer: asyncio.StreamWriter
    ) -> _Request | None:
        """``CONNECT pod-ip:port HTTP/1.1``: a sidecar's mTLS connection to a pod, which
        the gateway routes like any pod traffic but can no longer read."""
        parts = first_line.split(b" ")
        target = parts[1].decode("latin-1") if len(parts) == 3 else ""
        host, _, port_text = target.rpartition(":")
        if not is_pod_ip(host) or not port_text.isdigit() or not 0 < int(port_text) < 65536:
            writer.write(_error_response(400, "Bad Request", "CONNECT takes a pod ip:port"))
            writer.close()
            return None
        return _Request(peer, target, host, int(port_text), first_line, [], {}, tunnel=True)

    def _admitted(self, request: _Request, writer: asyncio.StreamWriter) -> Verdict | None:
        """NetworkPolicy's verdict on an allowed connection; a denied one is recorded and
        reset (None)."""
        verdict = self.view.policy.check(request.peer_ip, request.host, request.port)
        if verdict.allowed:
            return verdict
        self._deny(request, verdict)
        reset(writer)
        return None

    # -- pod to pod ------------------------------------------------------------------------

    async def _to_pod(
        self, request: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        verdict = self._admitted(request, writer)
        if verdict is None:
            return
        dst_node = addresses.node_for_ip(request.host) or self.node
        config = self.view.config
        span = None
        if dst_node != self.node and config.backend == "vxlan":
            settings = OverlaySettings(vni=config.vni, delay_ms=config.overlay_delay_ms)
            try:
                up_r, up_w, tunnel = await open_tunnel(
                    settings, self.node, request.peer_ip, request.host, request.port
                )
            except OverlayError as exc:
                writer.write(_error_response(502, "Bad Gateway", f"overlay: {exc}"))
                writer.close()
                return
            POD_CONNECTIONS.labels(self.node, "overlay").inc()
            # A tunnel carries no trace context: its span starts a trace of its own, which
            # hopscope pairs with the caller's request by the connection (hopscope.conn.client).
            span = self.tracer.start_span(
                f"cni-overlay {tunnel.src_node} -> {tunnel.dst_node} vni {tunnel.vni}",
                context=parent_context(request.headers),
                kind=SpanKind.INTERNAL,
            )
            attrs = request.base_attributes(self.node)
            attrs.update(overlay_attributes(tunnel, request.target, config.overlay_delay_ms))
            pod = self.view.policy.pods_by_ip.get(request.host)
            if pod is not None:
                attrs["hopscope.endpoint.pod"] = pod.name
            attrs.update(verdict.attributes())
            span.set_attributes(attrs)
        else:
            try:
                up_r, up_w, _local = await _connect(request.host, request.port, request.peer_ip)
            except OSError as exc:
                writer.write(_error_response(502, "Bad Gateway", f"pod unreachable: {exc}"))
                writer.close()
                return
            POD_CONNECTIONS.labels(self.node, "local").inc()
        if request.tunnel:
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            up_w.write(request.head(span))
        await _relay(reader, writer, up_r, up_w, span)

    def _deny(self, request: _Request, verdict: Verdict) -> None:
        dst = self.view.policy.pods_by_ip.get(request.host)
        self.policy_metrics.count_denied(
            dst.namespace if dst else "", dst.name if dst else request.host, verdict
        )
        span = self.tracer.start_span(
            f"network-policy deny {request.peer} -> {request.target}",
            context=parent_context(request.headers),
            kind=SpanKind.INTERNAL,
        )
        attrs = request.base_attributes(self.node)
        attrs.update(verdict.attributes())
        attrs["hopscope.hop"] = "network-policy"
        attrs["error.type"] = "network-policy-denied"
        if dst is not None:
            attrs["hopscope.endpoint.pod"] = dst.name
        span.set_attributes(attrs)
        span.set_status(Status(StatusCode.ERROR, verdict.reason))
        with trace.use_span(span, end_on_exit=True):
            log.warning(
                "denied by NetworkPolicy",
                extra={
                    "src": request.peer,
                    "dst": request.target,
                    "side": verdict.side,
                    "policies": list(verdict.policies),
                    "reason": verdict.reason,
                },
            )

    # -- leaving the cluster ---------------------------------------------------------------

    async def _egress(
        self, request: _Request, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        verdict = self._admitted(request, writer)
        if verdict is None:
            return
        span = self.tracer.start_span(
            f"egress-snat {self.node} -> {request.target}",
            context=parent_context(request.headers),
            kind=SpanKind.INTERNAL,
        )
        attrs = request.base_attributes(self.node)
        attrs.update(verdict.attributes())
        attrs.update(
            {
                "hopscope.hop": "egress-snat",
                "hopscope.nat.translated.dst": request.target,
                "hopscope.egress.ip": self.egress_ip,
                "hopscope.nat.snat": True,
            }
        )
        try:
            up_r, up_w, local = await _connect(request.host, request.port, self.egress_ip)
        except OSError as exc:
            SNAT_CONNECTIONS.labels(self.node, self.egress_ip, request.target, "unreachable").inc()
            attrs["error.type"] = "destination unreachable"
            span.set_attributes(attrs)
            span.set_status(Status(StatusCode.ERROR, str(exc)))
            span.end()
            writer.write(
                _error_response(502, "Bad Gateway", f"cannot reach {request.target}: {exc}")
            )
            writer.close()
            return
        attrs["hopscope.nat.translated.src"] = local
        span.set_attributes(attrs)
        SNAT_CONNECTIONS.labels(self.node, self.egress_ip, request.target, "ok").inc()
        with trace.use_span(span, end_on_exit=False):
            log.info(
                "egress snat",
                extra={
                    "snat": f"{request.peer} -> {local}",
                    "dst": request.target,
                    "node": self.node,
                },
            )
        up_w.write(request.head(span))
        await _relay(reader, writer, up_r, up_w, span)


async def _connect(
    host: str, port: int, source: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, str]:
    reader, writer, local = await open_from(host, port, source, 3.0)
    return reader, writer, "{}:{}".format(*local)


async def _relay(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_r: asyncio.StreamReader,
    up_w: asyncio.StreamWriter,
    span: Any,
) -> None:
    """Both directions until both ends close; the span (if any) gets the response status."""
    status: list[int] = []
    started = time.monotonic()
    try:
        await asyncio.gather(_pipe(reader, up_w, None), _pipe(up_r, writer, status))
    finally:
        if span is not None:
            if status:
                span.set_attribute("http.response.status_code", status[0])
                if status[0] >= 500:
                    span.set_status(Status(StatusCode.ERROR))
            span.set_attribute("hopscope.relay_ms", round((time.monotonic() - started) * 1000, 3))
            span.end()
        up_w.close()
        writer.close()


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: list[int] | None
) -> None:
    try:
        while data := await reader.read(READ_SIZE):
            if status is not None and not status:
                match = _STATUS.match(data)
                if match:
                    status.append(int(match.group(1)))
            writer.write(data)
            await writer.drain()
        write_eof(writer)
    except (ConnectionError, OSError):
        pass

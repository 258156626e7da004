"""One request's kube-proxy hop: a span carrying the NAT, the choice and the conntrack state.

Real kube-proxy works per connection, below HTTP. The emulator still decides per connection
(that is the behaviour to learn), but it reads the HTTP framing so that *every request*
riding a connection gets its own span in that request's trace, parented to the caller's
span, with the same NAT tuple and ``hopscope.conntrack.state`` = ``new`` for the request that
opened the connection and ``established`` for the ones that rode it.

**Trace context passes through unchanged.** kube-proxy rewrites addresses, not requests: it
forwards the caller's ``traceparent`` as it came, so the callee's sidecar span is the direct
child of the caller's CLIENT span (the pair a service graph, such as Tempo's, turns into an
edge). The hop span is a CLIENT span with ``peer.service`` = the Service (a virtual node
``kube-proxy → <service>``), and the ``x-hopscope-via`` header names it (or its overlay
child) so the next hop can still be nested below it in hopscope's own views.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from mesh.cni.passthrough import forward_headers, parent_context
from mesh.cni.vtep import TunnelInfo, overlay_attributes
from mesh.datapath_metrics import request_duration
from mesh.hopattributes import EMULATION_COST
from mesh.kubeproxy.rules import EndpointTarget, Selector, ServiceRule
from mesh.model.policy import Verdict

log = logging.getLogger("kube-proxy")


ROOT_SAMPLE_RATIO = 1.0
"""Share of requests without a sampled caller that start a trace (``--trace-sample-ratio``)."""

_rng = random.Random()


def wants_span(traceparent: bytes | None) -> bool:
    """Decide before any OpenTelemetry work whether this request gets a hop span.

    A caller's ``traceparent`` decides (its sampled flag), like a ParentBased sampler;
    without one the request is a new root, sampled at ``ROOT_SAMPLE_RATIO``. Unsampled
    requests are relayed with their headers untouched: no span, no attributes, no log line.
    """
    if traceparent is not None and len(traceparent) == 55:
        return traceparent[-2:] in (b"01", b"03")
    return ROOT_SAMPLE_RATIO >= 1.0 or _rng.random() < ROOT_SAMPLE_RATIO


REQUEST_DURATION = request_duration()
"""Carries a ``trace_id`` exemplar for requests that have a sampled hop span."""


@dataclass
class ConnInfo:
    """What the proxier knows about one proxied connection (its conntrack entry)."""

    id: int
    rule: ServiceRule
    endpoint: EndpointTarget
    selector: Selector
    original_src: str
    original_dst: str
    translated_src: str
    translated_dst: str
    node: str
    reason: str = ""
    affinity: str = ""
    protocol: str = "tcp"
    requests: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    opened: float = 0.0
    closed: float | None = None
    state: str = "ESTABLISHED"
    tunnel: TunnelInfo | None = None
    """Set when the connection crosses nodes through the overlay."""
    policy: Verdict | None = None
    overlay_delay_ms: float = 0.0
    accepted_at: float = 0.0
    """``time.perf_counter()`` when kube-proxy accepted the connection (0: unknown)."""
    accepted_ns: int = 0
    """Wall clock of the accept, in ns: the first request's hop span starts there."""
    client_wait: float = 0.0
    """Seconds the client let pass before sending its first bytes: its time, not ours."""
    extra: dict[str, Any] = field(default_factory=dict)

    def attributes(self) -> dict[str, Any]:
        attrs: dict[str, Any] = {
            "hopscope.hop": self.rule.hop,
            "k8s.service.name": self.rule.name,
            "k8s.namespace.name": self.rule.namespace,
            "k8s.node.name": self.node,
            "hopscope.service.type": self.rule.service_type,
            "hopscope.service.port": self.rule.port,
            "hopscope.nat.original.src": self.original_src,
            "hopscope.nat.original.dst": self.original_dst,
            "hopscope.nat.translated.src": self.translated_src,
            "hopscope.nat.translated.dst": self.translated_dst,
            "hopscope.lb.mode": (
                "cloud" if self.rule.kind == "load-balancer" else self.selector.mode
            ),
            "hopscope.lb.algorithm": self.selector.algorithm,
            "hopscope.endpoint.pod": self.endpoint.pod,
            "hopscope.endpoint.node": self.endpoint.node,
            "hopscope.conntrack.id": self.id,
            "network.peer.address": self.original_src.rsplit(":", 1)[0],
            "network.protocol.name": self.protocol,
            "peer.service": self.rule.name,
            "server.address": self.rule.vip,
            "server.port": self.rule.port,
            "hopscope.rule.kind": self.rule.kind,
            "hopscope.decision": self.reason,
            "hopscope.nat.snat": self.original_src.rsplit(":", 1)[0]
            != self.translated_src.rsplit(":", 1)[0],
        }
        if self.rule.kind != "cluster-ip":
            attrs["hopscope.traffic_policy"] = self.rule.external_traffic_policy
        if self.affinity:
            attrs["hopscope.lb.affinity"] = self.affinity
        if self.policy is not None:
            attrs.update(self.policy.attributes())
        if self.tunnel is not None:
            attrs["hopscope.overlay"] = f"{self.tunnel.src_node} -> {self.tunnel.dst_node}"
        return attrs

    def overlay_attributes(self) -> dict[str, Any]:
        assert self.tunnel is not None
        return overlay_attributes(
            self.tunnel, self.translated_dst, self.overlay_delay_ms, self.endpoint.pod
        )


class RequestHop:
    """One request's kube-proxy span (and its ``cni-overlay`` child), timed for
    ``hopscope_kubeproxy_request_duration_seconds``.

    ``inner`` is the overlay span when the connection crosses nodes; both end together
    (child first). An unsampled request gets a hop with no span (``trace.INVALID_SPAN``): it
    is still timed, but carries no exemplar.

    The emulator's own share of the hop is summed as it happens: from ``origin`` (the accept,
    for the request that opened the connection; otherwise the arrival of the bytes holding
    the request's head) to the rewritten head leaving for the endpoint, plus the time the
    response's completing bytes spent in the relay. A tunnel's set-up is the overlay's
    share, not kube-proxy's. Both go on the spans as :data:`EMULATION_COST`.
    """

    __slots__ = (
        "cost",
        "forwarded_at",
        "inner",
        "inner_cost",
        "labels",
        "modeled_delay",
        "origin",
        "outer",
        "started",
    )

    def __init__(
        self, outer: Any, inner: Any, labels: tuple[str, str], origin: float | None = None
    ) -> None:
        self.outer = outer
        self.inner = inner
        self.labels = labels
        self.started = time.perf_counter()
        self.origin = self.started if origin is None else origin
        self.cost = 0.0
        self.inner_cost = 0.0
        self.forwarded_at: float | None = None
        self.modeled_delay = 0.0
        """The overlay's configured delay, both ways: the modelled network, not the cost."""

    @classmethod
    def untraced(cls, conn: ConnInfo) -> RequestHop:
        conn.requests += 1
        return cls(trace.INVALID_SPAN, None, (conn.rule.namespace, conn.rule.name))

    def forwarded(self) -> None:
        """The request's head has been handed to the endpoint's connection."""
        self.forwarded_at = time.perf_counter()
        self.cost += max(self.forwarded_at - self.origin - self.inner_cost, 0.0)

    def response_head(self, arrived: float, service_time: str | None) -> None:
        """The response's head came back (read at ``arrived``).

        Through the overlay, the time since the request left, less what the callee says it
        spent (``x-envoy-upstream-service-time``, set by its sidecar), is the round trip
        through the two tunnel endpoints: the overlay's share, less the delay the overlay is
        configured to add (the network it models). Without that header (no sidecar) the
        callee's time is unknown and nothing is charged.
        """
        if self.inner is None or self.forwarded_at is None or not service_time:
            return
        try:
            service_s = int(service_time) / 1000
        except ValueError:
            return
        transit = arrived - self.forwarded_at - service_s - self.modeled_delay
        self.inner_cost += max(transit, 0.0)

    def charge(self, seconds: float) -> None:
        self.cost += max(seconds, 0.0)

    def is_recording(self) -> bool:
        return bool(self.outer.is_recording())

    def set_attributes(self, attrs: dict[str, Any]) -> None:
        self.outer.set_attributes(attrs)

    def set_attribute(self, key: str, value: Any) -> None:
        self.outer.set_attribute(key, value)
        if self.inner is not None and key in (
            "http.response.status_code",
            "rpc.grpc.status_code",
            "error.type",
        ):
            self.inner.set_attribute(key, value)

    def set_status(self, status: Status) -> None:
        if self.inner is not None:
            self.inner.set_status(status)
        self.outer.set_status(status)

    def end(self) -> None:
        elapsed = time.perf_counter() - self.started
        if self.inner is not None:
            if self.inner.is_recording():
                self.inner.set_attribute(EMULATION_COST, round(self.inner_cost * 1e6))
            self.inner.end()
        if self.outer.is_recording():
            self.outer.set_attribute(EMULATION_COST, round(self.cost * 1e6))
        self.outer.end()
        histogram = REQUEST_DURATION.labels(*self.labels)
        context = self.outer.get_span_context()
        if context.trace_flags.sampled:
            histogram.observe(elapsed, {"trace_id": format(context.trace_id, "032x")})
        else:
            histogram.observe(elapsed)


def start_request_span(
    tracer: trace.Tracer,
    conn: ConnInfo,
    headers: dict[str, str],
    name: str,
    arrived: float | None = None,
) -> tuple[RequestHop, dict[str, str]]:
    """Start the hop span under the caller's context; return it and the trace headers to send.

    The request that opened the connection starts its span at the accept (and its overlay
    span when the tunnel began to open): that is when the packet reached the node.
    ``arrived`` is when the bytes holding a later request's head were read.
    """
    opening = conn.requests == 0 and conn.accepted_ns > 0
    span: Any = tracer.start_span(
        f"kube-proxy {conn.rule.namespace}/{conn.rule.name} {name}",
        context=parent_context(headers),
        kind=SpanKind.CLIENT,
        start_time=conn.accepted_ns if opening else None,
    )
    conn.requests += 1
    attrs: dict[str, Any] = {}
    if span.is_recording():
        attrs = conn.attributes()
        attrs["hopscope.conntrack.state"] = "new" if conn.requests == 1 else "established"
        attrs["hopscope.conntrack.request_index"] = conn.requests
        span.set_attributes(attrs)
    overlay = None
    if conn.tunnel is not None:
        tunnel = conn.tunnel
        overlay = tracer.start_span(
            f"cni-overlay {tunnel.src_node} -> {tunnel.dst_node} vni {tunnel.vni}",
            context=trace.set_span_in_context(span),
            kind=SpanKind.INTERNAL,
            start_time=tunnel.started_ns if opening and tunnel.started_ns else None,
        )
        if overlay.is_recording():
            overlay.set_attributes(conn.overlay_attributes())
    origin = conn.accepted_at + conn.client_wait if opening and conn.accepted_at else arrived
    hop = RequestHop(span, overlay, (conn.rule.namespace, conn.rule.name), origin)
    if conn.tunnel is not None:
        hop.modeled_delay = 2 * conn.overlay_delay_ms / 1000
        if opening:
            hop.inner_cost = conn.tunnel.setup_seconds
    carrier = forward_headers(headers, overlay if overlay is not None else span)
    if not span.is_recording():
        return hop, carrier  # unsampled: no attributes, no log line
    with trace.use_span(span, end_on_exit=False):
        log.info(
            "request",
            extra={
                "service": conn.rule.service,
                "request": name,
                "conntrack_state": attrs["hopscope.conntrack.state"],
                "dnat": f"{conn.original_dst} -> {conn.translated_dst}",
                "src": conn.original_src,
                "endpoint_pod": conn.endpoint.pod,
            },
        )
    return hop, carrier


def finish_request_span(span: Any, status: int | None, grpc_status: int | None = None) -> None:
    if status is not None:
        span.set_attribute("http.response.status_code", status)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
    if grpc_status is not None:
        span.set_attribute("rpc.grpc.status_code", grpc_status)
    span.end()


def fail_request_span(span: Any, reason: str) -> None:
    span.set_status(Status(StatusCode.ERROR, reason))
    span.set_attribute("error.type", reason)
    span.end()


DENY_READ_TIMEOUT = 1.0
"""Seconds a denied connection is held to read the request's trace context."""


async def _request_headers(reader: Any, timeout: float = DENY_READ_TIMEOUT) -> dict[str, str]:
    """The first request's headers on a connection (HTTP/1 head or first HTTP/2 HEADERS)."""
    import asyncio

    import hpack

    data = b""
    deadline = asyncio.get_running_loop().time() + timeout
    decoder = hpack.Decoder()
    while len(data) < 65536:
        remaining = deadline - asyncio.get_running_loop().time()
        if remaining <= 0:
            break
        try:
            chunk = await asyncio.wait_for(reader.read(65536), remaining)
        except (TimeoutError, ConnectionError, OSError):
            break
        if not chunk:
            break
        data += chunk
        if data.startswith(b"PRI * HTTP/2.0"):
            headers = _h2_first_headers(data[24:], decoder)
            if headers is not None:
                return headers
        elif b"\r\n\r\n" in data:
            head = data.split(b"\r\n\r\n", 1)[0].split(b"\r\n")[1:]
            pairs = (line.partition(b":") for line in head)
            return {
                k.strip().lower().decode("latin-1"): v.strip().decode("latin-1")
                for k, _, v in pairs
            }
    return {}


def _h2_first_headers(frames: bytes, decoder: Any) -> dict[str, str] | None:
    offset = 0
    while offset + 9 <= len(frames):
        length = int.from_bytes(frames[offset : offset + 3], "big")
        ftype, flags = frames[offset + 3], frames[offset + 4]
        payload = frames[offset + 9 : offset + 9 + length]
        if len(payload) < length:
            return None
        offset += 9 + length
        if ftype != 0x1:
            continue
        pad = payload[0] if flags & 0x8 else 0
        block = payload[(1 if flags & 0x8 else 0) + (5 if flags & 0x20 else 0) :]
        block = block[: len(block) - pad] if pad else block
        try:
            decoded = decoder.decode(block)
        except Exception:
            return {}
        return {str(k).lower(): str(v) for k, v in decoded}
    return None


async def refusal_span(
    tracer: trace.Tracer,
    name: str,
    attrs: dict[str, Any],
    reason: str,
    reader: Any,
    read_timeout: float = DENY_READ_TIMEOUT,
    message: str = "refused",
    extra: dict[str, Any] | None = None,
) -> None:
    """A span in the caller's trace for a connection kube-proxy refused, and why.

    The request's headers are read first (up to ``read_timeout``) so the span joins the
    caller's trace; a client that sends nothing gets a span of its own.
    """
    headers = await _request_headers(reader, read_timeout)
    span = tracer.start_span(name, context=parent_context(headers), kind=SpanKind.CLIENT)
    if attrs.get("k8s.service.name"):
        attrs["peer.service"] = attrs["k8s.service.name"]
    if ":path" in headers:
        attrs["url.path"] = headers[":path"]
    span.set_attributes(attrs)
    span.set_status(Status(StatusCode.ERROR, reason))
    with trace.use_span(span, end_on_exit=True):
        log.warning(
            message,
            extra={
                "service": f"{attrs.get('k8s.namespace.name')}/{attrs.get('k8s.service.name')}",
                "src": attrs.get("hopscope.nat.original.src"),
                "error_type": attrs.get("error.type"),
                "reason": reason,
                **(extra or {}),
            },
        )


async def deny_span(tracer: trace.Tracer, conn: ConnInfo, reader: Any) -> None:
    """NetworkPolicy dropped this connection: say which side and which policies."""
    verdict = conn.policy
    assert verdict is not None
    attrs = conn.attributes()
    attrs["hopscope.conntrack.state"] = "new"
    attrs["error.type"] = "network-policy-denied"
    await refusal_span(
        tracer,
        f"kube-proxy {conn.rule.namespace}/{conn.rule.name} denied by NetworkPolicy",
        attrs,
        verdict.reason,
        reader,
        message="denied by NetworkPolicy",
        extra={
            "endpoint_pod": conn.endpoint.pod,
            "side": verdict.side,
            "policies": list(verdict.policies),
        },
    )

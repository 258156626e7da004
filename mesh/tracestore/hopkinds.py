"""Every kind of hop hopscope draws, each declared once.

A hop is a span carrying ``hopscope.hop``; the value names one :class:`HopKind` in
:data:`KINDS`. The entry says everything the readers of a trace need to know about that
kind: how its source and destination, its NAT / detail column and its place ("where")
render (:mod:`.hops`), how a verdict names it and explains a failure that started there,
which packet-walk rows it adds (:mod:`.verdict`), its colour in ``hopscope trace`` and in
the explorer, and whether it is hopscope emulating in userspace what a node's kernel does.
The pieces it is built from are in :mod:`.hoprender`.

A kind this table does not know (a foreign span that sets ``hopscope.hop``) reads as
:data:`OTHER`: it renders with the generic rules and never breaks a view.

Adding a kind is the emitting code plus one ``_declare(...)`` below: a new
:class:`HopKind`, or a ``replace`` of the family it belongs to (an Envoy towards Services,
a Service NAT, a node's datapath).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Flag, auto
from typing import TYPE_CHECKING

from mesh.tracestore.hoprender import (
    Hop,
    PacketWalk,
    SentPacket,
    app_endpoints,
    client_endpoints,
    cloud_lb_for_service,
    dns_detail,
    dns_endpoints,
    dns_rcode,
    inbound_tls,
    nat_originals,
    no_tls,
    node_and_kind,
    ok_or_error,
    opaque_tls,
    outbound_tls,
    overlay_encapsulation,
    peer_to_upstream,
    pod_name,
    policy_or_rewrites,
    sent_as_accepted,
    sent_as_captured,
    sent_as_translated,
    service_endpoint,
    walk_dropped,
    walk_egress,
    walk_in_pod,
    walk_overlay,
    walk_proxied,
    walk_served,
    walk_service_nat,
)

if TYPE_CHECKING:
    from mesh.tracestore.otlp import SpanRecord

# -- the registry --------------------------------------------------------------------------


class Trait(Flag):
    """What a kind of hop does on the path."""

    EMULATED = auto()
    """hopscope does in a userspace process what a node's kernel does (DNAT, encapsulation,
    SNAT, packet filtering): the hop is real, its cost is the playground's."""
    ENTRY = auto()
    """A request can enter the journey here (the first hop to see the client's packet)."""
    FORWARDS_CONTEXT = auto()
    """A NAT hop: passes the caller's trace context on, so its callee nests below it."""
    DIALS_SERVICES = auto()
    """Connects to Service addresses: a refused connect() there was kube-proxy's REJECT."""
    REPORTS_FLAGS = auto()
    """An Envoy: its response flags are the status the caller saw."""
    DELIVERS_IN_POD = auto()
    """Hands the request to the app in its own pod (the app nests below it as it is)."""
    CONNTRACK_PAIRED = auto()
    """Reached through a NAT hop with nothing to read ``x-hopscope-via``: nested below the
    NAT hop that last sent a packet to its address."""


NO_TRAITS = Trait(0)

Walker = Callable[[Hop, Hop | None, PacketWalk], None]
Sender = Callable[[Hop, list[Hop]], SentPacket | None]


@dataclass(frozen=True)
class HopKind:
    """One kind of hop: how it renders, how a verdict reads it, how it looks.

    The text fields are ``str.format`` templates over the hop's
    :func:`~mesh.tracestore.verdict.template_fields` (``{kind}``, ``{where}``, ``{app}``,
    ``{status}``, ``{flags}``, ``{label}``, …).
    """

    name: str
    """The ``hopscope.hop`` value."""
    traits: Trait = NO_TRAITS
    """What the kind does on the path, as far as reading a journey needs to know."""
    style: str = ""
    """Rich style of the kind's name in ``hopscope trace``."""
    colour: str = "#eef"
    """Background of the kind's badge in the explorer."""
    endpoints: Callable[[SpanRecord], tuple[str, str]] = peer_to_upstream
    """``(src, dst)`` of the hop."""
    detail: Callable[[SpanRecord], str] = policy_or_rewrites
    """The NAT / detail column."""
    where: Callable[[SpanRecord], str] = pod_name
    """Where the hop happened: a pod, a node, a Service."""
    fallback_status: Callable[[SpanRecord], str] = ok_or_error
    """The status column when the span has no HTTP or gRPC status."""
    tls: Callable[[SpanRecord], str] = no_tls
    """The hop's ``tls`` column: how the connection was protected, as this hop knew it."""
    label: str = "the {kind} hop at {where}"
    """How a verdict names the hop."""
    explains: str = ""
    """Why, when a failure started at this hop (checked after NetworkPolicy and the
    :attr:`error_causes` of every kind); empty: the proxy's flags, or "failed"."""
    group: str = "{app} {kind} {status} {flags}"
    """A pod-free label to count failures this kind produced by."""
    error_causes: tuple[tuple[str, str], ...] = ()
    """``(error.type, why)``: failures this kind produces, whichever hop records them."""
    walk: Walker | None = None
    """Adds the hop's rows to a packet walk; None: it adds none."""
    client_packet: Sender | None = None
    """The client's packet as this hop saw it, when it is the first to see it."""

    @property
    def emulated(self) -> bool:
        return Trait.EMULATED in self.traits

    @property
    def css_class(self) -> str:
        return f"hop-{self.name}" if self.name else "hop-other"


KINDS: dict[str, HopKind] = {}
"""Every known hop kind by name, in journey order."""


def _declare(kind: HopKind) -> HopKind:
    KINDS[kind.name] = kind
    return kind


CLIENT = _declare(
    HopKind(
        "client",
        Trait.ENTRY,
        style="white",
        endpoints=client_endpoints,
    )
)
DNS = _declare(
    HopKind(
        "dns",
        style="magenta",
        colour="#f3e8fd",
        endpoints=dns_endpoints,
        detail=dns_detail,
        fallback_status=dns_rcode,
        explains=(
            "pod {where} could not resolve {dns_name!r}: {status} after {dns_tried} "
            "(the whole search path)"
        ),
        group="dns {status} ({dns_name})",
    )
)
_ENVOY_TO_SERVICES = HopKind(
    "",
    Trait.ENTRY | Trait.DIALS_SERVICES | Trait.REPORTS_FLAGS,
    walk=walk_proxied,
    tls=outbound_tls,
)
"""An Envoy that ends a client's connection and opens its own to a Service."""
INGRESS = _declare(
    replace(
        _ENVOY_TO_SERVICES,
        name="ingress",
        style="cyan",
        label="the ingress",
        group="ingress {status} {flags}",
        client_packet=sent_as_accepted,
    )
)
SIDECAR_OUTBOUND = _declare(
    replace(
        _ENVOY_TO_SERVICES,
        name="sidecar-outbound",
        style="blue",
        label="the {where} sidecar (outbound)",
        client_packet=sent_as_captured,
    )
)
SIDECAR_INBOUND = _declare(
    HopKind(
        "sidecar-inbound",
        Trait.REPORTS_FLAGS | Trait.DELIVERS_IN_POD,
        style="blue",
        label="the {where} sidecar (inbound)",
        walk=walk_in_pod,
        tls=inbound_tls,
    )
)

_SERVICE_NAT = HopKind(
    "",
    Trait.EMULATED | Trait.ENTRY | Trait.FORWARDS_CONTEXT,
    style="yellow",
    colour="#fff3d6",
    endpoints=nat_originals,
    label="{kind} ({where})",
    walk=walk_service_nat,
    client_packet=sent_as_translated,
    tls=opaque_tls,
)
"""A Service address DNATed to an endpoint (and undone by conntrack on the reply)."""
KUBE_PROXY = _declare(
    replace(
        _SERVICE_NAT,
        name="kube-proxy",
        where=service_endpoint,
        group="kube-proxy {error_type} ({service})",
        error_causes=(
            ("no-ready-endpoints", "kube-proxy rejected the connection: {message}"),
            ("no-local-endpoints", "kube-proxy rejected the connection: {message}"),
            (
                "endpoint-unreachable",
                "kube-proxy sent it to an endpoint that did not answer ({message}); "
                "its rules may be stale or the pod just went away",
            ),
        ),
    )
)
LOAD_BALANCER = _declare(replace(_SERVICE_NAT, name="load-balancer", where=cloud_lb_for_service))

_NODE_DATAPATH = HopKind(
    "",
    Trait.EMULATED,
    style="green",
    colour="#fce8e6",
    endpoints=nat_originals,
    where=node_and_kind,
)
"""Packet work a node does for a pod's traffic: encapsulation, SNAT, filtering."""
CNI_OVERLAY = _declare(
    replace(
        _NODE_DATAPATH,
        name="cni-overlay",
        traits=Trait.EMULATED | Trait.FORWARDS_CONTEXT,
        colour="#e8f0fe",
        detail=overlay_encapsulation,
        walk=walk_overlay,
        tls=opaque_tls,
    )
)
EGRESS_SNAT = _declare(replace(_NODE_DATAPATH, name="egress-snat", walk=walk_egress))
NETWORK_POLICY = _declare(
    replace(
        _NODE_DATAPATH,
        name="network-policy",
        style="",
        group="NetworkPolicy deny ({policy_side})",
        walk=walk_dropped,
    )
)
APP = _declare(
    HopKind(
        "app",
        Trait.CONNTRACK_PAIRED,
        style="bold white",
        colour="#e6f4ea",
        endpoints=app_endpoints,
        label="the {app} app in pod {where}",
        explains="{label} answered {status} itself",
        group="app {app} answered {status}",
        walk=walk_served,
    )
)

OTHER = HopKind("")
"""What a kind this table does not know reads as (its own name is kept on the hop)."""


def kind_of(name: object) -> HopKind:
    """The entry for a ``hopscope.hop`` value; :data:`OTHER` for one hopscope does not know."""
    return KINDS.get(str(name or ""), OTHER)


def explained_error(error_type: str) -> tuple[str, str] | None:
    """``(kind that produced it, why)`` for an ``error.type`` some kind declares."""
    for kind in KINDS.values():
        for declared, why in kind.error_causes:
            if declared == error_type:
                return kind.name, why
    return None


def badge_css() -> str:
    """The explorer's per-kind badge colours, from the table."""
    return "\n".join(
        f".{kind.css_class} {{ background: {kind.colour}; }}" for kind in (*KINDS.values(), OTHER)
    )

"""The kernel's connection tracking table, read over ctnetlink (pyroute2).

Two ways in, both per node namespace:

- :class:`ConntrackWatcher` subscribes to the ``NEW`` and ``DESTROY`` event groups: one
  :class:`Flow` per connection the node's netfilter confirmed or dropped, in the order the
  kernel sent them. A ``NEW`` event carries no timestamp (the kernel adds
  ``CTA_TIMESTAMP`` to ``DESTROY`` events and table dumps only), so :attr:`Flow.seen_ns`
  holds the observer's wall clock at receipt and :attr:`Flow.start_ns` is filled where the
  kernel gives it (``nf_conntrack_timestamp=1`` in the node namespace).
- :func:`table` dumps the current entries, with their kernel start times.

:func:`service_flow_attributes` turns a DNATed flow into the kube-proxy hop attributes of
``ARCHITECTURE.md`` (original and translated tuples, the endpoint pod, the chains that
matched) by looking the original destination up in the rule set the node was synced with.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import ipaddress
import os
import socket
import struct
import time
from collections.abc import AsyncIterator, Container, Iterator
from dataclasses import dataclass
from typing import Any

from mesh.kernel.iptables import (
    NODEPORTS,
    SERVICES,
    endpoint_chain,
    external_chain,
    local_policy_chain,
    service_chain,
)
from mesh.kernel.renderer import ProxyNode
from mesh.kubeproxy.rules import RuleSet, ServiceRule

NFNLGRP_CONNTRACK_NEW = 1
NFNLGRP_CONNTRACK_DESTROY = 3
IPCTNL_MSG_CT_NEW = 0
NETLINK_NETFILTER = 12
SO_RCVBUFFORCE = 33
EVENT_BUFFER = 8 << 20
"""Bytes of events a node's socket may hold before the kernel drops new ones (ENOBUFS)."""
IPCTNL_MSG_CT_DELETE = 2
IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5
PROTOCOLS = {socket.IPPROTO_TCP: "tcp", socket.IPPROTO_UDP: "udp", socket.IPPROTO_SCTP: "sctp"}


@dataclass(frozen=True)
class Flow:
    """One conntrack entry: the tuple as the client sent it and the tuple of the reply."""

    id: int
    event: str
    """``new`` or ``destroy`` for watched flows, ``entry`` for a table dump."""
    protocol: str
    original_src: str
    original_dst: str
    reply_src: str
    reply_dst: str
    status: int
    seen_ns: int
    """Wall clock when the observer read the message."""
    start_ns: int | None = None
    """The kernel's wall-clock time the entry was confirmed, where the kernel sends it."""
    stop_ns: int | None = None
    state: str | None = None
    """The TCP state (``ESTABLISHED``, ``TIME_WAIT``, …) for TCP entries of a dump."""
    timeout: int | None = None
    """Seconds until the entry expires unless more packets come (table dumps)."""
    bytes_orig: int | None = None
    """Bytes the client sent (IP packets), where the kernel counts them
    (``nf_conntrack_acct=1``: in destroy events and table dumps)."""
    bytes_reply: int | None = None
    """Bytes of the reply direction."""
    packets_orig: int | None = None
    packets_reply: int | None = None
    recent: dict[str, int] | None = None
    """For a new DNATed flow whose client is in ``recent`` lists (ClientIP affinity): list
    name (the endpoint chain) -> connections it recorded for the client, this one included."""

    @property
    def translated_dst(self) -> str:
        """Where the packets really went: the reply comes from there."""
        return self.reply_src

    @property
    def translated_src(self) -> str:
        """The source the server saw: the reply goes there."""
        return self.reply_dst

    @property
    def dnat(self) -> bool:
        return bool(self.status & IPS_DST_NAT)

    @property
    def snat(self) -> bool:
        return bool(self.status & IPS_SRC_NAT)

    def line(self) -> str:
        """The entry the way ``conntrack -L`` prints it."""
        osrc, osport = self.original_src.rsplit(":", 1)
        odst, odport = self.original_dst.rsplit(":", 1)
        rsrc, rsport = self.reply_src.rsplit(":", 1)
        rdst, rdport = self.reply_dst.rsplit(":", 1)
        number = {v: k for k, v in PROTOCOLS.items()}.get(self.protocol, 0)
        parts = [f"{self.protocol:<8} {number}"]
        if self.timeout is not None:
            parts.append(str(self.timeout))
        if self.state:
            parts.append(self.state)
        parts.append(f"src={osrc} dst={odst} sport={osport} dport={odport}")
        if self.bytes_orig is not None:  # nf_conntrack_acct=1: conntrack -L shows counts
            parts.append(f"packets={self.packets_orig or 0} bytes={self.bytes_orig}")
        if not self.status & IPS_SEEN_REPLY:
            parts.append("[UNREPLIED]")
        parts.append(f"src={rsrc} dst={rdst} sport={rsport} dport={rdport}")
        if self.bytes_reply is not None:
            parts.append(f"packets={self.packets_reply or 0} bytes={self.bytes_reply}")
        if self.status & IPS_ASSURED:
            parts.append("[ASSURED]")
        parts.append(f"id={self.id}")
        return " ".join(parts)


def _tuple(nla: Any) -> tuple[str, str, str] | None:
    if nla is None:
        return None
    ip = nla.get_attr("CTA_TUPLE_IP")
    proto = nla.get_attr("CTA_TUPLE_PROTO")
    if ip is None or proto is None:
        return None
    number = proto.get_attr("CTA_PROTO_NUM")
    if number not in PROTOCOLS:
        return None
    src, dst = ip.get_attr("CTA_IP_V4_SRC"), ip.get_attr("CTA_IP_V4_DST")
    if src is None or dst is None:
        return None
    sport, dport = proto.get_attr("CTA_PROTO_SRC_PORT"), proto.get_attr("CTA_PROTO_DST_PORT")
    return PROTOCOLS[number], f"{src}:{sport}", f"{dst}:{dport}"


_TCP_STATES = (
    "NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK",
    "TIME_WAIT", "CLOSE", "SYN_SENT2",
)  # fmt: skip


def parse(msg: Any, seen_ns: int | None = None, event: str | None = None) -> Flow | None:
    """A ctnetlink message as a :class:`Flow`; None for what is not IPv4 TCP/UDP/SCTP."""
    original = _tuple(msg.get_attr("CTA_TUPLE_ORIG"))
    reply = _tuple(msg.get_attr("CTA_TUPLE_REPLY"))
    if original is None or reply is None:
        return None
    if event is None:
        kind = msg["header"]["type"] & 0xFF
        event = "destroy" if kind == IPCTNL_MSG_CT_DELETE else "new"
    stamps = msg.get_attr("CTA_TIMESTAMP")
    start = stop = None
    if stamps is not None:
        start = stamps.get_attr("CTA_TIMESTAMP_START") or None
        stop = stamps.get_attr("CTA_TIMESTAMP_STOP") or None
    state = None
    info = msg.get_attr("CTA_PROTOINFO")
    tcp = info.get_attr("CTA_PROTOINFO_TCP") if info is not None else None
    if tcp is not None:
        number = tcp.get_attr("CTA_PROTOINFO_TCP_STATE")
        if number is not None and 0 <= number < len(_TCP_STATES):
            state = _TCP_STATES[number]
    return Flow(
        id=int(msg.get_attr("CTA_ID") or 0),
        event=event,
        protocol=original[0],
        original_src=original[1],
        original_dst=original[2],
        reply_src=reply[1],
        reply_dst=reply[2],
        status=int(msg.get_attr("CTA_STATUS") or 0),
        seen_ns=seen_ns if seen_ns is not None else time.time_ns(),
        start_ns=start,
        stop_ns=stop,
        state=state,
        timeout=msg.get_attr("CTA_TIMEOUT"),
        packets_orig=_counter(msg, "CTA_COUNTERS_ORIG", "CTA_COUNTERS_PACKETS"),
        bytes_orig=_counter(msg, "CTA_COUNTERS_ORIG", "CTA_COUNTERS_BYTES"),
        packets_reply=_counter(msg, "CTA_COUNTERS_REPLY", "CTA_COUNTERS_PACKETS"),
        bytes_reply=_counter(msg, "CTA_COUNTERS_REPLY", "CTA_COUNTERS_BYTES"),
    )


def _counter(msg: Any, direction: str, kind: str) -> int | None:
    """One of the entry's packet and byte counts (``nf_conntrack_acct=1``), if it has them."""
    counters = msg.get_attr(direction)
    return None if counters is None else int(counters.get_attr(kind) or 0)


class ConntrackWatcher:
    """Conntrack ``NEW``/``DESTROY`` events of one network namespace, as :class:`Flow`s.

    ``async with ConntrackWatcher("hopscope-node-a") as watcher: async for flow in watcher``.
    The socket is a plain ``NETLINK_NETFILTER`` socket made inside the namespace, and the
    messages are read by :func:`parse_events` (a busy node sends thousands of events a
    second; a generic netlink decoder spends ~10x the time per message). Events the socket
    could not take (a full receive buffer: ``ENOBUFS``) are lost, as for ``conntrack -E``;
    :attr:`overruns` counts how often that happened.
    """

    def __init__(self, netns: str | None, destroy: bool = True) -> None:
        self.netns = netns
        self.groups = 1 << (NFNLGRP_CONNTRACK_NEW - 1)
        if destroy:
            self.groups |= 1 << (NFNLGRP_CONNTRACK_DESTROY - 1)
        self.overruns = 0
        self.sock: socket.socket | None = None

    def open(self) -> socket.socket:
        from mesh.kernel.forward import socket_in

        sock = socket_in(self.netns, socket.SOCK_RAW, NETLINK_NETFILTER, socket.AF_NETLINK)
        try:  # as root the buffer may exceed rmem_max: room for bursts of events
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, EVENT_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, EVENT_BUFFER)
        sock.bind((0, self.groups))
        self.sock = sock
        return sock

    def read(self, timeout: float | None = None) -> list[Flow]:
        """The flows of the next datagram (blocking up to ``timeout``; [] on timeout)."""
        assert self.sock is not None, "open() first"
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            return []
        except OSError as exc:
            if exc.errno != errno.ENOBUFS:
                raise
            self.overruns += 1
            return []
        return parse_events(data, time.time_ns())

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    async def __aenter__(self) -> ConntrackWatcher:
        self.open().setblocking(False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[Flow]:
        return self._flows()

    async def _flows(self) -> AsyncIterator[Flow]:
        assert self.sock is not None, "use `async with`"
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.sock_recv(self.sock, 1 << 16)
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    raise
                self.overruns += 1
                continue
            for flow in parse_events(data, time.time_ns()):
                yield flow


_NLA = struct.Struct("=HH")
_NLMSG = struct.Struct("=IHHII")
CTNETLINK = 1 << 8
NLA_TYPE_MASK = 0x3FFF


def _attrs(data: bytes, start: int, end: int) -> dict[int, tuple[int, int]]:
    """Netlink attributes in ``data[start:end]``: type -> (payload start, payload end)."""
    out = {}
    while start + 4 <= end:
        length, kind = _NLA.unpack_from(data, start)
        if length < 4:
            break
        out[kind & NLA_TYPE_MASK] = (start + 4, start + length)
        start += (length + 3) & ~3
    return out


def _ct_tuple(data: bytes, span: tuple[int, int] | None) -> tuple[str, str, str] | None:
    if span is None:
        return None
    top = _attrs(data, *span)
    ip, proto = top.get(1), top.get(2)  # CTA_TUPLE_IP, CTA_TUPLE_PROTO
    if ip is None or proto is None:
        return None
    ips, protos = _attrs(data, *ip), _attrs(data, *proto)
    src, dst, num = ips.get(1), ips.get(2), protos.get(1)  # CTA_IP_V4_SRC/DST, PROTO_NUM
    sport, dport = protos.get(2), protos.get(3)
    if None in (src, dst, num, sport, dport) or data[num[0]] not in PROTOCOLS:  # type: ignore[index]
        return None
    assert src and dst and sport and dport and num

    def address(ip: tuple[int, int], port: tuple[int, int]) -> str:
        return f"{socket.inet_ntoa(data[ip[0] : ip[1]])}:{int.from_bytes(data[port[0] : port[1]])}"

    return PROTOCOLS[data[num[0]]], address(src, sport), address(dst, dport)


def _messages(data: bytes) -> Iterator[tuple[int, int, int]]:
    """The netlink messages in one datagram: (type, start of the payload, end)."""
    offset = 0
    while offset + _NLMSG.size <= len(data):
        length, kind, _flags, _seq, _pid = _NLMSG.unpack_from(data, offset)
        if length < _NLMSG.size:
            return
        yield kind, offset + _NLMSG.size, min(offset + length, len(data))
        offset += (length + 3) & ~3


def parse_events(
    data: bytes,
    seen_ns: int,
    event: str | None = None,
    wanted: Container[int] | None = None,
) -> list[Flow]:
    """The IPv4 TCP/UDP/SCTP flows in one datagram of ctnetlink messages.

    ``event`` names every flow's event (a dump's entries); by default each message's type
    says ``new`` or ``destroy``. ``wanted``: only the entries with these conntrack ids are
    read further than their id (a dump read for a few open connections skips the rest of
    a busy table, its ``TIME_WAIT`` entries, at the cost of one attribute walk each)."""
    flows = []
    for kind, start, end in _messages(data):
        if kind & 0xFF00 != CTNETLINK or data[start] != socket.AF_INET:
            continue
        if wanted is not None and _ct_id(data, start + 4, end) not in wanted:
            continue
        top = _attrs(data, start + 4, end)  # after the nfgenmsg header
        ct_id = top.get(12)
        number = int.from_bytes(data[ct_id[0] : ct_id[1]]) if ct_id else 0
        original, reply = _ct_tuple(data, top.get(1)), _ct_tuple(data, top.get(2))
        if original is None or reply is None:
            continue
        status = top.get(3)
        flows.append(
            Flow(
                id=number,
                event=event or ("destroy" if kind & 0xFF == IPCTNL_MSG_CT_DELETE else "new"),
                protocol=original[0],
                original_src=original[1],
                original_dst=original[2],
                reply_src=reply[1],
                reply_dst=reply[2],
                status=int.from_bytes(data[status[0] : status[1]]) if status else 0,
                seen_ns=seen_ns,
                packets_orig=_ct_count(data, top.get(9), 1),  # CTA_COUNTERS_ORIG
                bytes_orig=_ct_count(data, top.get(9), 2),
                packets_reply=_ct_count(data, top.get(10), 1),  # CTA_COUNTERS_REPLY
                bytes_reply=_ct_count(data, top.get(10), 2),
                state=_ct_tcp_state(data, top.get(4)),  # CTA_PROTOINFO
            )
        )
    return flows


def _ct_id(data: bytes, start: int, end: int) -> int:
    """A message's ``CTA_ID`` (0 when it has none), read without parsing the rest."""
    unpack = _NLA.unpack_from
    while start + 4 <= end:
        length, kind = unpack(data, start)
        if length < 4:
            break
        if kind & NLA_TYPE_MASK == 12:
            return int.from_bytes(data[start + 4 : start + length])
        start += (length + 3) & ~3
    return 0


def _ct_tcp_state(data: bytes, span: tuple[int, int] | None) -> str | None:
    """The TCP state of ``CTA_PROTOINFO`` → ``CTA_PROTOINFO_TCP`` →
    ``CTA_PROTOINFO_TCP_STATE`` (u8), where the message has one (dumps, not events)."""
    tcp = _attrs(data, *span).get(1) if span is not None else None
    state = _attrs(data, *tcp).get(1) if tcp is not None else None
    if state is None or data[state[0]] >= len(_TCP_STATES):
        return None
    return _TCP_STATES[data[state[0]]]


def _ct_count(data: bytes, span: tuple[int, int] | None, kind: int) -> int | None:
    """A count of a ``CTA_COUNTERS_*`` attribute: ``CTA_COUNTERS_PACKETS`` (1) or
    ``CTA_COUNTERS_BYTES`` (2), both big-endian u64."""
    if span is None:
        return None
    counted = _attrs(data, *span).get(kind)
    return int.from_bytes(data[counted[0] : counted[1]]) if counted else None


_DUMP_REQUEST = struct.Struct("=IHHIIBBH")
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_DONE, NLMSG_ERROR = 3, 2


def dump(netns: str | None, wanted: Container[int] | None = None) -> list[Flow]:
    """Every IPv4 TCP/UDP/SCTP entry of the namespace's table, read by :func:`parse_events`
    (a plain netlink dump: cheap enough to repeat every few seconds); with ``wanted``, only
    the entries with those conntrack ids."""
    from mesh.kernel.forward import socket_in

    sock = socket_in(netns, socket.SOCK_RAW, NETLINK_NETFILTER, socket.AF_NETLINK)
    try:
        sock.settimeout(5)
        kind = CTNETLINK | 1  # IPCTNL_MSG_CT_GET
        sock.send(
            _DUMP_REQUEST.pack(_DUMP_REQUEST.size, kind, NLM_F_REQUEST | NLM_F_DUMP, 1, 0,
                               socket.AF_INET, 0, 0)
        )  # fmt: skip
        flows: list[Flow] = []
        now = time.time_ns()
        while True:
            data = sock.recv(1 << 17)
            if not data:
                return flows
            for msg_kind, _start, _end in _messages(data):
                if msg_kind in (NLMSG_DONE, NLMSG_ERROR):
                    return flows
            flows += parse_events(data, now, "entry", wanted)
    finally:
        sock.close()


def table(netns: str | None) -> list[Flow]:
    """Every IPv4 TCP/UDP/SCTP entry in the namespace's conntrack table, oldest first."""
    from pyroute2.conntrack import NFCTSocket

    now = time.time_ns()
    with NFCTSocket(netns=netns) as sock:
        flows = [f for msg in sock.dump() if (f := parse(msg, now, "entry")) is not None]
    return sorted(flows, key=lambda f: (f.start_ns or 0, f.id))


def recent_hits(lists: dict[str, str], client_ip: str) -> dict[str, int]:
    """How many packets each ``xt_recent`` list (``/proc/net/xt_recent/NAME``) recorded for
    ``client_ip``: its timestamps after ``oldest_pkt``."""
    wanted = f"src={client_ip} "
    hits = {}
    for name, text in lists.items():
        for line in text.splitlines():
            if line.startswith(wanted):
                _, _, stamps = line.partition("oldest_pkt: ")
                hits[name] = len(stamps.split(" ", 1)[1].split(",")) if " " in stamps else 1
    return hits


def rule_attributes(rule: ServiceRule) -> dict[str, Any]:
    """What a kube-proxy hop says about the Service rule it went through (a ``RuleSet``
    entry), whatever the kernel then did with the packet."""
    attrs: dict[str, Any] = {
        "hopscope.hop": rule.hop,
        "k8s.service.name": rule.name,
        "k8s.namespace.name": rule.namespace,
        "hopscope.service.type": rule.service_type,
        "hopscope.service.port": rule.port,
        "hopscope.rule.kind": rule.kind,
    }
    if rule.kind != "cluster-ip":
        attrs["hopscope.traffic_policy"] = rule.external_traffic_policy
    return attrs


def service_flow_attributes(
    flow: Flow, rules: RuleSet, node: ProxyNode | None = None
) -> dict[str, Any] | None:
    """The kube-proxy hop attributes a DNATed flow stands for; None if no Service matches.

    The chain list is the path the first packet took through the nat table, the way
    ``iptables -t nat -L -v`` counters would show it.
    """
    vip, port = flow.original_dst.rsplit(":", 1)
    rule = rules.rules.get((vip, int(port)))
    if rule is None or not flow.dnat:
        return None
    dst_ip, dst_port = flow.translated_dst.rsplit(":", 1)
    endpoint = next((e for e in rule.endpoints if e.ip == dst_ip and e.port == int(dst_port)), None)
    protocol = flow.protocol
    name = rule.service
    chains = [SERVICES]
    balancer = service_chain(name, protocol)
    if rule.kind != "cluster-ip":
        if rule.kind == "node-port":
            chains.append(NODEPORTS)
        chains.append(external_chain(name, protocol))
        if rule.external_traffic_policy == "Local" and not _from_cluster(flow, node):
            balancer = local_policy_chain(name, protocol)
    chains += [balancer, endpoint_chain(name, protocol, flow.translated_dst)]
    attrs: dict[str, Any] = {
        **rule_attributes(rule),
        "hopscope.nat.original.src": flow.original_src,
        "hopscope.nat.original.dst": flow.original_dst,
        "hopscope.nat.translated.src": flow.translated_src,
        "hopscope.nat.translated.dst": flow.translated_dst,
        "hopscope.nat.snat": flow.snat,
        "hopscope.lb.mode": "iptables",
        "hopscope.lb.algorithm": "random",
        "hopscope.conntrack.id": flow.id,
        "hopscope.rule.chains": chains,
        "network.peer.address": flow.original_src.rsplit(":", 1)[0],
        "network.protocol.name": protocol,
        "peer.service": rule.name,
        "server.address": rule.vip,
        "server.port": rule.port,
    }
    if endpoint is not None:
        attrs["hopscope.endpoint.pod"] = endpoint.pod
        attrs["hopscope.endpoint.node"] = endpoint.node
    if rule.session_affinity == "ClientIP":
        # the endpoint chain's recent list: this client's first connection, or a later one
        seen = (flow.recent or {}).get(endpoint_chain(name, protocol, flow.translated_dst))
        attrs["hopscope.lb.affinity"] = (
            "ClientIP" if seen is None else "ClientIP (new)" if seen <= 1 else "ClientIP (sticky)"
        )
    return attrs


def _from_cluster(flow: Flow, node: ProxyNode | None) -> bool:
    """Whether the client is a pod (kube-proxy's ClusterCIDR local-traffic detector)."""
    if node is None or node.cluster_cidr is None:
        return False
    src = ipaddress.ip_address(flow.original_src.rsplit(":", 1)[0])
    return src in ipaddress.ip_network(node.cluster_cidr)


def entry(flow: Flow, rules: RuleSet, node: str) -> dict[str, Any]:
    """A flow as ``hopscope conntrack -o json`` shows an entry (the userspace table's keys,
    plus the node whose table holds it)."""
    vip, port = flow.original_dst.rsplit(":", 1)
    rule = rules.rules.get((vip, int(port))) if port.isdigit() else None
    endpoint = ""
    if rule is not None:
        ip, _, target = flow.translated_dst.rpartition(":")
        endpoint = next((e.pod for e in rule.endpoints if e.ip == ip and str(e.port) == target), "")
    return {
        "id": flow.id,
        "node": node,
        "protocol": flow.protocol,
        "state": flow.state or "",
        "timeout_seconds": flow.timeout,
        "original": {"src": flow.original_src, "dst": flow.original_dst},
        "reply": {"src": flow.reply_src, "dst": flow.reply_dst},
        "dnat": flow.dnat,
        "snat": flow.snat,
        "service": rule.service if rule is not None else "",
        "endpoint_pod": endpoint,
        "requests": None,
        "start_ns": flow.start_ns,
        "line": flow.line(),
    }


# -- NFLOG: the packets a node's policy rules dropped ----------------------------------------

NFNL_SUBSYS_ULOG = 4
NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULA_CFG_CMD = 1
NFULA_CFG_MODE = 2
NFULA_CFG_TIMEOUT = 4
NFULA_CFG_QTHRESH = 5
NFULA_TIMESTAMP = 3
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2
NFULA_PAYLOAD = 9
NFULA_PREFIX = 10
NLM_F_REQUEST_ACK = 0x1 | 0x4


@dataclass(frozen=True)
class Logged:
    """One packet an NFLOG rule logged: its prefix and its TCP/UDP tuple."""

    prefix: str
    protocol: str
    src: str
    dst: str
    seen_ns: int
    vni: int | None = None
    """For a VXLAN packet (UDP to :data:`VXLAN_UDP_PORT`): its network identifier, and the
    tuple of the packet it carries."""
    inner_src: str | None = None
    inner_dst: str | None = None


def _nla(kind: int, payload: bytes) -> bytes:
    data = _NLA.pack(4 + len(payload), kind) + payload
    return data + b"\0" * (-len(data) % 4)


def nflog_socket(netns: str | None, group: int, copy_range: int = 64) -> socket.socket:
    """A socket in ``netns`` bound to NFLOG ``group``, copying each packet's first bytes
    (the IP and TCP headers: enough for the tuple)."""
    from mesh.kernel.forward import socket_in

    sock = socket_in(netns, socket.SOCK_RAW, NETLINK_NETFILTER, socket.AF_NETLINK)
    sock.bind((0, 0))
    body = struct.pack("=BBH", socket.AF_UNSPEC, 0, socket.htons(group))
    body += _nla(NFULA_CFG_CMD, bytes([NFULNL_CFG_CMD_BIND]))
    body += _nla(NFULA_CFG_MODE, struct.pack(">IBB", copy_range, NFULNL_COPY_PACKET, 0))
    # one packet per message, sent at once (the defaults batch them for up to a second)
    body += _nla(NFULA_CFG_TIMEOUT, struct.pack(">I", 0))
    body += _nla(NFULA_CFG_QTHRESH, struct.pack(">I", 1))
    kind = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
    sock.send(_NLMSG.pack(_NLMSG.size + len(body), kind, NLM_F_REQUEST_ACK, 1, 0) + body)
    ack = sock.recv(4096)  # NLMSG_ERROR with error 0 is the ACK
    error = struct.unpack_from("=i", ack, _NLMSG.size)[0] if len(ack) >= _NLMSG.size + 4 else 0
    if error:
        sock.close()
        raise OSError(-error, f"NFLOG group {group}: {os.strerror(-error)}")
    return sock


def parse_nflog(data: bytes, seen_ns: int) -> list[Logged]:
    """The IPv4 TCP/UDP packets in one datagram of NFLOG messages."""
    out = []
    for kind, start, end in _messages(data):
        if kind != (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET:
            continue
        top = _attrs(data, start + 4, end)
        payload, prefix, stamp = (
            top.get(NFULA_PAYLOAD),
            top.get(NFULA_PREFIX),
            top.get(NFULA_TIMESTAMP),
        )
        packet = data[payload[0] : payload[1]] if payload else b""
        if len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] not in (6, 17):
            continue
        ihl = (packet[0] & 0x0F) * 4
        if len(packet) < ihl + 4:
            continue
        sport, dport = struct.unpack_from(">HH", packet, ihl)
        when = seen_ns
        if stamp is not None and stamp[1] - stamp[0] >= 16:  # the packet's own time
            sec, usec = struct.unpack_from(">QQ", data, stamp[0])
            when = sec * 1_000_000_000 + usec * 1000 or seen_ns
        text = data[prefix[0] : prefix[1]].rstrip(b"\0").decode(errors="replace") if prefix else ""
        logged = Logged(
            text,
            PROTOCOLS[packet[9]],
            f"{socket.inet_ntoa(packet[12:16])}:{sport}",
            f"{socket.inet_ntoa(packet[16:20])}:{dport}",
            when,
        )
        if packet[9] == 17 and dport == VXLAN_UDP_PORT:
            logged = _with_vxlan_inner(logged, packet, ihl + 8)
        out.append(logged)
    return out


VXLAN_UDP_PORT = 8472
"""flannel's VXLAN port (the IANA port is 4789)."""


def _with_vxlan_inner(logged: Logged, packet: bytes, at: int) -> Logged:
    """``logged`` with the VXLAN header's VNI and the inner IPv4 TCP/UDP tuple, when the
    copied bytes hold them (8 bytes VXLAN, 14 Ethernet, the inner IP and ports)."""
    inner = at + 8 + 14
    if len(packet) < inner + 20 or not packet[at] & 0x08:  # the I flag: a valid VNI
        return logged
    vni = int.from_bytes(packet[at + 4 : at + 7], "big")
    if packet[inner - 2 : inner] != b"\x08\x00" or packet[inner] >> 4 != 4:
        return logged
    ihl = (packet[inner] & 0x0F) * 4
    if packet[inner + 9] not in (6, 17) or len(packet) < inner + ihl + 4:
        return logged
    sport, dport = struct.unpack_from(">HH", packet, inner + ihl)
    return dataclasses.replace(
        logged,
        vni=vni,
        inner_src=f"{socket.inet_ntoa(packet[inner + 12 : inner + 16])}:{sport}",
        inner_dst=f"{socket.inet_ntoa(packet[inner + 16 : inner + 20])}:{dport}",
    )


VXLAN_LOG_CHAIN = "HOPSCOPE-VXLAN-LOG"
NFLOG_COPY = 128
"""Bytes of each logged packet: outer IP and UDP, VXLAN, inner Ethernet, IP and ports."""
INNER_TCP_SYN = "0>>22&0x3C@36&0xFF=6&&0>>22&0x3C@30>>22&0x3C@40&0x12=0x02"
"""``u32``: past the outer IP header to the UDP header; 30 bytes on (UDP, VXLAN, inner
Ethernet) the inner IP header, protocol TCP; past it, TCP flags SYN without ACK."""


def vxlan_log_rules(group: int) -> str:
    """The filter rules that NFLOG (``group``) a node's VXLAN packets carrying an inner
    TCP SYN: what kube-proxy's observer reads the overlay's outer tuple from."""
    comment = '-m comment --comment "hopscope: the overlay hop reads the outer tuple"'
    return "\n".join(
        [
            "*filter",
            f":{VXLAN_LOG_CHAIN} - [0:0]",
            f"-I OUTPUT -p udp -m udp --dport {VXLAN_UDP_PORT} {comment} -j {VXLAN_LOG_CHAIN}",
            f'-A {VXLAN_LOG_CHAIN} -m u32 --u32 "{INNER_TCP_SYN}" '
            f'-j NFLOG --nflog-group {group} --nflog-prefix "vxlan"',
            "COMMIT",
            "",
        ]
    )

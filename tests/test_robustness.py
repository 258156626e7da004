"""Odd input must never knock a component over or leave a traceback in its log.

A real cluster (the sample shop plus the echo Services of ``tests/manifests/echo.yaml``)
takes a few hundred malformed, truncated and reset connections — random bytes, partial
HTTP/1, huge headers, bad HTTP/2 prefaces and frames, resets mid-request and right after
connect, malformed DNS over UDP and TCP — on every address a client can reach:

| target | address |
| --- | --- |
| kube-proxy, ClusterIP | echo-sticky VIP:8080 (no sidecar: relays see it all), frontend's |
| kube-proxy, NodePort | 127.10.0.1:30080, 127.10.0.2:30081 |
| kube-proxy, LoadBalancer | echo-lb's 127.200.0.x:8080 |
| node gateways | 127.10.0.1:15080, 127.10.0.2:15080 |
| VTEPs | 127.10.0.1:8472, 127.10.0.2:8472 |
| cluster DNS | 127.96.0.10:10053 UDP and TCP |
| ingress | 127.200.0.1:8080 |

Every target must accept some of these connections (a wrong address would otherwise pass
unnoticed). Then every component keeps its PID and restart count, every pod (apps and
sidecars) its restart count, valid requests still succeed, and no log under the state
directory holds a traceback.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from mesh import addresses
from tests.e2e_support import api_get, dataplane, hopscope, outside_socket, plan

pytestmark = pytest.mark.e2e

NODE_A, NODE_B = addresses.NODE_IPS["node-a"], addresses.NODE_IPS["node-b"]
CLIENT = "127.100.0.9"
LOG_MARKERS = (
    "Traceback",
    "Task exception was never retrieved",
    "Exception in callback",
    "exception was never retrieved",
    "Unhandled exception",
)
"""What an unhandled exception leaves in a log (Python's own words, asyncio's, the loop's)."""


# -- what a bad client sends ----------------------------------------------------------------


def _junk(rng: random.Random, low: int = 1, high: int = 400) -> bytes:
    return rng.randbytes(rng.randint(low, high))


def _payloads(rng: random.Random, host: str) -> list[tuple[str, bytes, str]]:
    """``(name, bytes, ending)``; ending is ``rst`` (abortive close), ``fin`` or ``read-rst``
    (read what comes back for a moment, then reset)."""
    head = f"GET / HTTP/1.1\r\nHost: {host}\r\n".encode()
    huge = head + b"X-Big: " + b"a" * 200_000 + b"\r\n\r\n"
    many = head + b"".join(f"X-H{i}: v\r\n".encode() for i in range(400)) + b"\r\n"
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    bad_frame = struct.pack("!I", 0xFFFFFF)[1:] + b"\x01\x04" + struct.pack("!I", 1)
    return [
        ("random", _junk(rng), "rst"),
        ("random-read", _junk(rng), "read-rst"),
        ("random-fin", _junk(rng), "fin"),
        ("nothing", b"", "rst"),
        ("partial-head", head, "rst"),
        ("partial-head-fin", head, "fin"),
        ("truncated-line", b"GET /a", "fin"),
        ("bad-request-line", b"GET\x00/ \xffHTTP/9.9\r\n\r\n", "read-rst"),
        ("huge-header", huge, "read-rst"),
        ("many-headers", many, "read-rst"),
        ("body-cut", head + b"Content-Length: 5000\r\n\r\n" + _junk(rng, 10, 100), "rst"),
        ("bad-chunk", head + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nxx\r\n", "read-rst"),
        ("h2-truncated-preface", preface[:10], "rst"),
        ("h2-bad-preface", b"PRI * HTTP/2.0\r\n\r\nXX\r\n\r\n" + _junk(rng), "read-rst"),
        ("h2-bad-frame", preface + bad_frame + _junk(rng, 1, 50), "read-rst"),
        (
            "h2-garbage-headers",
            preface + b"\x00\x00\x08\x01\x05\x00\x00\x00\x01" + b"\xff" * 8,
            "rst",
        ),
        ("pipelined-then-rst", (head + b"\r\n") * 3, "rst"),
    ]


def _send(target: tuple[str, int], data: bytes, ending: str, source: str = CLIENT) -> bool:
    """Send one bad connection; whether ``connect()`` succeeded (what came after may fail).
    Host addresses (127/8) from the host; cluster addresses from where the data path lets
    an outside client in (:func:`~tests.e2e_support.outside_socket`)."""
    if target[0].startswith("127."):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((source, 0))
    else:
        sock = outside_socket(source)
    sock.settimeout(1.0)
    connected = False
    try:
        sock.connect(target)
        connected = True
        if data:
            sock.sendall(data)
        if ending == "fin":
            sock.shutdown(socket.SHUT_WR)
            sock.recv(4096)
        elif ending == "read-rst":
            sock.recv(4096)
    except OSError:
        pass  # refused, reset or timed out: the server's business, not ours
    finally:
        if ending != "fin":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    return connected


def _dns_garbage(rng: random.Random) -> list[bytes]:
    query_id = rng.getrandbits(16)
    header = struct.pack("!HHHHHH", query_id, 0x0100, 1, 0, 0, 0)
    return [
        _junk(rng, 1, 11),  # shorter than a header
        _junk(rng, 12, 512),
        struct.pack("!HHHHHH", query_id, 0x0100, 40, 0, 0, 0),  # 40 questions, none there
        header + b"\x07example",  # name cut short
        header + b"\xc0\x0c\x00\x01\x00\x01",  # pointer to itself
        header + b"\x3f" + b"a" * 63 + b"\x00\x00\x21",  # type without a class
        header + b"\x00\x00\xff\x00\x01",  # ANY for the root
        struct.pack("!HHHHHH", query_id, 0x8180, 1, 1, 0, 0) + b"\x00\x00\x01\x00\x01",  # a reply
    ]


def _fuzz_dns(rng: random.Random, connects: dict[str, int]) -> int:
    target = (plan()["DNS_SERVICE_IP"], plan()["DNS_PORT"])
    sent = 0
    connects.setdefault("cluster DNS (TCP)", 0)
    udp = outside_socket(CLIENT, socket.SOCK_DGRAM)
    for _ in range(4):
        for message in _dns_garbage(rng):
            udp.sendto(message, target)
            sent += 1
    udp.close()
    for message in _dns_garbage(rng):
        for framing in (
            struct.pack("!H", len(message)) + message,
            struct.pack("!H", len(message) + 50) + message,  # longer than what comes
            struct.pack("!H", 0),
            b"\x01",  # half a length
        ):
            if _send(target, framing, rng.choice(("rst", "fin", "read-rst"))):
                connects["cluster DNS (TCP)"] += 1
            sent += 1
    return sent


# -- the cluster's components ---------------------------------------------------------------


def _components() -> dict[str, tuple[int | None, int]]:
    status = api_get("/api/v1/status")
    return {c["name"]: (c["pid"], c["restarts"]) for c in status["components"]}


def _pods() -> dict[str, int]:
    """Every pod's restart count (its app's and its sidecar's processes)."""
    return {p["name"]: p["restarts"] for p in api_get("/api/v1/state")["pods"]}


def _service(name: str) -> dict[str, Any]:
    return next(s for s in api_get("/api/v1/state")["services"] if s["name"] == name)


def _tracebacks(home: Path) -> list[str]:
    found = []
    for path in sorted(home.rglob("*")):
        if not path.is_file() or path.suffix not in (".log", ".jsonl", ".txt", ""):
            continue
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if any(marker in line for marker in LOG_MARKERS):
                found.append(f"{path.relative_to(home)}: {line[:300]}")
    return found


def _get(ip: str, port: int, host: str | None = None) -> int:
    conn = http.client.HTTPConnection(ip, port, timeout=5, source_address=(CLIENT, 0))
    try:
        conn.request("GET", "/", headers={"Host": host} if host else {})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def test_malformed_and_reset_connections_leave_every_component_up_and_no_traceback(
    cluster_to_stop: dict[str, str],
) -> None:
    cluster = cluster_to_stop  # the shared cluster (this test stops it at the end)
    home = Path(cluster["HOPSCOPE_HOME"])
    before = _components()
    assert all(pid for pid, _ in before.values()), before
    pods_before = _pods()
    assert pods_before, "no pods"
    (lb_ip,) = _service("echo-lb")["load_balancer_ingress"]
    targets: dict[str, tuple[str, int]] = {
        "kube-proxy ClusterIP (echo)": (_service("echo-sticky")["cluster_ip"], 8080),
        "kube-proxy ClusterIP (frontend)": (_service("frontend")["cluster_ip"], 8080),
        "kube-proxy NodePort": (NODE_A, 30080),
        "kube-proxy NodePort (Local)": (NODE_B, 30081),
        "kube-proxy LoadBalancer": (lb_ip, 8080),
        "ingress": (addresses.INGRESS_IP, addresses.INGRESS_PORT),
    }
    relays = dataplane() == "userspace"  # the kernel path has no CNI relays to fuzz
    if relays:
        targets |= {
            "node gateway a": (NODE_A, addresses.EGRESS_GATEWAY_PORT),
            "node gateway b": (NODE_B, addresses.EGRESS_GATEWAY_PORT),
            "vtep a": (NODE_A, addresses.VTEP_PORT),
            "vtep b": (NODE_B, addresses.VTEP_PORT),
        }
    rng = random.Random(11)
    sent = 0
    connects = dict.fromkeys(targets, 0)
    for name, target in targets.items():
        for _ in range(1 if relays else 2):  # fewer targets on the kernel path: twice
            for _label, data, ending in _payloads(rng, "shop.local"):
                connects[name] += _send(target, data, ending)
                sent += 1
    for target in (targets["vtep a"], targets["node gateway b"]) if relays else ():  # lies
        for line in (
            b"HOPSCOPE-VXLAN/1 vni=1 src=999.1.1.1 dst=127.244.1.5:70000\n",
            b"HOPSCOPE-VXLAN/1 vni=99999999999999999999 src=1.2.3.4 dst=1.2.3.4:1\n",
            b"HOPSCOPE-VXLAN/1 vni=1 src=127.244.1.9 dst=127.244.2.9:80 outer=1.2.3:99999999\n",
            b"HOPSCOPE-VXLAN/1 vni=1 src=127.244.1.9 dst=127.244.1.250:1\n" + b"x" * 100,
            b"CONNECT 127.244.9.9:1 HTTP/1.1\r\nHost: 127.244.9.9:1\r\n\r\n",
            b"GET http://[::1 HTTP/1.1\r\n\r\n",
        ):
            _send(target, line, "read-rst")
            sent += 1
    sent += _fuzz_dns(rng, connects)
    print(f"sent {sent} malformed, truncated or reset connections and datagrams")
    print("connections accepted per target:", connects)
    assert sent >= 200
    missed = [name for name, count in connects.items() if count == 0]
    assert not missed, f"no connection reached {missed}: {connects}"

    # Still serving: the whole journey, a NodePort, and DNS.
    page = hopscope("curl", "--json", "http://shop.local/", env=cluster)
    assert '"status": 200' in page.stdout, page.stdout
    assert _get(NODE_A, 30080) == 200
    assert _get(addresses.INGRESS_IP, addresses.INGRESS_PORT, "shop.local") == 200
    dig = hopscope("dig", "frontend.shop.svc.cluster.local", env=cluster)
    assert _service("frontend")["cluster_ip"] in dig.stdout, dig.stdout

    assert _components() == before  # same PIDs, no restarts
    assert _pods() == pods_before  # same pods, no app or sidecar restarted
    problems = _tracebacks(home)
    assert not problems, "\n".join(problems[:20])
    # Connections still open when the cluster stops must end quietly too.
    hopscope("down", env=cluster)
    problems = _tracebacks(home)
    assert not problems, "\n".join(problems[:20])


def test_the_log_check_can_fail(tmp_path: Path) -> None:
    """The scan finds a traceback written the way the components log one."""
    logs = tmp_path / "logs"
    logs.mkdir()
    (logs / "kube-proxy.log").write_text(
        '{"msg": "x", "exc_info": "Traceback (most recent call last):\\n  File ..."}\n'
    )
    assert _tracebacks(tmp_path)

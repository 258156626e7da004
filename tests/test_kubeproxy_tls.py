"""kube-proxy on a TLS stream: relayed untouched, one span per connection.

Address plan (loopback, apart from the other kube-proxy tests):

- Service ``shop/catalog`` VIP 127.96.251.1:18281 → one endpoint, pod ``catalog-1`` at
  127.244.251.2:18282, a real TLS server (Python ``ssl``, a certificate made here with
  ``cryptography``) that echoes what it reads.
- Clients connect from 127.100.251.1 with Python ``ssl``, SNI ``catalog.shop.svc.cluster.local``.
"""

from __future__ import annotations

import asyncio
import datetime
import random
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from mesh.cni.vtep import TunnelInfo
from mesh.kubeproxy.clienthello import ClientHelloReader, looks_like_tls, parse_sni
from mesh.kubeproxy.hop import ConnInfo
from mesh.kubeproxy.proxier import Proxier
from mesh.kubeproxy.relays import sniff
from mesh.kubeproxy.rules import IptablesRandom
from mesh.kubeproxy.tlsconn import ConnectionHop
from mesh.model.types import (
    ClusterState,
    Endpoint,
    EndpointPort,
    EndpointSlice,
    Service,
    ServicePort,
)

VIP, PORT = "127.96.251.1", 18281
POD_IP, POD_PORT = "127.244.251.2", 18282
CLIENT_IP = "127.100.251.1"
SNI = "catalog.shop.svc.cluster.local"


def _certificate(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SNI)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(SNI)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp / "cert.pem", tmp / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


class _TLSEcho:
    """A TLS server that echoes each read back until the client closes."""

    def __init__(self, cert: Path, key: Path) -> None:
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(cert, key)
        self.sock = socket.create_server((POD_IP, POD_PORT), reuse_port=False)
        self.peers: list[tuple[str, int]] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, peer = self.sock.accept()
            except OSError:
                return
            self.peers.append(peer)
            threading.Thread(target=self._echo, args=(raw,), daemon=True).start()

    def _echo(self, raw: socket.socket) -> None:
        raw.settimeout(5)
        try:
            with self.context.wrap_socket(raw, server_side=True) as tls:
                while data := tls.recv(65536):
                    tls.sendall(data)
        except (OSError, ssl.SSLError):
            pass

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return _certificate(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def backend(pki: tuple[Path, Path]) -> Iterator[_TLSEcho]:
    server = _TLSEcho(*pki)
    yield server
    server.close()


def _state() -> ClusterState:
    endpoint = Endpoint([POD_IP], True, True, False, "catalog-1", "node-a")
    return ClusterState(
        resource_version=1,
        services=[
            Service("catalog", "shop", cluster_ip=VIP, ports=[ServicePort(PORT, "https", "https")])
        ],
        endpoint_slices=[
            EndpointSlice(
                "catalog-x", "shop", "catalog", [endpoint], [EndpointPort(POD_PORT, "https")]
            )
        ],
    )


class _Running:
    def __init__(self, exporter: InMemorySpanExporter, proxier: Proxier, loop: Any) -> None:
        self.exporter, self.proxier, self.loop = exporter, proxier, loop
        self.errors: list[str] = []
        loop.set_exception_handler(lambda _loop, ctx: self.errors.append(str(ctx)))

    def spans(self, n: int, timeout: float = 5.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = list(self.exporter.get_finished_spans())
            if len(spans) >= n:
                return spans
            time.sleep(0.02)
        raise AssertionError(f"expected {n} spans, got {self.exporter.get_finished_spans()}")


@pytest.fixture()
def proxy(backend: _TLSEcho) -> Iterator[_Running]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    proxier = Proxier(provider.get_tracer("test"), IptablesRandom(), overlay=False)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(proxier.sync(_state()), loop).result(5)
    yield _Running(exporter, proxier, loop)
    asyncio.run_coroutine_threadsafe(_stop(proxier), loop).result(5)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()


async def _stop(proxier: Proxier) -> None:
    for server in proxier.listeners.values():
        server.close()
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _client_context(cert: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    return context


def test_a_tls_connection_is_relayed_untouched_and_gets_one_span(
    proxy: _Running, pki: tuple[Path, Path], backend: _TLSEcho
) -> None:
    raw = socket.create_connection((VIP, PORT), timeout=5, source_address=(CLIENT_IP, 0))
    host, port = raw.getsockname()
    client_tuple = f"{host}:{port}"
    with _client_context(pki[0]).wrap_socket(raw, server_hostname=SNI) as tls:
        # The handshake verified the pod's certificate through kube-proxy: nothing was altered.
        assert tls.version() == "TLSv1.3"
        for message in (b"GET / HTTP/1.1\r\nhost: catalog\r\n\r\n", b"x" * 100_000):
            tls.sendall(message)
            got = b""
            while len(got) < len(message):
                got += tls.recv(65536)
            assert got == message
    (span,) = proxy.spans(1)
    a = dict(span.attributes or {})
    assert span.parent is None  # a trace of its own: the stream says nothing of the caller's
    assert span.kind.name == "CLIENT"
    assert span.name == "kube-proxy shop/catalog TLS connection"
    assert a["hopscope.hop"] == "kube-proxy"
    assert a["hopscope.tls.opaque"] is True
    assert a["tls.client.server_name"] == SNI
    assert a["hopscope.conn.client"] == client_tuple
    assert a["hopscope.nat.original.src"] == client_tuple
    assert a["hopscope.nat.original.dst"] == f"{VIP}:{PORT}"
    assert a["hopscope.nat.translated.dst"] == f"{POD_IP}:{POD_PORT}"
    assert a["hopscope.endpoint.pod"] == "catalog-1"
    assert a["hopscope.conntrack.state"] == "new"
    assert a["network.protocol.name"] == "tls"
    assert a["k8s.service.name"] == "catalog" and a["peer.service"] == "catalog"
    # Both messages and the TLS framing around them passed: more bytes than the plaintext.
    assert int(a["hopscope.conn.bytes_in"]) > 100_000 + 40
    assert int(a["hopscope.conn.bytes_out"]) > 100_000 + 40
    assert int(a["hopscope.emulation.cost_us"]) >= 0
    # The pod saw the client's own address (DNAT only), as for HTTP.
    assert backend.peers[-1][0] == CLIENT_IP
    (entry,) = [e for e in proxy.proxier.conntrack_entries() if e["l7"] == "tls"]
    assert entry["original"]["src"] == client_tuple
    assert not proxy.errors


def test_a_client_hello_without_sni_gets_a_span_without_one(
    proxy: _Running, pki: tuple[Path, Path]
) -> None:
    context = _client_context(pki[0])
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    raw = socket.create_connection((VIP, PORT), timeout=5, source_address=(CLIENT_IP, 0))
    with context.wrap_socket(raw) as tls:
        tls.sendall(b"ping")
        assert tls.recv(10) == b"ping"
    (span,) = proxy.spans(1)
    assert "tls.client.server_name" not in (span.attributes or {})
    assert span.attributes["hopscope.tls.opaque"] is True  # type: ignore[index]


@pytest.mark.parametrize("cut", [3, 5, 9, 43, -1])
def test_a_truncated_or_garbled_client_hello_neither_crashes_nor_stalls(
    proxy: _Running, pki: tuple[Path, Path], cut: int
) -> None:
    hello = bytearray(client_hello(SNI))
    if cut == -1:  # lengths that point far past the data
        hello[3:5] = b"\xff\xff"
        hello[6:9] = b"\xff\xff\xff"
        hello[43] = 0xFF
    else:
        hello = hello[:cut]
    sock = socket.create_connection((VIP, PORT), timeout=5, source_address=(CLIENT_IP, 0))
    sock.sendall(bytes(hello))
    sock.shutdown(socket.SHUT_WR)
    # The TLS server answers the garbage with an alert or just closes; either way the
    # connection ends promptly and the relay closes its span.
    sock.settimeout(5)
    while sock.recv(65536):
        pass
    sock.close()
    (span,) = proxy.spans(1)
    a = span.attributes or {}
    assert a["hopscope.tls.opaque"] is True
    assert a["hopscope.conn.bytes_in"] == len(hello)
    assert "tls.client.server_name" not in a
    assert not proxy.errors


def test_http_and_opaque_tcp_are_not_taken_for_tls() -> None:
    assert sniff(b"GET / HTTP/1.1\r\n") == "http1"
    assert sniff(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n") == "h2"
    assert sniff(client_hello(SNI)) == "tls"
    assert sniff(b"\x16\x03") == "tcp"  # too short to say
    assert sniff(b"\x16\x02\x01") == "tcp"  # SSLv2-era version: not a TLS record
    assert sniff(b"SSH-2.0-OpenSSH_9.6\r\n") == "tcp"


# -- the ClientHello parser on its own -------------------------------------------------------


def client_hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    """A real ClientHello from Python's ``ssl`` (OpenSSL), as its first flight."""
    context = ssl.create_default_context()
    if alpn:
        context.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    if server_name is None:
        context.check_hostname = False
    tls = context.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_parser_reads_the_sni_of_real_client_hellos_however_they_are_split() -> None:
    hello = client_hello(SNI, ["h2", "http/1.1"])
    assert looks_like_tls(hello)
    for step in (1, 2, 7, 100, len(hello)):
        reader = ClientHelloReader()
        for i in range(0, len(hello), step):
            reader.feed(hello[i : i + step])
        assert reader.done and reader.server_name == SNI
    reader = ClientHelloReader()
    reader.feed(client_hello(None))
    assert reader.done and reader.server_name is None


def test_parser_survives_fuzzed_client_hellos() -> None:
    """Random truncations, bit flips and length rewrites never raise, and a parse either
    finds the real name or none."""
    rng = random.Random(15)
    hello = client_hello(SNI)
    for _ in range(3000):
        data = bytearray(hello)
        mutation = rng.randrange(4)
        if mutation == 0:
            data = data[: rng.randrange(len(data))]
        elif mutation == 1:
            for _ in range(rng.randrange(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif mutation == 2:
            at = rng.randrange(len(data) - 2)
            data[at : at + 2] = rng.choice([b"\xff\xff", b"\x00\x00", b"\x40\x00"])
        else:
            data = bytearray(rng.randbytes(rng.randrange(1, 600)))
            data[0] = 0x16
        reader = ClientHelloReader()
        for i in range(0, len(data), 1 + rng.randrange(300)):
            reader.feed(bytes(data[i : i + 300]))
        assert reader.server_name in (None, SNI) or reader.server_name.isascii()
        parse_sni(bytes(data[5:]))
    # A name that is not a host name (control characters, spaces) is not reported.
    assert parse_sni(client_hello(SNI)[5:].replace(b"catalog", b"cat\x00log")) is None


def test_parser_gives_up_on_an_endless_first_flight() -> None:
    reader = ClientHelloReader()
    reader.feed(b"\x16\x03\x01\xff\xff\x01\xff\xff\xff")  # a 16 MiB ClientHello, promised
    for _ in range(20):
        reader.feed(b"\x00" * 1000)
    assert reader.done and reader.server_name is None and not reader.buf


# -- the overlay child --------------------------------------------------------------------


def test_a_tunnelled_connection_gets_its_overlay_span_as_a_child() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    from mesh.kubeproxy.rules import build_rules

    rule = next(iter(build_rules(_state(), {}).rules.values()))
    tunnel = TunnelInfo(
        1, "127.100.251.1:40000", "127.0.1.1:51000", "127.0.2.1:8472", "node-a", "node-b"
    )
    conn = ConnInfo(
        id=7,
        rule=rule,
        endpoint=rule.ready_endpoints[0],
        selector=IptablesRandom(),
        original_src="127.100.251.1:40000",
        original_dst=f"{VIP}:{PORT}",
        translated_src="127.100.251.1:40000",
        translated_dst=f"{POD_IP}:{POD_PORT}",
        node="node-a",
        tunnel=tunnel,
        protocol="tls",
    )
    hop = ConnectionHop(provider.get_tracer("test"), conn)
    hop.hello.feed(client_hello(SNI))
    hop.end()
    overlay, span = exporter.get_finished_spans()
    assert overlay.parent is not None and overlay.parent.span_id == span.context.span_id
    assert overlay.attributes["hopscope.hop"] == "cni-overlay"  # type: ignore[index]
    assert overlay.attributes["hopscope.nat.original.dst"] == f"{POD_IP}:{POD_PORT}"  # type: ignore[index]
    assert span.attributes["hopscope.overlay"] == "node-a -> node-b"  # type: ignore[index]
    assert span.attributes["tls.client.server_name"] == SNI  # type: ignore[index]

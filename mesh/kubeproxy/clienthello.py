"""Reading the unencrypted start of a TLS connection: is it TLS, and which name it asks for.

kube-proxy relays a TLS stream untouched; the only things it can learn are in the client's
first flight, sent in the clear: the ClientHello and its ``server_name`` extension (SNI).
This module is sans-io: :class:`ClientHelloReader` is fed the client's bytes as they are
relayed (it never holds them up) and parses the first handshake message once it is whole.

Every length in the ClientHello is checked against the bytes actually present before it is
used, the message is capped at :data:`MAX_HELLO_BYTES`, and anything that does not parse is
"no SNI", never an exception: the input comes from any client that can reach a Service.

No library in hopscope's environment parses a ClientHello (``cryptography`` and the standard
``ssl`` module only drive whole handshakes), and the two fields needed are a few dozen lines
of RFC 8446 §4.1.2 / RFC 6066 §3 framing.
"""

from __future__ import annotations

import re

HANDSHAKE_RECORD = 0x16
CLIENT_HELLO = 0x01
SERVER_NAME_EXTENSION = 0x0000
HOST_NAME = 0x00

MAX_HELLO_BYTES = 16384 + 5
"""Bytes of the first flight read at most: one full TLS record (2^14) and its header; a
ClientHello (even with post-quantum key shares) fits, and a larger one is given up on."""

_HOSTNAME = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252}[A-Za-z0-9_.])?$")


def looks_like_tls(first: bytes) -> bool:
    """A TLS handshake record (type 0x16, protocol version 3.x) opens the stream."""
    return len(first) >= 3 and first[0] == HANDSHAKE_RECORD and first[1] == 0x03


class _Short(Exception):
    """A length points past the bytes present."""


class _Cursor:
    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int = 0, end: int | None = None) -> None:
        self.data, self.pos = data, pos
        self.end = len(data) if end is None else end

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise _Short
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def uint(self, size: int) -> int:
        return int.from_bytes(self.take(size), "big")

    def sub(self, length_size: int) -> _Cursor:
        """A cursor over the length-prefixed vector that starts here (and skips past it)."""
        n = self.uint(length_size)
        start = self.pos
        self.take(n)
        return _Cursor(self.data, start, start + n)

    def left(self) -> int:
        return self.end - self.pos


def handshake_bytes(stream: bytes) -> tuple[bytes, bool, int]:
    """The handshake layer's bytes (payloads of the leading handshake records, joined);
    whether a record of another type follows them (no more handshake bytes can come); and
    how long ``stream`` must be for its last, incomplete record (or header) to be whole."""
    out = bytearray()
    pos = 0
    while pos + 5 <= len(stream):
        if stream[pos] != HANDSHAKE_RECORD:
            return bytes(out), True, 0
        length = int.from_bytes(stream[pos + 3 : pos + 5], "big")
        out += stream[pos + 5 : pos + 5 + length]
        pos += 5 + length
    ended = pos < len(stream) and stream[pos] != HANDSHAKE_RECORD
    return bytes(out), ended, pos if pos > len(stream) else pos + 5


def parse_sni(handshake: bytes) -> str | None:
    """The host name a complete ClientHello asks for; None without one (or if malformed)."""
    try:
        return _sni(_Cursor(handshake))
    except _Short:
        return None


def _sni(msg: _Cursor) -> str | None:
    if msg.uint(1) != CLIENT_HELLO:
        return None
    body = msg.sub(3)
    body.take(2 + 32)  # legacy_version, random
    body.sub(1)  # legacy_session_id
    body.sub(2)  # cipher_suites
    body.sub(1)  # legacy_compression_methods
    if body.left() == 0:
        return None  # no extensions at all
    extensions = body.sub(2)
    while extensions.left():
        ext_type = extensions.uint(2)
        data = extensions.sub(2)
        if ext_type != SERVER_NAME_EXTENSION:
            continue
        names = data.sub(2)
        while names.left():
            name_type = names.uint(1)
            name = names.sub(2)
            if name_type == HOST_NAME:
                return _host_name(name.take(name.left()))
        return None
    return None


def _host_name(raw: bytes) -> str | None:
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        return None
    return text if _HOSTNAME.match(text) else None


class ClientHelloReader:
    """Fed the client's bytes as they pass; says when the ClientHello is whole (or never
    will be) and what SNI it carried. Costs nothing once :attr:`done`."""

    __slots__ = ("buf", "done", "server_name", "wait_for")

    def __init__(self) -> None:
        self.buf = bytearray()
        self.done = False
        self.server_name: str | None = None
        self.wait_for = 0
        """Bytes to hold before parsing again: the record being read is incomplete until
        then (so a ClientHello dribbled byte by byte is not re-parsed for every byte)."""

    def feed(self, data: bytes) -> None:
        if self.done:
            return
        self.buf += data[: MAX_HELLO_BYTES - len(self.buf)]
        full = len(self.buf) >= MAX_HELLO_BYTES
        if len(self.buf) < self.wait_for and not full:
            return
        handshake, ended, self.wait_for = handshake_bytes(bytes(self.buf))
        if len(handshake) >= 4:
            needed = 4 + int.from_bytes(handshake[1:4], "big")
            if len(handshake) >= needed:
                self._finish(parse_sni(handshake[:needed]))
                return
        if ended or full:
            self._finish(None)

    def _finish(self, server_name: str | None) -> None:
        self.server_name = server_name
        self.done = True
        self.buf = bytearray()

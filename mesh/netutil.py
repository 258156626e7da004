"""Socket helpers shared by the emulators' data paths."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct


def bind_source(sock: socket.socket, ip: str) -> bool:
    """Bind ``sock`` to ``ip`` (any port) so the peer sees that source; True if it could.

    In local mode every 127/8 address is local, so a connection can leave from a pod's or
    a client's own address. In compose the emulators live in the control-plane container,
    where a pod's address is not local: the kernel refuses (EADDRNOTAVAIL) and the
    connection leaves from the container's own address on the route to the peer — the
    trace then shows that address as the translated source.
    """
    try:
        sock.bind((ip, 0))
    except OSError as exc:
        if exc.errno != errno.EADDRNOTAVAIL:
            raise
        return False
    return True


IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
"""Linux socket option (since 4.2): bind the address now, pick the port at connect()."""


async def open_from(
    host: str, port: int, source: str, timeout: float, limit: int = 2**18
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, tuple[str, int]]:
    """Connect to ``host:port`` leaving from ``source`` (see :func:`bind_source`).

    The source port is chosen at connect() by the whole 4-tuple: bind(ip, 0) alone must
    find a port free on that address and crawls once TIME_WAITs pile up. Raises OSError
    (also for a timeout) with the socket closed.
    """
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        bind_source(sock, source)
        sock.setblocking(False)
        async with asyncio.timeout(timeout):  # no task per connect, unlike wait_for
            await loop.sock_connect(sock, (host, port))
    except (OSError, TimeoutError) as exc:
        sock.close()
        if isinstance(exc, OSError):
            raise
        raise OSError(f"connect to {host}:{port} timed out after {timeout:g}s") from None
    local = sock.getsockname()[:2]
    reader, writer = await asyncio.open_connection(sock=sock, limit=limit)
    return reader, writer, (str(local[0]), int(local[1]))


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0): the peer sees the connection reset at once."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()

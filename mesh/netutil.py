"""Socket helpers shared by the emulators' data paths."""

from __future__ import annotations

import errno
import socket


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

"""How a pod's app reaches a Service: resolve like glibc in a pod, then go through the sidecar.

Names resolve with the pod's stub resolver (:mod:`mesh.dns.resolver`);
:class:`ServiceHTTPClient` and :func:`grpc_channel` then send through the pod's sidecar
outbound listener, naming the resolved ``ip:port`` in ``x-envoy-original-dst-host`` — the
stand-in for the original destination an iptables redirect would keep.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import grpc
import urllib3

from mesh import addresses
from mesh.dns.resolver import PodResolver

POOL_SIZE = 32
"""Keep-alive connections an app keeps to its sidecar (as many as its server has worker
threads: each may be calling out at once)."""


class ServiceHTTPClient:
    """HTTP calls to Services by name: resolve, then send via the sidecar.

    One urllib3 pool of keep-alive connections to the sidecar's outbound listener, shared
    by the app's threads, leaving from the pod's own address. urllib3 rather than
    ``requests``: the same connection pool without the per-call session machinery (proxy
    and ``.netrc`` look-ups, cookie jars, hooks), which cost an app more CPU than its own
    handler. No retries and no redirects: the sidecar owns retries, and a caller sees
    what came back.
    """

    def __init__(self, resolver: PodResolver, sidecar: str, source_ip: str) -> None:
        self.resolver = resolver
        self.sidecar = sidecar
        host, _, port = sidecar.rpartition(":")
        self._pool = urllib3.HTTPConnectionPool(
            host, int(port), maxsize=POOL_SIZE, block=False, source_address=(source_ip, 0)
        )

    def get(self, url: str, timeout: float = 10.0) -> urllib3.BaseHTTPResponse:
        return self.request("GET", url, timeout=timeout)

    def request(
        self, method: str, url: str, timeout: float = 10.0, data: bytes | str | None = None
    ) -> urllib3.BaseHTTPResponse:
        """Send and read the whole answer; ``urllib3.exceptions.HTTPError`` when none came."""
        parts = urlsplit(url)
        if not parts.hostname:
            raise ValueError(f"not a URL: {url!r}")
        port = parts.port or 80
        ip = self.resolver.resolve(parts.hostname)[0]
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {"Host": parts.netloc, addresses.ORIGINAL_DST_HEADER: f"{ip}:{port}"}
        return self._pool.request(
            method,
            path,
            body=data,
            headers=headers,
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
            retries=False,
            redirect=False,
        )


def grpc_channel(sidecar: str, authority: str) -> grpc.Channel:
    """A channel to a Service through the sidecar; ``authority`` is ``name:port``."""
    return grpc.insecure_channel(sidecar, options=[("grpc.default_authority", authority)])


def grpc_call(
    resolver: PodResolver, service: str, port: int, call: Callable[[list[tuple[str, str]]], Any]
) -> Any:
    """Resolve ``service`` then invoke ``call(metadata)`` with the original-destination header."""
    ip = resolver.resolve(service)[0]
    return call([(addresses.ORIGINAL_DST_HEADER, f"{ip}:{port}")])

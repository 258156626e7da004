"""How a pod's app reaches a Service: resolve like glibc in a pod, then go through the sidecar.

Names resolve with the pod's stub resolver (:mod:`mesh.dns.resolver`);
:class:`ServiceHTTPClient` and :func:`grpc_channel` then send through the pod's sidecar
outbound listener, naming the resolved ``ip:port`` in ``x-envoy-original-dst-host`` — the
stand-in for the original destination an iptables redirect would keep.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import grpc
import requests
from requests.adapters import HTTPAdapter

from mesh import addresses
from mesh.dns.resolver import PodResolver


class _BoundAdapter(HTTPAdapter):
    """Connections leave from the pod's own address."""

    def __init__(self, source_ip: str) -> None:
        self.source_ip = source_ip
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = (self.source_ip, 0)
        super().init_poolmanager(*args, **kwargs)


class ServiceHTTPClient:
    """HTTP calls to Services by name: resolve, then send via the sidecar."""

    def __init__(self, resolver: PodResolver, sidecar: str, source_ip: str) -> None:
        self.resolver = resolver
        self.sidecar = sidecar
        self._local = threading.local()
        self.source_ip = source_ip

    def _session(self) -> requests.Session:
        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            session.mount("http://", _BoundAdapter(self.source_ip))
            self._local.session = session
        return session

    def get(self, url: str, timeout: float = 10.0) -> requests.Response:
        return self.request("GET", url, timeout=timeout)

    def request(
        self, method: str, url: str, timeout: float = 10.0, data: bytes | str | None = None
    ) -> requests.Response:
        parts = urlsplit(url)
        if not parts.hostname:
            raise ValueError(f"not a URL: {url!r}")
        port = parts.port or 80
        ip = self.resolver.resolve(parts.hostname)[0]
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        headers = {"Host": parts.netloc, addresses.ORIGINAL_DST_HEADER: f"{ip}:{port}"}
        return self._session().request(
            method, f"http://{self.sidecar}{path}", headers=headers, timeout=timeout, data=data
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

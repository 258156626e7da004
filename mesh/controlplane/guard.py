"""Who may drive the control-plane API: a token, and Host/Origin checks.

Local mode runs every container of a manifest as a process of the user who ran
``hopscope up``, so whoever can ``POST /api/v1/apply`` can run commands as that user. The
guard closes the three ways in:

* **Other users of the machine** — every state-changing request needs the cluster's API
  token (``Authorization: Bearer …``, or the explorer's session cookie). ``hopscope up``
  writes it to the state directory with mode 0600, so only its user's CLI can read it.
  Reads stay open, but without the token ``GET /api/v1/state`` blanks the values of every
  Secret (their keys and types stay): the TLS keys an Ingress serves are not for everyone.
* **DNS rebinding** — a page on ``evil.example`` whose name later resolves to a loopback
  address is same-origin with the API in the browser's eyes. Every request (reads too)
  whose ``Host`` is not one of the API's own addresses is refused.
* **Cross-site requests** — a state-changing request with a foreign ``Origin`` is
  refused; the session cookie is ``SameSite=Strict`` and no endpoint changes state on GET.

The OTLP receiver (``POST /v1/traces``) stays open on a loopback-only bind (telemetry from
the cluster's own processes; another local user can add misleading spans, within the store's
byte budget, but nothing it accepts runs anything or changes the cluster); where the API listens
beyond loopback (the compose stack), it takes spans from the container itself and from the
cluster's pods, and from anyone else only with the API token or the OTLP-only token (the
Collector reads the latter from the state volume).
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from flask import Flask, Response, jsonify, redirect, request
from flask.typing import ResponseReturnValue

from mesh import addresses
from mesh.apiclient import OTLP_TOKEN_FILE, TOKEN_FILE

SESSION_COOKIE = "hopscope_session"
SESSION_SECONDS = 12 * 3600
"""How long the explorer's session cookie is valid (a new ``hopscope up`` ends it too)."""
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
OTLP_PATHS = ("/v1/traces", "/v1/logs", "/v1/metrics")
ALLOWED_HOSTS_ENV = "HOPSCOPE_API_ALLOWED_HOSTS"
"""Extra host names the API answers to, comma-separated (compose: its service name)."""


def write_token(path: Path, mode: int = 0o600) -> str:
    """Write a fresh random token to ``path`` with ``mode`` (no window with wider rights)."""
    token = secrets.token_urlsafe(32)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    os.chmod(path, mode)  # the umask may have narrowed it
    return token


def create_tokens(state_dir: Path, bind_ip: str = addresses.CONTROL_PLANE_IP) -> tuple[str, str]:
    """A new API token (0600) in ``state_dir``, and the OTLP-only token if anyone needs one.

    The OTLP token is for a Collector in another container (the compose stack, where the API
    listens beyond loopback), so it is 0644 and survives restarts of the control plane: a
    Collector that read it at its own start keeps delivering when only the control plane
    restarts. On a loopback-only bind the receiver takes spans without a token, so no
    OTLP token is written (an old one is removed) and ``""`` comes back.
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    otlp_path = state_dir / OTLP_TOKEN_FILE
    if ipaddress.ip_address(bind_ip).is_loopback:
        otlp_path.unlink(missing_ok=True)
        return write_token(state_dir / TOKEN_FILE), ""
    try:
        otlp = otlp_path.read_text().strip()
    except OSError:
        otlp = ""
    if len(otlp) < 32:
        otlp = write_token(otlp_path, 0o644)
    return write_token(state_dir / TOKEN_FILE), otlp


@dataclass
class Guard:
    """The API's policy: its token(s), the hosts it answers to, whether it is loopback-only."""

    token: str
    otlp_token: str = ""
    bind_ip: str = "127.0.0.1"
    port: int = 8001
    extra_hosts: Iterable[str] = field(default_factory=tuple)
    extra_ips: Iterable[str] = field(default_factory=tuple)
    """Addresses the API is reached at through a forwarder (the kernel data path's cluster
    host address, where pods send telemetry)."""
    is_pod_ip: Callable[[str], bool] = lambda _ip: False
    """Is this source address one of the cluster's pods? (They may send telemetry.)"""

    def __post_init__(self) -> None:
        self.loopback_only = ipaddress.ip_address(self.bind_ip).is_loopback
        self.wildcard = ipaddress.ip_address(self.bind_ip).is_unspecified
        names = {"localhost", socket.gethostname().lower(), *map(str.lower, self.extra_hosts)}
        env = os.environ.get(ALLOWED_HOSTS_ENV, "")
        names.update(h.strip().lower() for h in env.split(",") if h.strip())
        self.host_names = frozenset(n for n in names if n)
        self.extra_ips = frozenset(self.extra_ips)

    # -- checks --------------------------------------------------------------------------

    def host_allowed(self, host_header: str) -> bool:
        """Is ``Host`` one of our own addresses? (An IP literal cannot be rebound.)"""
        host = _strip_port(host_header).lower()
        if not host:
            return False
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return host in self.host_names
        if self.wildcard:
            return True  # bound to every address: any literal address is one of ours
        return ip.is_loopback or str(ip) == self.bind_ip or str(ip) in self.extra_ips

    def origin_allowed(self, origin: str, host_header: str) -> bool:
        """Same-origin only: the Origin's host:port must be the Host the request was sent to."""
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            return False
        port = parts.port or (443 if parts.scheme == "https" else 80)
        host = _strip_port(host_header).lower()
        host_port = _port_of(host_header) or 80
        return parts.hostname.lower() == host and port == host_port and self.host_allowed(host)

    def token_ok(self, presented: str | None, otlp: bool = False) -> bool:
        if not presented:
            return False
        if hmac.compare_digest(presented.encode(), self.token.encode()):
            return True
        return (
            otlp
            and bool(self.otlp_token)
            and hmac.compare_digest(presented.encode(), self.otlp_token.encode())
        )

    def session_value(self, expires: int) -> str:
        """The explorer's session cookie valid until ``expires`` (Unix seconds): the expiry
        and an HMAC of it keyed with the API token, so the cookie never holds the token."""
        mac = hmac.new(self.token.encode(), f"hopscope-session:{expires}".encode(), hashlib.sha256)
        return f"{expires}.{mac.hexdigest()}"

    def session_ok(self, cookie: str | None) -> bool:
        value = cookie or ""
        expires = value.partition(".")[0]
        if not expires.isdigit() or len(expires) > 12 or int(expires) < time.time():
            return False
        return hmac.compare_digest(value.encode(), self.session_value(int(expires)).encode())

    def authorised(self) -> bool:
        """Does the current request carry the API token (bearer) or a valid session cookie?"""
        return self.token_ok(_bearer()) or self.session_ok(request.cookies.get(SESSION_COOKIE))

    def _own_telemetry(self, peer: str) -> bool:
        """Spans from the cluster itself: on a loopback bind anyone local, else pods and us."""
        if self.loopback_only:
            return True
        try:
            if ipaddress.ip_address(peer).is_loopback:
                return True
        except ValueError:
            return False
        return self.is_pod_ip(peer)

    # -- Flask wiring --------------------------------------------------------------------

    def install(self, app: Flask) -> None:
        app.before_request(self._check)
        app.add_url_rule("/login", "login", self._login, methods=["GET"])

    def _check(self) -> Response | tuple[Response, int] | None:
        if not self.host_allowed(request.host):
            return _refuse(
                403,
                f"Host {request.host!r} is not an address of this API "
                "(requests by another name are refused: DNS rebinding)",
            )
        if request.method not in STATE_CHANGING:
            return None
        origin = request.headers.get("Origin")
        if origin is not None and not self.origin_allowed(origin, request.host):
            return _refuse(403, f"cross-origin request from {origin!r} refused")
        otlp = request.path in OTLP_PATHS
        if otlp and self._own_telemetry(request.remote_addr or ""):
            return None
        if self.token_ok(_bearer(), otlp=otlp):
            return None
        if not otlp and self.session_ok(request.cookies.get(SESSION_COOKIE)):
            return None
        return _refuse(
            401,
            "missing or wrong API token: run hopscope as the user who started the cluster "
            f"(it reads {TOKEN_FILE} in the state directory, HOPSCOPE_HOME or ~/.hopscope)",
        )

    def _login(self) -> ResponseReturnValue:
        """``/login?token=…`` (the URL ``hopscope up`` prints) sets the explorer's session."""
        if not self.token_ok(request.args.get("token")):
            return _refuse(401, "wrong or missing token in the explorer URL")
        resp = redirect("/", code=303)
        expires = int(time.time()) + SESSION_SECONDS
        resp.set_cookie(
            SESSION_COOKIE,
            self.session_value(expires),
            max_age=SESSION_SECONDS,
            httponly=True,
            samesite="Strict",
            path="/",
        )
        return resp


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _strip_port(host: str) -> str:
    host = host.strip()
    if host.startswith("["):  # [::1]:8001
        return host[1 : host.find("]")] if "]" in host else ""
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host


def _port_of(host: str) -> int | None:
    tail = host.rsplit("]", 1)[-1] if host.startswith("[") else host
    if tail.count(":") != 1:
        return None
    try:
        return int(tail.rsplit(":", 1)[1])
    except ValueError:
        return None


def _refuse(status: int, message: str) -> tuple[Response, int]:
    return jsonify(error=message), status

"""The control-plane API client shared by the CLI, scenarios, the traffic generator and benches.

It raises its own exceptions (:class:`ControlPlaneUnavailable`, :class:`APIRequestError`);
each caller turns them into its own kind of error (the CLI into one-line messages).

Every request carries the cluster's API token (``Authorization: Bearer …``) when the token
file of the state directory is readable: the control plane refuses state-changing requests
without it (see ``mesh/controlplane/guard.py``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import requests

from mesh import addresses

HOPSCOPE_HOME = "HOPSCOPE_HOME"
"""State directory (pid file, logs, rendered Envoy configs, API token). Default ``~/.hopscope``."""

TOKEN_FILE = "api-token"
"""The API token's file in the state directory (mode 0600, written by the control plane)."""

OTLP_TOKEN_FILE = "otlp-token"
"""A second token that only the OTLP receiver accepts (for a Collector in another container)."""

API_URL = f"http://{addresses.CONTROL_PLANE_CLIENT_HOST}:{addresses.CONTROL_PLANE_PORT}"

NOT_RUNNING = (
    f"no hopscope cluster is running (nothing answers at {API_URL}); start one with `hopscope up`"
)


def client_otlp_endpoint() -> str:
    """Where the CLI's own spans (curl, traffic, scenarios) go so that the cluster sees them.

    Local mode: the cluster's receiver, always; the control plane forwards to the user's
    backend when ``hopscope up`` was given one, so sending there directly would leave the
    spans out of ``hopscope trace``. Compose (inside the control-plane container): the
    Collector the stack names in ``OTEL_EXPORTER_OTLP_ENDPOINT``, which feeds both stores.
    """
    from mesh.otlp import OTLP_HTTP_PORT

    if addresses.PLAN == "compose":
        return os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or API_URL
    return f"http://{addresses.CONTROL_PLANE_CLIENT_HOST}:{OTLP_HTTP_PORT}"


def state_dir(create: bool = True) -> Path:
    """The state directory: ``$HOPSCOPE_HOME`` or ``~/.hopscope``."""
    path = Path(os.environ.get(HOPSCOPE_HOME) or Path.home() / ".hopscope")
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def read_token(home: Path | None = None) -> str | None:
    """The API token of the cluster whose state directory is ``home``, if we may read it."""
    try:
        token = ((home or state_dir(create=False)) / TOKEN_FILE).read_text().strip()
    except OSError:
        return None
    return token or None


class APIClientError(Exception):
    """Base of the client's errors; the message is one line meant for a person."""


class ControlPlaneUnavailable(APIClientError):
    """Nothing answers at the API address (no cluster running), or it answered too late."""


class APIRequestError(APIClientError):
    """The control plane answered with an error status; ``message`` is its own reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class APIClient:
    """Thin JSON client for the control-plane API."""

    def __init__(
        self, base: str = API_URL, timeout: float = 10.0, token: str | None = None
    ) -> None:
        self.base = base
        self.timeout = timeout
        self.token = token if token is not None else read_token()

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def get(self, path: str, **params: Any) -> Any:
        return self._request("GET", path, params=params)

    def post(self, path: str, body: Any = None) -> Any:
        return self._request("POST", path, json=body)

    def get_text(self, path: str) -> str:
        """A GET whose answer is not JSON (the pod proxy: a sidecar's admin page)."""
        return str(self._request("GET", path, raw=True))

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        raw = kwargs.pop("raw", False)  # the answer as text (get_text)
        try:
            resp = requests.request(
                method, self.base + path, timeout=self.timeout, headers=self.headers(), **kwargs
            )
        except requests.ConnectionError:
            raise ControlPlaneUnavailable(NOT_RUNNING) from None
        except requests.Timeout:
            raise ControlPlaneUnavailable(
                f"the control plane did not answer {path} in time (its log names what the "
                "request waited on: look for 'API request slow')"
            ) from None
        if resp.status_code >= 400:
            try:
                message = str(resp.json().get("error", resp.text))
            except (ValueError, AttributeError):
                message = resp.text.strip() or resp.reason
            raise APIRequestError(resp.status_code, message)
        return resp.text if raw else resp.json()

    def running(self) -> bool:
        try:
            requests.get(self.base + "/api/v1/status", timeout=2)
        except requests.RequestException:
            return False
        return True

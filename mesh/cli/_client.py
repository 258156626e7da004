"""What every CLI command shares: the state directory and the control-plane API client."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click
import requests

from mesh import addresses

HOPSCOPE_HOME = "HOPSCOPE_HOME"
"""State directory (pid file, logs, rendered Envoy configs). Default: ``~/.hopscope``."""

API_URL = f"http://{addresses.CONTROL_PLANE_CLIENT_HOST}:{addresses.CONTROL_PLANE_PORT}"

NOT_RUNNING = (
    f"no hopscope cluster is running (nothing answers at {API_URL}); start one with `hopscope up`"
)


def state_dir() -> Path:
    path = Path(os.environ.get(HOPSCOPE_HOME) or Path.home() / ".hopscope")
    path.mkdir(parents=True, exist_ok=True)
    return path


class APIClient:
    """Thin JSON client for the control-plane API with one-line, actionable errors."""

    def __init__(self, base: str = API_URL, timeout: float = 10.0) -> None:
        self.base = base
        self.timeout = timeout

    def get(self, path: str, **params: Any) -> Any:
        return self._request("GET", path, params=params)

    def post(self, path: str, body: Any = None) -> Any:
        return self._request("POST", path, json=body)

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            resp = requests.request(method, self.base + path, timeout=self.timeout, **kwargs)
        except requests.ConnectionError:
            raise click.ClickException(NOT_RUNNING) from None
        except requests.Timeout:
            raise click.ClickException(f"the control plane did not answer {path} in time") from None
        if resp.status_code >= 400:
            try:
                message = resp.json().get("error", resp.text)
            except ValueError:
                message = resp.text.strip() or resp.reason
            raise click.ClickException(message)
        return resp.json()

    def running(self) -> bool:
        try:
            requests.get(self.base + "/api/v1/status", timeout=2)
        except requests.RequestException:
            return False
        return True

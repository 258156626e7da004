"""Client side of the control plane's state API, used the way kube-proxy watches the API server.

``GET /api/v1/state`` returns ``ClusterState.to_dict()``; with ``?after=N&timeout=S`` the
server holds the request until its ``resource_version`` exceeds ``N`` (or ``S`` seconds pass).
Without the API token the Secrets come back with blank values: a reader that needs them
(an ingress controller serving TLS) passes ``token``; the node daemons need none.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import requests

from mesh.model.types import ClusterState

log = logging.getLogger(__name__)


def fetch_state(
    api: str, after: int | None = None, timeout: float = 30.0, token: str | None = None
) -> ClusterState:
    """One (optionally long-polling) read of the cluster state; with the API ``token``,
    Secrets keep their values."""
    params: dict[str, str] = {}
    if after is not None:
        params = {"after": str(after), "timeout": str(timeout)}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    resp = requests.get(
        f"{api.rstrip('/')}/api/v1/state", params=params, headers=headers, timeout=timeout + 5
    )
    resp.raise_for_status()
    return ClusterState.from_dict(resp.json())


class StateWatcher:
    """Calls ``on_state`` with every new ClusterState version, from a daemon thread.

    Connection errors are retried with a short back-off, so a restarted control plane is
    picked up again; the last good state stays in force meanwhile (as kube-proxy keeps its
    rules when the API server is away).
    """

    def __init__(
        self, api: str, on_state: Callable[[ClusterState], None], token: str | None = None
    ) -> None:
        self.api = api
        self.on_state = on_state
        self.token = token
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="state-watch", daemon=True)
        self.version: int | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                state = fetch_state(self.api, self.version, timeout=20.0, token=self.token)
            except (requests.RequestException, ValueError) as exc:
                log.warning("state watch failed, retrying", extra={"error": str(exc)})
                time.sleep(0.5)
                continue
            if self.version is None or state.resource_version != self.version:
                self.version = state.resource_version
                try:
                    self.on_state(state)
                except Exception:
                    log.exception("state handler failed")

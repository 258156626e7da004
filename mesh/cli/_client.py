"""What every CLI command shares: the state directory and the control-plane API client.

The client itself lives in :mod:`mesh.apiclient`; here its errors become click's one-line
errors with a non-zero exit.
"""

from __future__ import annotations

from typing import Any

import click

from mesh.apiclient import API_URL, HOPSCOPE_HOME, NOT_RUNNING, APIClientError, state_dir
from mesh.apiclient import APIClient as _BaseClient

__all__ = ["API_URL", "HOPSCOPE_HOME", "NOT_RUNNING", "APIClient", "state_dir"]


class APIClient(_BaseClient):
    """The API client whose errors are :class:`click.ClickException` (one line, exit 1)."""

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            return super()._request(method, path, **kwargs)
        except APIClientError as exc:
            raise click.ClickException(str(exc)) from None

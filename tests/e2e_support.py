"""Helpers for end-to-end tests that start a real local cluster with the ``hopscope`` CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil
import requests

from mesh import addresses

T = TypeVar("T")

API = f"http://{addresses.CONTROL_PLANE_IP}:{addresses.CONTROL_PLANE_PORT}"
HOPSCOPE = [sys.executable, "-m", "mesh.cli"]


def hopscope(
    *args: str, env: dict[str, str], timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*HOPSCOPE, *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"hopscope {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def cluster_env(home: Path) -> dict[str, str]:
    return {**os.environ, "HOPSCOPE_HOME": str(home)}


def poll_until(fn: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.2) -> T:
    """Call ``fn`` until it returns something truthy; fail with the last error otherwise."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except Exception as exc:  # keep polling; report the last failure
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"condition not met in {timeout}s; last error: {last_error!r}")


def api_get(path: str, **params: Any) -> Any:
    resp = requests.get(API + path, params=params, timeout=10)
    resp.raise_for_status()
    return resp.json()


def cluster_processes() -> list[psutil.Process]:
    """The control plane and everything below it."""
    pid = api_get("/api/v1/status")["pid"]
    root = psutil.Process(pid)
    return [root, *root.children(recursive=True)]


def assert_all_gone(procs: list[psutil.Process], timeout: float = 10.0) -> None:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    assert not alive, f"processes left behind: {[(p.pid, p.name()) for p in alive]}"


def hop_names(view: dict[str, Any], overlay: bool = False) -> list[str]:
    """The hops in order; ``cni-overlay`` hops (present only when a leg crosses nodes, which
    depends on where pods landed) are left out unless ``overlay``."""
    return [h["hop"] for h in view["hops"] if overlay or h["hop"] != "cni-overlay"]


def trace_json(trace_id: str) -> dict[str, Any]:
    return api_get(f"/api/v1/traces/{trace_id}")  # type: ignore[no-any-return]


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=1)[:4000]

"""The control plane's slow-request report: what a stuck API request was waiting on."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import pytest

from mesh.controlplane.slowrequests import SlowRequests


def _request(watch: SlowRequests, path: str, query: str = "") -> threading.Thread:
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": query}
    thread = threading.Thread(target=watch, args=(environ, lambda *_: None), daemon=True)
    thread.start()
    return thread


def test_a_stuck_request_is_reported_once_with_what_it_waits_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    held = threading.Lock()
    entered = threading.Barrier(3)

    def waits_for_the_state_lock(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        entered.wait()
        with held:
            return [b"{}"]

    watch = SlowRequests(waits_for_the_state_lock, slow_after=5.0)
    with held:
        stuck = _request(watch, "/api/v1/apply")
        poll = _request(watch, "/api/v1/state", "after=3&timeout=20")  # a watch: slow on purpose
        entered.wait()
        time.sleep(0.05)  # both are inside the lock's acquire now
        with caplog.at_level(logging.WARNING, logger="mesh.controlplane.slowrequests"):
            assert watch.check(now=time.monotonic() + 1) == []
            assert watch.check(now=time.monotonic() + 6) == ["GET /api/v1/apply"]
            assert watch.check(now=time.monotonic() + 9) == []  # reported once
    stuck.join(5)
    poll.join(5)
    [record] = [r for r in caplog.records if r.getMessage() == "API request slow"]
    assert record.request == "GET /api/v1/apply"  # type: ignore[attr-defined]
    assert "waits_for_the_state_lock" in record.stack  # type: ignore[attr-defined]
    assert "with held:" in record.stack  # type: ignore[attr-defined]
    # the watch's thread waits on the same lock: it is among the others shown
    others = record.threads  # type: ignore[attr-defined]
    assert any("waits_for_the_state_lock" in where for where in others.values()), others
    assert watch.check(now=time.monotonic() + 20) == []  # nothing running any more


def test_a_failing_app_leaves_no_request_behind() -> None:
    def broken(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        raise RuntimeError("boom")

    watch = SlowRequests(broken, slow_after=0.0)
    with pytest.raises(RuntimeError):
        watch({"REQUEST_METHOD": "POST", "PATH_INFO": "/api/v1/apply"}, lambda *_: None)
    assert watch.check() == []

"""Slow API requests, reported with where every thread of the control plane stood.

A request that takes longer than :data:`SLOW_AFTER_S` (a watch's long poll aside) means the
API is stuck behind something: the state lock held by a thread that is starting a pod,
a sidecar render, a handler waiting on the network. The client only learns "the control
plane did not answer in time"; this log line says why, once per slow request, with the
slow request's own stack and the innermost frames of every other thread.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

SLOW_AFTER_S = 5.0
"""A request still running after this long is reported (clients give up after 10 to 15 s)."""

FRAMES_PER_THREAD = 4
"""Innermost frames shown for each of the other threads."""


def _long_poll(environ: dict[str, Any]) -> bool:
    """A watch (``GET /api/v1/state?after=N``) is slow on purpose."""
    return environ.get("PATH_INFO") == "/api/v1/state" and "after=" in environ.get(
        "QUERY_STRING", ""
    )


class SlowRequests:
    """WSGI middleware that notes each request's thread and start, and a daemon thread that
    logs the requests running longer than ``slow_after`` seconds."""

    def __init__(
        self, app: Callable[..., Iterable[bytes]], slow_after: float = SLOW_AFTER_S
    ) -> None:
        self.app = app
        self.slow_after = slow_after
        self._running: dict[int, _Running] = {}
        """The requests in progress, by their thread."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="slow-requests", daemon=True)

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        if _long_poll(environ):
            return self.app(environ, start_response)
        ident = threading.get_ident()
        what = f"{environ.get('REQUEST_METHOD', '?')} {environ.get('PATH_INFO', '')}"
        with self._lock:
            self._running[ident] = _Running(what, time.monotonic())
        try:
            return self.app(environ, start_response)
        finally:
            with self._lock:
                self._running.pop(ident, None)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.check()
            except Exception:  # the watchdog must never take the API down with it
                log.exception("slow request check failed")

    def check(self, now: float | None = None) -> list[str]:
        """Log each request past the threshold once; return what was reported."""
        now = time.monotonic() if now is None else now
        with self._lock:
            slow = [
                (ident, request)
                for ident, request in self._running.items()
                if not request.reported and now - request.started >= self.slow_after
            ]
            for _, request in slow:
                request.reported = True
        for ident, request in slow:
            log.warning(
                "API request slow",
                extra={
                    "request": request.what,
                    "seconds": round(now - request.started, 1),
                    "stack": _stack(ident, limit=12),
                    "threads": _other_threads(ident),
                },
            )
        return [request.what for _, request in slow]


@dataclass
class _Running:
    what: str
    """Method and path."""
    started: float
    """On the monotonic clock."""
    reported: bool = False


def _stack(ident: int, limit: int) -> str:
    frame = sys._current_frames().get(ident)
    if frame is None:
        return ""
    return "".join(traceback.format_stack(frame, limit=limit)).strip()


def _other_threads(skip: int) -> dict[str, str]:
    """Each other thread's innermost frames, as ``file:line function`` joined by `` < ``."""
    names = {t.ident: t.name for t in threading.enumerate()}
    out: dict[str, str] = {}
    for ident, frame in sys._current_frames().items():
        if ident in (skip, threading.get_ident()):
            continue
        frames = traceback.extract_stack(frame, limit=FRAMES_PER_THREAD)
        where = " < ".join(
            f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in reversed(frames)
        )
        out[f"{names.get(ident, '?')}-{ident}"] = where
    return out

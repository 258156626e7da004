"""Stream helpers for the emulators' relays that tolerate a peer that is already gone.

A client may reset its connection before its handler runs or while a relay is finishing:
the transport then knows no peer address and refuses further writes. These helpers turn
both cases into ordinary "connection over" outcomes instead of exceptions, and
:func:`connection_handler` keeps a connection's end from reaching asyncio's "unhandled
exception" log.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar


def endpoints(writer: asyncio.StreamWriter) -> tuple[tuple[str, int], tuple[str, int]] | None:
    """``((local ip, port), (peer ip, port))`` of an accepted connection, or None if the
    peer reset it before it was handled (the kernel no longer knows the peer address)."""
    local = writer.get_extra_info("sockname")
    peer = writer.get_extra_info("peername")
    if not local or not peer:
        return None
    return (str(local[0]), int(local[1])), (str(peer[0]), int(peer[1]))


def write_eof(writer: asyncio.StreamWriter) -> None:
    """Half-close our sending side if the transport is still open (else nothing to do)."""
    if writer.is_closing():
        return
    try:
        if writer.can_write_eof():
            writer.write_eof()
    except (RuntimeError, OSError):
        pass  # the transport closed under us (uvloop raises RuntimeError for that)


def write(writer: asyncio.StreamWriter, data: bytes) -> bool:
    """Send ``data`` unless the peer is gone; False if it could not be sent."""
    if writer.is_closing():
        return False
    try:
        writer.write(data)
    except (RuntimeError, OSError):
        return False  # closed under us between the check and the write (uvloop)
    return True


_Handler = TypeVar("_Handler", bound=Callable[..., Awaitable[None]])

_RUNNING: set[asyncio.Task[Any]] = set()
"""Connection handlers still running. asyncio's stream protocol drops its reference to a
handler's task when the client goes away; without this one, a relay still finishing
upstream could be garbage-collected mid-way."""


def connection_handler(handler: _Handler) -> _Handler:
    """Wrap a ``start_server`` callback so a peer that vanished ends it quietly.

    asyncio reports a handler task that ends with an exception — a cancelled one included —
    as "Unhandled exception in client_connected_cb", with a traceback. A connection reset
    at the wrong moment can cancel a future the handler awaits (a stream's close waiter or
    read waiter), which surfaces as ``CancelledError`` although nobody cancelled the task;
    and writes after the reset raise ``RuntimeError`` under uvloop. Both mean "this
    connection is over". So does a cancellation of the task itself (the process shutting
    down): nothing awaits a connection's handler, so ending it quietly loses nothing.
    The handler's task is referenced until it ends (:data:`_RUNNING`).
    """

    @functools.wraps(handler)
    async def run(*args: Any) -> None:
        task = asyncio.current_task()
        if task is not None:
            _RUNNING.add(task)
            task.add_done_callback(_RUNNING.discard)
        try:
            await handler(*args)
        except (asyncio.CancelledError, ConnectionError, OSError):
            pass
        except RuntimeError as exc:
            if "closed" not in str(exc):
                raise

    return run  # type: ignore[return-value]

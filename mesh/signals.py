"""How hopscope's daemons stop: on SIGTERM (the runtime's stop) or SIGINT (Ctrl-C)."""

from __future__ import annotations

import asyncio
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def wait_for_stop_signal() -> None:
    """Return once the process receives one of :data:`STOP_SIGNALS`.

    The handlers run on the running event loop, so the caller can shut down in order
    (stop watching, close servers) instead of dying mid-write."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

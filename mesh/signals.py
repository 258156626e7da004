"""How hopscope's daemons stop: on SIGTERM (the runtime's stop) or SIGINT (Ctrl-C)."""

from __future__ import annotations

import asyncio
import signal

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


async def wait_for_stop_signal() -> str:
    """Return once the process receives one of :data:`STOP_SIGNALS`; its name.

    The handlers run on the running event loop, so the caller can shut down in order
    (stop watching, close servers) instead of dying mid-write."""
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        received.append(sig.name)
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    await stop.wait()
    return received[0]

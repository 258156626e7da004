"""The host forwarder (:mod:`mesh.kernel.forward`) on the loopback, no namespace needed."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest

from mesh.kernel.forward import Endpoint, Forwarder

LISTEN, TARGET = "127.77.1.1:18180", "127.77.1.1:18181"


async def _slow_target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Reads the request to its end (the client's half-close), thinks, then answers."""
    request = await reader.read()
    await asyncio.sleep(0.3)
    writer.write(b"answer to " + request)
    await writer.drain()
    writer.close()


async def _half_closing_clients(count: int) -> list[bytes]:
    target_host, target_port = TARGET.split(":")
    target = await asyncio.start_server(_slow_target, target_host, int(target_port))
    forwarder = Forwarder(Endpoint.parse(LISTEN), Endpoint.parse(TARGET))
    await forwarder.start()

    async def collect_garbage() -> None:
        while True:  # what a busy forwarder's allocations trigger now and then
            gc.collect()
            await asyncio.sleep(0.02)

    async def client(n: int) -> bytes:
        host, port = LISTEN.split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(f"request {n}".encode())
        writer.write_eof()  # done sending; still waiting for the answer
        answer = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return answer

    collector = asyncio.create_task(collect_garbage())
    try:
        return await asyncio.gather(*(client(n) for n in range(count)))
    finally:
        collector.cancel()
        await forwarder.close()
        target.close()


def test_an_answer_after_the_clients_half_close_is_relayed_whole(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The client's side leaves the event loop once it half-closes; the relay must still
    be alive when the target answers, whatever the garbage collector does meanwhile."""
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        answers = asyncio.run(_half_closing_clients(20))
    assert answers == [f"answer to request {n}".encode() for n in range(20)]
    assert not [r for r in caplog.records if "destroyed" in r.getMessage()], caplog.text

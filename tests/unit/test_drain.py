"""wait_backlog_quiet: keep accepting until no connection has arrived for a moment.

Connections are paced by the test's own coroutine on the same loop, so "a connection
arrived less than ``quiet`` ago" is decided by the loop's ordering, not by luck.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from sockherd import drain

QUIET = 0.1


class Counting(asyncio.Protocol):
    accepted = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        type(self).accepted += 1


def run(tmp_path: Path, scenario: Callable[[asyncio.base_events.Server, str], Awaitable[None]]) -> None:
    async def main() -> None:
        Counting.accepted = 0
        path = str(tmp_path / "s")
        server = await asyncio.get_running_loop().create_unix_server(Counting, path)
        try:
            await scenario(server, path)
        finally:
            server.close()

    asyncio.run(main())


async def connect(path: str) -> asyncio.StreamWriter:
    _, writer = await asyncio.open_unix_connection(path)
    return writer


async def until(condition: Callable[[], bool], iterations: int = 1000) -> None:
    """Let the loop run until ``condition`` holds (a bounded number of iterations, no timer)."""
    for _ in range(iterations):
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("condition not reached")


def test_a_quiet_listener_waits_quiet_seconds(tmp_path: Path) -> None:
    async def scenario(server: asyncio.base_events.Server, path: str) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await drain.wait_backlog_quiet(server, QUIET, timeout=5)
        assert QUIET <= loop.time() - start < 5

    run(tmp_path, scenario)


def test_each_arrival_restarts_the_quiet_period(tmp_path: Path) -> None:
    async def scenario(server: asyncio.base_events.Server, path: str) -> None:
        loop = asyncio.get_running_loop()
        waiting = asyncio.ensure_future(drain.wait_backlog_quiet(server, QUIET, timeout=10))
        writers = []
        for _ in range(6):
            await asyncio.sleep(QUIET / 2)  # pacing the arrivals, inside the quiet period
            assert not waiting.done()
            writers.append(await connect(path))
        last_arrival = loop.time()
        assert await waiting
        assert loop.time() - last_arrival >= QUIET * 0.9  # asyncio may wake a timer a clock tick early
        assert Counting.accepted == 6  # accepting went on all along
        for writer in writers:
            writer.close()

    run(tmp_path, scenario)


def test_gives_up_at_the_timeout_when_arrivals_never_stop(tmp_path: Path) -> None:
    async def scenario(server: asyncio.base_events.Server, path: str) -> None:
        loop = asyncio.get_running_loop()
        waiting = asyncio.ensure_future(drain.wait_backlog_quiet(server, QUIET, timeout=4 * QUIET))
        start = loop.time()
        writers = []
        while not waiting.done():
            writers.append(await connect(path))
            await asyncio.wait([waiting], timeout=QUIET / 3)
        assert waiting.result() is False
        assert loop.time() - start >= 4 * QUIET * 0.9
        for writer in writers:
            writer.close()

    run(tmp_path, scenario)


def test_leaves_no_descriptor_or_reader_behind(tmp_path: Path) -> None:
    async def scenario(server: asyncio.base_events.Server, path: str) -> None:
        before = set(os.listdir("/proc/self/fd"))
        writer = await connect(path)
        assert await drain.wait_backlog_quiet(server, QUIET / 4, timeout=5)
        writer.close()
        await asyncio.sleep(0)
        # The dup()s are gone (only the accepted connection and the client remain)...
        assert len(set(os.listdir("/proc/self/fd")) - before) <= 2
        # ... and the server still accepts through its own reader.
        writer = await connect(path)
        await until(lambda: Counting.accepted == 2)
        writer.close()

    run(tmp_path, scenario)


def test_returns_false_at_once_for_a_closed_server(tmp_path: Path) -> None:
    async def scenario(server: asyncio.base_events.Server, path: str) -> None:
        server.close()
        assert await drain.wait_backlog_quiet(server, QUIET, timeout=5) is False

    run(tmp_path, scenario)

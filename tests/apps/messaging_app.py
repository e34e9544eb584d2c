"""A worker with message and request handlers, for the messaging tests.

    python messaging_app.py     (under sockherd; serves on sockherd.server's base)

Request handlers: ``pid`` (one reply), ``count`` (a generator: 1, 2, 3), ``acount`` (an
async generator), ``boom`` (raises), ``not-json`` (a set), ``huge`` (over the frame
limit), ``linger`` (one reply, then waits: for a worker killed mid-stream), ``flood``
(replies without end), ``messages`` (the messages it got), ``ask-others`` (asks the
other workers for their pid through the daemon).
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from sockherd import worker
from sockherd.server import serve

RECEIVED: list[Any] = []


@worker.on_message
def remember(message: str, data: Any) -> None:
    RECEIVED.append([message, data])


@worker.request_handler("pid")
def pid(data: Any) -> dict[str, Any]:
    return {"pid": os.getpid(), "index": worker.index, "echo": data}


@worker.request_handler("count")
def count(data: Any) -> Iterator[int]:
    yield from (1, 2, 3)


@worker.request_handler("acount")
async def acount(data: Any) -> AsyncIterator[int]:
    for i in (1, 2, 3):
        await asyncio.sleep(0.01)
        yield i


@worker.request_handler("boom")
def boom(data: Any) -> None:
    raise RuntimeError("as asked")


@worker.request_handler("not-json")
def not_json(data: Any) -> set[int]:
    return {1, 2}


@worker.request_handler("huge")
def huge(data: Any) -> str:
    return "x" * (2 << 20)


@worker.request_handler("linger")
def linger(data: Any) -> Iterator[int]:
    yield os.getpid()
    time.sleep(60)
    yield 0


@worker.request_handler("flood")
def flood(data: Any) -> Iterator[str]:
    while True:
        yield "y" * 1000


@worker.request_handler("messages")
def messages(data: Any) -> list[Any]:
    return RECEIVED


@worker.request_handler("ask-others")
def ask_others(data: Any) -> list[Any]:
    return sorted(reply.data["pid"] for reply in worker.request("pid", workers="!self", timeout=5))


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    async for line in reader:
        writer.write(line)


if __name__ == "__main__":
    serve(echo)

"""A line-echo server with zero-downtime restarts: the handler is all the app there is.

    cd examples/echo && sockherd daemon        # then: nc 127.0.0.1 9000

Every worker accepts on the daemon's shared listener (``listen`` in sockherd.toml);
`sockherd restart` starts new workers on the same socket before the old ones stop
accepting, and the old ones finish their open connections: no client is refused or cut.
"""

from __future__ import annotations

import asyncio
import os

from sockherd import worker
from sockherd.server import serve


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.write(f"hello from worker {worker.id} (pid {os.getpid()})\n".encode())
    async for line in reader:
        writer.write(line)
        await writer.drain()


if __name__ == "__main__":
    serve(echo, port=9000)

"""A hand-written uvicorn integration: a plain ``uvicorn.Server`` the app runs itself.

    python handwritten_uvicorn.py

The worker library does readiness (``report_online`` once the ASGI lifespan has
started; the socket is already listening) and shutdown (the daemon's ``shutdown``
sets uvicorn's ``should_exit``). uvicorn's own shutdown then closes the listener and
every idle keep-alive connection at once: no ``Connection: close`` first, no linger on
the backlog, which is what sockherd's runner adds. A client pinned to such a worker's
connection (the dev server before it understood HTTP) loses the request it sends as
the connection closes.

Answers ``pid=N METHOD SIZE`` with the size of the request body it read.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import uvicorn

from sockherd import worker

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            worker.report_online()
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["type"] != "http":
        return
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    body = f"pid={os.getpid()} {scope['method']} {size}\n".encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def main() -> None:
    server = uvicorn.Server(uvicorn.Config(app, lifespan="on", log_level="warning"))
    loop = asyncio.get_running_loop()

    def on_shutdown_message() -> None:  # on the library's thread: only trigger (uvicorn polls the flag)
        loop.call_soon_threadsafe(setattr, server, "should_exit", True)

    worker.set_shutdown_handler(on_shutdown_message)
    await server.serve(sockets=[worker.bind_socket()])


if __name__ == "__main__":
    asyncio.run(main())

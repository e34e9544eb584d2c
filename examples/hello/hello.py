"""A plain ASGI app served as a sockherd worker: ``python -m sockherd.uvicorn hello:app``.

No framework, so that everything between nginx and the app is visible:

* ``GET /`` greets with the worker's id and pid (run it twice across a
  ``sockherd restart`` to watch the pid change without a failed request);
* ``POST /echo`` returns the request body;
* ``GET /slow?ms=N`` answers after N milliseconds (a request to drain during a restart);
* ``GET /pid`` returns just the pid.

And it answers the daemon's messaging (``sockherd send-req`` / ``send-msg``):

* ``sockherd send-req stats``: each worker's pid and how many requests it served;
* ``sockherd send-req countdown 3``: a stream of replies, 3, 2, 1;
* ``sockherd send-msg greeting '"bonjour"'``: changes the greeting of ``GET /``.

The app is wrapped in :class:`sockherd.asgi.SuspendMiddleware`, so a worker started
suspended (``sockherd restart --suspended``, for a deploy with a database migration)
holds requests until ``sockherd resume``.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from sockherd import worker
from sockherd.asgi import SuspendMiddleware

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

MAX_SLOW_MS = 60_000
STATE: dict[str, Any] = {"greeting": "hello", "served": 0}


@worker.request_handler("stats")
def stats(data: object) -> dict[str, Any]:
    """`sockherd send-req stats`: one reply per worker."""
    return {"pid": os.getpid(), "served": STATE["served"]}


@worker.request_handler("countdown")
async def countdown(data: object) -> Any:
    """`sockherd send-req countdown N`: an async generator streams N replies."""
    for n in range(int(data) if isinstance(data, int) else 3, 0, -1):
        yield n
        await asyncio.sleep(0.1)


@worker.on_message
def greeting(message: str, data: object) -> None:
    """`sockherd send-msg greeting '"bonjour"'`: the next answers say bonjour."""
    if message == "greeting" and isinstance(data, str):
        STATE["greeting"] = data[:40]


@worker.on_shutdown
def goodbye() -> None:
    """Runs once, after the server has drained: the place to flush and close things."""
    print(f"hello: worker {worker.id} (pid {os.getpid()}) drained; shutdown hook ran", file=sys.stderr, flush=True)


async def respond(
    send: Send, status: int, body: str | bytes, content_type: bytes = b"text/plain; charset=utf-8"
) -> None:
    data = body.encode() if isinstance(body, str) else body
    headers = [(b"content-type", content_type), (b"content-length", str(len(data)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


async def read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def hello_app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    method, path = scope["method"], scope["path"]
    STATE["served"] += 1
    if path == "/" and method in ("GET", "HEAD"):
        who = worker.id if worker.id is not None else "standalone"
        await respond(send, 200, f"{STATE['greeting']} from worker {who} (index {worker.index}, pid {os.getpid()})\n")
    elif path == "/pid" and method == "GET":
        await respond(send, 200, f"{os.getpid()}\n")
    elif path == "/echo" and method == "POST":
        await respond(send, 200, await read_body(receive), b"application/octet-stream")
    elif path == "/slow" and method == "GET":
        query = parse_qs(scope["query_string"].decode("latin-1"))
        try:
            ms = min(int(query.get("ms", ["200"])[0]), MAX_SLOW_MS)
        except ValueError:
            await respond(send, 400, "ms must be an integer\n")
            return
        await asyncio.sleep(ms / 1000)
        await respond(send, 200, f"slept {ms} ms in pid {os.getpid()}\n")
    elif path in ("/", "/pid", "/echo", "/slow"):
        await respond(send, 405, "method not allowed\n")
    else:
        await respond(send, 404, "not found\n")


app = SuspendMiddleware(hello_app)

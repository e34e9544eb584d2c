"""The peer comparison's app: an ASGI app that takes 0.3 s to start.

    python -m sockherd.uvicorn slow_start:app                                   # sockherd
    gunicorn -k uvicorn_worker.UvicornWorker -w 2 -b unix:SOCK slow_start:app   # gunicorn
    uvicorn --uds SOCK slow_start:app                                           # supervisor

The import sleeps ``SLOW_START_SECONDS`` (0.3 by default), standing in for the imports
of a real app. GET answers with the worker's pid, POST with the size of the body it
read. A bad deploy is simulated by a marker file: when ``SLOW_START_FAIL_FILE`` names
a file that exists, the import raises, so the new version exits at start-up.
``SuspendMiddleware`` holds requests while sockherd has the worker suspended; outside
sockherd it is a no-op.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from sockherd.asgi import SuspendMiddleware

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

STARTUP_SECONDS = float(os.environ.get("SLOW_START_SECONDS", "0.3"))
FAIL_FILE = os.environ.get("SLOW_START_FAIL_FILE", "")

if FAIL_FILE and os.path.exists(FAIL_FILE):
    raise RuntimeError(f"bad deploy: {FAIL_FILE} exists, this version cannot start")
time.sleep(STARTUP_SECONDS)  # "imports"


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    if scope["method"] == "POST":
        body = f"pid={os.getpid()} POST {size}\n".encode()
    else:
        body = f"pid={os.getpid()} GET\n".encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


app = SuspendMiddleware(_app)

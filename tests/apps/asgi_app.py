"""An integrated ASGI app for the end-to-end tests: `python -m sockherd.uvicorn asgi_app:app`.

Answers with its pid and generation marker, holds requests while suspended (the
library's middleware), and misbehaves on request: /broken reports itself broken,
/grow?mb=N allocates memory (for max_memory).
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from sockherd import worker
from sockherd.asgi import SuspendMiddleware

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

# "New code on disk": the test writes the release marker before a restart.
RELEASE = open(os.environ["RELEASE_FILE"]).read().strip() if "RELEASE_FILE" in os.environ else "1"  # noqa: SIM115
BALLAST: list[bytearray] = []


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    size = 0
    while True:
        message = await receive()
        size += len(message.get("body", b""))
        if not message.get("more_body"):
            break
    path = scope["path"]
    if path == "/broken":
        worker.report_broken("asked to")
    elif path == "/grow":
        BALLAST.append(bytearray(int(scope["query_string"].decode().partition("mb=")[2] or "10") << 20))
    body = f"pid={os.getpid()} release={RELEASE} {scope['method']} {size}\n".encode()
    headers = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


app = SuspendMiddleware(_app)

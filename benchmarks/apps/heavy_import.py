"""The preload benchmark's app: its import costs ~0.4 s of CPU and ~40 MB, like a real app's.

    python -m sockherd.uvicorn heavy_import:app                          # sockherd (preload or not)
    gunicorn -k uvicorn_worker.UvicornWorker [--preload] heavy_import:app  # gunicorn

What the import builds stands in for a framework's modules and an app's tables: many
small Python objects (a dict of tuples and strings, the kind of memory refcounting and
the garbage collector touch) and a large buffer, then CPU spent until the import has cost
``HEAVY_IMPORT_CPU`` seconds (0.4 by default). GET answers with the worker's pid and the
pid that imported the app; ``SuspendMiddleware`` holds requests while suspended.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from sockherd.asgi import SuspendMiddleware

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_started = time.process_time()
CPU_SECONDS = float(os.environ.get("HEAVY_IMPORT_CPU", "0.4"))
TABLE = {f"route-{i}": (i, f"handler-{i}", [i, i + 1]) for i in range(90_000)}  # ~25 MB of small objects
BLOB = bytes(range(256)) * (12 * 1024 * 1024 // 256)  # 12 MiB: compiled code, data files
_digest = hashlib.sha256()
while time.process_time() - _started < CPU_SECONDS:
    _digest.update(BLOB[:65536])
IMPORTED_IN = os.getpid()


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "http":
        return
    body = json.dumps({"pid": os.getpid(), "imported_in": IMPORTED_IN, "routes": len(TABLE)}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


app = SuspendMiddleware(_app)

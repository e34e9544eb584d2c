"""An app for the preload tests: `python -m sockherd.uvicorn preload_app:app` with `preload = true`.

It answers with where it was imported, where its on_fork and on_resume hooks ran and
what it was told, so a test can see which process did what. The release comes from
RELEASE_FILE (new code on disk); a release named "broken" fails to import, as new code
with a bug in it would. BALLAST_MB allocates that much at import (the memory preload shares).
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from sockherd import worker
from sockherd.asgi import SuspendMiddleware

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

RELEASE = open(os.environ["RELEASE_FILE"]).read().strip() if "RELEASE_FILE" in os.environ else "1"  # noqa: SIM115
if RELEASE == "broken":
    raise RuntimeError("release 'broken' does not import: a bug in the new code")
IMPORTED_IN = os.getpid()
# A file the app opens while it is imported (a log, a sqlite database): in the fork server
# it takes the lowest free descriptor, which must not be one the listeners get in a worker.
IMPORT_LOG = open(os.environ["IMPORT_LOG"], "a") if "IMPORT_LOG" in os.environ else None  # noqa: SIM115
BALLAST = bytes(int(os.environ.get("BALLAST_MB", "0")) * 1024 * 1024)
FORKED_IN: list[int] = []
RESUMED_IN: list[int] = []


@worker.on_fork
def _forked() -> None:
    FORKED_IN.append(os.getpid())


@worker.on_resume
def _resumed() -> None:
    RESUMED_IN.append(os.getpid())


def _import_log_works() -> bool | None:
    if IMPORT_LOG is None:
        return None
    try:
        IMPORT_LOG.write(f"{os.getpid()} served\n")
        IMPORT_LOG.flush()
    except OSError:
        return False
    return True


async def _app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    body = json.dumps(
        {
            "pid": os.getpid(),
            "release": RELEASE,
            "module_file": __file__,
            "imported_in": IMPORTED_IN,
            "forked_in": FORKED_IN,
            "resumed_in": RESUMED_IN,
            "worker_id": worker.id,
            "index": worker.index,
            "listen_pid": os.environ.get("LISTEN_PID"),
            "listen_fds": os.environ.get("LISTEN_FDS"),
            "import_log_works": _import_log_works(),
        }
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


app = SuspendMiddleware(_app)  # holds requests while the worker is suspended

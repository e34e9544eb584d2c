"""An app for the preload tests: `python -m sockherd.uvicorn preload_app:app` with `preload = true`.

It answers with where it was imported, where its on_fork and on_resume hooks ran and
what it was told, so a test can see which process did what. The release comes from
RELEASE_FILE (new code on disk); a release named "broken" fails to import, as new code
with a bug in it would. BALLAST_MB allocates that much at import (the memory preload shares).
FORK_BARRIER makes the forks of one batch wait for each other (see below).
"""

from __future__ import annotations

import json
import os
import time
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


def _meet_the_other_forks(barrier: str, count: int) -> None:
    """FORK_BARRIER=DIR:N (tests/integration/test_fork_batch.py): each of the fork server's
    own children (the middle process of a fork) marks DIR and waits until N have, 5 s at
    most; one that waited that out leaves ``alone-PID``. Forks started side by side all
    meet; forks started one after another (each waiting for the last one's pid) cannot."""
    if os.getppid() != IMPORTED_IN:
        return  # a worker (the middle process's child), or not forked by the fork server
    open(os.path.join(barrier, f"middle-{os.getpid()}"), "w").close()
    deadline = time.monotonic() + 5.0
    while sum(name.startswith("middle-") for name in os.listdir(barrier)) < count:
        if time.monotonic() > deadline:
            open(os.path.join(barrier, f"alone-{os.getpid()}"), "w").close()
            return
        time.sleep(0.005)


if "FORK_BARRIER" in os.environ:
    _barrier, _, _count = os.environ["FORK_BARRIER"].rpartition(":")
    os.register_at_fork(after_in_child=lambda: _meet_the_other_forks(_barrier, int(_count)))


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

"""An app for the tests of how a worker ends: `python -m sockherd.uvicorn exit_app:app`.

Each step of a worker's exit leaves a line in EXIT_LOG, with the worker's pid: the
thread it started (not a daemon thread: the exit must wait for it) finishing after the
shutdown, and its atexit hook (registered at import, so inherited from the fork server
under preload), which also writes to stdout without flushing: the exit must flush it.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from sockherd import worker

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

_LOG = os.open(os.environ["EXIT_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
_stopping = threading.Event()


def _note(what: str, write: Callable[[int, bytes], int] = os.write, getpid: Callable[[], int] = os.getpid) -> None:
    write(_LOG, f"{what} {getpid()}\n".encode())


@atexit.register
def _at_exit() -> None:
    _note("atexit")
    sys.stdout.write(f"unflushed stdout of {os.getpid()}\n")  # block-buffered: a log file


# logging.shutdown (registered when logging was first imported) would otherwise run after
# the hook above, and flush stdout itself through uvicorn's handlers: moved ahead of it,
# only the exit's own flush can save the line.
atexit.unregister(logging.shutdown)
atexit.register(logging.shutdown)


def _finish_after_shutdown() -> None:
    _stopping.wait()
    time.sleep(0.2)  # still working a moment after the server has stopped
    _note("thread")


@worker.on_fork
def _start_thread() -> None:
    threading.Thread(target=_finish_after_shutdown, name="finisher").start()


worker.on_shutdown(_stopping.set)


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    body = f"{os.getpid()}\n".encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})

"""Close an asyncio server without dropping a connection: the listener half of a drain.

Two lessons from the field live here (docs: DESIGN.md, "Lessons from the field"):

* **Keep accepting until the backlog has stayed empty for a moment.** nginx may have
  connected to a worker's socket just before the daemon moved the symlink away; those
  connections sit in the listen backlog, and closing the listener resets them.
  :func:`wait_backlog_quiet` waits until no listener has had a pending connection for
  ``quiet`` seconds, while the server goes on accepting.
* **asyncio drops a connection accepted in the tick it closes.** The selector loop
  accepts synchronously but builds the transport in a task
  (``_accept_connection2``); if ``Server.close()`` runs before that task, the transport
  fails to attach (``Server._attach`` asserts the server still has sockets) and the
  client is reset. :func:`stop_accepting` stops the accepts first and
  :func:`close_after_attach` lets the pending ones attach before it closes.

Pure asyncio: no server framework is imported here. The functions use the public
``Server.sockets`` and ``loop.add_reader``/``remove_reader``; on loops that do not
accept through ``add_reader`` (uvloop), :func:`stop_accepting` is a no-op and
:func:`close_after_attach` degrades to a plain ``close()``, which those loops do safely.
"""

from __future__ import annotations

import asyncio
import os
import weakref

__all__ = ["close_after_attach", "stop_accepting", "wait_backlog_quiet"]

# Loop iterations close_after_attach yields before it closes. One is enough for the
# selector loop (an accept task's first step, which attaches, is already queued when
# accepting stops); the rest is margin for loops that take one more hop.
ATTACH_TICKS = 3

# Servers whose accepts this module stopped: waiting for their backlog to drain would
# only wait for the timeout, since nobody accepts any more.
_stopped: weakref.WeakSet[asyncio.base_events.Server] = weakref.WeakSet()


def _accepting(server: asyncio.base_events.Server) -> bool:
    return server.is_serving() and server not in _stopped and bool(server.sockets)


def stop_accepting(server: asyncio.base_events.Server) -> None:
    """Stop accepting new connections, leaving the listeners open. Idempotent.

    Connections still in the backlog stay there (not reset) until the server is closed;
    connections already accepted but not yet attached finish attaching.
    """
    loop = server.get_loop()
    for sock in server.sockets:
        loop.remove_reader(sock.fileno())
    _stopped.add(server)


async def close_after_attach(server: asyncio.base_events.Server, *, ticks: int = ATTACH_TICKS) -> None:
    """Stop accepting, let accepted connections attach to the server, then close it.

    After :func:`stop_accepting` no new accept task can appear, and the ones already
    created are queued ahead of this coroutine's next step, so a few loop iterations
    are enough for every one of them to attach before ``server.close()``.
    """
    stop_accepting(server)
    for _ in range(ticks):
        await asyncio.sleep(0)
    server.close()


# A `timeout` argument rather than asyncio.timeout(): running out is an answer (False), not an error.
async def wait_backlog_quiet(
    server: asyncio.base_events.Server,
    quiet: float = 0.05,
    *,
    timeout: float = 5.0,  # noqa: ASYNC109
) -> bool:
    """Wait until none of the server's listeners has had a pending connection for ``quiet`` s.

    A listening socket is readable exactly when its accept queue is non-empty. Rather
    than polling, each listener is watched through a ``dup()`` of its descriptor (the
    server's own reader stays in place and keeps accepting); every time one turns
    readable the quiet period starts over. After a sighting the watch is paused for a
    quarter of ``quiet`` so that a queue nobody drains cannot spin the loop.

    Returns True once the backlog has been quiet for ``quiet`` seconds, False when
    ``timeout`` runs out first or when the server is not accepting (closed, or after
    :func:`stop_accepting`), since then nothing would drain the queue.
    """
    if not _accepting(server):
        return False
    loop = asyncio.get_running_loop()
    rearm_delay = quiet / 4
    last_seen = loop.time()
    fds = [os.dup(sock.fileno()) for sock in server.sockets]
    watched: set[int] = set()
    rearms: dict[int, asyncio.TimerHandle] = {}

    def watch(fd: int) -> None:
        rearms.pop(fd, None)
        loop.add_reader(fd, on_readable, fd)
        watched.add(fd)

    def on_readable(fd: int) -> None:
        nonlocal last_seen
        last_seen = loop.time()
        loop.remove_reader(fd)
        watched.discard(fd)
        rearms[fd] = loop.call_later(rearm_delay, watch, fd)

    deadline = loop.time() + timeout
    try:
        for fd in fds:
            watch(fd)
        while True:
            now = loop.time()
            quiet_at = last_seen + quiet
            if now >= quiet_at:
                return True
            if now >= deadline or not _accepting(server):
                return False
            await asyncio.sleep(min(quiet_at, deadline) - now)
    finally:
        # Unregister before closing: epoll forgets a registration only when every
        # descriptor of the open file is closed, and the listener's stays open.
        for handle in rearms.values():
            handle.cancel()
        for fd in watched:
            loop.remove_reader(fd)
        for fd in fds:
            os.close(fd)

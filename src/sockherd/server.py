"""Raw socket servers with zero-downtime restarts: write a connection handler, nothing else.

    from sockherd.server import serve

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async for line in reader:
            writer.write(line)
            await writer.drain()

    serve(handle)                      # asyncio streams

    from sockherd.server import serve_threaded

    def handle(conn: socket.socket, address: object) -> None: ...

    serve_threaded(handle)             # a thread per connection, for blocking code

Under sockherd the server accepts on the daemon's shared listeners (``listen``) or on
the worker's own socket, reports online once it accepts, and on shutdown (the daemon's
``shutdown``, or SIGTERM/SIGINT) drains in stages: it stops accepting (on a worker's
own socket only after its backlog has stayed empty for a moment, so nothing queued is
reset; on shared listeners at once, since the other workers accept what waits there),
lets every open connection finish, runs the ``worker.on_shutdown`` hooks and returns.
A second SIGTERM (the daemon's ``shutdown_timeout`` ran out) cuts the wait short:
connections still open are shut down. Handlers that serve long-lived connections can
watch :attr:`StreamServer.stopping` to end them politely.

Standalone (no sockherd), it listens on ``127.0.0.1:8000`` (or ``port=``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import selectors
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sockherd import drain, worker

__all__ = ["StreamServer", "ThreadedServer", "serve", "serve_threaded"]

log = logging.getLogger("sockherd.server")

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
SocketHandler = Callable[[socket.socket, object], None]

BACKLOG_QUIET = 0.05  # a worker's own socket: its backlog must stay empty this long before it closes
BACKLOG_TIMEOUT = 2.0


def _listening_sockets(port: int) -> tuple[list[socket.socket], bool]:
    """(sockets, shared): the daemon's listeners, the worker's own socket, or a local port."""
    shared = worker.listeners()
    if shared:
        for sock in shared:
            sock.setblocking(False)
        return shared, True
    if worker.socket_path is not None:
        sock = worker.bind_socket()
    else:
        sock = socket.create_server(("127.0.0.1", port), reuse_port=False)
        log.info("sockherd.server: not under sockherd; listening on 127.0.0.1:%d", port)
    sock.setblocking(False)
    return [sock], False


class StreamServer:
    """An asyncio server: ``handler(reader, writer)`` per connection; see the module doc."""

    def __init__(self, handler: StreamHandler, *, port: int = 8000) -> None:
        self.handler = handler
        self.port = port
        self.stopping = asyncio.Event()  # set once the drain begins: long-lived handlers may wrap up
        self._hurry = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def active(self) -> int:
        """Connections being served now."""
        return len(self._tasks)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        sockets, shared = _listening_sockets(self.port)
        # The daemon's backlog: listen() again on a shared socket sets it for every worker.
        servers = [await asyncio.start_server(self._connected, sock=sock, backlog=worker.backlog) for sock in sockets]

        def from_the_ipc_thread() -> None:
            loop.call_soon_threadsafe(self._request_stop)

        worker.set_shutdown_handler(from_the_ipc_thread)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop)
        try:
            worker.report_online()
            await self.stopping.wait()
            if not shared and not worker.backlog_drained():  # drained: the daemon saw the queue empty
                await asyncio.gather(
                    *(drain.wait_backlog_quiet(s, BACKLOG_QUIET, timeout=BACKLOG_TIMEOUT) for s in servers)
                )
            await asyncio.gather(*(drain.close_after_attach(s) for s in servers))
            await self._finish_connections()
            await worker.run_shutdown_hooks_async()
        finally:
            worker.set_shutdown_handler(None)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            for sock in sockets:
                sock.close()

    def _request_stop(self) -> None:
        if self.stopping.is_set():
            self._hurry.set()  # asked again: the daemon's patience ran out
        self.stopping.set()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away: its business
        except Exception:
            log.exception("sockherd.server: the connection handler failed")
        finally:
            self._writers.discard(writer)
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def _finish_connections(self) -> None:
        while self._tasks and not self._hurry.is_set():
            hurry = asyncio.ensure_future(self._hurry.wait())
            await asyncio.wait({*self._tasks, hurry}, return_when=asyncio.FIRST_COMPLETED)
            hurry.cancel()
        if self._tasks:
            log.warning("sockherd.server: shutdown cut short; closing %d connection(s)", len(self._tasks))
            for writer in list(self._writers):
                writer.transport.abort()
            await asyncio.gather(*self._tasks, return_exceptions=True)


def serve(handler: StreamHandler, *, port: int = 8000) -> None:
    """Run an asyncio :class:`StreamServer` until it has drained; the worker then exits."""
    asyncio.run(StreamServer(handler, port=port).serve())


class ThreadedServer:
    """``handler(conn, address)`` in a thread per connection; see the module doc."""

    def __init__(self, handler: SocketHandler, *, port: int = 8000) -> None:
        self.handler = handler
        self.port = port
        self.stopping = threading.Event()
        self._hurry = threading.Event()
        self._lock = threading.Lock()
        self._connections: dict[threading.Thread, socket.socket] = {}
        self._wake_r, self._wake_w = socket.socketpair()

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._connections)

    def request_stop(self) -> None:
        """Begin the drain (safe from any thread and from a signal handler)."""
        if self.stopping.is_set():
            self._hurry.set()
        self.stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def serve(self) -> None:
        sockets, shared = _listening_sockets(self.port)
        worker.set_shutdown_handler(self.request_stop)
        previous = {sig: signal.signal(sig, lambda *_: self.request_stop()) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            with selectors.DefaultSelector() as selector:
                for sock in sockets:
                    selector.register(sock, selectors.EVENT_READ)
                selector.register(self._wake_r, selectors.EVENT_READ)
                worker.report_online()
                self._accept_until_stopped(selector, sockets)
                if not shared:
                    self._accept_until_quiet(selector, sockets)
            for sock in sockets:
                sock.close()
            self._finish_connections()
            worker.run_shutdown_hooks()
        finally:
            worker.set_shutdown_handler(None)
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._wake_r.close()
            self._wake_w.close()

    def _accept_until_stopped(self, selector: selectors.BaseSelector, sockets: list[socket.socket]) -> None:
        while not self.stopping.is_set():
            for key, _ in selector.select():
                if isinstance(key.fileobj, socket.socket) and key.fileobj in sockets:
                    self._accept(key.fileobj)

    def _accept_until_quiet(self, selector: selectors.BaseSelector, sockets: list[socket.socket]) -> None:
        """A worker's own socket: what nginx queued before the symlink moved is still ours."""
        selector.unregister(self._wake_r)
        deadline = time.monotonic() + BACKLOG_TIMEOUT
        quiet = 0.0 if worker.backlog_drained() else BACKLOG_QUIET  # drained: take what is there, no wait
        while time.monotonic() < deadline:
            events = selector.select(quiet)
            if not events:
                return
            for key, _ in events:
                if isinstance(key.fileobj, socket.socket):
                    self._accept(key.fileobj)

    def _accept(self, listener: socket.socket) -> None:
        try:
            conn, address = listener.accept()
        except (BlockingIOError, InterruptedError):
            return  # another worker took it (shared listeners)
        except OSError as exc:
            log.warning("sockherd.server: accept failed: %s", exc)
            return
        conn.setblocking(True)
        thread = threading.Thread(target=self._run, args=(conn, address), daemon=True)
        with self._lock:
            self._connections[thread] = conn
        thread.start()

    def _run(self, conn: socket.socket, address: object) -> None:
        try:
            with conn:
                self.handler(conn, address)
        except OSError:
            pass  # the client went away, or the drain was cut short
        except Exception:
            log.exception("sockherd.server: the connection handler failed")
        finally:
            with self._lock:
                self._connections.pop(threading.current_thread(), None)

    def _finish_connections(self) -> None:
        while True:
            with self._lock:
                threads = list(self._connections)
            if not threads:
                return
            if self._hurry.is_set():
                break
            threads[0].join(0.05)
        with self._lock:
            leftovers = dict(self._connections)
        log.warning("sockherd.server: shutdown cut short; closing %d connection(s)", len(leftovers))
        for thread, conn in leftovers.items():
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            thread.join(1.0)


def serve_threaded(handler: SocketHandler, *, port: int = 8000) -> None:
    """Run a :class:`ThreadedServer` until it has drained; the worker then exits."""
    ThreadedServer(handler, port=port).serve()

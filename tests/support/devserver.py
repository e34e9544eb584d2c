"""A DevServer on an event loop of the test's own, and small scripted servers on UNIX
sockets that misbehave on purpose, for tests/integration/test_devserver*.py."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import http.client
import re
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from sockherd.daemon.devserver import BUFFER_LIMIT, DevServer

Handler = Callable[[socket.socket], None]


@contextlib.contextmanager
def dev_server(
    published: Callable[[], list[Path]], retry: bool = True, buffer_limit: int = BUFFER_LIMIT
) -> Iterator[DevServer]:
    """A DevServer on a free port, on an event loop in a thread of its own; what the loop
    reports (an exception a connection's handler let through) fails the test."""
    loop = asyncio.new_event_loop()
    reported: list[str] = []
    loop.set_exception_handler(
        lambda _, context: reported.append(f"{context['message']}: {context.get('exception')!r}")
    )
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = DevServer(0, published, retry=retry, buffer_limit=buffer_limit)
    asyncio.run_coroutine_threadsafe(server.start(), loop).result(5)
    try:
        yield server
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
    gc.collect()  # a task's exception nobody retrieved is reported when the task is collected
    assert reported == [], reported


@contextlib.contextmanager
def scripted_upstream(path: Path, handler: Handler) -> Iterator[Path]:
    """A UNIX socket server that runs ``handler`` on each connection, in a thread."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    conns: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            conns.append(conn)
            threading.Thread(target=handler, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    try:
        yield path
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        for conn in conns:
            conn.close()


def read_request(conn: socket.socket, buffer: bytearray) -> bytes | None:
    """One request head and its Content-Length body from ``conn``; None at EOF."""
    while b"\r\n\r\n" not in buffer:
        data = conn.recv(65536)
        if not data:
            return None
        buffer += data
    end = buffer.index(b"\r\n\r\n") + 4
    match = re.search(rb"(?i)content-length: *(\d+)", buffer[:end])
    length = int(match.group(1)) if match else 0
    while len(buffer) < end + length:
        buffer += conn.recv(65536)
    request = bytes(buffer[: end + length])
    del buffer[: end + length]
    return request


def ok(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)


@contextlib.contextmanager
def http_connection(port: int) -> Iterator[http.client.HTTPConnection]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        yield conn
    finally:
        conn.close()


class Recorder:
    """A scripted worker that reads and never answers, noting what each connection got."""

    def __init__(self) -> None:
        self.received: list[bytes] = []  # per connection, in accept order
        self.closed = threading.Semaphore(0)  # released at each connection's EOF

    def __call__(self, conn: socket.socket) -> None:
        index = len(self.received)
        self.received.append(b"")
        with contextlib.suppress(OSError):
            while data := conn.recv(65536):
                self.received[index] += data
        self.closed.release()

"""A stand-in for the daemon's IPC end, for testing the worker library in isolation."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from pathlib import Path

from sockherd import protocol

TIMEOUT = 10.0

Received = list[tuple[int, protocol.Message]]  # (connection number from 1, message)


class FakeDaemon:
    """Accepts worker connections, answers hello, records every frame it receives."""

    def __init__(self, path: Path, hello_errors: list[str] | None = None) -> None:
        self.path = path
        self.hello_errors = hello_errors
        self.received: Received = []
        self.closed: set[int] = set()  # connections the worker side has closed
        self.conns: list[socket.socket] = []
        self._cond = threading.Condition()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._cond:
                self.conns.append(conn)
                number = len(self.conns)
            threading.Thread(target=self._read, args=(conn, number), daemon=True).start()

    def _read(self, conn: socket.socket, number: int) -> None:
        frames = protocol.FrameBuffer()
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                data = b""
            if not data:
                break
            for frame in frames.feed(data):
                msg = protocol.decode(frame)
                if msg.type == "hello" and msg.id is not None:
                    conn.sendall(protocol.reply(msg.id, {"worker": "welcome"}, errors=self.hello_errors))
                with self._cond:
                    self.received.append((number, msg))
                    self._cond.notify_all()
        with self._cond:
            self.closed.add(number)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[FakeDaemon], bool], what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: predicate(self), TIMEOUT):
                raise AssertionError(f"fake daemon: timed out waiting for {what}; received {self.types()}")

    def wait_message(self, type_: str, conn: int = 1) -> protocol.Message:
        self.wait_for(lambda d: any(n == conn and m.type == type_ for n, m in d.received), f"{type_} on #{conn}")
        return next(m for n, m in self.received if n == conn and m.type == type_)

    def wait_reply(self, request_id: int | str, conn: int = 1) -> protocol.Message:
        def replied(d: FakeDaemon) -> bool:
            return any(n == conn and m.is_reply and m.request_id == request_id for n, m in d.received)

        self.wait_for(replied, f"the reply to request {request_id!r} on #{conn}")
        return next(m for n, m in self.received if n == conn and m.is_reply and m.request_id == request_id)

    def types(self, conn: int | None = None) -> list[str]:
        with self._cond:
            return [m.type for n, m in self.received if conn is None or n == conn]

    def send(self, frame: bytes, conn: int = -1) -> None:
        self.conns[conn].sendall(frame)

    def resume(self, data: object = None, *, id: int | None = None, conn: int = -1) -> None:
        """Send ``resume`` (with ``id``: as a request, so that the reply says it was handled)."""
        self.send(protocol.message("resume", data, id=id), conn)

    def drop(self) -> None:
        """Close the newest connection, as a daemon that crashed would."""
        self.conns[-1].shutdown(socket.SHUT_RDWR)
        self.conns[-1].close()

    def close(self) -> None:
        # shutdown() first: close() alone does not wake a thread blocked in accept/recv,
        # and the kernel keeps such a socket open.
        for sock in [self._listener, *self.conns]:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.path.unlink(missing_ok=True)

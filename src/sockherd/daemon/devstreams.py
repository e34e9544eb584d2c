"""The dev server's byte streams: a buffered connection to each side, and bodies forwarded
as they came (see :mod:`sockherd.daemon.devserver`).

A read that cannot go on, at EOF or on a reset, raises :class:`ClosedEarly`; a write
that fails raises the ``OSError`` it got. Bytes that break a body's framing raise
:class:`Malformed`, which says whose bytes they were: the dev server answers ``400``
for the client's and ``502`` for the worker's.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal

from sockherd.daemon import http1

CHUNK = 64 * 1024
Peer = Literal["client", "worker"]


class ClosedEarly(ConnectionError):
    """The peer closed (or reset) the connection; ``partial`` is what arrived of the
    unfinished part."""

    def __init__(self, peer: Peer, partial: bytes = b"") -> None:
        super().__init__(f"the {peer} closed the connection early")
        self.peer = peer
        self.partial = partial


class Malformed(ValueError):
    """A body from ``peer`` that breaks its framing, found while it was being forwarded
    (too late to pipe it raw instead)."""

    def __init__(self, peer: Peer, error: http1.ParseError) -> None:
        super().__init__(f"{peer}: {error}")
        self.peer = peer


class Conn:
    """One side's stream with a buffer of bytes read but not yet used."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Peer) -> None:
        self.reader = reader
        self.writer = writer
        self.peer: Peer = peer
        self.buffer = bytearray()
        self.received = 0  # bytes read from the peer, ever
        self.reused = False  # it has carried a whole exchange (the idle-connection race applies)

    async def _fill(self) -> None:
        try:
            data = await self.reader.read(CHUNK)
        except OSError as exc:  # a reset: for the reader, the same as an early close
            raise ClosedEarly(self.peer, bytes(self.buffer)) from exc
        if not data:
            raise ClosedEarly(self.peer, bytes(self.buffer))
        self.received += len(data)
        self.buffer += data

    def take(self, n: int = -1) -> bytes:
        n = len(self.buffer) if n < 0 else min(n, len(self.buffer))
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    def unread(self, data: bytes) -> None:
        self.buffer[:0] = data

    async def read_some(self, n: int = CHUNK) -> bytes:
        if not self.buffer:
            await self._fill()
        return self.take(n)

    async def read_head(self) -> bytes:
        """Up to and including the blank line; ParseError past MAX_HEAD, ClosedEarly at EOF."""
        start = 0
        while (end := self.buffer.find(http1.HEAD_END, start)) == -1:
            if len(self.buffer) > http1.MAX_HEAD:
                raise http1.ParseError("head too long")
            start = max(0, len(self.buffer) - 3)
            await self._fill()
        return self.take(end + 4)

    async def read_chunked(self, scanner: http1.ChunkedScanner) -> bytes:
        """The next piece of a chunked body (what ``scanner`` says belongs to it)."""
        data = await self.read_some()
        try:
            used = scanner.feed(data)
        except http1.ParseError as exc:
            raise Malformed(self.peer, exc) from exc
        self.unread(data[used:])
        return data[:used]

    def idle_and_closed(self) -> bool:
        return not self.buffer and self.reader.at_eof()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


async def copy_body(src: Conn, dst: Conn, framing: http1.Framing, scanner: http1.ChunkedScanner | None = None) -> None:
    """Forward one body as it came (a chunked one from where ``scanner`` is); raise
    ClosedEarly if ``src`` ends inside it, Malformed if its chunks are not HTTP."""
    if framing.kind == "length":
        remaining = framing.length
        while remaining:
            data = await src.read_some(min(remaining, CHUNK))
            remaining -= len(data)
            await dst.send(data)
    elif framing.kind == "chunked":
        scanner = scanner or http1.ChunkedScanner()
        while not scanner.done:
            await dst.send(await src.read_chunked(scanner))
    elif framing.kind == "close":
        with contextlib.suppress(ClosedEarly):
            while True:
                await dst.send(await src.read_some())


async def pipe(src: Conn, dst: Conn) -> None:
    """Raw bytes until EOF, then half-close ``dst`` (the pre-HTTP dev server, and tunnels)."""
    try:
        await dst.send(src.take())
        while data := await src.reader.read(CHUNK):
            src.received += len(data)
            await dst.send(data)
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if dst.writer.can_write_eof():
                dst.writer.write_eof()


def error_response(status: str, text: str) -> bytes:
    body = text.encode() + b"\n"
    return (
        f"HTTP/1.1 {status}\r\ncontent-type: text/plain\r\nconnection: close\r\n"
        f"content-length: {len(body)}\r\n\r\n".encode()
        + body
    )

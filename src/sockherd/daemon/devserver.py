"""The development server: 127.0.0.1:PORT forwarded to the published sockets.

This is the one place traffic flows through the daemon, and it is for a developer's
machine, not production (use nginx there). It proxies HTTP/1.x the way nginx does with
upstream ``keepalive`` and ``proxy_next_upstream error``: each client connection gets
an upstream connection that is reused while it works, a new one goes to the published
symlinks round-robin (the kernel resolves a symlink at connect time, as for nginx, so
restarts behave as they will in production), and a request the worker never answered
is sent again, when that is safe (see :meth:`ClientConnection.exchange`). What it
cannot parse (see :mod:`sockherd.daemon.http1`) is piped as raw bytes, both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from sockherd.daemon import http1

log = logging.getLogger("sockherd")

_CHUNK = 64 * 1024
BUFFER_LIMIT = 4 * 1024 * 1024  # request bodies up to this size are buffered, hence retryable
RETRIES = 3  # sends of one request after the first, on fresh connections
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class ClosedEarly(ConnectionError):
    """The peer closed the connection; ``partial`` is what arrived of the unfinished part."""

    def __init__(self, partial: bytes = b"") -> None:
        super().__init__("connection closed early")
        self.partial = partial


class Conn:
    """One side's stream with a buffer of bytes read but not yet used."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.buffer = bytearray()
        self.received = 0  # bytes read from the peer, ever
        self.reused = False  # it has carried a whole exchange (the idle-connection race applies)

    async def _fill(self) -> None:
        data = await self.reader.read(_CHUNK)
        if not data:
            raise ClosedEarly(bytes(self.buffer))
        self.received += len(data)
        self.buffer += data

    def take(self, n: int = -1) -> bytes:
        n = len(self.buffer) if n < 0 else min(n, len(self.buffer))
        data = bytes(self.buffer[:n])
        del self.buffer[:n]
        return data

    def unread(self, data: bytes) -> None:
        self.buffer[:0] = data

    async def read_some(self, n: int = _CHUNK) -> bytes:
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

    def idle_and_closed(self) -> bool:
        return not self.buffer and self.reader.at_eof()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def close(self) -> None:
        self.writer.close()


async def copy_body(src: Conn, dst: Conn, framing: http1.Framing, scanner: http1.ChunkedScanner | None = None) -> None:
    """Forward one body as it came (a chunked one from where ``scanner`` is); raise
    ClosedEarly if ``src`` ends inside it."""
    if framing.kind == "length":
        remaining = framing.length
        while remaining:
            data = await src.read_some(min(remaining, _CHUNK))
            remaining -= len(data)
            await dst.send(data)
    elif framing.kind == "chunked":
        scanner = scanner or http1.ChunkedScanner()
        while not scanner.done:
            data = await src.read_some()
            used = scanner.feed(data)
            src.unread(data[used:])
            await dst.send(data[:used])
    elif framing.kind == "close":
        with contextlib.suppress(ClosedEarly):
            while True:
                await dst.send(await src.read_some())


async def pipe(src: Conn, dst: Conn) -> None:
    """Raw bytes until EOF, then half-close ``dst`` (the pre-HTTP dev server, and tunnels)."""
    try:
        await dst.send(src.take())
        while data := await src.reader.read(_CHUNK):
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


class DevServer:
    def __init__(
        self,
        port: int,
        published: Callable[[], list[Path]],
        host: str = "127.0.0.1",
        *,
        retries: int = RETRIES,
        buffer_limit: int = BUFFER_LIMIT,
    ) -> None:
        self.host = host
        self.port = port
        self.retries = retries
        self.buffer_limit = buffer_limit
        self.retried = 0  # requests sent again after a worker closed without answering
        self._published = published
        self._counter = itertools.count()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        log.info("dev server on http://%s:%d/ (not for production: put nginx in front instead)", self.host, self.port)

    async def close(self) -> None:
        self._closing = True
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def connect(self) -> Conn | None:
        """A new connection to a published socket, round-robin, trying each once."""
        paths = self._published()
        start = next(self._counter)
        for offset in range(len(paths)):
            path = paths[(start + offset) % len(paths)]
            try:
                return Conn(*await asyncio.open_unix_connection(str(path)))
            except OSError:
                continue  # like proxy_next_upstream error: try the next worker
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        client = ClientConnection(self, Conn(reader, writer))
        try:
            await client.run()
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            if not self._closing:
                raise
            # close() cancelled it: end quietly (Python 3.11's streams log a cancelled handler)
        finally:
            self._tasks.discard(task)
            client.close()


class ClientConnection:
    """One client connection: its requests, one at a time, and its upstream connection."""

    def __init__(self, server: DevServer, client: Conn) -> None:
        self.server = server
        self.client = client
        self.upstream: Conn | None = None
        self.sending: asyncio.Task[None] | None = None  # a streamed request body on its way

    def close(self) -> None:
        if self.sending is not None:
            self.sending.cancel()
        self.drop_upstream()
        self.client.close()

    def drop_upstream(self) -> None:
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None

    async def run(self) -> None:
        while True:
            try:
                raw = await self.client.read_head()
            except ClosedEarly:
                if self.client.buffer:  # half a head, then EOF: not ours to judge
                    await self.raw_pipe()
                return
            except http1.ParseError:  # a head too long
                await self.raw_pipe()
                return
            try:
                request = http1.parse_request_head(raw)
                framing = http1.request_framing(request)
            except http1.ParseError:
                self.client.unread(raw)
                await self.raw_pipe()
                return
            if not await self.handle(request, framing):
                return

    async def raw_pipe(self, sending: Awaitable[object] | None = None) -> None:
        """Pipe raw bytes both ways until both sides are done (after ``sending``, if given)."""
        upstream = self.upstream if self.upstream is not None else await self.server.connect()
        if upstream is None:
            await self.client.send(error_response("502 Bad Gateway", "no worker is online"))
            return
        self.upstream = upstream

        async def client_side() -> None:
            if sending is not None:
                with contextlib.suppress(ConnectionError, OSError):
                    await sending
            await pipe(self.client, upstream)

        await asyncio.gather(client_side(), pipe(upstream, self.client))

    async def handle(self, request: http1.Head, framing: http1.Framing) -> bool:
        """Serve one request; whether the client connection stays open for another."""
        head = request.raw
        if http1.expects_continue(request) and (
            framing.kind == "chunked" or (framing.kind == "length" and framing.length <= self.server.buffer_limit)
        ):
            await self.client.send(_CONTINUE)  # as nginx does when it reads the body itself
            head = http1.without_fields(request, {"expect"})
        body, rest = await self.read_body(framing)
        result = await self.exchange(request, head, body, rest)
        if result is None:
            return False
        response, body_sent = result
        upstream = self.upstream
        assert upstream is not None
        try:
            response_framing = http1.response_framing(request.method, response)
        except http1.ParseError:  # a body it cannot delimit: raw bytes from here on
            response_framing = http1.Framing("tunnel")
        if response_framing.kind == "tunnel":  # 101 Switching Protocols, CONNECT: no more HTTP
            await self.client.send(response.raw)
            await self.raw_pipe()
            return False
        keep_client = body_sent and http1.keeps_alive(request) and response_framing.kind != "close"
        keep_upstream = keep_client and http1.keeps_alive(response)
        await self.client.send(http1.response_head_for_client(response, request, keep_alive=keep_client))
        await copy_body(upstream, self.client, response_framing)
        upstream.reused = True
        if not keep_upstream:
            self.drop_upstream()
        return keep_client

    async def read_body(
        self, framing: http1.Framing
    ) -> tuple[bytes, Callable[[Conn], Coroutine[Any, Any, None]] | None]:
        """The request body as far as it is buffered, and what forwards the rest to an
        upstream connection (None: the body is whole, the request can be sent again)."""
        limit = self.server.buffer_limit
        if framing.kind == "length" and framing.length <= limit:
            body = bytearray()
            while len(body) < framing.length:
                body += await self.client.read_some(framing.length - len(body))
            return bytes(body), None
        if framing.kind == "length":
            return b"", lambda upstream: copy_body(self.client, upstream, framing)
        if framing.kind == "chunked":
            body = bytearray()
            scanner = http1.ChunkedScanner()
            while not scanner.done and len(body) <= limit:
                data = await self.client.read_some()
                used = scanner.feed(data)
                self.client.unread(data[used:])
                body += data[:used]
            if not scanner.done:
                return bytes(body), lambda upstream: copy_body(self.client, upstream, framing, scanner)
            return bytes(body), None
        return b"", None

    async def exchange(
        self, request: http1.Head, head: bytes, body: bytes, rest: Callable[[Conn], Coroutine[Any, Any, None]] | None
    ) -> tuple[http1.Head, bool] | None:
        """Send the request and read its final response head; None once answered otherwise.

        A request is sent again, on a fresh connection to the currently published socket,
        when the worker closed or reset the connection before any byte of a response,
        only if its body is whole in memory (``rest`` is None) and the connection was a
        reused, idle one. That is the case where the worker did not read the request: it
        closed an idle keep-alive connection (a drain, an idle timeout) just as the
        request went out, so nothing was applied and even a POST is safe to repeat. It is
        nginx's rule with ``proxy_next_upstream error``: a failed connect goes to the next
        server (here :meth:`DevServer.connect` tries every published socket), and a
        request already sent is not sent again when that could apply it twice (nginx: a
        POST, unless ``non_idempotent``; here: anything on a fresh connection, which may
        have failed after the worker acted). nginx reaches the same result for its idle
        pooled connections by retrying their failures without spending a try. Returns
        the response head and whether the whole request body went out.
        """
        attempt = 0
        while True:
            if self.upstream is not None and self.upstream.idle_and_closed():
                self.drop_upstream()  # closed while idle: no request was lost to it
            if self.upstream is None:
                self.upstream = await self.server.connect()
                if self.upstream is None:
                    await self.client.send(error_response("502 Bad Gateway", "no worker is online"))
                    return None
            upstream = self.upstream
            received = upstream.received
            sending: asyncio.Task[None] | None = None
            try:
                await upstream.send(head + body)
                if rest is not None:
                    sending = self.sending = asyncio.create_task(rest(upstream))
                return await self.final_response(request, upstream, sending)
            except http1.ParseError:  # not an HTTP/1.x response: from here on, raw bytes
                await self.raw_pipe(sending)
                return None
            except (ConnectionError, OSError):
                answered = upstream.received > received
                retry = upstream.reused and rest is None and not answered and attempt < self.server.retries
                self.drop_upstream()
                if sending is not None:
                    sending.cancel()
                if not retry:
                    if not answered:
                        await self.client.send(error_response("502 Bad Gateway", "the worker closed the connection"))
                    return None
                attempt += 1
                self.server.retried += 1
                log.debug(
                    "dev server: %s %s: the worker closed an idle connection without answering; sent again (%d/%d)",
                    request.method,
                    request.target[:100],
                    attempt,
                    self.server.retries,
                )

    async def final_response(
        self, request: http1.Head, upstream: Conn, sending: asyncio.Task[None] | None
    ) -> tuple[http1.Head, bool]:
        """Read response heads up to the final one, forwarding interim (1xx) ones to
        HTTP/1.1 clients. Returns it and whether the whole request body went out."""
        while True:
            raw = await upstream.read_head()
            try:
                response = http1.parse_response_head(raw)
            except http1.ParseError:
                upstream.unread(raw)
                raise
            if response.status >= 200 or response.status == 101:
                break
            if request.minor >= 1:
                await self.client.send(raw)
        if sending is None:
            return response, True
        if not sending.done():
            sending.cancel()  # answered before the whole body was read: the client connection ends
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await sending
            return response, False
        return response, sending.exception() is None

"""The development server: 127.0.0.1:PORT forwarded to the published sockets.

This is the one place traffic flows through the daemon, and it is for a developer's
machine, not production (use nginx there). It proxies HTTP/1.x the way nginx does with
upstream ``keepalive`` and ``proxy_next_upstream error``: each client connection gets
an upstream connection that is reused while it works, a new one goes to the published
symlinks round-robin (the kernel resolves a symlink at connect time, as for nginx, so
restarts behave as they will in production), and an idempotent request the worker
never answered is sent again, when that is safe (see :meth:`ClientConnection.exchange`).
What it cannot parse (see :mod:`sockherd.daemon.http1`) is piped as raw bytes, both
ways. A chunked body found malformed once it is being read is too late for that: a
request's gets a ``400``, a response's ends the client connection (its head went out).
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
from sockherd.daemon.devstreams import ClosedEarly, Conn, Malformed, copy_body, error_response, pipe

log = logging.getLogger("sockherd")

BUFFER_LIMIT = 4 * 1024 * 1024  # request bodies up to this size are buffered, hence retryable
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})  # RFC 9110 9.2.2
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class DevServer:
    def __init__(
        self,
        port: int,
        published: Callable[[], list[Path]],
        host: str = "127.0.0.1",
        *,
        retry: bool = True,
        buffer_limit: int = BUFFER_LIMIT,
    ) -> None:
        self.host = host
        self.port = port
        self.retry = retry  # send an idempotent request again once, when a reused connection closed under it
        self.buffer_limit = buffer_limit
        self.retried = 0  # requests sent again after a worker closed without answering
        self._published = published
        self._counter = itertools.count()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    @property
    def clients(self) -> int:
        """Client connections being served."""
        return len(self._tasks)

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
                return Conn(*await asyncio.open_unix_connection(str(path)), "worker")
            except OSError:
                continue  # like proxy_next_upstream error: try the next worker
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        client = ClientConnection(self, Conn(reader, writer, "client"))
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
        self.responding = False  # the final response to the current request has begun

    def close(self) -> None:
        if self.sending is not None:
            _discard(self.sending)
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
            self.responding = False
            try:
                if not await self.handle(request, framing):
                    return
            except ValueError as exc:  # Malformed (or a ParseError): too late to pipe it raw
                await self.refuse(exc)
                return

    async def refuse(self, exc: ValueError) -> None:
        """End the client connection on a body that broke its framing mid-way: with a
        400 for the client's body, a 502 for anything else, unless the response has begun."""
        log.debug("dev server: %s", exc)
        self.drop_upstream()
        if self.responding:
            return
        if isinstance(exc, Malformed) and exc.peer == "client":
            await self.client.send(error_response("400 Bad Request", "malformed request body"))
        else:
            await self.client.send(error_response("502 Bad Gateway", "malformed response from the worker"))

    async def raw_pipe(self, sending: Awaitable[object] | None = None) -> None:
        """Pipe raw bytes both ways until both sides are done (after ``sending``, if given)."""
        self.responding = True
        upstream = self.upstream if self.upstream is not None else await self.server.connect()
        if upstream is None:
            await self.client.send(error_response("502 Bad Gateway", "no worker is online"))
            return
        self.upstream = upstream

        async def client_side() -> None:
            if sending is not None:
                with contextlib.suppress(ConnectionError, OSError, ValueError):
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
        self.responding = True
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
                body += await self.client.read_chunked(scanner)
            if not scanner.done:
                return bytes(body), lambda upstream: copy_body(self.client, upstream, framing, scanner)
            return bytes(body), None
        return b"", None

    async def exchange(
        self, request: http1.Head, head: bytes, body: bytes, rest: Callable[[Conn], Coroutine[Any, Any, None]] | None
    ) -> tuple[http1.Head, bool] | None:
        """Send the request and read its final response head; None once answered otherwise.

        An idempotent request (GET, HEAD, OPTIONS, TRACE, PUT, DELETE) is sent again, on
        a fresh connection to the currently published socket, when the worker closed or
        reset the connection before any byte of a response, only if its body is whole in
        memory (``rest`` is None) and the connection was a reused, idle one: the worker
        most likely closed an idle keep-alive connection (a drain, an idle timeout) just
        as the request went out. It may also have died after reading it (SIGKILL, the
        OOM killer): the two look the same from here, hence idempotent requests only, as
        nginx's ``proxy_next_upstream error`` without ``non_idempotent``. Any other
        request (POST, PATCH, ...) goes out on a fresh connection, which the idle-close
        race cannot hit, and is never sent twice. A failed connect goes to the next
        server (:meth:`DevServer.connect` tries every published socket). Returns the
        response head and whether the whole request body went out.
        """
        idempotent = request.method in IDEMPOTENT
        while True:
            if self.upstream is not None and (
                self.upstream.idle_and_closed() or (self.upstream.reused and not idempotent)
            ):
                self.drop_upstream()  # closed while idle (nothing lost), or not to be risked on that race
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
            except (ConnectionError, OSError) as exc:
                if isinstance(exc, ClosedEarly) and exc.peer == "client":
                    raise  # the client left in the middle of its request body
                answered = upstream.received > received
                # At most once: the request goes again on a fresh connection, which is not reused.
                retry = self.server.retry and idempotent and upstream.reused and rest is None and not answered
                self.drop_upstream()
                if sending is not None:
                    _discard(sending)
                if not retry:
                    if not answered:
                        await self.client.send(error_response("502 Bad Gateway", "the worker closed the connection"))
                    return None
                self.server.retried += 1
                log.debug(
                    "dev server: %s %s: the worker closed an idle connection without answering; sent again",
                    request.method,
                    request.target[:100],
                )

    async def final_response(
        self, request: http1.Head, upstream: Conn, sending: asyncio.Task[None] | None
    ) -> tuple[http1.Head, bool]:
        """The final response head and whether the whole request body went out.

        A streamed body and the response are awaited together. A worker may answer
        before it has read the whole body: the rest is not sent, and the client
        connection ends after the response. A client that stops sending its body (it
        left, or its chunks are malformed) ends the exchange and the worker's connection,
        on which the worker would otherwise wait for the rest forever."""
        reading = asyncio.ensure_future(self.final_head(request, upstream))
        try:
            if sending is not None:
                await asyncio.wait((reading, sending), return_when=asyncio.FIRST_COMPLETED)
                failure = sending.exception() if sending.done() and not sending.cancelled() else None
                if not reading.done() and isinstance(failure, ClosedEarly | Malformed) and failure.peer == "client":
                    self.drop_upstream()
                    raise failure
            response = await reading  # (a failed write to the worker: it may still answer, or close)
        finally:
            reading.cancel()
        if sending is None:
            return response, True
        if not sending.done():
            sending.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError, ValueError):
                await sending
            return response, False
        return response, not sending.cancelled() and sending.exception() is None

    async def final_head(self, request: http1.Head, upstream: Conn) -> http1.Head:
        """Response heads up to the final one; interim (1xx) ones go to HTTP/1.1 clients."""
        while True:
            raw = await upstream.read_head()
            try:
                response = http1.parse_response_head(raw)
            except http1.ParseError:
                upstream.unread(raw)
                raise
            if response.status >= 200 or response.status == 101:
                return response
            if request.minor >= 1:
                await self.client.send(raw)


def _discard(task: asyncio.Task[None]) -> None:
    """Cancel ``task``; an exception it already ended with is ours to drop, not asyncio's to log."""
    if task.done() and not task.cancelled():
        task.exception()
    task.cancel()

"""The development server: 127.0.0.1:PORT forwarded to the published sockets.

This is the one place traffic flows through the daemon, and it is for a developer's
machine, not production (use nginx there). Connections go round-robin over the
published symlinks; the kernel resolves each symlink at connect time, exactly as nginx
does, so restarts behave as they will in production.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("sockherd")

_CHUNK = 64 * 1024


class DevServer:
    def __init__(self, port: int, published: Callable[[], list[Path]], host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = port
        self._published = published
        self._counter = itertools.count()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        log.info("dev server on http://%s:%d/ (not for production: put nginx in front instead)", self.host, self.port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _connect_upstream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        paths = self._published()
        if not paths:
            return None
        start = next(self._counter)
        for offset in range(len(paths)):
            path = paths[(start + offset) % len(paths)]
            try:
                return await asyncio.open_unix_connection(str(path))
            except OSError:
                continue  # like proxy_next_upstream error: try the next worker
        return None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            upstream = await self._connect_upstream()
            if upstream is None:
                body = b"no worker is online\n"
                writer.write(
                    b"HTTP/1.1 502 Bad Gateway\r\ncontent-type: text/plain\r\nconnection: close\r\n"
                    + f"content-length: {len(body)}\r\n\r\n".encode()
                    + body
                )
                return
            up_reader, up_writer = upstream
            try:
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
        except (ConnectionError, OSError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()

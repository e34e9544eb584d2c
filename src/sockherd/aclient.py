"""An asyncio IPC client, for users' own tools: ``from sockherd.client import AsyncClient``.

    async with AsyncClient("/run/app/sockherd.ipc") as daemon:
        print((await daemon.call("status"))["workers"])
        await daemon.call("restart", on_progress=print)
        async for reply in daemon.send_request("stats", workers="!0"):
            print(reply.worker["index"], reply.data or reply.error)

One connection carries any number of requests at once (the daemon answers each by id);
a reader task hands every reply to the request it answers. It speaks exactly what the
blocking :class:`sockherd.client.Client` speaks (the CLI uses that one: it starts
faster without asyncio) and raises the same exceptions.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from sockherd import protocol
from sockherd.client import CONNECT_TIMEOUT, CommandFailed, DaemonUnreachable, settle
from sockherd.messages import Reply, RequestFailed, replies_of
from sockherd.protocol import Message, ProtocolError

__all__ = ["AsyncClient", "RequestFailed"]

_LOST = object()


class AsyncClient:
    def __init__(self, ipc_path: str | os.PathLike[str], *, timeout: float | None = None) -> None:
        self.ipc_path = Path(ipc_path)
        self.timeout = timeout  # per reply while waiting; None waits as long as the daemon works
        self.daemon_info: dict[str, Any] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Queue[Message | object]] = {}
        self._ids = itertools.count(1)

    async def __aenter__(self) -> AsyncClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object | TracebackType | None) -> None:
        await self.close()

    async def connect(self) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(str(self.ipc_path), limit=protocol.MAX_FRAME), CONNECT_TIMEOUT
            )
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonUnreachable(f"no sockherd daemon is listening on {self.ipc_path} ({exc.strerror})") from None
        except PermissionError:
            raise DaemonUnreachable(f"{self.ipc_path}: permission denied (the daemon runs as another user)") from None
        except TimeoutError:
            raise DaemonUnreachable(f"the daemon on {self.ipc_path} did not accept within {CONNECT_TIMEOUT}s") from None
        self._writer = writer
        self._reader_task = asyncio.create_task(self._read(reader), name="sockherd-client-reader")
        hello = {"role": protocol.ROLE_CLIENT, "pid": os.getpid(), "version": protocol.PROTOCOL_VERSION}
        try:
            self.daemon_info = await self.call("hello", hello, timeout=CONNECT_TIMEOUT)
        except (CommandFailed, DaemonUnreachable):
            await self.close()
            raise

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = None
        if self._reader_task is not None:
            self._reader_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader_task
            self._reader_task = None

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while (frame := await protocol.read_frame(reader)) is not None:
                msg = protocol.decode(frame)
                if msg.is_reply and isinstance(msg.request_id, int) and msg.request_id in self._waiting:
                    self._waiting[msg.request_id].put_nowait(msg)
        except (ProtocolError, OSError):
            pass
        finally:
            for queue in self._waiting.values():
                queue.put_nowait(_LOST)

    async def request(
        self,
        type_: str,
        data: Any = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - per reply, as Client.request
    ) -> AsyncIterator[Message]:
        """Send a request and yield its replies; the last one has ``done`` set."""
        if self._writer is None:
            await self.connect()
        assert self._writer is not None
        request_id = next(self._ids)
        queue: asyncio.Queue[Message | object] = asyncio.Queue()
        self._waiting[request_id] = queue
        try:
            self._writer.write(protocol.message(type_, data, id=request_id))
            await self._writer.drain()
            wait = timeout if timeout is not None else self.timeout
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), wait)
                except TimeoutError:
                    raise DaemonUnreachable(f"the daemon did not answer within {wait}s") from None
                if item is _LOST:
                    raise DaemonUnreachable("the daemon closed the connection")
                assert isinstance(item, Message)
                yield item
                if item.done:
                    return
        except OSError as exc:
            raise DaemonUnreachable(f"could not send to the daemon: {exc}") from None
        finally:
            self._waiting.pop(request_id, None)

    async def call(
        self,
        type_: str,
        data: Any = None,
        *,
        on_progress: Callable[[str], None] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - per reply, as Client.call
    ) -> Any:
        """Send a request and return the final reply's data; errors raise CommandFailed."""
        async for reply in self.request(type_, data, timeout=timeout):
            if settle(reply, on_progress):
                return reply.data
        raise DaemonUnreachable("the daemon ended the answer early")  # pragma: no cover

    async def send_message(self, name: str, data: Any = None, *, workers: str | None = None) -> list[dict[str, Any]]:
        """``send-msg``: the workers it was delivered to (CommandFailed names the others)."""
        result = await self.call("send-msg", {"workers": workers, "name": name, "data": data})
        sent = result.get("sent", []) if isinstance(result, dict) else []
        return [w for w in sent if isinstance(w, dict)]

    async def send_request(
        self,
        name: str,
        data: Any = None,
        *,
        workers: str | None = None,
        timeout: float = 30.0,  # noqa: ASYNC109 - the workers' deadline, enforced by the daemon per worker
    ) -> AsyncIterator[Reply]:
        """``send-req``: every reply as it streams in; RequestFailed if refused as a whole."""
        async for msg in self.request(
            "send-req", {"workers": workers, "name": name, "data": data, "timeout": timeout}, timeout=timeout + 10
        ):
            for reply in replies_of(iter([msg])):  # one frame at a time: streamed, never collected
                yield reply

"""The daemon's IPC server: owner-only, credential-checked, hostile-input-proof.

Every byte on this socket is untrusted. A malformed or oversized frame closes that one
connection; an unknown request gets an error reply; nothing a peer sends can raise out
of here, and no peer can make the daemon buffer without bound (frames are capped,
in-flight requests per connection are capped, and a peer that stops reading its
replies is dropped).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from sockherd import protocol
from sockherd._nofollow import chmod_socket
from sockherd.protocol import Message, ProtocolError

log = logging.getLogger("sockherd")

MAX_CONNECTIONS = 1024
# Held back for root when another uid (the daemon's own) floods: `sudo sockherd status`
# always gets in.
ROOT_RESERVE = 128
# Connections that have not said hello yet, per uid: past this, the oldest is dropped
# (never the newcomer, who will most likely say hello at once). This, times MAX_FRAME,
# bounds what an unauthenticated flood can make the daemon buffer.
MAX_PENDING_PER_UID = 32
HELLO_TIMEOUT = 5.0  # seconds from accept to a hello
HELLO_GRACE = 1.0  # a connection silent for less is never dropped to make room
MAX_INFLIGHT_PER_CONNECTION = 32
MAX_UNREAD_REPLY_BYTES = 256 << 10  # plus one frame: what a peer that stops reading can pin


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, as the kernel saw it connect."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", creds)
    return pid, uid, gid


class Connection:
    """One peer. ``role`` and ``worker_id`` are set by a successful hello."""

    def __init__(self, writer: asyncio.StreamWriter, pid: int, uid: int) -> None:
        self._writer = writer
        self.pid = pid
        self.uid = uid
        self.role: str | None = None
        self.worker_id: str | None = None
        self.opened_at = asyncio.get_running_loop().time()
        self.tasks: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"<Connection pid={self.pid} role={self.role}>"

    @property
    def is_open(self) -> bool:
        return not self._writer.is_closing()

    def send(self, frame: bytes) -> None:
        if self._writer.is_closing():
            return
        if self._writer.transport.get_write_buffer_size() > MAX_UNREAD_REPLY_BYTES:
            log.warning("IPC: pid %d does not read its replies; dropping the connection", self.pid)
            self.abort()
            return
        self._writer.write(frame)

    def reply(
        self, request_id: int | str, data: Any = None, *, errors: list[str] | None = None, done: bool = True
    ) -> None:
        """Never raises: an operation must not stop halfway because its answer cannot be sent."""
        try:
            frame = protocol.reply(request_id, data, errors=errors, done=done)
        except ProtocolError as exc:  # a reply too large to frame: say so instead
            frame = protocol.reply(request_id, errors=[str(exc)])
        except Exception:
            log.exception("IPC: cannot encode a reply for pid %d; dropping the connection", self.pid)
            self.abort()
            return
        self.send(frame)

    def close(self) -> None:
        self._writer.close()

    def abort(self) -> None:
        """Drop the connection now, with whatever it had buffered (a peer that stopped reading)."""
        self._writer.transport.abort()

    def fileno(self) -> int:
        """The connection's descriptor, for handing across exec (``restart --upgrade``)."""
        fd: int = self._writer.get_extra_info("socket").fileno()
        return fd

    async def writable(self, seconds: float) -> bool:
        """Wait until what this peer has not read yet is below the transport's high-water
        mark (64 KiB). A stream of replies forwarded to it (send-req) waits here, which
        stops the daemon reading the worker that sends them: backpressure end to end. A
        peer that reads nothing for ``seconds`` is dropped; False then."""
        if self._writer.is_closing():
            return False
        try:
            await asyncio.wait_for(self._writer.drain(), seconds)
        except TimeoutError:
            log.warning("IPC: pid %d does not read its replies; dropping the connection", self.pid)
            self.abort()
            return False
        except ConnectionError:
            return False
        return True

    async def drained(self, seconds: float) -> bool:
        """Wait until everything written so far has left for the peer (or ``seconds`` pass)."""
        self._writer.transport.set_write_buffer_limits(high=0)  # drain() now waits for empty
        try:
            await asyncio.wait_for(self._writer.drain(), seconds)
        except (TimeoutError, ConnectionError):
            return False
        return True


MessageHandler = Callable[[Connection, Message], Awaitable[None]]


class IpcServer:
    def __init__(
        self,
        path: Path,
        on_message: MessageHandler,
        on_disconnect: Callable[[Connection], None],
        *,
        sock: socket.socket | None = None,
    ) -> None:
        self.path = path
        self._on_message = on_message
        self._on_disconnect = on_disconnect
        self._sock = sock
        self._server: asyncio.Server | None = None
        self.connections: set[Connection] = set()
        self._handlers: set[asyncio.Task[Any]] = set()

    @property
    def listening_socket(self) -> socket.socket | None:
        return self._sock

    async def start(self) -> None:
        if self._sock is None:
            self._sock = bind_private_unix_socket(self.path)
        self._server = await asyncio.start_unix_server(self._serve, sock=self._sock, limit=protocol.MAX_FRAME)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
        # Let each connection's reader see EOF and end normally: a handler task still
        # pending when the loop closes is cancelled, and asyncio logs that as an error.
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=1.0)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    async def resume_connection(self, sock: socket.socket) -> Connection | None:
        """A client's connection inherited across exec (``restart --upgrade``): it said
        hello to the image before this one, and waits for the answer to its request."""
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=protocol.MAX_FRAME)
        resumed: asyncio.Future[Connection | None] = asyncio.get_running_loop().create_future()
        asyncio.create_task(self._serve(reader, writer, role=protocol.ROLE_CLIENT, resumed=resumed))  # noqa: RUF006
        return await resumed

    async def _serve(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        role: str | None = None,
        resumed: asyncio.Future[Connection | None] | None = None,
    ) -> None:
        if resumed is not None:  # whatever happens below, the caller gets an answer
            self._resolve_on_exit(resumed)
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)
        sock: socket.socket = writer.get_extra_info("socket")
        try:
            pid, uid, _ = peer_credentials(sock)
        except OSError:
            writer.close()
            return
        if uid not in (os.getuid(), 0):
            log.warning("IPC: refused a connection from uid %d (pid %d): not this daemon's user", uid, pid)
            writer.close()
            return
        if not self._admit(uid, pid):
            writer.transport.abort()
            return
        conn = Connection(writer, pid, uid)
        conn.role = role
        self.connections.add(conn)
        if resumed is not None and not resumed.done():
            resumed.set_result(conn)
        try:
            await self._read_loop(reader, conn)
        except ProtocolError as exc:
            log.warning("IPC: closing the connection of pid %d: %s", pid, exc)
        except (ConnectionError, OSError):
            pass
        finally:
            self.connections.discard(conn)
            self._on_disconnect(conn)
            writer.close()

    def _admit(self, uid: int, pid: int) -> bool:
        """Room for one more connection from ``uid``? May drop silent ones to make it.

        At the limits, the oldest connection that has not said hello makes room (a
        flood of idle connections never locks a real client out). Below them, a uid
        keeps at most MAX_PENDING_PER_UID connections that have been silent for longer
        than HELLO_GRACE: a herd of workers connecting at once says hello within
        milliseconds and is never thinned.
        """
        now = asyncio.get_running_loop().time()
        silent = sorted((c for c in self.connections if c.role is None), key=lambda c: c.opened_at)
        mine = [c for c in self.connections if c.uid == uid]
        if len(self.connections) >= MAX_CONNECTIONS or (uid != 0 and len(mine) >= MAX_CONNECTIONS - ROOT_RESERVE):
            victims = [c for c in silent if uid in (0, c.uid)]
            if not victims:
                log.warning(
                    "IPC: %d connections open (%d of uid %d); refusing pid %d",
                    len(self.connections),
                    len(mine),
                    uid,
                    pid,
                )
                return False
            self._drop(victims[0], "to make room")
        stale = [c for c in silent if c.uid == uid and now - c.opened_at > HELLO_GRACE and c in self.connections]
        if len(stale) >= MAX_PENDING_PER_UID:
            self._drop(stale[0], f"{len(stale)} of uid {uid} silent for over {HELLO_GRACE:g}s")
        return True

    def _drop(self, conn: Connection, why: str) -> None:
        log.warning("IPC: dropping a silent connection of pid %d (%s)", conn.pid, why)
        conn.abort()
        self.connections.discard(conn)

    @staticmethod
    def _resolve_on_exit(resumed: asyncio.Future[Connection | None]) -> None:
        def resolve(_: object) -> None:
            if not resumed.done():
                resumed.set_result(None)

        task = asyncio.current_task()
        if task is not None:
            task.add_done_callback(resolve)

    async def _read_loop(self, reader: asyncio.StreamReader, conn: Connection) -> None:
        while (frame := await self._next_frame(reader, conn)) is not None:
            msg = protocol.decode(frame)
            if conn.role is None or msg.id is None:
                # hello and one-way messages are handled in order, before the next frame
                await self._handle(conn, msg)
                continue
            if len(conn.tasks) >= MAX_INFLIGHT_PER_CONNECTION:
                raise ProtocolError(f"more than {MAX_INFLIGHT_PER_CONNECTION} requests in flight")
            task = asyncio.create_task(self._handle(conn, msg))
            conn.tasks.add(task)
            task.add_done_callback(conn.tasks.discard)
            # Let it start before the next frame is read: a quick request (status) is done
            # by then, so only requests really in progress count against the cap, and a
            # client that pipelines many small ones is not cut off for it.
            await asyncio.sleep(0)

    @staticmethod
    async def _next_frame(reader: asyncio.StreamReader, conn: Connection) -> bytes | None:
        if conn.role is not None:
            return await protocol.read_frame(reader)
        try:
            async with asyncio.timeout_at(conn.opened_at + HELLO_TIMEOUT):
                return await protocol.read_frame(reader)
        except TimeoutError:
            raise ProtocolError(f"no hello within {HELLO_TIMEOUT:g}s") from None

    async def _handle(self, conn: Connection, msg: Message) -> None:
        try:
            await self._on_message(conn, msg)
        except ProtocolError:
            raise
        except Exception as exc:  # a bug in a handler must not take the daemon down
            log.exception("IPC: handling %r from pid %d failed", msg.type, conn.pid)
            if msg.id is not None:
                conn.reply(msg.id, errors=[f"internal error handling {msg.type!r}: {exc}"])


def bind_private_unix_socket(path: Path) -> socket.socket:
    """A listening socket only its owner can connect to, with no window where it is wider."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        sock.bind(str(path))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    chmod_socket(path, 0o600)
    sock.listen(128)
    sock.setblocking(False)
    return sock

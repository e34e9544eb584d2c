"""A blocking IPC client for the CLI and for users' own scripts.

with Client("/run/app/sockherd.ipc") as daemon:
    daemon.call("restart", on_progress=print)
    print(daemon.call("status")["workers"])
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from sockherd import protocol
from sockherd.messages import Reply, RequestFailed, replies_of
from sockherd.protocol import FrameBuffer, Message, ProtocolError

if TYPE_CHECKING:
    from sockherd.aclient import AsyncClient

__all__ = ["AsyncClient", "Client", "CommandFailed", "DaemonUnreachable", "Reply", "RequestFailed"]


def __getattr__(name: str) -> object:
    # AsyncClient lives in its own module so that the CLI, which uses Client, never
    # imports asyncio (it would add to every command's start-up).
    if name == "AsyncClient":
        from sockherd.aclient import AsyncClient

        return AsyncClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


CONNECT_TIMEOUT = 5.0


class DaemonUnreachable(Exception):
    """No daemon answers on the IPC socket."""


class CommandFailed(Exception):
    """The daemon answered with errors."""

    def __init__(self, errors: tuple[str, ...], data: Any = None) -> None:
        super().__init__("; ".join(errors))
        self.errors = errors
        self.data = data


def settle(reply: Message, on_progress: Callable[[str], None] | None) -> bool:
    """One reply of a call: errors raise CommandFailed, progress goes to ``on_progress``;
    True when it is the final reply (its ``data`` is the answer)."""
    if reply.errors:
        raise CommandFailed(reply.errors, reply.data)
    if reply.done:
        return True
    if on_progress is not None and isinstance(reply.data, dict) and "progress" in reply.data:
        on_progress(str(reply.data["progress"]))
    return False


class Client:
    def __init__(self, ipc_path: str | os.PathLike[str], *, timeout: float | None = None) -> None:
        self.ipc_path = Path(ipc_path)
        self.timeout = timeout  # per read while waiting for replies; None waits as long as the daemon works
        self._sock: socket.socket | None = None
        self._frames = FrameBuffer()
        self._pending: list[bytes] = []
        self._ids = itertools.count(1)
        self.daemon_info: dict[str, Any] = {}
        self.last_outcome: list[dict[str, Any]] = []  # of the last send_request

    def __enter__(self) -> Client:
        if self._sock is None:
            self.connect()
        return self

    def __exit__(self, *exc: object | TracebackType | None) -> None:
        self.close()

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            sock.connect(str(self.ipc_path))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            sock.close()
            raise DaemonUnreachable(f"no sockherd daemon is listening on {self.ipc_path} ({exc.strerror})") from None
        except PermissionError:
            sock.close()
            raise DaemonUnreachable(f"{self.ipc_path}: permission denied (the daemon runs as another user)") from None
        except TimeoutError:
            sock.close()
            raise DaemonUnreachable(f"the daemon on {self.ipc_path} did not accept within {CONNECT_TIMEOUT}s") from None
        self._sock = sock
        hello = {"role": protocol.ROLE_CLIENT, "pid": os.getpid(), "version": protocol.PROTOCOL_VERSION}
        try:
            self.daemon_info = self.call("hello", hello, timeout=CONNECT_TIMEOUT)
        except (CommandFailed, DaemonUnreachable):
            self.close()
            raise

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _read_frame(self, timeout: float | None) -> bytes:
        assert self._sock is not None
        self._sock.settimeout(timeout)
        while not self._pending:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                raise DaemonUnreachable(f"the daemon did not answer within {timeout}s") from None
            except ConnectionError as exc:
                raise DaemonUnreachable(f"the daemon closed the connection ({exc.strerror})") from None
            if not data:
                raise DaemonUnreachable("the daemon closed the connection")
            self._pending.extend(self._frames.feed(data))
        return self._pending.pop(0)

    def request(self, type_: str, data: Any = None, *, timeout: float | None = None) -> Iterator[Message]:
        """Send a request and yield its replies; the last one has ``done`` set."""
        if self._sock is None:
            self.connect()
        assert self._sock is not None
        request_id = next(self._ids)
        self._sock.settimeout(CONNECT_TIMEOUT)
        try:
            self._sock.sendall(protocol.message(type_, data, id=request_id))
        except OSError as exc:
            raise DaemonUnreachable(f"could not send to the daemon: {exc}") from None
        while True:
            try:
                msg = protocol.decode(self._read_frame(timeout if timeout is not None else self.timeout))
            except ProtocolError as exc:
                raise DaemonUnreachable(f"the daemon sent something this client cannot read: {exc}") from None
            if not msg.is_reply or msg.request_id != request_id:
                continue  # not ours (nothing else is sent to clients today)
            yield msg
            if msg.done:
                return

    def call(
        self,
        type_: str,
        data: Any = None,
        *,
        on_progress: Callable[[str], None] | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Send a request and return the final reply's data; errors raise CommandFailed."""
        for reply in self.request(type_, data, timeout=timeout):
            if settle(reply, on_progress):
                return reply.data
        raise DaemonUnreachable("the daemon ended the answer early")  # pragma: no cover

    # -- messaging -------------------------------------------------------------------

    def send_message(self, name: str, data: Any = None, *, workers: str | None = None) -> list[dict[str, Any]]:
        """``send-msg``: the workers it was delivered to. CommandFailed names those it was
        not (its ``data["sent"]`` still lists the others)."""
        result = self.call("send-msg", {"workers": workers, "name": name, "data": data})
        sent = result.get("sent", []) if isinstance(result, dict) else []
        return [w for w in sent if isinstance(w, dict)]

    def send_request(
        self, name: str, data: Any = None, *, workers: str | None = None, timeout: float = 30.0
    ) -> Iterator[Reply]:
        """``send-req``: every reply as it streams in (``Reply.worker``, ``.data`` or
        ``.error``). Afterwards :attr:`last_outcome` lists every selected worker's outcome.
        RequestFailed when the daemon refuses the request as a whole (no worker matches)."""
        self.last_outcome = []
        frames = self.request(
            "send-req", {"workers": workers, "name": name, "data": data, "timeout": timeout}, timeout=timeout + 10
        )
        return replies_of(frames, self.last_outcome)

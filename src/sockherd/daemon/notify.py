"""The sd_notify endpoint: workers that speak systemd's protocol report ready here.

One datagram socket for the whole herd (``NOTIFY_SOCKET``). The kernel attaches the
sender's credentials (SO_PASSCRED), so a datagram is attributed to a worker by pid and
cannot be forged by another process.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("sockherd")

_MAX_DATAGRAM = 4096
_CREDS = struct.Struct("3i")


def parse_notify(payload: bytes) -> dict[str, str]:
    """``READY=1\\nSTATUS=…`` → {"READY": "1", "STATUS": "…"}; junk lines are skipped."""
    fields: dict[str, str] = {}
    for line in payload.decode(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key:
            fields[key] = value
    return fields


class NotifySocket:
    def __init__(
        self, path: Path, on_notify: Callable[[int, dict[str, str]], None], *, sock: socket.socket | None = None
    ) -> None:
        self.path = path
        self._on_notify = on_notify
        self._sock: socket.socket | None = None
        self._inherited = sock  # across an upgrade's exec: already bound, SO_PASSCRED set

    @property
    def datagram_socket(self) -> socket.socket | None:
        return self._sock

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._inherited is not None:
            self._sock, self._inherited = self._inherited, None
            self._sock.setblocking(False)
            loop.add_reader(self._sock.fileno(), self._read)
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        old_umask = os.umask(0o177)
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        sock.setblocking(False)
        self._sock = sock
        loop.add_reader(sock.fileno(), self._read)

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._sock is not None:
            loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _read(self) -> None:
        assert self._sock is not None
        while True:
            try:
                data, ancdata, _, _ = self._sock.recvmsg(_MAX_DATAGRAM, socket.CMSG_SPACE(_CREDS.size) + 256)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("notify socket: %s", exc)
                return
            pid = None
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(payload) >= _CREDS.size:
                    pid, _, _ = _CREDS.unpack_from(payload)
                elif level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    _close_passed_fds(payload)  # FDSTORE is not supported; never leak them
            if pid is None:
                continue
            self._on_notify(pid, parse_notify(data))


def _close_passed_fds(payload: bytes) -> None:
    fds = array.array("i")
    fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)

"""Listen queues as the kernel sees them: how many connections wait, and the backlog.

For UNIX sockets through sock_diag netlink (what ``ss -xl`` reads): one dump of every
listening UNIX socket gives, per socket, its inode, its path, the connections queued
in it now (``udiag_rqueue``) and its backlog (``udiag_wqueue``). For a TCP listener the
daemon holds, ``TCP_INFO`` says the same (``tcpi_unacked``, ``tcpi_sacked``).

Used for the metrics in ``status``, the warning about a worker that listens with a
backlog far below ``backlog``, and the adaptive linger: an old worker's shutdown starts
once its queue, which no new connection can reach after the symlink moved, is empty.
Stdlib only; on a kernel without the module every query answers "unknown" (None).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct
from dataclasses import dataclass

NETLINK_SOCK_DIAG = 4
SOCK_DIAG_BY_FAMILY = 20
NLM_F_REQUEST = 0x1
NLM_F_DUMP = 0x300
NLMSG_ERROR = 2
NLMSG_DONE = 3
TCP_LISTEN = 10
UDIAG_SHOW_NAME = 0x01
UDIAG_SHOW_RQLEN = 0x10
UNIX_DIAG_NAME = 0
UNIX_DIAG_RQLEN = 4

_NLMSGHDR = struct.Struct("=IHHII")
_REQUEST = struct.Struct("=BBHIIIII")  # family, protocol, pad, states, ino, show, cookie[2]
_MSG = struct.Struct("=BBBBIII")  # family, type, state, pad, ino, cookie[2]
_ATTR = struct.Struct("=HH")


@dataclass(frozen=True, slots=True)
class ListenQueue:
    inode: int
    path: str | None
    queued: int  # connections waiting to be accepted, now
    backlog: int  # the most that can wait (listen()'s argument, capped by somaxconn)


def unix_listen_queues() -> list[ListenQueue] | None:
    """Every listening UNIX socket on the host (in this network namespace); None if unknown."""
    try:
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as nl:
            nl.settimeout(2.0)
            body = _REQUEST.pack(
                socket.AF_UNIX, 0, 0, 1 << TCP_LISTEN, 0, UDIAG_SHOW_NAME | UDIAG_SHOW_RQLEN, 0xFFFFFFFF, 0xFFFFFFFF
            )
            header = _NLMSGHDR.pack(_NLMSGHDR.size + len(body), SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
            nl.sendto(header + body, (0, 0))
            return _read_dump(nl)
    except OSError:
        return None


def _read_dump(nl: socket.socket) -> list[ListenQueue] | None:
    found: list[ListenQueue] = []
    while True:
        data = nl.recv(1 << 16)
        offset = 0
        while offset + _NLMSGHDR.size <= len(data):
            length, kind, _, _, _ = _NLMSGHDR.unpack_from(data, offset)
            if length < _NLMSGHDR.size:
                return found
            if kind == NLMSG_DONE:
                return found
            if kind == NLMSG_ERROR:
                return None
            if kind == SOCK_DIAG_BY_FAMILY:
                parsed = _parse_message(data[offset + _NLMSGHDR.size : offset + length])
                if parsed is not None:
                    found.append(parsed)
            offset += (length + 3) & ~3


def _parse_message(payload: bytes) -> ListenQueue | None:
    if len(payload) < _MSG.size:
        return None
    _, _, _, _, inode, _, _ = _MSG.unpack_from(payload)
    path: str | None = None
    queued = backlog = None
    offset = _MSG.size
    while offset + _ATTR.size <= len(payload):
        length, kind = _ATTR.unpack_from(payload, offset)
        if length < _ATTR.size:
            break
        value = payload[offset + _ATTR.size : offset + length]
        if kind == UNIX_DIAG_NAME and value and not value.startswith(b"\0"):
            path = os.fsdecode(value.rstrip(b"\0"))
        elif kind == UNIX_DIAG_RQLEN and len(value) >= 8:
            queued, backlog = struct.unpack_from("=II", value)
        offset += (length + 3) & ~3
    if queued is None or backlog is None:
        return None
    return ListenQueue(inode, path, queued, backlog)


def tcp_listen_queue(sock: socket.socket) -> tuple[int, int] | None:
    """(queued, backlog) of a listening TCP socket this process holds; None if unknown."""
    with contextlib.suppress(OSError):
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
        # struct tcp_info: 8 one-byte fields, then __u32 rto, ato, snd_mss, rcv_mss,
        # unacked, sacked, …: for a listener, unacked is the accept queue, sacked the backlog.
        unacked, sacked = struct.unpack_from("=II", info, 8 + 4 * 4)
        return unacked, sacked
    return None


LINGER_QUIET = 0.01  # an empty queue for this long: nothing nginx began before the rename is left
LINGER_POLL = 0.002


async def linger(paths: list[str], limit: float) -> tuple[float, bool]:
    """The adaptive linger before old workers stop: return once the listen queue of every
    socket at ``paths`` has been seen empty for ``LINGER_QUIET`` (or is gone), at most
    ``limit`` seconds: (the seconds waited, whether the queues were seen empty). Without
    sock_diag it waits ``limit``, as before, and cannot say.

    After the symlinks moved, a connection can reach an old socket only if nginx
    resolved the link just before the rename; such a connect completes in microseconds
    and then waits in the queue. So once the queues stay empty, the stop signal cannot
    reset anything, even for a server that closes its listener at once (the ``shutdown``
    message says so: ``backlog_drained``, and sockherd's own servers then skip their
    own wait for a quiet backlog).
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + limit
    wanted = set(paths)
    empty_since: float | None = None
    drained = False
    while (now := loop.time()) < deadline:
        queues = unix_listen_queues()
        if queues is None:  # no sock_diag: the fixed wait
            await asyncio.sleep(deadline - now)
            break
        busy = any(q.queued for q in queues if q.path in wanted)
        if busy:
            empty_since = None
        elif empty_since is None:
            empty_since = now
        elif now - empty_since >= LINGER_QUIET:
            drained = True
            break
        await asyncio.sleep(LINGER_POLL)
    return loop.time() - start, drained


__all__ = ["ListenQueue", "linger", "tcp_listen_queue", "unix_listen_queues"]

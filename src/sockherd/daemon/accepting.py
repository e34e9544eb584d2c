"""Is a process waiting for connections on a shared listener? (``ready = "socket"``)

With per-worker sockets, "ready" for a server that never reports is "its socket accepts
a connection". A shared listener accepts from the moment the daemon binds it, so that
probe says nothing about a new worker. What the kernel does show, for the worker and
every process below it (a server's own workers):

- an **epoll** instance watching the listener (``/proc/PID/fdinfo`` lists each watched
  descriptor with its inode): asyncio, uvloop, libuv, Go, most servers wait this way;
- a thread **blocked in accept()/accept4()** on it (``/proc/PID/task/TID/syscall``
  names the call and its first argument, the descriptor).

A server that waits in ``poll``/``select`` is not seen (its descriptor list is in its own
memory): such a server needs sd_notify ``READY=1``, as gunicorn sends. This is what
the docs promise for ``ready = "socket"`` with ``listen``: the worker has started
waiting for connections, not that its application has finished loading whatever it
loads lazily.
"""

from __future__ import annotations

import contextlib
import os
import platform

import psutil


def waits_for_connections(pid: int, inodes: frozenset[int]) -> bool:
    """True when ``pid`` or a descendant watches or blocks on a listener with one of ``inodes``."""
    try:
        family = [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except psutil.Error:
        return False
    return any(_process_waits(p, inodes) for p in family)


def _process_waits(pid: int, inodes: frozenset[int]) -> bool:
    sockets: dict[int, int] = {}  # fd -> socket inode
    epolls: list[int] = []
    with contextlib.suppress(OSError):
        for entry in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{entry}")
                if target.startswith("socket:["):
                    sockets[int(entry)] = int(target[8:-1])
                elif target == "anon_inode:[eventpoll]":
                    epolls.append(int(entry))
    if not any(inode in inodes for inode in sockets.values()):
        return False  # it does not even hold the listener
    return any(_epoll_watches(pid, fd, inodes) for fd in epolls) or _blocked_in_accept(pid, sockets, inodes)


def _epoll_watches(pid: int, epoll_fd: int, inodes: frozenset[int]) -> bool:
    try:
        with open(f"/proc/{pid}/fdinfo/{epoll_fd}") as f:
            info = f.read()
    except OSError:
        return False
    for line in info.splitlines():
        if not line.startswith("tfd:"):
            continue
        # "tfd:        7 events:       19 data:     7fa600000007  pos:0 ino:4a2c6a sdev:9"
        for field in line.split():
            if field.startswith("ino:"):
                with contextlib.suppress(ValueError):
                    if int(field[4:], 16) in inodes:
                        return True
    return False


def _blocked_in_accept(pid: int, sockets: dict[int, int], inodes: frozenset[int]) -> bool:
    calls = _accept_calls()
    if not calls:
        return False
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return False
    for tid in threads:
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as f:
                fields = f.read().split()
        except OSError:
            continue
        with contextlib.suppress(ValueError, IndexError):
            if int(fields[0]) in calls and sockets.get(int(fields[1], 16)) in inodes:
                return True
    return False


def _accept_calls() -> frozenset[int]:
    return _ACCEPT_BY_MACHINE.get(platform.machine(), frozenset())


# accept(2) and accept4(2), per architecture (the syscall table is not shared).
_ACCEPT_BY_MACHINE: dict[str, frozenset[int]] = {
    "x86_64": frozenset({43, 288}),
    "aarch64": frozenset({202, 242}),
    "riscv64": frozenset({202, 242}),
    "ppc64le": frozenset({330, 344}),
    "s390x": frozenset({364}),
}

__all__ = ["waits_for_connections"]

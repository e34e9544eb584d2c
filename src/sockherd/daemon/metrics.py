"""Resource figures for ``status``: each worker's memory, CPU, age and listen queue.

Read when ``status`` asks, never sampled in the background (an idle daemon stays at 0 %
CPU). ``cpu`` is the percentage of one core used since the previous ``status`` (at
most the last minute), the worker's lifetime average the first time; a worker's figures
include the processes below it (a pre-fork server's own workers).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time

from sockherd.daemon.reaper import stat_fields
from sockherd.daemon.sockdiag import ListenQueue, tcp_listen_queue, unix_listen_queues

RECENT = 60.0  # seconds a previous CPU sample stays the reference
LOW_BACKLOG = 128  # below this (and far below what was asked), a burst overflows the queue


def backlog_problem(label: str, found: int, wanted: int) -> str | None:
    """What to say about a worker socket listening with a backlog far below ``backlog``."""
    if found >= LOW_BACKLOG or found * 4 >= wanted:
        return None
    return (
        f"{label} listens with a backlog of {found}, far below backlog = {wanted}: a burst of connections "
        "(a restart, a cold start) overflows it and nginx fails them at once (connect() error 11); pass the "
        "backlog to the server: uvicorn --backlog $SOCKHERD_BACKLOG, gunicorn --backlog, "
        "socketserver's request_queue_size, or use the library's bind_socket()"
    )


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


class Sampler:
    """CPU percentages between two ``status`` requests, per process.

    Figures come straight from ``/proc/PID/stat`` and a worker's descendants from
    ``/proc/PID/task/TID/children``: each costs a few reads of the worker's own files,
    where psutil's ``children()`` reads every process on the host, once per worker.
    """

    def __init__(self) -> None:
        self._last: dict[int, tuple[int, float, float]] = {}  # pid -> (start time, cpu seconds, when)
        self._seen: set[int] = set()

    def usage(self, pid: int | None) -> tuple[int, float]:
        """(rss bytes, cpu percent) of ``pid`` and every process below it."""
        if pid is None:
            return 0, 0.0
        rss, cpu = 0, 0.0
        now = time.time()
        uptime = _uptime()
        for member in _family(pid):
            stat = _stat(member)
            if stat is None:
                continue  # gone meanwhile
            started, spent, pages = stat
            rss += pages * _PAGE_SIZE
            cpu += self._percent(member, started, spent, now, uptime)
        return rss, round(cpu, 1)

    def _percent(self, pid: int, started: int, spent: float, now: float, uptime: float | None) -> float:
        self._seen.add(pid)
        last = self._last.get(pid)
        self._last[pid] = (started, spent, now)
        if last is not None and last[0] == started and now - last[2] <= RECENT and now > last[2]:
            return 100.0 * (spent - last[1]) / (now - last[2])
        if uptime is None:
            return 0.0
        return 100.0 * spent / max(uptime - started / _CLOCK_TICKS, 1e-3)  # the lifetime average

    def forget_unseen(self) -> None:
        """After a round: drop the samples of processes that are gone."""
        for pid in [p for p in self._last if p not in self._seen]:
            del self._last[pid]
        self._seen = set()


def _stat(pid: int) -> tuple[int, float, int] | None:
    """(start time in clock ticks since boot, cpu seconds, resident pages) from /proc/PID/stat."""
    fields = stat_fields(pid)  # from field 3 of proc(5): utime is 14, stime 15, starttime 22, rss 24
    if fields is None:
        return None
    try:
        utime, stime, started, pages = int(fields[11]), int(fields[12]), int(fields[19]), int(fields[21])
    except (IndexError, ValueError):
        return None
    return started, (utime + stime) / _CLOCK_TICKS, pages


def _family(pid: int) -> list[int]:
    """``pid`` and every process below it, through each thread's ``children`` file."""
    found, pending = [], [pid]
    while pending:
        current = pending.pop()
        found.append(current)
        try:
            threads = os.listdir(f"/proc/{current}/task")
        except OSError:
            continue
        for tid in threads:
            with contextlib.suppress(OSError, ValueError), open(f"/proc/{current}/task/{tid}/children", "rb") as f:
                pending.extend(int(child) for child in f.read().split())
    return found


def _uptime() -> float | None:
    try:
        with open("/proc/uptime", "rb") as f:
            return float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def queues_by_path_and_inode() -> tuple[dict[str, ListenQueue], dict[int, ListenQueue]]:
    found = unix_listen_queues() or []
    return {q.path: q for q in found if q.path}, {q.inode: q for q in found}


def listener_queue(sock: socket.socket, by_inode: dict[int, ListenQueue]) -> tuple[int, int] | None:
    """(queued, backlog) of one of the daemon's shared listeners."""
    if sock.family == socket.AF_UNIX:
        queue = by_inode.get(os.fstat(sock.fileno()).st_ino)
        return (queue.queued, queue.backlog) if queue is not None else None
    return tcp_listen_queue(sock)


__all__ = ["Sampler", "backlog_problem", "listener_queue", "queues_by_path_and_inode"]

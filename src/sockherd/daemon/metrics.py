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

import psutil

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


class Sampler:
    """CPU percentages between two ``status`` requests, per process."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[float, float, float]] = {}  # pid -> (create_time, cpu seconds, when)
        self._seen: set[int] = set()

    def usage(self, pid: int | None) -> tuple[int, float]:
        """(rss bytes, cpu percent) of ``pid`` and every process below it."""
        if pid is None:
            return 0, 0.0
        try:
            root = psutil.Process(pid)
            family = [root, *root.children(recursive=True)]
        except psutil.Error:
            return 0, 0.0
        rss, cpu = 0, 0.0
        now = time.time()
        for proc in family:
            with contextlib.suppress(psutil.Error):
                with proc.oneshot():
                    rss += proc.memory_info().rss
                    times = proc.cpu_times()
                    spent, created = times.user + times.system, proc.create_time()
                cpu += self._percent(proc.pid, created, spent, now)
        return rss, round(cpu, 1)

    def _percent(self, pid: int, created: float, spent: float, now: float) -> float:
        self._seen.add(pid)
        last = self._last.get(pid)
        self._last[pid] = (created, spent, now)
        if last is not None and last[0] == created and now - last[2] <= RECENT and now > last[2]:
            return 100.0 * (spent - last[1]) / (now - last[2])
        return 100.0 * spent / max(now - created, 1e-3)  # the lifetime average

    def forget_unseen(self) -> None:
        """After a round: drop the samples of processes that are gone."""
        for pid in [p for p in self._last if p not in self._seen]:
            del self._last[pid]
        self._seen = set()


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

"""Observe worker exits without polling.

Children are reaped on SIGCHLD with ``waitpid(-1, WNOHANG)`` in a loop: one signal may
stand for several exits, and reaping every child (known or not) keeps zombies from
piling up when the daemon runs as PID 1 or a subreaper. Unknown exits are remembered
for a while, because a worker spawned from an executor thread can exit before the loop
registers interest in it.

Processes that are not our children (adopted from a previous daemon) are watched
through a pidfd, which becomes readable when the process exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections import OrderedDict
from collections.abc import Callable

log = logging.getLogger("sockherd")

ExitCallback = Callable[[int], None]
_UNCLAIMED_LIMIT = 4096  # a whole herd starting at once


class Reaper:
    """Dispatches each child's exit code (negative: killed by that signal) once."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._callbacks: dict[int, ExitCallback] = {}
        self._unclaimed: OrderedDict[int, int] = OrderedDict()
        self._pidfds: dict[int, int] = {}

    def install(self) -> None:
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.reap()  # exits that happened before the handler was installed

    def uninstall(self) -> None:
        self._loop.remove_signal_handler(signal.SIGCHLD)
        for pid in list(self._pidfds):
            self._close_pidfd(pid)

    def watch_child(self, pid: int, callback: ExitCallback) -> None:
        if (code := self._unclaimed.pop(pid, None)) is not None:
            self._loop.call_soon(callback, code)
            return
        self._callbacks[pid] = callback

    def watch_foreign(self, pid: int, callback: ExitCallback) -> bool:
        """Watch a process that is not our child; False if it is already gone."""
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        self._pidfds[pid] = fd

        def on_readable() -> None:
            self._close_pidfd(pid)
            callback(0)  # the exit status of a non-child is not ours to read

        self._loop.add_reader(fd, on_readable)
        return True

    def _close_pidfd(self, pid: int) -> None:
        fd = self._pidfds.pop(pid, None)
        if fd is not None:
            self._loop.remove_reader(fd)
            os.close(fd)

    def reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            callback = self._callbacks.pop(pid, None)
            if callback is None:
                log.debug("reaped unknown child %d (exit %d)", pid, code)
                self._unclaimed[pid] = code
                while len(self._unclaimed) > _UNCLAIMED_LIMIT:
                    self._unclaimed.popitem(last=False)
                continue
            try:
                callback(code)
            except Exception:
                log.exception("exit handler for pid %d failed", pid)


def send_signal(pid: int, sig: int, pidfd: int | None = None) -> bool:
    """Signal a process, through its pidfd when we hold one (immune to PID reuse).

    Returns False when the process is already gone.
    """
    try:
        if pidfd is not None:
            signal.pidfd_send_signal(pidfd, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def kill_process_group(pgid: int) -> None:
    """SIGKILL what is left of a worker's session (children of a wrapper script)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)

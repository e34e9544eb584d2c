"""Observe worker exits without polling, and let no worker's process group outlive it.

On SIGCHLD every known child is peeked at with ``waitid(WNOWAIT)``: an exited leader
stays a zombie while its process group is SIGKILLed (a wrapper script's children die
with it), because the zombie's pid pins the group id and nothing else can be given that
number meanwhile. Only then is the leader reaped and its exit dispatched.

Children we do not know (orphans reparented to us as PID 1 or a subreaper, launches
abandoned mid-exec) are reaped too, so zombies never pile up, except while a launch is
in flight: its child may be among them, and it must stay unreaped until its pid is
registered (see processes.py). Exits reaped before anyone asked are remembered a while.

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
_WAIT_PEEK = os.WEXITED | os.WNOHANG | os.WNOWAIT


class Hold:
    """While any hold is active, children the reaper does not know stay unreaped."""

    def __init__(self, reaper: Reaper) -> None:
        self._reaper: Reaper | None = reaper

    def release(self) -> None:
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper._holds -= 1
            if reaper._holds == 0 and reaper.installed:
                reaper.reap()  # what waited for the hold


class Reaper:
    """Dispatches each child's exit code (negative: killed by that signal) once."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._callbacks: dict[int, ExitCallback] = {}
        self._unclaimed: OrderedDict[int, int] = OrderedDict()
        self._pidfds: dict[int, int] = {}  # adopted processes' pidfds we watch (fd -> fd)
        self._child_pidfds: dict[int, int] = {}  # our children's pidfds we watch (pid -> fd)
        self._holds = 0
        self.installed = False

    def install(self) -> None:
        self._loop.add_signal_handler(signal.SIGCHLD, self.reap)
        self.installed = True
        for pid, pidfd in self._child_pidfds.items():  # children adopted before (an upgrade's)
            self._loop.add_reader(pidfd, self._child_exited, pid)
        self.reap()  # exits that happened before the handler was installed

    def uninstall(self) -> None:
        self._loop.remove_signal_handler(signal.SIGCHLD)
        for pidfd in self._child_pidfds.values():
            self._loop.remove_reader(pidfd)  # kept: a later install() watches them again
        self.installed = False
        for pidfd in list(self._pidfds):
            self.unwatch_foreign(pidfd)

    def hold_unknown(self) -> Hold:
        self._holds += 1
        return Hold(self)

    def watch_child(self, pid: int, callback: ExitCallback, pidfd: int | None = None) -> None:
        """``callback(code)`` once child ``pid`` has exited and is reaped.

        With its ``pidfd`` the exit is seen the moment the kernel announces it: the
        pidfd becomes readable in the same pass of the event loop, where SIGCHLD goes
        through the signal handler's self-pipe and another pass (a standby's failover
        waits on this). SIGCHLD still reaps it if it comes first. The caller closes the
        pidfd only in ``callback``, after it is no longer watched.
        """
        if (code := self._unclaimed.pop(pid, None)) is not None:
            self._loop.call_soon(callback, code)
            return
        self._callbacks[pid] = callback
        if pidfd is not None:
            self._child_pidfds[pid] = pidfd
            if self.installed:
                self._loop.add_reader(pidfd, self._child_exited, pid)
        if self.installed:
            self._loop.call_soon(self.reap)  # it may have exited before we asked

    def _child_exited(self, pid: int) -> None:
        self._unwatch_child(pid)
        try:
            exited = os.waitid(os.P_PID, pid, _WAIT_PEEK)
        except ChildProcessError:  # reaped already, through SIGCHLD
            return
        if exited is not None:
            self._finish(pid)

    def _unwatch_child(self, pid: int) -> None:
        if (pidfd := self._child_pidfds.pop(pid, None)) is not None and self.installed:
            self._loop.remove_reader(pidfd)

    def watch_foreign(self, pidfd: int, callback: Callable[[], None]) -> None:
        """Watch a process that is not our child (adopted): ``callback()`` once it exits.

        Its exit status is its parent's to read, not ours. The caller owns ``pidfd`` and
        closes it only after the callback (or after :meth:`unwatch_foreign`).
        """

        def on_readable() -> None:
            self._loop.remove_reader(pidfd)
            self._pidfds.pop(pidfd, None)
            callback()

        self._pidfds[pidfd] = pidfd
        self._loop.add_reader(pidfd, on_readable)

    def unwatch_foreign(self, pidfd: int) -> None:
        if self._pidfds.pop(pidfd, None) is not None:
            self._loop.remove_reader(pidfd)

    def reap(self) -> None:
        while True:  # the common case: each exited child in turn, one syscall each
            try:
                peeked = os.waitid(os.P_ALL, 0, _WAIT_PEEK)
            except ChildProcessError:
                return
            if peeked is None:
                return
            if peeked.si_pid not in self._callbacks and self._holds:
                break  # it must wait for the hold, and it hides the children behind it
            if not self._finish(peeked.si_pid):
                return
        for pid in list(self._callbacks):  # behind a held child: ask for each known one
            try:
                exited = os.waitid(os.P_PID, pid, _WAIT_PEEK)
            except ChildProcessError:  # not ours (any more): nothing will ever report it
                self._callbacks.pop(pid, None)
                continue
            if exited is not None:
                self._finish(pid)

    def _finish(self, pid: int) -> bool:
        """``pid`` has exited and is still a zombie: kill its group, then reap it."""
        self._unwatch_child(pid)  # before the callback, which closes the pidfd
        callback = self._callbacks.pop(pid, None)
        if callback is not None:
            kill_process_group(pid)
        try:
            _, status = os.waitpid(pid, 0)  # a zombie: returns at once
        except ChildProcessError:
            return False
        code = os.waitstatus_to_exitcode(status)
        if callback is None:
            log.debug("reaped unknown child %d (exit %d)", pid, code)
            self._unclaimed[pid] = code
            while len(self._unclaimed) > _UNCLAIMED_LIMIT:
                self._unclaimed.popitem(last=False)
            return True
        try:
            callback(code)
        except Exception:
            log.exception("exit handler for pid %d failed", pid)
        return True


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
    """SIGKILL what is left of a worker's process group (children of a wrapper script)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def stat_fields(pid: int) -> list[bytes] | None:
    """/proc/PID/stat from field 3 on (the command name, field 2, may hold anything)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2 :].split()


def process_start_time(pid: int) -> int | None:
    """When the kernel started ``pid``, in clock ticks since boot (None: no such process).

    A pid can be reused; a pid together with its start time names one process for good.
    """
    fields = stat_fields(pid)
    try:
        return int(fields[19]) if fields else None  # field 22 of proc(5)
    except (IndexError, ValueError):
        return None


def process_is_zombie(pid: int) -> bool:
    fields = stat_fields(pid)
    return fields is not None and fields[:1] == [b"Z"]  # field 3 of proc(5): the state


def process_parent(pid: int) -> int | None:
    fields = stat_fields(pid)
    try:
        return int(fields[1]) if fields else None  # field 4 of proc(5)
    except (IndexError, ValueError):
        return None

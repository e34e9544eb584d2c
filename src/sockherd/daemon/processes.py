"""The operating system's processes, behind the small interface a Worker needs.

A Worker asks this layer to launch a process, signal it, kill its process group, watch
its exit and probe its socket; nothing else in the daemon touches a pid. The real layer
(:class:`OsProcesses`) forks+execs in an executor thread and reaps on SIGCHLD; the
unit tests swap in a fake one, so the herd's interleavings run in milliseconds.

What the real layer guarantees, because each broke something once:

- **A launch cannot escape.** Popen runs in a thread; if the launch is cancelled (a
  stop preempting a deploy) or times out, a ticket shared with the thread says so, and
  whichever side holds the new process last kills its group. A cancelled launch waits
  until its process, if one was started, is killed and reaped.
- **spawn_timeout counts the exec, not the queue.** With a whole herd starting at once
  the executor queues spawns; the deadline starts when the thread picks the spawn up.
- **A pid is never reused under us.** While a launch is in flight the reaper does not
  reap children it does not know (the new one may be among them), so pidfd_open and the
  start-time read see the process we started; the group is killed before the leader is
  reaped (see reaper.py), while its pid still pins the group id.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import functools
import logging
import os
import socket
import threading
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sockherd._nofollow import chmod_socket
from sockherd.daemon.accepting import waits_for_connections
from sockherd.daemon.environment import open_output
from sockherd.daemon.forkserver import PRELOAD_FD_VAR, ForkFailed, ServerKey
from sockherd.daemon.forkservers import ForkServers
from sockherd.daemon.listeners import SD_LISTEN_FDS_START
from sockherd.daemon.reaper import (
    Hold,
    Reaper,
    kill_process_group,
    process_is_zombie,
    process_parent,
    process_start_time,
    send_signal,
)
from sockherd.daemon.spawn import spawn

log = logging.getLogger("sockherd")

_PROBE_FIRST_DELAY = 0.005
_PROBE_MAX_DELAY = 0.1
# The exit of an adopted process that is not our child: its status is its parent's.
EXIT_UNKNOWN = -1000


class LaunchFailed(Exception):
    """The process could not be started; ``reason`` completes "worker … <reason>"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Preload:
    """A launch forked from its generation's fork server (``preload = true``, forkserver.py)."""

    generation: int
    contract: Mapping[str, str]  # the worker's own variables: the rest of ``env`` is the fork server's
    ready_timeout: float  # for the fork server to import the app (online_timeout)
    teardown: bool = False  # preload_teardown: the worker exits through the interpreter's teardown


@dataclass(frozen=True, slots=True)
class Launch:
    """Everything needed to start one worker process."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path
    stdout: Path | None
    stderr: Path | None
    # Shared listeners, handed over as systemd does: at fds 3.., with LISTEN_PID set.
    listen_fds: tuple[int, ...] = ()
    preload: Preload | None = None
    # Kept open in the process (a fork server's channel): at their own numbers, or, with
    # listen_fds, right after the listeners (3 + len(listen_fds), ...).
    pass_fds: tuple[int, ...] = ()


class ProcessHandle(Protocol):
    """One started process, leader of its own process group."""

    @property
    def pid(self) -> int: ...

    @property
    def start_time(self) -> int | None:
        """The kernel's start time of the process (clock ticks since boot): pid + this is unique."""
        ...

    @property
    def exited(self) -> asyncio.Future[int]:
        """Resolves with the exit code (negative: the signal) once reaped."""
        ...

    def signal(self, sig: int) -> bool:
        """Signal the leader; False when it is already gone."""
        ...

    def kill_group(self) -> None:
        """SIGKILL the whole process group (a wrapper's children too)."""
        ...


class ProcessLayer(Protocol):
    async def launch(self, launch: Launch, spawn_timeout: float) -> ProcessHandle:
        """Start a process (raises LaunchFailed); cancelled, it leaves nothing running."""
        ...

    async def probe_socket(self, path: Path) -> None:
        """Return once something accepts connections on the UNIX socket at ``path``."""
        ...

    async def probe_accepting(self, pid: int, inodes: frozenset[int]) -> None:
        """Return once ``pid`` (or a process below it) waits for connections on one of the
        listening sockets ``inodes`` (``ready = "socket"`` with shared listeners)."""
        ...

    def adopt(self, pid: int, start_time: int) -> ProcessHandle | None:
        """Take over a running process started by an earlier daemon (or this one, before
        an exec); None when ``pid`` is gone or now names another process."""
        ...

    def retain_preloaded(self, generations: Collection[int], *, spare: bool | None = None) -> None:
        """Retire the fork servers of generations not in ``generations`` (preload). The
        spare fork server for the next deploy: True (the herd is idle) keep one, False
        (``preload_spare = false``) none, None leave it as it is (a deploy may take it)."""
        ...

    def preloaded(self) -> dict[int, int]:
        """generation -> pid of its running fork server."""
        ...

    def preload_spare(self) -> int | None:
        """The pid of the spare fork server waiting for the next deploy, if any."""
        ...

    async def settle(self) -> None:
        """Until launches given up have left nothing running (the caller bounds the wait)."""
        ...

    def set_socket_mode(self, path: Path, mode: int, gid: int | None) -> None:
        """Give a worker's socket ``mode`` and group (OSError if it is not a socket: never followed)."""
        ...


class _Ticket:
    """Shared by the loop and the Popen thread: who owns the process when it appears."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.abandoned = False
        self.executing = False  # the thread is inside Popen: a process may appear
        self.pid: int | None = None

    def abandon(self) -> tuple[int | None, bool]:
        """The loop gives up on this launch: the process the thread made, and whether it still may."""
        with self.lock:
            self.abandoned = True
            return self.pid, self.executing and self.pid is None


class OsProcess:
    def __init__(self, pid: int, pidfd: int | None, start_time: int | None, loop: asyncio.AbstractEventLoop) -> None:
        self.pid = pid
        self.start_time = start_time
        self._pidfd = pidfd
        self.exited: asyncio.Future[int] = loop.create_future()

    def _on_reaped(self, code: int) -> None:
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None
        if not self.exited.done():
            self.exited.set_result(code)

    def signal(self, sig: int) -> bool:
        if self.exited.done():
            return False
        return send_signal(self.pid, sig, self._pidfd)

    def kill_group(self) -> None:
        # Only while the leader is unreaped: its pid pins the group id against reuse.
        if not self.exited.done():
            kill_process_group(self.pid)

    def _on_foreign_exit(self) -> None:
        # Not our child: its parent (init, a subreaper) reaps it, maybe already. While
        # any member of its group lives, the group id cannot be handed out again.
        kill_process_group(self.pid)
        self._on_reaped(EXIT_UNKNOWN)


class OsProcesses:
    """fork+exec in a thread (never a bare fork of this asyncio process), reap on SIGCHLD."""

    def __init__(self, reaper: Reaper, executor: concurrent.futures.Executor | None = None) -> None:
        self._reaper = reaper
        self._executor = executor
        self._fork_servers = ForkServers(self._start_fork_server, lambda key: _open_outputs(key.stdout, key.stderr))
        self._late: set[asyncio.Future[Any]] = set()  # forks given up, and their workers until reaped

    async def launch(self, launch: Launch, spawn_timeout: float) -> ProcessHandle:
        if launch.preload is not None:
            return await self._launch_forked(launch, launch.preload, spawn_timeout)
        loop = asyncio.get_running_loop()
        outputs: list[int | None] = []
        for path in (launch.stdout, launch.stderr):
            try:
                outputs.append(open_output(path))
            except OSError as exc:
                _close_all(outputs)
                why = "it is a symlink (never followed)" if exc.errno == errno.ELOOP else exc.strerror
                raise LaunchFailed(f"cannot open its log file {path}: {why}") from None
        ticket = _Ticket()
        picked_up: asyncio.Future[None] = loop.create_future()
        hold = self._reaper.hold_unknown()  # our child must not be reaped before we know its pid
        try:
            future = loop.run_in_executor(
                self._executor, functools.partial(_popen, launch, outputs, ticket, loop, picked_up)
            )
        except BaseException:
            _close_all(outputs)
            hold.release()
            raise
        future.add_done_callback(lambda _: hold.release() if ticket.abandoned else None)

        def give_up() -> None:
            ticket.abandon()  # the thread kills the process, if exec ever returns
            if future.done():
                hold.release()

        try:
            await asyncio.shield(picked_up)  # queued in the executor: not part of spawn_timeout
            pid = await asyncio.wait_for(asyncio.shield(future), spawn_timeout)
        except TimeoutError:
            give_up()
            raise LaunchFailed(
                f"could not execute {launch.argv[0]!r} within spawn_timeout ({spawn_timeout}s)"
            ) from None
        except OSError as exc:
            give_up()
            raise LaunchFailed(f"could not execute {launch.argv[0]!r}: {exc.strerror or exc}") from None
        except asyncio.CancelledError:
            await self._abandon(ticket, future, spawn_timeout)
            if future.done():
                hold.release()
            raise
        if pid is None:  # only an abandoned ticket returns None, and only the paths above abandon
            give_up()
            raise LaunchFailed("launch abandoned")
        try:
            pidfd: int | None = os.pidfd_open(pid)
        except OSError:
            pidfd = None  # kernels before 5.3: plain kill(), still safe while unreaped
        handle = OsProcess(pid, pidfd, process_start_time(pid), loop)
        self._reaper.watch_child(pid, handle._on_reaped, pidfd)
        hold.release()
        return handle

    async def _abandon(
        self,
        ticket: _Ticket,
        future: asyncio.Future[int | None],
        spawn_timeout: float,
    ) -> None:
        """Cancelled: kill what the thread started and wait until it is reaped.

        Still queued, the thread will see the abandoned ticket and start nothing.
        """
        pid, executing = ticket.abandon()
        if executing:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(future), spawn_timeout)
            pid = ticket.pid
        if pid is None:
            return
        kill_process_group(pid)  # unreaped (we hold the reaper): the group id is still its own
        reaped: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._reaper.watch_child(pid, functools.partial(_resolve_exit, reaped))
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(asyncio.shield(reaped), spawn_timeout)

    # -- preloaded generations (forkserver.py) -----------------------------------------

    async def _launch_forked(self, launch: Launch, preload: Preload, spawn_timeout: float) -> ProcessHandle:
        server_env = {k: v for k, v in launch.env.items() if k not in preload.contract}
        key = ServerKey(
            preload.generation,
            tuple(launch.argv),
            tuple(sorted(server_env.items())),
            launch.cwd,
            launch.stdout,
            launch.stderr,
            launch.listen_fds,
        )
        try:
            server = await self._fork_servers.server_for(key, spawn_timeout, preload.ready_timeout)
        except ForkFailed as exc:
            raise LaunchFailed(exc.reason) from None
        except LaunchFailed as exc:
            raise LaunchFailed(f"{exc.reason} (its generation's preload process)") from None
        try:
            outputs = _open_outputs(launch.stdout, launch.stderr)
        except OSError as exc:
            why = "it is a symlink (never followed)" if exc.errno == errno.ELOOP else exc.strerror
            raise LaunchFailed(f"cannot open its log file {exc.filename}: {why}") from None
        hold = self._reaper.hold_unknown()  # the worker becomes our child before we know its pid
        # spawn_timeout counts the fork, not the queue: a deploy asks for all its forks at once.
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        fork = asyncio.ensure_future(
            server.fork(dict(preload.contract), outputs, list(launch.listen_fds), started, teardown=preload.teardown)
        )
        fork.add_done_callback(lambda _: _close_all([fd for _, fd in outputs]))
        try:
            turn: set[asyncio.Future[Any]] = {started, fork}
            await asyncio.wait(turn, return_when=asyncio.FIRST_COMPLETED)
            pid = await asyncio.wait_for(asyncio.shield(fork), spawn_timeout)
        except (TimeoutError, asyncio.CancelledError) as exc:  # before OSError: TimeoutError is one
            # The fork runs on (a cancelled request would put the channel out of step);
            # whatever it makes is killed and reaped, and the hold ends then.
            server.retire()
            self._late.add(fork)
            fork.add_done_callback(self._late.discard)
            fork.add_done_callback(functools.partial(self._kill_late_fork, hold))
            if isinstance(exc, TimeoutError):
                raise LaunchFailed(f"could not be forked within spawn_timeout ({spawn_timeout}s)") from None
            raise
        except ForkFailed as exc:
            hold.release()
            raise LaunchFailed(exc.reason) from None
        except OSError as exc:
            hold.release()
            raise LaunchFailed(f"could not be forked: {exc.strerror or exc}") from None
        return self._watch_new_child(pid, hold)

    def _watch_new_child(self, pid: int, hold: Hold) -> ProcessHandle:
        try:
            pidfd: int | None = os.pidfd_open(pid)
        except OSError:
            pidfd = None
        handle = OsProcess(pid, pidfd, process_start_time(pid), asyncio.get_running_loop())
        self._reaper.watch_child(pid, handle._on_reaped, pidfd)
        hold.release()
        return handle

    def _kill_late_fork(self, hold: Hold, fork: asyncio.Future[int]) -> None:
        if fork.cancelled() or fork.exception() is not None:
            hold.release()
            return
        pid = fork.result()
        kill_process_group(pid)  # unreaped: its group id is still its own (it leads it before its pid is sent)
        reaped: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._late.add(reaped)
        reaped.add_done_callback(self._late.discard)
        self._reaper.watch_child(pid, functools.partial(_resolve_exit, reaped))
        hold.release()

    async def settle(self) -> None:
        """Until every fork given up has answered and the worker it made is reaped: the
        daemon waits for this (bounded) before it exits, or a worker forked for a launch
        the quit cancelled would outlive it, managed by nobody."""
        if self._late:
            log.info("waiting for %d fork(s) given up to answer, to kill what they made", len(self._late))
        while self._late:
            await asyncio.wait(set(self._late))

    async def _start_fork_server(
        self, key: ServerKey, channel: socket.socket, spawn_timeout: float
    ) -> tuple[int, asyncio.Future[int]]:
        """The fork server gets the shared listeners at 3.., as its workers will: what the app
        opens while it is imported then cannot take those numbers, which every worker's
        listeners would overwrite. Its channel follows them (see _spawn_with_listeners)."""
        env = dict(key.env)
        channel_fd = SD_LISTEN_FDS_START + len(key.listen_fds) if key.listen_fds else channel.fileno()
        env[PRELOAD_FD_VAR] = str(channel_fd)
        launch = Launch(
            list(key.argv),
            env,
            key.cwd,
            key.stdout,
            key.stderr,
            listen_fds=key.listen_fds,
            pass_fds=(channel.fileno(),),
        )
        handle = await self.launch(launch, spawn_timeout)
        return handle.pid, handle.exited

    def retain_preloaded(self, generations: Collection[int], *, spare: bool | None = None) -> None:
        self._fork_servers.retain(generations)
        if spare is True:
            self._fork_servers.keep_spare(generations)
        elif spare is False:
            self._fork_servers.drop_spare()

    def preloaded(self) -> dict[int, int]:
        return self._fork_servers.pids()

    def preload_spare(self) -> int | None:
        return self._fork_servers.spare_pid()

    def adopt(self, pid: int, start_time: int) -> ProcessHandle | None:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return None
        # Checked after the pidfd is open: if the start time matches now, the pidfd
        # refers to that very process, whatever happens to the pid number later.
        ours = process_parent(pid) == os.getpid()  # still: this daemon re-executed itself
        if process_start_time(pid) != start_time or (process_is_zombie(pid) and not ours):
            os.close(pidfd)  # reused by another program, or dead (a zombie its parent did not reap)
            return None
        handle = OsProcess(pid, pidfd, start_time, asyncio.get_running_loop())
        if ours:
            self._reaper.watch_child(pid, handle._on_reaped, pidfd)
        else:
            self._reaper.watch_foreign(pidfd, handle._on_foreign_exit)
        return handle

    def set_socket_mode(self, path: Path, mode: int, gid: int | None) -> None:
        chmod_socket(path, mode, gid)

    async def probe_accepting(self, pid: int, inodes: frozenset[int]) -> None:
        delay = _PROBE_FIRST_DELAY
        while not waits_for_connections(pid, inodes):
            await asyncio.sleep(delay)
            delay = min(delay * 2, _PROBE_MAX_DELAY)

    async def probe_socket(self, path: Path) -> None:
        delay = _PROBE_FIRST_DELAY
        while True:
            try:
                _, writer = await asyncio.open_unix_connection(str(path))
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(delay)
                delay = min(delay * 2, _PROBE_MAX_DELAY)
                continue
            except BlockingIOError:  # backlog full: it is accepting, just busy
                return
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return


def _open_outputs(stdout: Path | None, stderr: Path | None) -> list[tuple[str, int]]:
    """A forked worker's (or a spare's) log files, opened as for an executed one, by name;
    none left open if one fails."""
    outputs: list[tuple[str, int]] = []
    try:
        for name, path in (("stdout", stdout), ("stderr", stderr)):
            fd = open_output(path)
            if fd is not None:
                outputs.append((name, fd))
    except OSError:
        _close_all([fd for _, fd in outputs])
        raise
    return outputs


def _popen(
    launch: Launch,
    outputs: list[int | None],
    ticket: _Ticket,
    loop: asyncio.AbstractEventLoop,
    picked_up: asyncio.Future[None],
) -> int | None:
    """Runs in an executor thread; closes the output fds it was given, whatever happens."""
    try:
        with contextlib.suppress(RuntimeError):  # the loop closed under a daemon quitting
            loop.call_soon_threadsafe(_resolve, picked_up)
        with ticket.lock:
            if ticket.abandoned:
                return None
            ticket.executing = True
        pid = spawn(launch, outputs)
        with ticket.lock:
            ticket.pid = pid
            if ticket.abandoned:  # the loop gave up while exec ran: nobody else will kill it
                kill_process_group(pid)
        return pid
    finally:
        _close_all(outputs)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _resolve_exit(future: asyncio.Future[int], code: int) -> None:
    if not future.done():
        future.set_result(code)


def _close_all(fds: list[int | None]) -> None:
    for fd in fds:
        if fd is not None:
            os.close(fd)


__all__ = [
    "EXIT_UNKNOWN",
    "Launch",
    "LaunchFailed",
    "OsProcess",
    "OsProcesses",
    "Preload",
    "ProcessHandle",
    "ProcessLayer",
]

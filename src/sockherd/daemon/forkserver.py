"""Preloaded generations, the daemon's side: a fork server per generation, workers forked on request.

With ``preload = true`` the first launch of a generation starts the worker command once,
with ``SOCKHERD_PRELOAD_FD`` naming its end of a SOCK_SEQPACKET socket pair instead of a
worker's environment. That process imports the app and says ``ready``
(:func:`sockherd.preload.fork_point`); every launch of the generation is then a request
on the socket: the worker's environment, and as SCM_RIGHTS descriptors its log files and
the shared listeners. The answer is the pid of a worker that is already the daemon's
child: the fork server forks twice and the middle process exits, so the worker is
reparented to the daemon, a child subreaper. From there on the worker is managed exactly
like an executed one (pidfd, exit status, process group, adoption after an upgrade).

Failure is a failed launch, with the same words a worker's would have: a fork server
that exits before ``ready`` (the app failed to import: its traceback is in the workers'
log, which the failed deploy shows), or that does not say ``ready`` within
``online_timeout``. A fork server that dies later is started again by the next launch
of its generation. Fork servers live while their generation does (the herd tells
:mod:`sockherd.daemon.forkservers` which generations still have workers or may start
some) and exit on their own when the channel closes: when the daemon retires them,
execs an upgrade, or dies. A fork server may also begin as a *spare*, started between
deploys and waiting at ``warm_point`` (:meth:`ForkServer.wait_warm`, :meth:`ForkServer.go`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sockherd.daemon.hardening import prctl
from sockherd.daemon.reaper import kill_process_group

log = logging.getLogger("sockherd")

PRELOAD_FD_VAR = "SOCKHERD_PRELOAD_FD"  # sockherd.preload reads it (a test keeps the two equal)
SPARE_VAR = "SOCKHERD_PRELOAD_SPARE"  # sockherd.preload.warm_point reads it (a test keeps the two equal)
PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>
_MAX_MESSAGE = 64 * 1024
_EXIT_GRACE = 2.0  # a retired fork server that has not exited by then is killed
_STATUS_WAIT = 1.0  # for the exit status of a fork server whose channel closed


class ForkFailed(Exception):
    """A worker could not be forked; ``reason`` completes "worker … <reason>"."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class ServerKey:
    """What a fork server was started with: a reload that changes any of it needs another."""

    generation: int
    argv: tuple[str, ...]
    env: tuple[tuple[str, str], ...]
    cwd: Path
    stdout: Path | None
    stderr: Path | None
    listen_fds: tuple[int, ...] = ()  # the daemon's listeners, the same for its whole life


def become_subreaper() -> None:
    """Orphaned descendants are reparented to the daemon: a forked worker's middle process
    exits, and the worker must become the daemon's child (PID 1 in a container already is)."""
    prctl(PR_SET_CHILD_SUBREAPER, 1)


class ForkServer:
    """One generation's preloaded process and the daemon's end of its channel."""

    def __init__(self, key: ServerKey, pid: int, exited: asyncio.Future[int], channel: socket.socket) -> None:
        self.key = key
        self.pid = pid
        self.exited = exited
        self._channel = channel
        self._send_lock = asyncio.Lock()
        # One future per request on the channel whose answer is not read yet, in the order
        # sent (the fork server answers in that order), each resolved once its answer is read.
        self._unanswered: collections.deque[asyncio.Future[None]] = collections.deque()
        self._out_of_step = False  # a fork left without reading its answer: the next answers are not theirs
        self._kill_timer: asyncio.TimerHandle | None = None
        self.usable = True  # False once retired, dead, or out of step with its channel
        self.supports_spares = False  # its program calls preload.warm_point (forkservers.py)
        self.started_at = asyncio.get_running_loop().time()

    @property
    def alive(self) -> bool:
        return self.usable and not self.exited.done()

    async def wait_ready(self, timeout: float) -> str | None:  # noqa: ASYNC109 (the config's online_timeout)
        """Until the app is imported and the fork server waits for fork requests: None. A
        spare that found itself out of date after its ``go`` says why instead, and exits."""
        reply = await self._reply_within(
            timeout, f"could not be forked: its preloaded app did not finish loading within online_timeout ({timeout}s)"
        )
        stale = reply.get("stale")
        if isinstance(stale, str):
            self.retire()
            return stale
        if not reply.get("ready"):
            self.retire()
            raise ForkFailed(f"could not be forked: the preload process answered {reply!r} instead of ready")
        self.supports_spares = reply.get("spares") is True
        return None

    async def wait_warm(self, timeout: float) -> None:  # noqa: ASYNC109 (the config's online_timeout)
        """A spare: until it has started and imported the server, and waits for a deploy."""
        reply = await self._reply_within(timeout, f"did not start within online_timeout ({timeout}s)")
        if not reply.get("warm"):
            self.retire()
            raise ForkFailed(f"answered {reply!r} instead of warm")

    async def go(self, cwd: str, outputs: list[tuple[str, int]], timeout: float) -> str | None:  # noqa: ASYNC109
        """A warm spare becomes a generation's fork server: it gets the log files and the
        ``cwd``, checks that nothing it loaded changed on disk, imports the app. None once it
        is ready; the reason when it was out of date (it exits: start one afresh).
        Raises ForkFailed as :meth:`wait_ready` does (the app failed to import)."""
        try:
            await self._send(
                json.dumps({"go": True, "cwd": cwd, "outputs": [n for n, _ in outputs]}).encode(),
                [fd for _, fd in outputs],
            )
        except ForkFailed:
            return "it has exited"
        return await self.wait_ready(timeout)

    async def _reply_within(self, timeout: float, late: str) -> dict[str, Any]:  # noqa: ASYNC109
        """The next answer; retired and ForkFailed(``late``) if none comes within ``timeout``."""
        try:
            return await asyncio.wait_for(self._receive(), timeout)
        except TimeoutError:
            self.retire()
            raise ForkFailed(late) from None

    async def fork(
        self,
        environment: dict[str, str],
        outputs: list[tuple[str, int]],
        listen_fds: list[int],
        started: asyncio.Future[None] | None = None,
        *,
        teardown: bool = False,
    ) -> int:
        """The pid of a new worker, already the daemon's child. Not to be cancelled (callers
        shield it and clean up after it): a cancelled fork leaves its answer unread, and the
        forks queued behind it then fail rather than take answers that are not theirs (the
        channel closes once they are done, and the fork server kills the workers it could
        not report).

        Requests are pipelined: a deploy's forks all go out at once, and the fork server
        takes the next one as soon as it has answered the last, without waiting for the
        daemon to read that answer and send another (under load that round trip was up to
        12 ms a worker). ``started`` is resolved when the answers before this one are in:
        from then on the fork server works on it (``spawn_timeout`` counts from there).
        ``teardown``: the worker exits through the interpreter's teardown (``preload_teardown``).
        """
        loop = asyncio.get_running_loop()
        async with self._send_lock:  # the order sent is the order answered
            if not self.alive:
                raise ForkFailed("could not be forked: its generation's preload process is gone")
            request = {
                "env": environment,
                "outputs": [name for name, _ in outputs],
                "listen": len(listen_fds),
                "teardown": teardown,
            }
            ahead = self._unanswered[-1] if self._unanswered else None
            answered: asyncio.Future[None] = loop.create_future()
            try:
                await self._send(json.dumps(request).encode(), [fd for _, fd in outputs] + list(listen_fds))
            except BaseException:
                self.usable = False
                if not self._unanswered:
                    self._close()
                raise
            self._unanswered.append(answered)
        try:
            if ahead is not None:
                await asyncio.shield(ahead)
            if self._out_of_step:
                raise ForkFailed("could not be forked: a fork before it was given up unanswered")
            if started is not None and not started.done():
                started.set_result(None)
            reply = await self._receive()
        except ForkFailed:  # the channel is at EOF, or this answer was read: still in step
            self.usable = False
            raise
        except BaseException:  # cancelled while waiting: its answer will come, and is nobody's
            self.usable = False
            self._out_of_step = True
            raise
        finally:
            self._unanswered.remove(answered)
            answered.set_result(None)
            if not self.usable and not self._unanswered:
                self._close()  # retired meanwhile: now that the last answer is in
        if "error" in reply:
            raise ForkFailed(f"could not be forked: {reply['error']}")
        pid = reply.get("pid")
        if not isinstance(pid, int) or pid <= 0:
            self.retire()
            raise ForkFailed(f"could not be forked: the preload process answered {reply!r}")
        return pid

    async def _send(self, data: bytes, fds: list[int]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                socket.send_fds(self._channel, [data], fds)
                return
            except BlockingIOError:
                writable: asyncio.Future[None] = loop.create_future()
                loop.add_writer(self._channel, _resolve, writable)
                try:
                    await writable
                finally:
                    loop.remove_writer(self._channel)
            except OSError as exc:
                raise ForkFailed(f"could not be forked: the preload process is gone ({exc.strerror})") from None

    async def _receive(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        receive = asyncio.ensure_future(loop.sock_recv(self._channel, _MAX_MESSAGE))
        watched: set[asyncio.Future[Any]] = {receive, self.exited}
        try:
            await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not receive.done():
                receive.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await receive
        data = b""
        if receive.done() and not receive.cancelled():
            with contextlib.suppress(OSError):  # reset by a dying fork server: it is gone, as at EOF
                data = receive.result()
        if not data and receive.cancelled():  # it exited: an answer it sent first is still queued
            with contextlib.suppress(OSError):
                data = self._channel.recv(_MAX_MESSAGE)
        if not data:
            self.usable = False
            with contextlib.suppress(TimeoutError):  # its status, for the message: reaped in a moment
                await asyncio.wait_for(asyncio.shield(self.exited), _STATUS_WAIT)
            code = self.exited.result() if self.exited.done() else None
            status = "" if code is None else f" with status {code}"
            raise ForkFailed(
                f"could not be forked: its preload process exited{status} (did the app fail to import? "
                "its output is in the workers' log)"
            )
        try:
            message = json.loads(data)
        except ValueError:
            message = data[:100]
        if not isinstance(message, dict):
            raise ForkFailed(f"could not be forked: the preload process answered {message!r}")
        return message

    def retire(self) -> None:
        """No more forks. The channel closes (the fork server exits) at once, or once the
        fork in flight has its answer: closed under it, the answer, a worker's pid, would
        be lost with the worker still running. Either way the fork server is killed if it
        has not exited after a grace: one stuck in a fork (an at-fork handler deadlocked
        by a thread started at import) would otherwise hold its answer, and with it the
        reaper's hold on unknown children, forever."""
        if not self.usable and self._kill_timer is not None:
            return
        self.usable = False
        if not self._unanswered:
            self._close()
        if self._kill_timer is None and not self.exited.done():
            self._kill_timer = asyncio.get_running_loop().call_later(_EXIT_GRACE, kill_process_group, self.pid)
            self.exited.add_done_callback(lambda _: self._kill_timer.cancel() if self._kill_timer else None)

    def _close(self) -> None:
        if self._channel.fileno() >= 0:
            self._channel.close()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


__all__ = [
    "PRELOAD_FD_VAR",
    "SPARE_VAR",
    "ForkFailed",
    "ForkServer",
    "ServerKey",
    "become_subreaper",
]

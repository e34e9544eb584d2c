"""The fork servers of a daemon's preloaded generations, and the spare for the next deploy.

:mod:`sockherd.daemon.forkserver` is one fork server and its channel; this module keeps
one per generation that may still start workers (started on its first launch, shared by
concurrent launches, retired with the generation), and between deploys one *spare*: the
next deploy's fork server started ahead of time up to :func:`sockherd.preload.warm_point`
(see :class:`ForkServers`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Collection, Iterable

from sockherd.daemon.forkserver import SPARE_VAR, ForkFailed, ForkServer, ServerKey, become_subreaper
from sockherd.daemon.reaper import kill_process_group

log = logging.getLogger("sockherd")

# Starts the fork server's process with the channel's other end: (its pid, its exit).
StartServer = Callable[[ServerKey, socket.socket, float], Awaitable[tuple[int, asyncio.Future[int]]]]
# Opens the log files a key names, for a spare that becomes its fork server: [(stdout|stderr, fd)].
OpenOutputs = Callable[[ServerKey], list[tuple[str, int]]]


def spare_spec(key: ServerKey) -> ServerKey:
    """What a spare must have been started with to serve ``key``: all of it but the generation."""
    return dataclasses.replace(key, generation=0)


class ForkServers:
    """The fork servers of the generations that may still start workers, by what they run,
    and one *spare* between deploys.

    The spare is the next deploy's fork server started ahead of time, up to
    :func:`sockherd.preload.warm_point` (interpreter, server imports; not the app): a
    deploy then waits only for the app's own import. It is kept while the herd is idle
    (no deploy in flight, running), for the command of the newest fork server that
    said its program has a warm point; a deploy whose fork server has the same command,
    environment, ``cwd`` and log files takes it, any other retires it. It checks that
    what it loaded is still what is on disk before it imports the app
    (:mod:`sockherd._import_snapshot`); if not, the deploy starts a fork server afresh.
    """

    def __init__(self, start_process: StartServer, open_outputs: OpenOutputs) -> None:
        self._start_process = start_process
        self._open_outputs = open_outputs
        self._servers: dict[ServerKey, asyncio.Task[ForkServer]] = {}
        self._subreaper = False
        self._spare: tuple[ServerKey, asyncio.Task[ForkServer]] | None = None
        self._spare_failed: ServerKey | None = None  # not again for this spec: it cannot start
        self._timeouts = (2.0, 10.0)  # a spare's (spawn_timeout, online_timeout): the last launch's

    async def server_for(self, key: ServerKey, spawn_timeout: float, ready_timeout: float) -> ForkServer:
        """The running fork server for ``key``, started (and awaited until ready) if needed.
        Concurrent launches of one generation share one start, and its failure."""
        self._timeouts = (spawn_timeout, ready_timeout)
        task = self._servers.get(key)
        if task is not None and _gone(task):
            task = None
        if task is None:
            spare = self._claim_spare(key)
            task = asyncio.ensure_future(self._start(key, spawn_timeout, ready_timeout, spare))
            self._servers[key] = task
        return await asyncio.shield(task)

    async def _start(
        self, key: ServerKey, spawn_timeout: float, ready_timeout: float, spare: asyncio.Task[ForkServer] | None = None
    ) -> ForkServer:
        if spare is not None and (server := await self._from_spare(key, spare, ready_timeout)) is not None:
            return server
        server = await self._launch(key, spawn_timeout)
        await server.wait_ready(ready_timeout)
        log.info("preloaded generation %d: fork server pid %d ready", key.generation, server.pid)
        if self._spare_failed == spare_spec(key):
            self._spare_failed = None  # these settings start now: a spare may again (the failure passed)
        return server

    async def _launch(self, key: ServerKey, spawn_timeout: float) -> ForkServer:
        if not self._subreaper:
            become_subreaper()
            self._subreaper = True
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            ours.setblocking(False)
            pid, exited = await self._start_process(key, theirs, spawn_timeout)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return ForkServer(key, pid, exited, ours)

    async def _from_spare(
        self, key: ServerKey, spare: asyncio.Task[ForkServer], ready_timeout: float
    ) -> ForkServer | None:
        """The spare as ``key``'s fork server, ready; None if it cannot be (start afresh)."""
        try:
            server = await asyncio.shield(spare)  # still starting: it is further along than a fresh one
        except Exception:
            return None
        if not server.alive:
            server.retire()  # died waiting: its channel goes now
            return None
        try:
            outputs = self._open_outputs(key)
        except OSError:
            server.retire()
            return None  # the fresh start reports it, with the launch's words
        try:
            stale = await server.go(str(key.cwd), outputs, ready_timeout)
        finally:
            _close_all(fd for _, fd in outputs)
        if stale is not None:
            server.retire()
            log.info("spare preload process pid %d not used (%s): starting a fork server afresh", server.pid, stale)
            return None
        server.key = key
        log.info(
            "preloaded generation %d: fork server pid %d ready (a spare, started %.1fs before)",
            key.generation,
            server.pid,
            asyncio.get_running_loop().time() - server.started_at,
        )
        return server

    def _claim_spare(self, key: ServerKey) -> asyncio.Task[ForkServer] | None:
        """The spare for a new fork server of ``key``, if it was started for that; else retired."""
        if self._spare is None:
            return None
        spec, task = self._spare
        self._spare = None
        if spec == spare_spec(key):
            return task
        _drop(task)
        return None

    def keep_spare(self, generations: Collection[int]) -> None:
        """The herd is idle: have a spare for the newest of ``generations``' fork servers
        whose program has a warm point (or none, if no such server)."""
        newest: ServerKey | None = None
        for key, task in self._servers.items():
            if key.generation not in generations or not _started(task) or not task.result().supports_spares:
                continue
            if newest is None or key.generation > newest.generation:
                newest = key
        spec = spare_spec(newest) if newest is not None else None
        if self._spare is not None:
            current, task = self._spare
            if current == spec and not _gone(task):
                return
            self._spare = None
            _drop(task)
        if spec is None or spec == self._spare_failed:
            return
        task = asyncio.ensure_future(self._start_spare(spec))
        task.add_done_callback(_consume_failure)  # logged in _start_spare; no "never retrieved"
        self._spare = (spec, task)

    async def _start_spare(self, spec: ServerKey) -> ForkServer:
        spawn_timeout, ready_timeout = self._timeouts
        spare_key = dataclasses.replace(spec, env=(*spec.env, (SPARE_VAR, "1")))
        try:
            server = await self._launch(spare_key, spawn_timeout)  # cancelled: launch leaves nothing running
            try:
                await server.wait_warm(ready_timeout)
            except asyncio.CancelledError:  # dropped while it starts: nothing in it to keep
                server.retire()
                kill_process_group(server.pid)
                raise
        except Exception as exc:
            self._spare_failed = spec
            reason = exc.reason if isinstance(exc, ForkFailed) else str(exc)
            log.warning("spare preload process could not start (%s): deploys start their fork server afresh", reason)
            raise
        log.info("spare preload process pid %d warm: the next deploy imports only the app", server.pid)
        return server

    def retain(self, generations: Collection[int]) -> None:
        """Retire the fork servers of every generation not in ``generations``."""
        for key, task in list(self._servers.items()):
            if key.generation in generations:
                continue
            del self._servers[key]
            _retire_task(task)

    def drop_spare(self) -> None:
        """No spare (``preload_spare = false``, the daemon quits): one still starting is killed."""
        if self._spare is not None:
            _drop(self._spare[1])
            self._spare = None

    def pids(self) -> dict[int, int]:
        """generation -> pid of its fork server, for status."""
        return {
            key.generation: task.result().pid
            for key, task in self._servers.items()
            if _started(task) and task.result().alive
        }

    def spare_pid(self) -> int | None:
        """The spare's pid once it is warm, for status."""
        if self._spare is None or not _started(self._spare[1]):
            return None
        server = self._spare[1].result()
        return server.pid if server.alive else None


def _started(task: asyncio.Task[ForkServer]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


def _gone(task: asyncio.Task[ForkServer]) -> bool:
    """A fork server that failed to start, or started and died: one is started afresh."""
    return task.done() and (not _started(task) or not task.result().alive)


def _retire_task(task: asyncio.Task[ForkServer]) -> None:
    if task.done():
        if _started(task):
            task.result().retire()
    else:
        task.add_done_callback(_retire_when_started)


def _drop(task: asyncio.Task[ForkServer]) -> None:
    """A spare no deploy will take: cancelled while it starts (which kills it), else retired."""
    if task.done():
        _retire_task(task)
    else:
        task.cancel()


def _consume_failure(task: asyncio.Task[ForkServer]) -> None:
    if not task.cancelled():
        task.exception()


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _retire_when_started(task: asyncio.Task[ForkServer]) -> None:
    if _started(task):
        task.result().retire()


__all__ = ["ForkServers", "OpenOutputs", "StartServer", "spare_spec"]

"""One worker process: spawn, readiness, exit watch and the staged shutdown ladder.

A Worker owns its own state machine (``spawning → running → online → terminating →
dead``); the herd decides what to do with it. Every wait here has a deadline, and
every deadline has an escalation.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import secrets
import signal
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

from sockherd import protocol
from sockherd.config import Config, Timeouts, WorkerSpec, render_command
from sockherd.daemon.environment import worker_environment
from sockherd.daemon.listeners import Listeners
from sockherd.daemon.logformat import worker_event
from sockherd.daemon.metrics import backlog_problem
from sockherd.daemon.processes import EXIT_UNKNOWN, Launch, LaunchFailed, Preload, ProcessHandle, ProcessLayer
from sockherd.daemon.sockdiag import unix_listen_queues

log = logging.getLogger("sockherd")

_REAP_AFTER_KILL = 5.0


class WorkerState(enum.StrEnum):
    SPAWNING = "spawning"
    RUNNING = "running"
    ONLINE = "online"
    SUSPENDED = "suspended"
    BROKEN = "broken"
    TERMINATING = "terminating"
    DEAD = "dead"


class StartError(Exception):
    """A worker failed to come online: exited, timed out, or could not be executed."""

    def __init__(self, worker: Worker, reason: str) -> None:
        super().__init__(reason)
        self.worker = worker
        self.reason = reason
        # The worker's log tail, read when it failed: read later, after its siblings of
        # the same deploy were killed, the shared file could end with their output.
        self.output: list[str] | None = None


class FrameSink(Protocol):
    """The daemon's end of a worker's IPC connection."""

    @property
    def is_open(self) -> bool: ...

    def send(self, frame: bytes) -> None: ...


def new_worker_id(index: int | None) -> str:
    return f"{'s' if index is None else index}-{secrets.token_hex(3)}"


class Worker:
    def __init__(
        self,
        *,
        config: Config,
        spec: WorkerSpec,
        timeouts: Timeouts,
        index: int | None,
        generation: int,
        processes: ProcessLayer,
        on_exit: Callable[[Worker, int], None],
        on_spawned: Callable[[Worker], None] | None = None,
        on_change: Callable[[], None] | None = None,
        restarts: int = 0,
        suspended: bool = False,
        worker_id: str | None = None,
        socket_gid: int | None = None,
        listeners: Listeners | None = None,
    ) -> None:
        self.id = worker_id or new_worker_id(index)
        # Shared-listener mode: the worker accepts on the daemon's listeners (LISTEN_FDS)
        # and binds no socket of its own; there is nothing to probe, chmod or publish.
        self.listeners = listeners if listeners else None
        self.index = index
        self.suspended = suspended  # holds requests until resumed (deploys with migrations, standbys)
        self.parked = False  # kept for a rollback (takeback.py): out of traffic until resumed
        self.warning: str | None = None  # something about it that will cost requests (a tiny backlog)
        # Unpublished and its listen queue seen empty since (sockdiag.linger): nothing can
        # reach it any more, and its shutdown message says so.
        self.backlog_drained = False
        self._resume_pending = False
        self.generation = generation
        self.spec = spec
        self.timeouts = timeouts
        self.restarts = restarts
        self.socket_path = config.worker_socket_path(self.id)
        self.socket_gid = socket_gid  # the group nginx reaches the socket through
        self._ipc_path = config.ipc_path
        self._notify_path = config.notify_path
        self._processes = processes
        self._on_exit_callback = on_exit
        self._on_spawned = on_spawned
        self._on_change = on_change or (lambda: None)
        self.state = WorkerState.SPAWNING
        self.pid: int | None = None
        self.start_time: int | None = None  # the kernel's: pid + start time name one process
        self._process: ProcessHandle | None = None
        self.started_at = time.time()
        self.online_at: float | None = None
        self.exit_code: int | None = None
        self.broken_reason: str | None = None
        self.status_text: str | None = None
        self.link: FrameSink | None = None
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int] = loop.create_future()
        self._online: asyncio.Future[None] = loop.create_future()
        self._launched: asyncio.Future[None] = loop.create_future()  # its pid is known, or it never ran
        self._stop_task: asyncio.Task[None] | None = None
        self._killed = False

    def __repr__(self) -> str:
        return f"<Worker {self.id} pid={self.pid} {self.state}>"

    @property
    def label(self) -> str:
        slot = "standby" if self.index is None else f"#{self.index}"
        return f"worker {slot} ({self.id}, pid {self.pid})"

    @property
    def stopping(self) -> bool:
        """True once the daemon began shutting it down: its exit is expected."""
        return self._stop_task is not None or self._killed

    @property
    def alive(self) -> bool:
        return self.pid is not None and not self.exited.done()

    # -- spawn -------------------------------------------------------------------------

    def _contract(self) -> dict[str, str]:
        contract = {
            "SOCKHERD_WORKER_ID": self.id,
            "SOCKHERD_INDEX": "standby" if self.index is None else str(self.index),
            "SOCKHERD_IPC": str(self._ipc_path),
            "SOCKHERD_SUSPENDED": "1" if self.suspended else "0",
            "SOCKHERD_BACKLOG": str(self.spec.backlog),
            "NOTIFY_SOCKET": str(self._notify_path),
        }
        if self.listeners is not None:
            contract.update(self.listeners.environment())
        else:
            contract["SOCKHERD_SOCKET"] = str(self.socket_path)
            contract["SOCKHERD_SOCKET_MODE"] = f"{self.spec.socket_mode:o}"
        return contract

    async def spawn(self) -> None:
        """Start the worker's process; cancelled, it leaves nothing running."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket_path)  # ids are random, but never bind over a leftover
        argv = render_command(
            self.spec.command,
            socket=str(self.socket_path),
            worker_id=self.id,
            index="standby" if self.index is None else str(self.index),
        )
        contract = self._contract()
        env = worker_environment(self.spec, os.environ, contract)
        fds = self.listeners.fds if self.listeners is not None else ()
        preload = (
            Preload(self.generation, contract, self.timeouts.online, teardown=self.spec.preload_teardown)
            if self.spec.preload
            else None
        )
        launch = Launch(argv, env, self.spec.cwd, self.spec.stdout, self.spec.stderr, listen_fds=fds, preload=preload)
        try:
            process = await self._processes.launch(launch, self.timeouts.spawn)
        except LaunchFailed as exc:
            self._mark_dead(-1)
            raise StartError(self, exc.reason) from None
        except BaseException:
            self._mark_dead(-1)
            raise
        self._process = process
        self.pid, self.start_time = process.pid, process.start_time
        self.state = WorkerState.RUNNING
        self._launched.set_result(None)
        process.exited.add_done_callback(lambda done: self._on_exit(done.result()))
        if self._on_spawned is not None:
            self._on_spawned(self)
        self._on_change()
        log.info(
            "%s spawned (generation %d): %s",
            self.label,
            self.generation,
            " ".join(argv),
            extra=worker_event("spawned", self),
        )

    async def wait_launched(self) -> None:
        """Until its pid is known (or it failed to start), ``spawn_timeout`` at most. A worker
        forked from a preloaded generation can say hello before the fork's answer is read."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._launched), self.timeouts.spawn)

    def adopt(self, process: ProcessHandle, state: WorkerState, started_at: float, online_at: float | None) -> None:
        """Manage a process an earlier daemon started, as if this one had spawned it."""
        self._process = process
        if not self._launched.done():
            self._launched.set_result(None)
        self.pid, self.start_time = process.pid, process.start_time
        self.state = state
        self.started_at, self.online_at = started_at, online_at
        if state not in (WorkerState.SPAWNING, WorkerState.RUNNING) and not self._online.done():
            self._online.set_result(None)  # it reported ready to the earlier daemon
        process.exited.add_done_callback(lambda done: self._on_exit(done.result()))

    # -- readiness ---------------------------------------------------------------------

    def report_online(self, via: str) -> None:
        # Accepted while spawning too: a fast worker can report before its pid is known.
        if self._online.done() or self.exited.done():
            return
        log.debug("%s reported ready via %s", self.label, via)
        self._online.set_result(None)

    async def wait_online(self) -> None:
        """Until ready and its socket accepts, or raise StartError (the worker is killed)."""
        deadline = asyncio.get_running_loop().time() + self.timeouts.online
        try:
            async with asyncio.timeout_at(deadline):
                if self.spec.ready == "notify":
                    await self._race_exit(self._online, "before it reported ready")
                if self.listeners is not None:
                    if self.spec.ready == "socket":
                        assert self.pid is not None
                        probe = asyncio.ensure_future(self._processes.probe_accepting(self.pid, self.listeners.inodes))
                        await self._race_exit(probe, "before it waited for connections on the listeners")
                else:
                    probe = asyncio.ensure_future(self._processes.probe_socket(self.socket_path))
                    await self._race_exit(probe, "before its socket accepted")
        except TimeoutError:
            if self.spec.ready == "notify" and not self._online.done():
                what = "report ready"
            elif self.listeners is not None:
                what = "wait for connections on the shared listeners"
            else:
                what = "accept connections on its socket"
            hint = await self._readiness_hint()
            await self.kill()
            raise StartError(self, f"did not {what} within online_timeout ({self.timeouts.online}s){hint}") from None
        except OSError as exc:  # the probe met something else than a socket (a planted link, a loop)
            await self.kill()
            raise StartError(self, f"cannot connect to its socket {self.socket_path}: {exc.strerror or exc}") from None
        if self.listeners is None:
            await self._prepare_socket_for_nginx()
            self._check_backlog()
        if self.broken_reason is not None:
            await self.kill()
            raise StartError(self, f"reported itself broken before it was published: {self.broken_reason}")
        self.state = WorkerState.SUSPENDED if self.suspended else WorkerState.ONLINE
        self.online_at = time.time()
        if not self._online.done():
            self._online.set_result(None)
        self._on_change()
        log.info(
            "%s online after %.3fs", self.label, self.online_at - self.started_at, extra=worker_event("online", self)
        )

    def _check_backlog(self) -> None:
        """A server that listens with a tiny backlog (socketserver's 5) serves fine until a
        burst: then nginx's connects fail at once. Said when it is published, and in status."""
        queues = unix_listen_queues()
        found = next((q for q in queues or [] if q.path == str(self.socket_path)), None)
        if found is not None and (problem := backlog_problem(self.label, found.backlog, self.spec.backlog)):
            self.warning = problem
            log.warning("%s", problem)

    async def _prepare_socket_for_nginx(self) -> None:
        try:  # whatever mode and group the server chose (gunicorn sets its own)
            self._processes.set_socket_mode(self.socket_path, self.spec.socket_mode, self.socket_gid)
        except PermissionError:
            await self.kill()
            raise StartError(
                self,
                f"cannot give its socket the group {self.socket_gid} (socket_group): the daemon's user must be a "
                "member of that group, or run the daemon as root",
            ) from None
        except OSError as exc:
            await self.kill()
            raise StartError(self, f"its socket {self.socket_path} cannot be made ready for nginx: {exc}") from None

    async def _readiness_hint(self) -> str:
        """A worker that never reported ready but accepts on its socket: a server without
        the library or sd_notify, run with ``ready = "notify"`` (the default)."""
        if self.spec.ready != "notify" or self._online.done() or self.pid is None:
            return ""
        try:
            if self.listeners is not None:
                await asyncio.wait_for(self._processes.probe_accepting(self.pid, self.listeners.inodes), 0.2)
                return (
                    "; it waits for connections on the listeners but never reported ready: set "
                    '`ready = "socket"` for servers without the sockherd library or sd_notify'
                )
            await asyncio.wait_for(self._processes.probe_socket(self.socket_path), 0.2)
        except (TimeoutError, OSError):
            return ""
        return (
            '; its socket accepts connections but it never reported ready: set `ready = "socket"` '
            "for servers without the sockherd library or sd_notify"
        )

    async def _race_exit(self, awaitable: asyncio.Future[None], when: str) -> None:
        watched: set[asyncio.Future[Any]] = {awaitable, self.exited}
        try:
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if awaitable is not self._online:
                awaitable.cancel()
        if self.exited in done:
            raise StartError(self, f"exited with {describe_exit(self.exited.result())} {when}")
        awaitable.result()

    # -- suspension --------------------------------------------------------------------

    def attach_link(self, link: FrameSink) -> None:
        """The worker's IPC connection (re)opened: deliver what it missed."""
        self.link = link
        if self._resume_pending:
            self._send_resume()

    def resume(self) -> None:
        """Release held requests; a promoted standby also learns its index."""
        self.suspended = False
        self.parked = False
        if self.state is WorkerState.SUSPENDED:
            self.state = WorkerState.ONLINE
        self._send_resume()
        self._on_change()

    def _send_resume(self) -> None:
        if self.link is None or not self.link.is_open:
            self._resume_pending = True  # sent on the next hello
            return
        self._resume_pending = False
        data = {} if self.index is None else {"index": self.index}
        self.link.send(protocol.message("resume", data))

    def park(self) -> None:
        """Kept for a rollback, out of traffic: tell it (the library closes its keep-alive
        connections gracefully and runs the app's on_suspend hooks). A rollback's
        ``resume`` takes it back into service."""
        self.parked = True
        if self.link is not None and self.link.is_open:
            self.link.send(protocol.message("suspend"))

    def report_broken(self, reason: str) -> None:
        self.broken_reason = reason
        if self.state in (WorkerState.ONLINE, WorkerState.SUSPENDED):
            self.state = WorkerState.BROKEN
        self._on_change()

    def rss(self) -> int:
        """Resident memory of the worker and its children (a wrapper's server counts)."""
        if not self.alive or self.pid is None:
            return 0
        try:
            proc = psutil.Process(self.pid)
            return int(sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]))
        except psutil.Error:
            return 0

    # -- exit and shutdown -------------------------------------------------------------

    def _on_exit(self, code: int) -> None:
        self._mark_dead(code, remove_socket=False)
        try:
            self._on_exit_callback(self, code)  # first: a standby's failover is a rename away
        finally:
            self._remove_socket()

    def _mark_dead(self, code: int, *, remove_socket: bool = True) -> None:
        self.state = WorkerState.DEAD
        self.exit_code = code
        if not self._launched.done():
            self._launched.set_result(None)
        if remove_socket:
            self._remove_socket()
        if not self.exited.done():
            self.exited.set_result(code)

    def _remove_socket(self) -> None:
        with contextlib.suppress(OSError):
            if stat.S_ISSOCK(os.lstat(self.socket_path).st_mode):
                os.unlink(self.socket_path)

    def signal(self, sig: int) -> bool:
        if not self.alive or self._process is None:
            return False
        return self._process.signal(sig)

    async def _wait_exit(self, seconds: float) -> bool:
        try:
            await asyncio.wait_for(asyncio.shield(self.exited), seconds)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Staged shutdown; concurrent callers share one ladder. Returns once reaped."""
        if not self.alive:
            return
        if self._stop_task is None:
            self.state = WorkerState.TERMINATING
            self._stop_task = asyncio.create_task(self._shutdown_ladder(), name=f"stop {self.id}")
            self._on_change()
        await asyncio.shield(self._stop_task)

    async def _shutdown_ladder(self) -> None:
        t = self.timeouts
        if self.link is not None and self.link.is_open:
            first = "the shutdown message"
            self.link.send(protocol.message("shutdown", {"backlog_drained": True} if self.backlog_drained else None))
        else:
            first = self.spec.stop_signal.name
            self.signal(self.spec.stop_signal)
        log.info("%s stopping: sent %s", self.label, first, extra=worker_event("stopping", self))
        if await self._wait_exit(t.shutdown):
            return
        log.warning(
            "%s still running %.1fs after %s: sending SIGTERM",
            self.label,
            t.shutdown,
            first,
            extra=worker_event("escalated", self, signal="SIGTERM"),
        )
        self.signal(signal.SIGTERM)
        if await self._wait_exit(t.kill):
            return
        log.error(
            "%s ignored SIGTERM for %.1fs: sending SIGKILL",
            self.label,
            t.kill,
            extra=worker_event("escalated", self, signal="SIGKILL"),
        )
        await self.kill()

    async def kill(self) -> None:
        """SIGKILL the worker and its process group, and wait until it is reaped.

        (Whenever a leader exits, the reaper kills what is left of its group too.)
        """
        if not self.alive or self._process is None:
            return
        self._killed = True
        self._process.signal(signal.SIGKILL)
        self._process.kill_group()
        if not await self._wait_exit(_REAP_AFTER_KILL):
            log.error("%s not reaped %.0fs after SIGKILL (uninterruptible sleep?)", self.label, _REAP_AFTER_KILL)

    def status(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "pid": self.pid,
            "index": self.index,
            "state": str(self.state),
            "socket": str(self.socket_path) if self.listeners is None else None,
            "generation": self.generation,
            "started_at": self.started_at,
            "online_at": self.online_at,
            "restarts": self.restarts,
            "integrated": self.link is not None and self.link.is_open,
            "suspended": self.suspended,
            "broken_reason": self.broken_reason,
            "status_text": self.status_text,
            "exit_code": self.exit_code,
        }


def describe_exit(code: int) -> str:
    if code == EXIT_UNKNOWN:
        return "an unknown status (adopted: not this daemon's child)"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


@dataclass(frozen=True, slots=True)
class Generation:
    """One version of the worker spec; a deploy starts the next one beside the current.

    Timeouts are not part of it: a reload changes them for every worker, of any
    generation, and every later spawn (see Herd.timeouts_for).
    """

    number: int
    spec: WorkerSpec

    @classmethod
    def of(cls, worker: Worker) -> Generation:
        """The generation a worker belongs to (its successor must run the same spec)."""
        return cls(worker.generation, worker.spec)

"""What peers on the IPC socket and the sd_notify socket may ask of the daemon.

Every frame arriving here is untrusted: data is validated field by field, an unknown
request gets an error reply, and the only way to change state is a well-formed request
from a peer that said hello (the IPC server already checked its uid).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import psutil

from sockherd import __version__, protocol
from sockherd.config import ConfigError
from sockherd.daemon import succession
from sockherd.daemon.coordinator import Busy, ShuttingDown
from sockherd.daemon.herd import DeployFailed
from sockherd.daemon.ipc import Connection
from sockherd.daemon.messaging import MessagingError, Router, request_fields
from sockherd.daemon.process import Worker
from sockherd.daemon.reaper import kill_process_group, process_parent, process_start_time
from sockherd.protocol import Message, ProtocolError

if TYPE_CHECKING:
    from sockherd.daemon.daemon import Daemon

log = logging.getLogger("sockherd")

Command = Callable[[Connection, Message], Awaitable[None]]
Progress = Callable[[str], None]
MAX_REASON = 1000
EARLY_NOTIFY_LIMIT = 4096  # datagrams kept for pids not yet registered
EARLY_NOTIFY_TTL = 60.0


def log_progress(text: str) -> None:
    log.info("%s", text)


class Control:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.herd = daemon.herd
        # A worker can report READY=1 before the Popen that started it has returned to
        # the loop (the exec runs in a thread): its datagram waits here for its pid.
        # Keyed by pid and start time, so a reused pid never inherits another's report.
        self._early_notify: OrderedDict[tuple[int, int | None], tuple[float, dict[str, str]]] = OrderedDict()
        self.herd.on_spawned = self._replay_early_notify
        self._commands: dict[str, Command] = {
            "status": self._status,
            "config": self._config,
            "start": self._start,
            "restart": self._restart,
            "resume": self._resume,
            "set-workers": self._set_workers,
            "set-standby": self._set_standby,
            "stop": self._stop,
            "reload": self._reload,
            "terminate": self._terminate,
            "rollback": self._rollback,
            "commit": self._commit,
            "promote": self._promote,
            "send-msg": self._send_msg,
            "send-req": self._send_req,
        }
        self.router = Router(self.herd)

    # -- dispatch ------------------------------------------------------------------------

    async def on_message(self, conn: Connection, msg: Message) -> None:
        if msg.is_reply:
            if conn.role == protocol.ROLE_WORKER:
                await self.router.on_reply(conn, msg)  # a worker answering a send-req
            return
        if conn.role is None:
            if msg.type != "hello":
                raise ProtocolError(f"expected a hello first, got {msg.type!r}")
            await self._hello(conn, msg)
        elif conn.role == protocol.ROLE_WORKER:
            await self._worker_message(conn, msg)
        elif msg.id is not None:
            command = self._commands.get(msg.type)
            if command is None:
                conn.reply(msg.id, errors=[f"unknown request type {msg.type!r}"])
            else:
                await command(conn, msg)

    async def _hello(self, conn: Connection, msg: Message) -> None:
        data = msg.data if isinstance(msg.data, dict) else {}
        role, version = data.get("role"), data.get("version", protocol.PROTOCOL_VERSION)
        error = None
        if role not in (protocol.ROLE_CLIENT, protocol.ROLE_WORKER):
            error = f"hello: 'role' must be {protocol.ROLE_CLIENT!r} or {protocol.ROLE_WORKER!r}"
        elif not isinstance(version, int) or version > protocol.PROTOCOL_VERSION:
            error = (
                f"hello: protocol version {version!r} is not supported (this daemon speaks {protocol.PROTOCOL_VERSION})"
            )
        elif role == protocol.ROLE_WORKER:
            error = await self._attach_worker(conn, data.get("id"))
        if error is not None:
            log.warning("IPC: refused a hello from pid %d: %s", conn.pid, error)
            if msg.id is not None:
                conn.reply(msg.id, errors=[error])
            raise ProtocolError(error)
        conn.role = role
        if msg.id is not None:
            conn.reply(msg.id, {"daemon_pid": os.getpid(), "version": __version__, "name": self.daemon.config.name})

    async def _attach_worker(self, conn: Connection, worker_id: object) -> str | None:
        worker = self.herd.workers.get(worker_id) if isinstance(worker_id, str) else None
        if worker is None:
            return f"hello: no worker with id {worker_id!r}"
        if worker.pid is None and worker.spec.preload:
            # Forked from its generation's fork server, it may say hello before the fork's
            # answer is read; its environ is the fork server's, so only its pid can tell.
            await worker.wait_launched()
            if worker.pid is None and process_parent(conn.pid) == os.getpid():
                # Our child, for a launch that failed: forked by a fork server that died
                # before it answered. Nobody manages it; unreaped, its pid is still its own.
                log.warning("IPC: pid %d was forked for %s, whose launch failed: killing it", conn.pid, worker.id)
                kill_process_group(conn.pid)
                return f"hello: worker {worker.id} failed to start; pid {conn.pid} was killed"
        if worker.pid is None and _our_child_with_id(conn.pid, worker.id):
            pass  # spawned, its pid not registered yet: the kernel says it is our child with that id
        elif self.herd.worker_for_pid(conn.pid) is not worker:
            return f"hello: pid {conn.pid} is not worker {worker.id} (pid {worker.pid}) or its child"
        conn.worker_id = worker.id
        # The worker process itself owns the link; a child that inherited its
        # environment (a wrapper's server, a subprocess importing the library) may
        # report for it, but never displaces the worker's own connection.
        if conn.pid == worker.pid or worker.link is None or not worker.link.is_open:
            worker.attach_link(conn)
        return None

    def on_disconnect(self, conn: Connection) -> None:
        self.router.on_disconnect(conn)
        if conn.worker_id is not None:
            worker = self.herd.workers.get(conn.worker_id)
            if worker is not None and worker.link is conn:
                # Another connection the worker process itself still has open takes over
                # (a second hello displaced the first; the second one went away).
                others = [
                    c
                    for c in self.daemon.ipc.connections
                    if c is not conn and c.worker_id == worker.id and c.pid == worker.pid and c.is_open
                ]
                worker.link = others[-1] if others else None

    async def _worker_message(self, conn: Connection, msg: Message) -> None:
        worker = self.herd.workers.get(conn.worker_id or "")
        if worker is None:
            return
        data = msg.data if isinstance(msg.data, dict) else {}
        if msg.type == "online":
            worker.report_online("ipc")
        elif msg.type == "broken":
            self.herd.healer.on_broken(worker, str(data.get("reason", ""))[:MAX_REASON] or "no reason given")
        elif msg.type == "send-msg" and msg.id is not None:
            await self._send_msg(conn, msg, sender=worker)
        elif msg.type == "send-req" and msg.id is not None:
            await self._send_req(conn, msg, sender=worker)
        elif msg.id is not None:
            conn.reply(msg.id, errors=[f"unknown request type {msg.type!r}"])

    def on_notify(self, pid: int, fields: dict[str, str]) -> None:
        """An sd_notify datagram, attributed to a worker by the kernel's credentials."""
        worker = self.herd.worker_for_pid(pid)
        if worker is None:
            self._early_notify[(pid, process_start_time(pid))] = (time.monotonic(), fields)
            while len(self._early_notify) > EARLY_NOTIFY_LIMIT:
                self._early_notify.popitem(last=False)
            return
        self._apply_notify(worker, fields)

    def _replay_early_notify(self, worker: Worker) -> None:
        assert worker.pid is not None
        early = self._early_notify.pop((worker.pid, worker.start_time), None)
        if early is not None and time.monotonic() - early[0] < EARLY_NOTIFY_TTL:
            self._apply_notify(worker, early[1])

    def _apply_notify(self, worker: Worker, fields: dict[str, str]) -> None:
        if "STATUS" in fields:
            worker.status_text = fields["STATUS"][:200]
        if fields.get("READY") == "1":
            worker.report_online("sd_notify")
        if "BROKEN" in fields:  # our extension: systemd ignores fields it does not know
            self.herd.healer.on_broken(worker, fields["BROKEN"][:MAX_REASON] or "no reason given")

    # -- helpers -------------------------------------------------------------------------

    @staticmethod
    def _streaming(conn: Connection, request_id: int | str) -> Progress:
        """Progress lines go to the log and, as partial replies, to the asking client."""

        def progress(text: str) -> None:
            log_progress(text)
            conn.reply(request_id, {"progress": text}, done=False)

        return progress

    @staticmethod
    def _int_field(
        conn: Connection, msg: Message, key: str, default: int | None, bounds: tuple[int, int]
    ) -> int | None:
        """A validated integer from the request's data, or None after an error reply."""
        assert msg.id is not None
        data = msg.data if isinstance(msg.data, dict) else {}
        value = data.get(key, default)
        low, high = bounds
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            conn.reply(msg.id, errors=[f"{msg.type}: {key!r} must be an integer from {low} to {high}"])
            return None
        return value

    # -- commands ------------------------------------------------------------------------

    @staticmethod
    def _origin(conn: Connection, sender: Worker | None) -> dict[str, Any]:
        return {"worker": sender.id, "pid": sender.pid} if sender is not None else {"client": conn.pid}

    async def _send_msg(self, conn: Connection, msg: Message, sender: Worker | None = None) -> None:
        assert msg.id is not None
        try:
            selector, name, data, _ = request_fields(msg.data, request=False)
            sent, errors = self.router.send_message(
                selector, name, data, self._origin(conn, sender), sender.id if sender else None
            )
        except MessagingError as exc:
            conn.reply(msg.id, errors=[str(exc)])
            return
        conn.reply(msg.id, {"sent": sent}, errors=errors)

    async def _send_req(self, conn: Connection, msg: Message, sender: Worker | None = None) -> None:
        request_id = msg.id
        assert request_id is not None

        def emit(item: dict[str, Any]) -> None:
            conn.reply(request_id, item, done=False)

        try:
            selector, name, data, timeout = request_fields(msg.data, request=True)
            outcomes, errors = await self.router.request(
                selector,
                name,
                data,
                timeout=timeout,
                origin=self._origin(conn, sender),
                emit=emit,
                writable=conn.writable,
                self_id=sender.id if sender else None,
            )
        except MessagingError as exc:
            conn.reply(request_id, errors=[str(exc)])
            return
        conn.reply(request_id, {"workers": outcomes}, errors=errors)

    async def _status(self, conn: Connection, msg: Message) -> None:
        assert msg.id is not None
        conn.reply(msg.id, self.daemon.status())

    async def _config(self, conn: Connection, msg: Message) -> None:
        assert msg.id is not None
        conn.reply(msg.id, self.daemon.config.as_dict())

    async def _deploy(self, conn: Connection, msg: Message, run: Callable[..., Awaitable[Any]]) -> None:
        request_id = msg.id
        assert request_id is not None
        attempts = self._int_field(conn, msg, "max_attempts", self.daemon.config.max_start_attempts, (1, 100))
        if attempts is None:
            return
        data = msg.data if isinstance(msg.data, dict) else {}
        suspended = data.get("suspended") is True
        if msg.type == "restart" and data.get("upgrade") is True:
            await self.answer_deploy(
                conn,
                request_id,
                msg.type,
                lambda progress: self._upgrade(conn, request_id, attempts, suspended, progress),
            )
            return
        extra: dict[str, Any] = {}
        if msg.type == "restart":
            keep = data.get("keep_previous", self.daemon.config.keep_previous)
            if keep is not None and (
                isinstance(keep, bool) or not isinstance(keep, int | float) or not 0 < keep <= 86400
            ):
                conn.reply(request_id, errors=["restart: 'keep_previous' must be a number of seconds from 0 to 86400"])
                return
            canary = data.get("canary")
            if canary is not None and (isinstance(canary, bool) or not isinstance(canary, int) or canary < 1):
                conn.reply(request_id, errors=["restart: 'canary' must be a positive integer"])
                return
            if canary is not None and "keep_previous" not in data:
                keep = None  # a canary keeps the old workers of its slots by itself
            extra = {"keep_previous": float(keep) if keep is not None else None, "canary": canary}
        await self.answer_deploy(
            conn, request_id, msg.type, lambda progress: run(attempts, progress, suspended=suspended, **extra)
        )

    async def _upgrade(
        self, conn: Connection, request_id: int | str, attempts: int, suspended: bool, progress: Progress
    ) -> None:
        """``restart --upgrade``: re-exec a newer installed sockherd in place, or, with the
        same version installed, reload the config and restart (the command means the same)."""
        daemon = self.daemon
        if await succession.upgrade_in_place(
            daemon, attempts, progress, suspended=suspended, conn=conn, request_id=request_id
        ):
            return  # unreachable: the new image answers
        progress(f"sockherd {__version__} is the installed version: reloading the config and restarting")
        plan = await daemon.ops.reload(progress)
        if not (plan.restart and daemon.herd.running):
            await daemon.ops.restart(attempts, progress, suspended=suspended)

    async def answer_deploy(
        self,
        conn: Connection,
        request_id: int | str,
        name: str,
        run: Callable[[Progress], Awaitable[Any]],
        *,
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Run a start or restart for a client, streaming progress, and answer it."""
        try:
            result = await run(self._streaming(conn, request_id))
        except (Busy, ShuttingDown, ConfigError) as exc:
            conn.reply(request_id, errors=[str(exc)])
        except DeployFailed as exc:
            conn.reply(request_id, {"output": exc.output}, errors=[exc.reason])
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            conn.reply(request_id, errors=[f"{name} interrupted by a stop"])
        else:
            conn.reply(request_id, {"result": result, "status": self.daemon.status(), **(extra or {})})

    async def _start(self, conn: Connection, msg: Message) -> None:
        await self._deploy(conn, msg, self.daemon.ops.start)

    async def _restart(self, conn: Connection, msg: Message) -> None:
        await self._deploy(conn, msg, self.daemon.ops.restart)

    async def _rollback(self, conn: Connection, msg: Message) -> None:
        assert msg.id is not None
        received = time.perf_counter()  # the time reported runs from here to the last rename
        await self.answer_deploy(
            conn, msg.id, msg.type, lambda progress: self.daemon.ops.rollback(progress, received_at=received)
        )

    async def _commit(self, conn: Connection, msg: Message) -> None:
        assert msg.id is not None
        await self.answer_deploy(conn, msg.id, msg.type, lambda progress: self.daemon.ops.commit())

    async def _promote(self, conn: Connection, msg: Message) -> None:
        assert msg.id is not None
        attempts = self.daemon.config.max_start_attempts
        await self.answer_deploy(conn, msg.id, msg.type, lambda progress: self.daemon.ops.promote(attempts, progress))

    async def _resume(self, conn: Connection, msg: Message) -> None:
        assert msg.id is not None
        try:
            resumed = await self.daemon.ops.resume()
        except (Busy, ShuttingDown) as exc:
            conn.reply(msg.id, errors=[str(exc)])
        else:
            conn.reply(msg.id, {"resumed": resumed})

    async def _scale(
        self, conn: Connection, msg: Message, apply: Callable[[int, int, Progress], Awaitable[None]]
    ) -> None:
        request_id = msg.id
        assert request_id is not None
        count = self._int_field(conn, msg, "count", None, (1 if msg.type == "set-workers" else 0, 4096))
        if count is None:
            return
        try:
            await apply(count, self.daemon.config.max_start_attempts, self._streaming(conn, request_id))
        except (Busy, ShuttingDown, DeployFailed) as exc:
            conn.reply(request_id, errors=[str(exc)])
        else:
            conn.reply(request_id, {"result": count, "status": self.daemon.status()})

    async def _set_workers(self, conn: Connection, msg: Message) -> None:
        await self._scale(conn, msg, self.daemon.ops.set_workers)

    async def _set_standby(self, conn: Connection, msg: Message) -> None:
        await self._scale(conn, msg, self.daemon.ops.set_standby)

    async def _stop(self, conn: Connection, msg: Message) -> None:
        assert msg.id is not None
        count = len(self.herd.workers)
        await self.daemon.ops.stop()  # preempts; never refused
        conn.reply(msg.id, {"stopped": count})

    async def _reload(self, conn: Connection, msg: Message) -> None:
        request_id = msg.id
        assert request_id is not None
        try:
            changed = await self.daemon.reload(self._streaming(conn, request_id))
        except ConfigError as exc:
            conn.reply(request_id, errors=[f"reload refused, the running configuration stays: {exc}"])
        except (Busy, ShuttingDown) as exc:
            conn.reply(request_id, errors=[str(exc)])
        except DeployFailed as exc:
            conn.reply(request_id, {"output": exc.output}, errors=[f"the running configuration stays: {exc.reason}"])
        else:
            conn.reply(request_id, {"result": changed})

    async def _terminate(self, conn: Connection, msg: Message) -> None:
        assert msg.id is not None
        log.info("terminate requested by pid %d: stopping all workers", conn.pid)
        await self.daemon.ops.quit("terminate")
        conn.reply(msg.id, {"terminated": True})
        self.daemon.request_quit()


def _our_child_with_id(pid: int, worker_id: str) -> bool:
    """A direct child of this daemon whose environment names ``worker_id``."""
    try:
        proc = psutil.Process(pid)
        return proc.ppid() == os.getpid() and proc.environ().get("SOCKHERD_WORKER_ID") == worker_id
    except psutil.Error:
        return False

"""The daemon: one asyncio loop, one signal entry point, the IPC server, command dispatch.

Signal handlers only enqueue; a single task dispatches each signal to its
``handle_<name>`` method, so every signal has one obvious home and none runs while
another is half done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

from sockherd import __version__, protocol
from sockherd.config import Config, ConfigError, load_config
from sockherd.daemon.devserver import DevServer
from sockherd.daemon import deploy
from sockherd.daemon.herd import Busy, DeployFailed, Herd
from sockherd.daemon.ipc import Connection, IpcServer
from sockherd.daemon.notify import NotifySocket
from sockherd.daemon.publish import SocketNames, TmpDirError, prepare_tmp_dir, socket_is_live, sweep_tmp_dir
from sockherd.daemon.reaper import Reaper
from sockherd.daemon.reload import plan_reload
from sockherd.protocol import Message, ProtocolError

log = logging.getLogger("sockherd")

HANDLED_SIGNALS = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGUSR1,
    signal.SIGUSR2,
    signal.SIGTTIN,
    signal.SIGTTOU,
)


class DaemonError(Exception):
    """The daemon cannot start; the message says why."""


def reset_signal_dispositions() -> None:
    """Make sure workers start with default signal handling.

    exec() resets caught signals to default but keeps ignored ones ignored, and a
    daemon started from ``nohup`` or a shell's ``&`` has SIGINT/SIGQUIT/SIGHUP ignored;
    workers would inherit that and never stop on ^C or SIGINT. The mask is inherited
    too, so it is cleared.
    """
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about the daemon itself, if it is listening."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    address = "\0" + path[1:] if path.startswith("@") else path
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(state.encode(), address)


class Daemon:
    def __init__(self, config: Config, *, dev_server_port: int | None = None, start_workers: bool = True) -> None:
        self.config = config
        self._dev_server_port = dev_server_port
        self._start_workers = start_workers
        self.started_at = time.time()
        self._quit = asyncio.Event()
        self._signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
        self._quitting = False
        self._loop = asyncio.get_running_loop()
        self.reaper = Reaper(self._loop)
        self.herd = Herd(config, self.reaper)
        self.ipc = IpcServer(config.ipc_path, self._on_message, self._on_disconnect)
        self.notify = NotifySocket(config.notify_path, self._on_notify)
        self.dev_server: DevServer | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._commands: dict[str, Callable[[Connection, Message], Awaitable[None]]] = {
            "status": self._cmd_status,
            "config": self._cmd_config,
            "start": self._cmd_start,
            "restart": self._cmd_restart,
            "resume": self._cmd_resume,
            "set-workers": self._cmd_set_workers,
            "set-standby": self._cmd_set_standby,
            "stop": self._cmd_stop,
            "reload": self._cmd_reload,
            "terminate": self._cmd_terminate,
        }

    # -- life cycle ---------------------------------------------------------------------

    def _prepare(self) -> None:
        cfg = self.config
        try:
            prepare_tmp_dir(cfg.tmp_dir)
        except TmpDirError as exc:
            raise DaemonError(str(exc)) from None
        if cfg.ipc_path.exists() and socket_is_live(cfg.ipc_path):
            raise DaemonError(f"another sockherd daemon is already running on {cfg.ipc_path}")
        sweep_tmp_dir(cfg.tmp_dir, SocketNames.from_pattern(cfg.socket_file), (cfg.ipc_file, cfg.notify_path.name))

    async def run(self) -> int:
        self._prepare()
        _set_title(f"sockherd daemon: {self.config.name} [{self.config.tmp_dir}]")
        reset_signal_dispositions()
        self.reaper.install()
        await self.ipc.start()
        self.notify.open(self._loop)
        for sig in HANDLED_SIGNALS:
            self._loop.add_signal_handler(sig, self._signals.put_nowait, sig)
        dispatcher = asyncio.create_task(self._dispatch_signals(), name="signals")
        try:
            if self._dev_server_port is not None:
                self.dev_server = DevServer(self._dev_server_port, self._published_paths)
                try:
                    await self.dev_server.start()
                except OSError as exc:
                    self.dev_server = None
                    port = self._dev_server_port
                    raise DaemonError(f"dev server: cannot listen on 127.0.0.1:{port}: {exc.strerror}") from None

            log.info("daemon %s ready (pid %d, IPC %s)", __version__, os.getpid(), self.config.ipc_path)
            if self._start_workers:
                self._spawn_background(self._initial_start())
            else:
                _sd_notify("READY=1")
            await self._quit.wait()
        finally:
            _sd_notify("STOPPING=1")
            await self._shutdown()
            dispatcher.cancel()
            for sig in HANDLED_SIGNALS:
                self._loop.remove_signal_handler(sig)
        log.info("daemon exits")
        return 0

    async def _initial_start(self) -> None:
        try:
            await self.herd.start(self.config.max_start_attempts, _log_progress)
        except DeployFailed as exc:
            log.error("workers failed to start: %s%s", exc.reason, "".join(f"\n  | {line}" for line in exc.output))
            log.error("the daemon keeps running with no workers; fix the app, then run `sockherd start`")
        finally:
            _sd_notify("READY=1")

    async def _shutdown(self) -> None:
        log.info("stopping all workers")
        await self.herd.stop()
        for task in list(self._background):
            task.cancel()
        if self.dev_server is not None:
            await self.dev_server.close()
        await self.ipc.close()
        self.notify.close(self._loop)
        self.reaper.uninstall()

    def request_quit(self) -> None:
        if self._quitting:
            log.warning("second quit request: killing all workers now")
            self._spawn_background(self.herd.kill_all())
            return
        self._quitting = True
        self._quit.set()

    def _spawn_background(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _published_paths(self) -> list[Any]:
        return [self.config.symlink_path(i) for i in sorted(self.herd.slots)]

    # -- signals ------------------------------------------------------------------------

    async def _dispatch_signals(self) -> None:
        while True:
            sig = await self._signals.get()
            handler = getattr(self, f"handle_{sig.name[3:].lower()}")
            try:
                await handler()
            except Exception:
                log.exception("handling %s failed", sig.name)

    async def handle_term(self) -> None:
        log.info("SIGTERM: graceful quit")
        self.request_quit()

    async def handle_int(self) -> None:
        log.info("SIGINT: graceful quit (again to kill the workers at once)")
        self.request_quit()

    async def handle_hup(self) -> None:
        log.info("SIGHUP: reloading the configuration")
        self._spawn_background(self._reload_logged())

    async def handle_usr2(self) -> None:
        log.info("SIGUSR2: restarting the workers")
        self._spawn_background(self._restart_logged())

    async def handle_usr1(self) -> None:
        # Worker output files are opened afresh for every spawn, so a rotated file is
        # picked up by the next generation; the daemon holds no log file of its own.
        log.info("SIGUSR1: log files are reopened at each spawn; nothing held open")

    async def handle_ttin(self) -> None:
        log.info("SIGTTIN: one worker more")
        self._spawn_background(self._scale_logged(self.herd.target_workers + 1))

    async def handle_ttou(self) -> None:
        if self.herd.target_workers <= 1:
            log.warning("SIGTTOU: already at one worker; not scaling to zero")
            return
        log.info("SIGTTOU: one worker fewer")
        self._spawn_background(self._scale_logged(self.herd.target_workers - 1))

    async def _scale_logged(self, count: int) -> None:
        try:
            await self._set_workers(count, _log_progress)
        except (Busy, DeployFailed) as exc:
            log.error("scaling to %d worker(s) failed: %s", count, exc)

    async def _set_workers(self, count: int, progress: Callable[[str], None]) -> None:
        herd = self.herd
        await herd.exclusive(
            "scale", lambda: deploy.set_workers(herd, count, self.config.max_start_attempts, progress)
        )

    async def _set_standby(self, count: int, progress: Callable[[str], None]) -> None:
        herd = self.herd
        await herd.exclusive(
            "scale", lambda: deploy.set_standby(herd, count, self.config.max_start_attempts, progress)
        )

    async def _restart_logged(self, config: Config | None = None) -> None:
        try:
            await self.herd.restart(self.config.max_start_attempts, _log_progress, config)
        except (Busy, DeployFailed) as exc:
            log.error("restart failed: %s", exc)

    async def _reload_logged(self) -> None:
        try:
            changed = await self._reload(_log_progress)
        except (ConfigError, Busy, DeployFailed) as exc:
            log.error("reload failed, the running configuration stays: %s", exc)
            return
        log.info("reload done: %s", changed)

    async def _reload(self, progress: Callable[[str], None]) -> str:
        """Apply a changed config with the smallest set of actions (see reload.py)."""
        new = load_config(self.config.path)
        herd = self.herd
        plan = plan_reload(self.config, new, workers=herd.target_workers, standby=herd.target_standby)
        if plan.restart and herd.running:
            # The new config becomes the running one only once its generation serves.
            progress(f"{plan.describe()}: restarting the workers")
            herd.target_workers, herd.target_standby = new.workers, new.standby
            await herd.restart(new.max_start_attempts, progress, new, suspended=herd.suspended)
        else:
            herd.config = new
        self.config = new
        if plan.timeouts:
            for worker in herd.workers.values():
                worker.timeouts = new.timeouts
        if plan.retitle:
            _set_title(f"sockherd daemon: {new.name} [{new.tmp_dir}]")
        if plan.republish:
            herd.republish()
        if plan.recycling:
            herd.healer.config_changed()
        if plan.dev_server:
            await self._restart_dev_server(new.dev_server)
        if plan.workers is not None:
            await self._set_workers(plan.workers, progress)
        if plan.standby is not None:
            await self._set_standby(plan.standby, progress)
        return plan.describe()

    async def _restart_dev_server(self, port: int | None) -> None:
        if self.dev_server is not None:
            await self.dev_server.close()
            self.dev_server = None
        if port is not None:
            self.dev_server = DevServer(port, self._published_paths)
            try:
                await self.dev_server.start()
            except OSError as exc:
                log.error("dev server: cannot listen on 127.0.0.1:%d: %s", port, exc.strerror)
                self.dev_server = None

    # -- IPC ----------------------------------------------------------------------------

    async def _on_message(self, conn: Connection, msg: Message) -> None:
        if msg.is_reply:
            return
        if conn.role is None:
            if msg.type != "hello":
                raise ProtocolError(f"expected a hello first, got {msg.type!r}")
            self._hello(conn, msg)
            return
        if conn.role == protocol.ROLE_WORKER:
            self._worker_message(conn, msg)
            return
        if msg.id is None:
            return
        command = self._commands.get(msg.type)
        if command is None:
            conn.reply(msg.id, errors=[f"unknown request type {msg.type!r}"])
            return
        await command(conn, msg)

    def _hello(self, conn: Connection, msg: Message) -> None:
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
            worker_id = data.get("id")
            worker = self.herd.workers.get(worker_id) if isinstance(worker_id, str) else None
            if worker is None:
                error = f"hello: no worker with id {data.get('id')!r}"
            elif self.herd.worker_for_pid(conn.pid) is not worker:
                error = f"hello: pid {conn.pid} is not worker {worker.id} (pid {worker.pid}) or its child"
            else:
                conn.worker_id = worker.id
                # The worker process itself owns the link; a child that inherited its
                # environment (a wrapper's server, a subprocess importing the library)
                # may report for it, but never displaces the worker's own connection.
                if conn.pid == worker.pid or worker.link is None or not worker.link.is_open:
                    worker.attach_link(conn)
        if error is not None:
            log.warning("IPC: refused a hello from pid %d: %s", conn.pid, error)
            if msg.id is not None:
                conn.reply(msg.id, errors=[error])
            raise ProtocolError(error)
        conn.role = role
        if msg.id is not None:
            conn.reply(msg.id, {"daemon_pid": os.getpid(), "version": __version__, "name": self.config.name})

    def _on_disconnect(self, conn: Connection) -> None:
        if conn.worker_id is not None:
            worker = self.herd.workers.get(conn.worker_id)
            if worker is not None and worker.link is conn:
                worker.link = None

    def _worker_message(self, conn: Connection, msg: Message) -> None:
        worker = self.herd.workers.get(conn.worker_id or "")
        if worker is None:
            return
        data = msg.data if isinstance(msg.data, dict) else {}
        if msg.type == "online":
            worker.report_online("ipc")
        elif msg.type == "broken":
            self.herd.healer.on_broken(worker, str(data.get("reason", ""))[:1000] or "no reason given")
        elif msg.id is not None:
            conn.reply(msg.id, errors=[f"unknown request type {msg.type!r}"])

    def _on_notify(self, pid: int, fields: dict[str, str]) -> None:
        worker = self.herd.worker_for_pid(pid)
        if worker is None:
            log.debug("notify from unknown pid %d: %s", pid, fields)
            return
        if "STATUS" in fields:
            worker.status_text = fields["STATUS"][:200]
        if fields.get("READY") == "1":
            worker.report_online("sd_notify")
        if "BROKEN" in fields:  # our extension: systemd ignores fields it does not know
            self.herd.healer.on_broken(worker, fields["BROKEN"][:1000] or "no reason given")

    # -- commands -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        herd = self.herd
        state = "stopping" if self._quitting else ("running" if herd.running else "stopped")
        return {
            "daemon": {
                "pid": os.getpid(),
                "version": __version__,
                "name": self.config.name,
                "config": str(self.config.path),
                "tmp_dir": str(self.config.tmp_dir),
                "ipc": str(self.config.ipc_path),
                "started_at": self.started_at,
                "state": state,
                "suspended": herd.suspended,
                "generation": herd.current.number if herd.current else None,
                "workers": herd.target_workers,
                "standby": herd.target_standby,
                "strategy": self.config.strategy,
                "operation": herd.operation,
                "dev_server": self.dev_server.port if self.dev_server else None,
            },
            "workers": herd.status(),
            "slots": herd.healer.slot_status(),
        }

    async def _cmd_status(self, conn: Connection, msg: Message) -> None:
        assert msg.id is not None
        conn.reply(msg.id, self.status())

    async def _cmd_config(self, conn: Connection, msg: Message) -> None:
        assert msg.id is not None
        conn.reply(msg.id, self.config.as_dict())

    def _int_field(self, conn: Connection, msg: Message, key: str, default: int | None, low: int, high: int) -> int | None:
        """A validated integer from the request's data, or None after an error reply."""
        assert msg.id is not None
        data = msg.data if isinstance(msg.data, dict) else {}
        value = data.get(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            conn.reply(msg.id, errors=[f"{msg.type}: {key!r} must be an integer from {low} to {high}"])
            return None
        return value

    async def _deploy_command(self, conn: Connection, msg: Message, run: Callable[..., Awaitable[Any]]) -> None:
        request_id = msg.id
        assert request_id is not None
        attempts = self._int_field(conn, msg, "max_attempts", self.config.max_start_attempts, 1, 100)
        if attempts is None:
            return
        data = msg.data if isinstance(msg.data, dict) else {}
        suspended = data.get("suspended", False) is True

        def progress(text: str) -> None:
            _log_progress(text)
            conn.reply(request_id, {"progress": text}, done=False)

        try:
            result = await run(attempts, progress, suspended=suspended)
        except Busy as exc:
            conn.reply(request_id, errors=[str(exc)])
        except DeployFailed as exc:
            conn.reply(request_id, {"output": exc.output}, errors=[exc.reason])
        except asyncio.CancelledError:
            if asyncio.current_task() is not None and asyncio.current_task().cancelling():  # type: ignore[union-attr]
                raise
            conn.reply(request_id, errors=[f"{msg.type} interrupted by a stop"])
        else:
            conn.reply(request_id, {"result": result, "status": self.status()})

    async def _cmd_start(self, conn: Connection, msg: Message) -> None:
        await self._deploy_command(conn, msg, self.herd.start)

    async def _cmd_restart(self, conn: Connection, msg: Message) -> None:
        await self._deploy_command(conn, msg, self.herd.restart)

    async def _cmd_resume(self, conn: Connection, msg: Message) -> None:
        assert msg.id is not None
        conn.reply(msg.id, {"resumed": self.herd.resume()})

    async def _scale_command(self, conn: Connection, msg: Message, apply: Callable[..., Awaitable[None]]) -> None:
        request_id = msg.id
        assert request_id is not None
        count = self._int_field(conn, msg, "count", None, 1 if msg.type == "set-workers" else 0, 4096)
        if count is None:
            return

        def progress(text: str) -> None:
            _log_progress(text)
            conn.reply(request_id, {"progress": text}, done=False)

        try:
            await apply(count, progress)
        except (Busy, DeployFailed) as exc:
            conn.reply(request_id, errors=[str(exc)])
        else:
            conn.reply(request_id, {"result": count, "status": self.status()})

    async def _cmd_set_workers(self, conn: Connection, msg: Message) -> None:
        await self._scale_command(conn, msg, self._set_workers)

    async def _cmd_set_standby(self, conn: Connection, msg: Message) -> None:
        await self._scale_command(conn, msg, self._set_standby)

    async def _cmd_stop(self, conn: Connection, msg: Message) -> None:
        assert msg.id is not None
        count = len(self.herd.workers)
        await self.herd.stop()
        conn.reply(msg.id, {"stopped": count})

    async def _cmd_reload(self, conn: Connection, msg: Message) -> None:
        request_id = msg.id
        assert request_id is not None
        try:

            def progress(text: str) -> None:
                _log_progress(text)
                conn.reply(request_id, {"progress": text}, done=False)

            changed = await self._reload(progress)
        except ConfigError as exc:
            conn.reply(request_id, errors=[f"reload refused, the running configuration stays: {exc}"])
        except (Busy, DeployFailed) as exc:
            conn.reply(request_id, errors=[f"reload failed: {exc}"])
        else:
            conn.reply(request_id, {"result": changed})

    async def _cmd_terminate(self, conn: Connection, msg: Message) -> None:
        assert msg.id is not None
        log.info("terminate requested by pid %d: stopping all workers", conn.pid)
        await self.herd.stop()
        conn.reply(msg.id, {"terminated": True})
        self.request_quit()


def _log_progress(text: str) -> None:
    log.info("%s", text)


def _set_title(title: str) -> None:
    try:
        from setproctitle import setproctitle
    except ImportError:  # pragma: no cover - a declared dependency, but never fatal
        return
    setproctitle(title)

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
import stat
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psutil

from sockherd import __version__
from sockherd.config import Config, ConfigError
from sockherd.daemon import succession
from sockherd.daemon.control import Control, log_progress
from sockherd.daemon.coordinator import Busy, ShuttingDown
from sockherd.daemon.devserver import DevServer
from sockherd.daemon.guard import LinkWatch, TmpDir
from sockherd.daemon.hardening import is_dumpable, make_undumpable, raise_fd_limit
from sockherd.daemon.herd import DeployFailed, Herd
from sockherd.daemon.ipc import IpcServer
from sockherd.daemon.lifecycle import (
    HANDLED_SIGNALS,
    DaemonError,
    reset_signal_dispositions,
    sd_notify,
    unblock_signals,
)
from sockherd.daemon.listeners import ListenerError, Listeners, open_listeners
from sockherd.daemon.notify import NotifySocket
from sockherd.daemon.operations import Operations
from sockherd.daemon.processes import OsProcesses
from sockherd.daemon.publish import (
    SocketNames,
    TmpDirError,
    nginx_access_problem,
    prepare_tmp_dir,
    socket_is_live,
    sweep_tmp_dir,
)
from sockherd.daemon.reaper import Reaper
from sockherd.daemon.state_file import write_atomically
from sockherd.daemon.upgrade import Inherited

log = logging.getLogger("sockherd")

_ORIGINS = {
    "bound": "bound by this daemon",
    "systemd": "from systemd socket activation",
    "upgrade": "kept across the upgrade",
    "recovered": "taken back from a running worker",
}


class Daemon:
    def __init__(
        self,
        config: Config,
        *,
        dev_server_port: int | None = None,
        start_workers: bool = True,
        inherited: Inherited | None = None,
        activated: list[socket.socket] | None = None,
    ) -> None:
        self.inherited = inherited  # this image is an upgrade of the one before (same pid)
        self._activated = activated or []  # systemd socket activation: LISTEN_FDS given to the daemon
        self._dev_server_port = dev_server_port
        self._start_workers = start_workers
        self.started_at = time.time()
        self._quit = asyncio.Event()
        self._signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self.reaper = Reaper(self._loop)
        self.herd = Herd(config, OsProcesses(self.reaper), state_path=config.state_path)
        self.ops = Operations(self.herd)
        self.control = Control(self)
        self.ipc = IpcServer(
            config.ipc_path,
            self.control.on_message,
            self.control.on_disconnect,
            sock=inherited.ipc if inherited else None,
        )
        self.notify = NotifySocket(
            config.notify_path, self.control.on_notify, sock=inherited.notify if inherited else None
        )
        self.dev_server: DevServer | None = None
        self._link_watch = LinkWatch(self.herd.check_link)
        self.herd.on_canary_failed = lambda why: self._spawn_background(self._auto_rollback(why))
        self._background: set[asyncio.Task[Any]] = set()

    @property
    def config(self) -> Config:
        """The running config: the herd's desired state holds the one copy."""
        return self.herd.config

    # -- life cycle ---------------------------------------------------------------------

    def _prepare(self) -> None:
        cfg = self.config
        group = cfg.worker.socket_group
        try:
            created = prepare_tmp_dir(cfg.tmp_dir, group)
        except TmpDirError as exc:
            raise DaemonError(str(exc)) from None
        if created:
            st = os.stat(cfg.tmp_dir)
            log.info("created tmp_dir %s (mode %o, gid %d)", cfg.tmp_dir, stat.S_IMODE(st.st_mode), st.st_gid)
        # Only where nginx is what serves: not behind the dev server, not without nginx,
        # not when nginx connects to a shared listener rather than into tmp_dir.
        serves_from_tmp_dir = self._dev_server_port is None and not cfg.listen
        if serves_from_tmp_dir and (problem := nginx_access_problem(cfg.tmp_dir, group)) is not None:
            log.warning("%s", problem)
        for path in (cfg.ipc_path, cfg.notify_path):
            try:
                mode = os.lstat(path).st_mode
            except FileNotFoundError:
                continue
            if not stat.S_ISSOCK(mode):
                # Something planted where our socket goes (a symlink, a file): never
                # replace or follow it.
                raise DaemonError(f"{path} exists and is not a socket; refusing to touch it (remove it if it is yours)")
        if self.inherited is None and cfg.ipc_path.exists() and socket_is_live(cfg.ipc_path):
            raise DaemonError(f"another sockherd daemon is already running on {cfg.ipc_path}")
        own_sockets = (cfg.ipc_file, cfg.notify_path.name) if self.inherited is None else ()  # ours, still open
        sweep_tmp_dir(
            cfg.tmp_dir, SocketNames.from_pattern(cfg.socket_file), own_sockets, state_file=cfg.state_path.name
        )

    async def run(self) -> int:
        self._prepare()
        self.herd.tmp_dir = TmpDir(self.config.tmp_dir)  # checked: from now on held, not looked up
        make_undumpable()
        raise_fd_limit()
        _set_title(f"sockherd daemon: {self.config.name} [{self.config.tmp_dir}]")
        reset_signal_dispositions()
        state = succession.previous_state(self)
        self.herd.listeners = self._open_listeners(state)
        adoption = succession.adopt_previous(
            self, state
        )  # before the reaper: a re-exec's dead children wait as zombies
        self.reaper.install()
        try:
            await self.ipc.start()
            self.notify.open(self._loop)
        except OSError as exc:
            await self.ipc.close()
            self.herd.listeners.close()
            where = self.config.tmp_dir
            raise DaemonError(f"cannot listen in {where}: {exc.strerror} ({exc.filename or ''})") from None
        for sig in HANDLED_SIGNALS:
            self._loop.add_signal_handler(sig, self._signals.put_nowait, sig)
        unblock_signals()
        self._link_watch.start(self._loop, self.herd.tmp_dir)
        dispatcher = asyncio.create_task(self._dispatch_signals(), name="signals")
        try:
            self._write_pidfile()
            if self._dev_server_port is not None:
                self.dev_server = DevServer(self._dev_server_port, self._published_paths)
                try:
                    await self.dev_server.start()
                except OSError as exc:
                    self.dev_server = None
                    port = self._dev_server_port
                    raise DaemonError(f"dev server: cannot listen on 127.0.0.1:{port}: {exc.strerror}") from None

            log.info("daemon %s ready (pid %d, IPC %s)", __version__, os.getpid(), self.config.ipc_path)
            self.herd.flush_state()
            if self.inherited is not None:
                self._spawn_background(succession.finish_upgrade(self, self.inherited, adoption))
            elif adoption is not None and adoption.adopted:
                self._spawn_background(succession.finish_adoption(self, adoption))
            elif self._start_workers:
                self._spawn_background(self._initial_start())
            else:
                sd_notify("READY=1")
            await self._quit.wait()
        finally:
            sd_notify("STOPPING=1")
            await self._shutdown()
            dispatcher.cancel()
            for sig in HANDLED_SIGNALS:
                self._loop.remove_signal_handler(sig)
        log.info("daemon exits")
        return 0

    def _open_listeners(self, state: dict[str, Any] | None) -> Listeners:
        """The shared listeners, for the daemon's whole life (see listeners.py for whence)."""
        cfg = self.config
        recorded, holders = succession.recorded_listeners(state) if self.inherited is None else ({}, [])
        gid = cfg.worker.socket_group
        if gid is None and self.herd.tmp_dir is not None:
            gid = os.fstat(self.herd.tmp_dir.fd).st_gid
        try:
            listeners = open_listeners(
                cfg.listen,
                backlog=cfg.worker.backlog,
                mode=cfg.worker.socket_mode,
                gid=gid,
                inherited=self.inherited.listeners if self.inherited is not None else None,
                activated=self._activated,
                recorded=recorded,
                holders=holders,
            )
        except ListenerError as exc:
            raise DaemonError(str(exc)) from None
        for item in listeners.items:
            log.info("listening on %s (%s)", item.address, _ORIGINS[item.origin])
        if listeners and not cfg.listen:
            log.info("serving on the %d socket(s) systemd passed (socket activation)", len(listeners))
        return listeners

    def _write_pidfile(self) -> None:
        path = self.config.pidfile
        if path is None:
            return
        try:
            write_atomically(path, f"{os.getpid()}\n".encode(), mode=0o644)
        except OSError as exc:
            raise DaemonError(f"pidfile {path}: cannot write: {exc.strerror or exc}") from None

    def _remove_pidfile(self) -> None:
        path = self.config.pidfile
        if path is None:
            return
        with contextlib.suppress(OSError, ValueError):
            if int(path.read_text().strip()) == os.getpid():
                os.unlink(path)

    async def _auto_rollback(self, why: str) -> None:
        """A canary worker crashed or broke: put the old generation back on its slots."""
        canary = self.herd.canary
        while self.herd.canary is canary and canary is not None:
            try:
                await self.ops.rollback(log_progress, why=f"canary rolled back by itself: {why}")
                return
            except Busy:
                await asyncio.sleep(0.2)  # a command holds the daemon: roll back right after it
            except (ShuttingDown, DeployFailed) as exc:
                log.error("automatic rollback of the canary failed: %s", exc)
                return

    async def _initial_start(self) -> None:
        try:
            await self.ops.start(self.config.max_start_attempts, log_progress)
        except DeployFailed as exc:
            log.error("workers failed to start: %s%s", exc.reason, "".join(f"\n  | {line}" for line in exc.output))
            log.error("the daemon keeps running with no workers; fix the app, then run `sockherd start`")
        except (Busy, ShuttingDown) as exc:
            log.info("initial start skipped: %s", exc)
        finally:
            sd_notify("READY=1")

    async def _shutdown(self) -> None:
        log.info("stopping all workers")
        await self.ops.quit()
        with contextlib.suppress(TimeoutError):  # a fork the quit cut short: its worker killed, reaped
            async with asyncio.timeout(self.config.timeouts.spawn):
                await self.herd.processes.settle()
        for task in list(self._background):
            task.cancel()
        self.herd.close_state()
        self.herd.listeners.close()
        self._remove_pidfile()
        if self.dev_server is not None:
            await self.dev_server.close()
        await self.ipc.close()
        self.notify.close(self._loop)
        self._link_watch.stop(self._loop)
        self.reaper.uninstall()

    def request_quit(self) -> None:
        if self._quit.is_set():
            log.warning("second quit request: killing all workers now")
            self._spawn_background(self.ops.kill_all())
            return
        self.herd.coordinator.begin_quit()  # from this moment, no command starts anything
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
        self._spawn_background(self.restart_logged())

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
            await self.ops.set_workers(count, self.config.max_start_attempts, log_progress)
        except (Busy, ShuttingDown, DeployFailed) as exc:
            log.error("scaling to %d worker(s) failed: %s", count, exc)

    async def restart_logged(self) -> None:
        try:
            await self.ops.restart(self.config.max_start_attempts, log_progress)
        except (Busy, ShuttingDown, DeployFailed) as exc:
            log.error("restart failed: %s", exc)

    async def _reload_logged(self) -> None:
        try:
            changed = await self.reload(log_progress)
        except (ConfigError, Busy, ShuttingDown, DeployFailed) as exc:
            log.error("reload failed, the running configuration stays: %s", exc)
            return
        log.info("reload done: %s", changed)

    async def reload(self, progress: Callable[[str], None]) -> str:
        """Apply a changed config with the smallest set of actions (see reload.py)."""
        was_running = self.herd.running
        plan = await self.ops.reload(progress)
        new = self.config
        if plan.retitle:
            _set_title(f"sockherd daemon: {new.name} [{new.tmp_dir}]")
        if plan.dev_server:
            await self._restart_dev_server(new.dev_server)
        if not was_running and plan.changed:
            return f"{plan.describe(applied=False)}; the workers are stopped: `sockherd start` runs the new config"
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

    # -- status -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        herd = self.herd
        state = "stopping" if herd.coordinator.quitting else ("running" if herd.running else "stopped")
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
                "dumpable": is_dumpable(),
                "listeners": [item.address for item in herd.listeners.items],
                "rss": psutil.Process().memory_info().rss,
                "kept": herd.kept.as_dict(herd.rss_of) if herd.kept is not None else None,
                "canary": herd.canary.as_dict() if herd.canary is not None else None,
                "rolled_back": herd.rolled_back,
                # preload: generation (as a string, JSON's keys) -> pid of its fork server
                "preloaded": {str(gen): pid for gen, pid in sorted(herd.processes.preloaded().items())},
                "preload_spare": herd.processes.preload_spare(),  # pid of the next deploy's fork server, warm
            },
            "workers": herd.status(),
            "slots": herd.healer.slot_status(),
        }


def _set_title(title: str) -> None:
    try:
        from setproctitle import setproctitle
    except ImportError:  # pragma: no cover - a declared dependency, but never fatal
        return
    setproctitle(title)

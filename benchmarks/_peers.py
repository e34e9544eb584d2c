"""Peer process managers for benchmarks/peers.py: sockherd, gunicorn and supervisor.

Each manager runs 2 workers of benchmarks/apps/slow_start.py, exposes the UNIX sockets
nginx's upstream lists, the pids of its live workers, and one way to deploy new code:

- sockherd: ``sockherd restart`` (the CLI, blocking until the deploy is done);
  upstream = the published symlinks ``app.0.sock``, ``app.1.sock``.
- gunicorn: ``SIGHUP`` to the master (no command; nothing to report an outcome);
  ``-k uvicorn_worker.UvicornWorker -w 2 -b unix:SOCK``; upstream = that one socket.
- supervisor: ``supervisorctl restart app:*`` for a program ``app`` with
  ``numprocs = 2`` running ``uvicorn --uds SOCK.N``; upstream = the two sockets.

Common to all: the same app, 2 workers, a keep-alive timeout of 75 s (sockherd.uvicorn's
default, longer than nginx's) and no access log. Everything else is each tool's default.

Every process started here is stopped on exit, on failure too: the peers' process
groups are killed, and any worker seen alive is killed if it outlived its manager.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path
from types import TracebackType

import psutil
from _harness import REPO

from support.daemon import RunningDaemon, running_daemon
from support.http import unix_get

APPS = REPO / "benchmarks" / "apps"
APP = "slow_start:app"
WORKERS = 2
# sockherd.uvicorn's default; given to the peers too, so that an upstream closing an
# idle keep-alive connection under nginx (gunicorn's default is 2 s, uvicorn's 5 s)
# never counts as a restart failure.
KEEPALIVE_TIMEOUT = 75
STARTUP_TIMEOUT = 30.0
_GUNICORN_READY = re.compile(r"\[(\d+)\] \[INFO\] Application startup complete")
_GUNICORN_INCIDENT = re.compile(r"WORKER TIMEOUT|SIGKILL|failed to boot|Shutting down: Master|Reason:")
_SUPERVISOR_INCIDENT = re.compile(r"SIGKILL|exited: .*\(exit status|gave up|FATAL|not expected")


def short_dir(prefix: str) -> Path:
    """A temp dir short enough for UNIX socket paths (sun_path is 108 bytes)."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def answering_pid(path: Path, timeout: float = 2.0) -> int | None:
    """The pid of the worker that answers a GET on a UNIX socket, None if nobody does."""
    try:
        response = unix_get(str(path), timeout=timeout)
    except (OSError, ValueError):
        return None
    return response.pid if response.status == 200 else None


def alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (psutil also guards against pid reuse)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


class Deploy:
    """A deploy in progress: a command (its exit code and output) or a signal (nothing)."""

    def __init__(self, argv: list[str] | None, send_signal: tuple[int, int] | None = None) -> None:
        self.argv = argv
        self.started = time.monotonic()
        self.finished: float | None = None
        self.returncode: int | None = None
        self._out = tempfile.TemporaryFile()  # noqa: SIM115 (closed in poll)
        self.output = ""
        self.proc: subprocess.Popen[bytes] | None = None
        if argv is not None:
            self.proc = subprocess.Popen(argv, stdout=self._out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        elif send_signal is not None:
            os.kill(*send_signal)
            self.finished = time.monotonic()
            self._out.close()

    def __enter__(self) -> Deploy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()  # a command still running when its caller gives up (or fails) is ended

    @property
    def is_command(self) -> bool:
        return self.argv is not None

    def poll(self) -> bool:
        """True once the command has exited (always, for a signal)."""
        if self.finished is not None:
            return True
        assert self.proc is not None
        if self.proc.poll() is None:
            return False
        self.finished = time.monotonic()
        self.returncode = self.proc.returncode
        self._out.seek(0)
        self.output = self._out.read().decode(errors="replace").strip()
        self._out.close()
        return True

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.poll():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.poll()

    @property
    def seconds(self) -> float | None:
        return None if self.finished is None else self.finished - self.started


class Manager(ABC):
    """One process manager running the app; a context manager that leaves nothing behind."""

    name: str
    how: str  # how a deploy is done, for the report
    upstream: list[Path]  # what nginx's upstream lists
    marker: Path  # the bad-deploy marker file: while it exists, the app fails at import

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._seen: dict[int, psutil.Process] = {}  # every worker seen, killed at exit if still alive
        self.workdir = short_dir("shp-")
        self._stack.callback(self._remove_workdir)
        self.marker = self.workdir / "bad-deploy"

    def __enter__(self) -> Manager:
        try:
            self.start()
            self.wait_started()
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self._stack.close()
        finally:
            self._kill_leftovers()

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLOW_START_FAIL_FILE": str(self.marker)}

    @abstractmethod
    def start(self) -> None: ...

    @abstractmethod
    def root(self) -> psutil.Process | None:
        """The manager's own process (None when it has exited)."""

    @abstractmethod
    def deploy(self) -> Deploy:
        """Start deploying the code on disk (a restart)."""

    def status_command(self) -> list[str] | None:
        """The manager's CLI doing nothing much (for the CLI's own start-up time); None: no CLI."""
        return None

    def cli_seconds(self) -> float | None:
        """Best of 3 wall times of ``status_command``: what every deploy command pays first."""
        argv = self.status_command()
        if argv is None:
            return None
        times = []
        for _ in range(3):
            started = time.monotonic()
            subprocess.run(argv, capture_output=True, check=False, stdin=subprocess.DEVNULL)
            times.append(time.monotonic() - started)
        return min(times)

    def ready_pids(self) -> set[int]:
        """Workers that said they serve (for a shared socket, where a probe reaches only one)."""
        return set()

    def incidents(self) -> list[str]:
        """The manager's own log lines about workers killed, crashed or given up on."""
        return []

    def probe_paths(self) -> list[Path]:
        """Sockets to GET directly (not through nginx) to see which workers answer."""
        return self.upstream

    def worker_pids(self) -> set[int]:
        """Live worker processes: the manager's descendants, minus zombies."""
        root = self.root()
        if root is None:
            return set()
        try:
            children = root.children(recursive=True)
        except psutil.Error:
            return set()
        pids = set()
        for child in children:
            if alive(child):
                self._seen.setdefault(child.pid, child)
                pids.add(child.pid)
        return pids

    def process(self, pid: int) -> psutil.Process | None:
        if pid in self._seen:
            return self._seen[pid]
        try:
            proc = psutil.Process(pid)
        except psutil.Error:
            return None
        self._seen[pid] = proc
        return proc

    def wait_started(self) -> None:
        """Every upstream socket answers, and WORKERS distinct workers answer or say they serve."""
        deadline = time.monotonic() + STARTUP_TIMEOUT
        seen: set[int] = set()
        answered: set[Path] = set()
        while True:
            for path in self.upstream:
                pid = answering_pid(path, timeout=1.0)
                if pid is not None:
                    seen.add(pid)
                    answered.add(path)
            seen |= self.ready_pids()
            if len(answered) == len(self.upstream) and len(seen & self.worker_pids()) >= WORKERS:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name}: {WORKERS} workers did not answer within {STARTUP_TIMEOUT}s")
            time.sleep(0.02)

    def _kill_leftovers(self) -> None:
        self.worker_pids()
        for proc in self._seen.values():
            if alive(proc):
                with contextlib.suppress(psutil.Error):
                    proc.kill()

    def _remove_workdir(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)


def _stop_group(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM a manager started in its own session, then SIGKILL its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # the group is ours: start_new_session=True
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class Sockherd(Manager):
    name = "sockherd"
    how = "`sockherd restart` (atomic: the whole new generation online before any symlink moves)"

    def __init__(self) -> None:
        super().__init__()
        self.daemon: RunningDaemon | None = None
        self.upstream = []

    def start(self) -> None:
        settings = {
            # no access log (uvicorn logs every request at "info"): the peers keep none either,
            # and here it would run through the daemon's stdout into this process's reader
            "command": [sys.executable, "-m", "sockherd.uvicorn", APP, "--log-level", "warning"],
            "cwd": str(APPS),
            "workers": WORKERS,
            "environment": {"SLOW_START_FAIL_FILE": str(self.marker)},
        }
        workdir = self.workdir / "d"
        workdir.mkdir()
        self.daemon = self._stack.enter_context(running_daemon(workdir, settings))
        self.upstream = [self.daemon.tmp_dir / f"app.{i}.sock" for i in range(WORKERS)]

    def wait_started(self) -> None:
        assert self.daemon is not None
        self.daemon.wait_ready(WORKERS, timeout=STARTUP_TIMEOUT)
        super().wait_started()

    def root(self) -> psutil.Process | None:
        if self.daemon is None or self.daemon.proc.poll() is not None:
            return None
        return self.process(self.daemon.proc.pid)

    def deploy(self) -> Deploy:
        assert self.daemon is not None
        return Deploy([sys.executable, "-m", "sockherd", "restart", "-c", str(self.daemon.config_path)])

    def status_command(self) -> list[str]:
        assert self.daemon is not None
        return [sys.executable, "-m", "sockherd", "status", "-c", str(self.daemon.config_path)]

    def log_mark(self) -> int:
        return self.daemon.mark() if self.daemon is not None else 0

    def log_since(self, mark: int) -> list[str]:
        """The daemon's log lines since ``log_mark`` (to explain a slow deploy)."""
        return self.daemon.log.splitlines()[mark:] if self.daemon is not None else []


class Gunicorn(Manager):
    name = "gunicorn"
    how = "SIGHUP to the master (new workers forked, old ones sent SIGTERM at once)"

    def __init__(self) -> None:
        super().__init__()
        self.socket = self.workdir / "gunicorn.sock"
        self.upstream = [self.socket]
        self.log = self.workdir / "gunicorn.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        argv = [
            sys.executable,
            "-m",
            "gunicorn",
            "-k",
            "uvicorn_worker.UvicornWorker",
            "-w",
            str(WORKERS),
            "-b",
            f"unix:{self.socket}",
            "--keep-alive",
            str(KEEPALIVE_TIMEOUT),
            # gunicorn >= 27 opens a control socket (for `gunicornc`; its `reload` only
            # sends the master SIGHUP and answers "reloading") in ~/.gunicorn by default
            "--control-socket",
            str(self.workdir / "gunicorn.ctl"),
            "--chdir",
            str(APPS),
            APP,
        ]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                start_new_session=True,
            )
        proc = self.proc
        self._stack.callback(lambda: _stop_group(proc, 35))

    def root(self) -> psutil.Process | None:
        if self.proc is None or self.proc.poll() is not None:
            return None
        return self.process(self.proc.pid)

    def deploy(self) -> Deploy:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"the gunicorn master has exited ({self.proc.returncode}): nothing to send SIGHUP to")
        return Deploy(None, (self.proc.pid, signal.SIGHUP))

    def probe_paths(self) -> list[Path]:
        # One socket shared by every worker: a probe reaches whichever accepts first, and
        # during a reload it can wait in the backlog or be accepted by an old worker that
        # is closing; the workers' own "startup complete" lines (ready_pids) are exact.
        return []

    def ready_pids(self) -> set[int]:
        # uvicorn logs this per worker, with the worker's pid, just before it accepts
        return {int(m.group(1)) for m in _GUNICORN_READY.finditer(self._log_text())}

    def incidents(self) -> list[str]:
        return [line for line in self._log_text().splitlines() if _GUNICORN_INCIDENT.search(line)]

    def _log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def master_exit(self) -> int | None:
        return None if self.proc is None else self.proc.poll()


class Supervisor(Manager):
    name = "supervisor"
    how = "`supervisorctl restart app:*` (stop both processes, then start both)"

    def __init__(self) -> None:
        super().__init__()
        self.upstream = [self.workdir / f"app.{i}.sock" for i in range(WORKERS)]
        self.conf = self.workdir / "supervisord.conf"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        d = self.workdir
        uvicorn = f"{sys.executable} -m uvicorn --uds {d}/app.%(process_num)d.sock"
        uvicorn += f" --timeout-keep-alive {KEEPALIVE_TIMEOUT} --no-access-log"
        # Defaults everywhere (startsecs = 1, startretries = 3, stopsignal = TERM,
        # stopwaitsecs = 10) except paths, the keep-alive timeout (see KEEPALIVE_TIMEOUT)
        # and no access log (gunicorn has none by default; sockherd's workers log warnings only).
        self.conf.write_text(
            f"""\
[supervisord]
nodaemon = true
user = root
logfile = {d}/supervisord.log
pidfile = {d}/supervisord.pid
childlogdir = {d}

[unix_http_server]
file = {d}/supervisor.sock

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl = unix://{d}/supervisor.sock

[program:app]
command = {uvicorn} {APP}
directory = {APPS}
numprocs = {WORKERS}
process_name = %(program_name)s_%(process_num)d
environment = SLOW_START_FAIL_FILE="{self.marker}"
stdout_logfile = {d}/app_%(process_num)d.log
redirect_stderr = true
"""
        )
        with (self.workdir / "supervisord.out").open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "supervisor.supervisord", "-c", str(self.conf)],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        proc = self.proc
        # supervisord stops its programs on SIGTERM (each in its own process group);
        # _kill_leftovers then kills any that outlived it.
        self._stack.callback(lambda: _stop_group(proc, 30))

    def root(self) -> psutil.Process | None:
        if self.proc is None or self.proc.poll() is not None:
            return None
        return self.process(self.proc.pid)

    def deploy(self) -> Deploy:
        return Deploy([*self._ctl, "restart", "app:*"])

    def incidents(self) -> list[str]:
        log = self.workdir / "supervisord.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return [line for line in text.splitlines() if _SUPERVISOR_INCIDENT.search(line)]

    def status_command(self) -> list[str]:
        return [*self._ctl, "status"]

    @property
    def _ctl(self) -> list[str]:
        return [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(self.conf)]


MANAGERS: dict[str, type[Manager]] = {"sockherd": Sockherd, "gunicorn": Gunicorn, "supervisor": Supervisor}


def cold_start_seconds() -> float:
    """One worker's start-up without any manager: exec, imports, the app's 0.3 s, bind."""
    workdir = short_dir("shp-")
    path = workdir / "one.sock"
    started_at = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--uds", str(path), APP],
        cwd=APPS,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        while answering_pid(path, timeout=1.0) is None:
            if proc.poll() is not None or time.monotonic() - started_at > STARTUP_TIMEOUT:
                raise RuntimeError("the app did not start on its own")
            time.sleep(0.002)
        return time.monotonic() - started_at
    finally:
        _stop_group(proc, 10)
        shutil.rmtree(workdir, ignore_errors=True)

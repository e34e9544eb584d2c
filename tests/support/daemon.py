"""Run a real sockherd daemon in a subprocess, and clean up everything it started."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil

from sockherd.client import Client, DaemonUnreachable

REPO = Path(__file__).resolve().parents[2]
TINYAPP = REPO / "tests" / "apps" / "tinyapp.py"
EXAMPLE = REPO / "examples" / "hello"


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as TOML")


def write_config(path: Path, settings: Mapping[str, Any]) -> Path:
    path.write_text("".join(f"{key} = {toml_value(value)}\n" for key, value in settings.items()))
    return path


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.01) -> Any:
    """Poll a condition with a deadline (for state only observable by asking)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


METRICS = ("rss", "cpu", "uptime", "queued")  # status fields that change from one call to the next


def without_metrics(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Status rows without their live figures, to compare the herd's state between two calls."""
    return [{k: v for k, v in row.items() if k not in METRICS} for row in rows]


def short_tmp_dir() -> Path:
    # pytest's tmp_path is too long for sun_path (108 bytes) once socket names are added.
    return Path(tempfile.mkdtemp(prefix="sh-", dir="/tmp"))


class RunningDaemon:
    def __init__(
        self,
        workdir: Path,
        settings: dict[str, Any],
        args: list[str],
        env: Mapping[str, str] | None = None,
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.workdir = workdir
        self.tmp_dir = Path(settings["tmp_dir"])
        self.config_path = write_config(workdir / "sockherd.toml", settings)
        self.ipc = self.tmp_dir / settings.get("ipc_file", "sockherd.ipc")
        self.lines: list[str] = []
        self.line_times: list[float] = []  # time.monotonic() when each line arrived
        self._new_line = threading.Condition()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sockherd", "daemon", "-c", str(self.config_path), "--log-level", "debug", *args],
            cwd=workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, **env} if env else None,
            pass_fds=pass_fds,  # descriptors the daemon inherits (left open, not close-on-exec)
        )
        self._reader = threading.Thread(target=self._read_output, daemon=True)
        self._reader.start()

    def _read_output(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._new_line:
                self.line_times.append(time.monotonic())
                self.lines.append(line.rstrip("\n"))
                self._new_line.notify_all()
        with self._new_line:
            self._new_line.notify_all()

    @property
    def log(self) -> str:
        with self._new_line:
            return "\n".join(self.lines)

    def wait_log(self, pattern: str, timeout: float = 15.0, start: int = 0) -> re.Match[str]:
        """Block until a daemon log line matches: the daemon's log is its event stream."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = start
        with self._new_line:
            while True:
                for line in self.lines[seen:]:
                    if match := regex.search(line):
                        return match
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no log line matched {pattern!r}; log:\n" + "\n".join(self.lines[-60:]))
                self._new_line.wait(remaining)

    def line_time(self, pattern: str, start: int = 0) -> float:
        """When (time.monotonic) the first line matching ``pattern`` arrived; it did already."""
        regex = re.compile(pattern)
        with self._new_line:
            for n in range(start, len(self.lines)):
                if regex.search(self.lines[n]):
                    return self.line_times[n]
        raise AssertionError(f"no log line matched {pattern!r}")

    def mark(self) -> int:
        with self._new_line:
            return len(self.lines)

    def client(self) -> Client:
        client = Client(self.ipc, timeout=60)
        client.connect()
        return client

    def call(self, command: str, data: Any = None) -> Any:
        with self.client() as client:
            return client.call(command, data)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = self.call("status")
        return result

    def published_pids(self) -> set[int]:
        return {w["pid"] for w in self.status()["workers"] if w["published"]}

    def wait_ready(self, workers: int, timeout: float = 20.0) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log}")
            try:
                status = self.status()
            except (DaemonUnreachable, OSError):
                return None
            online = [w for w in status["workers"] if w["published"] and w["state"] == "online"]
            return status if len(online) == workers and status["daemon"]["operation"] is None else None

        result: dict[str, Any] = wait_for(ready, timeout, f"{workers} published workers")
        return result

    def cli(self, *args: str, timeout: float = 60.0, ipc: bool = False) -> subprocess.CompletedProcess[str]:
        """Run the sockherd CLI against this daemon, by config file (or by IPC path)."""
        where = ["-i", str(self.ipc)] if ipc else ["-c", str(self.config_path)]
        return subprocess.run(
            [sys.executable, "-m", "sockherd", *args, *where],
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def cli_background(self, *args: str) -> subprocess.Popen[str]:
        """The CLI started and left running (``communicate()`` for its result)."""
        return subprocess.Popen(
            [sys.executable, "-m", "sockherd", *args, "-c", str(self.config_path)],
            cwd=self.workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def worker_pids(self) -> set[int]:
        """Pids of every live process started for this daemon (zombies aside)."""
        return {p.pid for p in self.worker_processes()}

    def state_file(self) -> dict[str, Any]:
        """The herd as the daemon last persisted it in tmp_dir."""
        state: dict[str, Any] = json.loads((self.ipc.parent / (self.ipc.name + ".state.json")).read_text())
        return state

    def worker_processes(self) -> list[psutil.Process]:
        """Every live process started for this daemon: found by its IPC path in the environment,
        or as the daemon's descendant (a worker forked from a preloaded generation's fork
        server has the fork server's environment in /proc, which names no IPC path)."""
        found: dict[int, psutil.Process] = {}
        with contextlib.suppress(psutil.Error):
            for proc in psutil.Process(self.proc.pid).children(recursive=True):
                found[proc.pid] = proc
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if proc.environ().get("SOCKHERD_IPC") == str(self.ipc):
                    found[proc.pid] = proc
        live = []
        for proc in found.values():
            with contextlib.suppress(psutil.Error):
                if proc.status() != psutil.STATUS_ZOMBIE:
                    live.append(proc)
        return live

    @staticmethod
    def _kill_pipe_holders(inode: int) -> None:
        """Whatever still holds the daemon's output pipe (a process that escaped, the fork
        server of a test that failed half-way) would keep the reader, and this teardown,
        waiting for an end of file forever."""
        for pid in _pipe_holders(inode):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        terminate(self.proc, 30)
        for proc in self.worker_processes():
            with contextlib.suppress(psutil.Error):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(psutil.Error):
                proc.kill()
        if self.proc.stdout is not None and not self.proc.stdout.closed:  # stop() may come twice
            self._kill_pipe_holders(os.fstat(self.proc.stdout.fileno()).st_ino)
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)


def _pipe_holders(inode: int) -> set[int]:
    """Other processes with the pipe ``inode`` open (the daemon's output, inherited)."""
    holders = set()
    for pid in psutil.pids():
        if pid == os.getpid():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == f"pipe:[{inode}]":
                        holders.add(pid)
                        break
    return holders


def terminate(proc: subprocess.Popen[Any], timeout: float) -> None:
    """SIGTERM unless it already exited, SIGKILL if it has not exited ``timeout`` s later; reaped."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def end_daemon(proc: subprocess.Popen[str], ipc: Path) -> None:
    """Teardown of a daemon a test started by hand: SIGTERM (what `docker stop` and
    systemd send) unless it already exited, SIGKILL after 30 s, then kill whatever it
    started that is left (found by its IPC path in the environment)."""
    terminate(proc, 30)
    for leftover in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if leftover.environ().get("SOCKHERD_IPC") == str(ipc):
                leftover.kill()


def run_daemon_once(config: Path, *, without_dac_override: bool = False) -> subprocess.CompletedProcess[str]:
    """Start a daemon that is expected to refuse to start.

    ``without_dac_override``: root minus the capability that lets it write anywhere, so
    file modes bind it like any user (switching uid would lose this Python: it lives
    under /root here).
    """
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"] if without_dac_override else []
    argv = [*prefix, sys.executable, "-m", "sockherd", "daemon", "-c", str(config)]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False, cwd="/")


def tinyapp_command(*flags: str) -> list[str]:
    return [sys.executable, str(TINYAPP), "{socket}", *flags]


@contextlib.contextmanager
def running_daemon(
    workdir: Path,
    settings: Mapping[str, Any],
    *args: str,
    env: Mapping[str, str] | None = None,
    pass_fds: tuple[int, ...] = (),
) -> Iterator[RunningDaemon]:
    config = {"tmp_dir": str(short_tmp_dir()), **settings}
    daemon = RunningDaemon(workdir, config, list(args), env, pass_fds)
    try:
        yield daemon
    finally:
        daemon.stop()


def installable_copy(where: Path, version: str) -> Path:
    """A copy of sockherd's source that reports ``version``: what `pip install -U` leaves.

    Run a daemon with ``PYTHONPATH`` set to the returned directory; :func:`bump` then
    "installs" another version under it while the daemon runs.
    """
    shutil.copytree(REPO / "src" / "sockherd", where / "sockherd", ignore=shutil.ignore_patterns("__pycache__"))
    bump(where, version)
    return where


def bump(where: Path, version: str) -> None:
    for old in where.glob("sockherd-*.dist-info"):
        shutil.rmtree(old)
    info = where / f"sockherd-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: sockherd\nVersion: {version}\n")

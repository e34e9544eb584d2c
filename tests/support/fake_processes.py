"""A fake process layer behind Worker, and a herd built on it, for interleaving tests.

The herd, the coordinator, deploys and healing run for real on a real event loop; only
the operating system is replaced: a "process" is an object whose exit, readiness and
answers to signals the test decides. So a test can hold every launch at a gate, stop
the daemon while they wait, crash a leader whose wrapper has children, and check what
is left, deterministically and in milliseconds.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from sockherd.config import load_config
from sockherd.daemon.herd import Herd
from sockherd.daemon.operations import Operations
from sockherd.daemon.process import Worker
from sockherd.daemon.processes import Launch, LaunchFailed
from support.daemon import write_config

FAKE_PID_BASE = 10_000_000  # above any pid_max: never a real process


def quiet(text: str) -> None:
    """A progress callback that prints nothing."""


class FakeProcess:
    def __init__(self, pid: int, launch: Launch, loop: asyncio.AbstractEventLoop, events: list[str]) -> None:
        self.pid = pid
        self._events = events
        self.start_time: int | None = pid * 7
        self.launch = launch
        self.worker_id = launch.env["SOCKHERD_WORKER_ID"]
        self.exited: asyncio.Future[int] = loop.create_future()
        self.signals: list[int] = []
        self.ignores: set[int] = set()  # signals it survives (SIGKILL never)
        self.children_alive = 0  # a wrapper's children, in the leader's process group
        self.group_killed = False

    @property
    def alive(self) -> bool:
        return not self.exited.done()

    def exit(self, code: int) -> None:
        if not self.exited.done():
            self._events.append(f"exit {self.pid}")
            self.exited.set_result(code)

    def signal(self, sig: int) -> bool:
        if not self.alive:
            return False
        self.signals.append(sig)
        self._events.append(f"signal {self.pid} {signal.Signals(sig).name}")
        if sig == signal.SIGKILL or sig not in self.ignores:
            asyncio.get_running_loop().call_soon(self.exit, -sig)
        return True

    def kill_group(self) -> None:
        self.group_killed = True
        self.children_alive = 0


class FakeProcesses:
    """Launches fake processes; ``gate`` (when set) holds every launch until opened."""

    def __init__(self) -> None:
        self.processes: list[FakeProcess] = []
        self.gate: asyncio.Event | None = None
        self.waiting = 0  # launches held at the gate now
        self.cancelled_launches = 0
        self.fail_commands: set[str] = set()  # argv[0] that cannot be executed
        self.on_started: Callable[[FakeProcess], None] = lambda proc: None
        self.events: list[str] = []  # "signal PID NAME", "exit PID", in order
        self._pids = itertools.count(FAKE_PID_BASE)
        self.preloaded_generations: set[int] = set()
        self.spare_requests: list[bool | None] = []

    async def launch(self, launch: Launch, spawn_timeout: float) -> FakeProcess:
        if self.gate is not None:
            self.waiting += 1
            try:
                await self.gate.wait()
            except asyncio.CancelledError:
                self.cancelled_launches += 1
                raise
            finally:
                self.waiting -= 1
        if launch.argv[0] in self.fail_commands:
            raise LaunchFailed(f"could not execute {launch.argv[0]!r}: No such file or directory")
        proc = FakeProcess(next(self._pids), launch, asyncio.get_running_loop(), self.events)
        self.processes.append(proc)
        self.on_started(proc)
        return proc

    async def probe_socket(self, path: Path) -> None:
        return None

    async def probe_accepting(self, pid: int, inodes: frozenset[int]) -> None:
        return None

    def set_socket_mode(self, path: Path, mode: int, gid: int | None) -> None:
        pass  # fake workers have no socket

    def adopt(self, pid: int, start_time: int) -> FakeProcess | None:
        """A process a previous (fake) daemon started, if it still runs as recorded."""
        proc = next((p for p in self.processes if p.pid == pid), None)
        if proc is None or not proc.alive or proc.start_time != start_time:
            return None
        return proc

    def retain_preloaded(self, generations: Collection[int], *, spare: bool | None = None) -> None:
        self.preloaded_generations = set(generations)  # what a real layer would keep fork servers for
        self.spare_requests.append(spare)  # True: keep a spare; False: none; None: leave it (a deploy runs)

    def preloaded(self) -> dict[int, int]:
        return {}

    def preload_spare(self) -> int | None:
        return None

    async def settle(self) -> None:
        return None  # a cancelled fake launch leaves nothing behind

    def live(self) -> list[FakeProcess]:
        return [p for p in self.processes if p.alive]

    def by_worker(self, worker_id: str) -> FakeProcess:
        return next(p for p in self.processes if p.worker_id == worker_id)


class FakeHerd:
    """A Herd and its Operations on fake processes; workers report ready unless told not to."""

    def __init__(self, tmp_dir: Path, fake: FakeProcesses | None = None, **settings: Any) -> None:
        self.tmp_dir = tmp_dir
        self.settings: dict[str, Any] = {
            "command": ["app", "{socket}"],
            "tmp_dir": str(tmp_dir),
            "linger": 0.0,
            "shutdown_timeout": 0.05,
            "kill_timeout": 0.05,
            "online_timeout": 2,
            **settings,
        }
        self.path = write_config(tmp_dir / "sockherd.toml", self.settings)
        self.fake = fake or FakeProcesses()  # shared: a successor daemon sees the same processes
        self.fake.on_started = self._started
        self.ready_when: Callable[[FakeProcess], bool] = lambda proc: True  # reports ready at once
        self.herd = Herd(load_config(self.path), self.fake, state_path=tmp_dir / "state.json")
        self.ops = Operations(self.herd)

    def rewrite(self, **settings: Any) -> None:
        """Change the config file (what a reload reads)."""
        self.settings.update(settings)
        write_config(self.path, self.settings)

    def _started(self, proc: FakeProcess) -> None:
        if self.ready_when(proc):
            asyncio.get_running_loop().call_soon(self.report, proc)

    def report(self, proc: FakeProcess) -> None:
        worker = self.herd.workers.get(proc.worker_id)
        if worker is not None:
            worker.report_online("fake")

    def worker(self, proc: FakeProcess) -> Worker:
        return self.herd.workers[proc.worker_id]

    def published_pids(self) -> set[int | None]:
        return {w.pid for w in self.herd.slots.values()}

    def live_pids(self) -> set[int]:
        return {p.pid for p in self.fake.live()}

    async def until(self, predicate: Callable[[], object], what: str, seconds: float = 2.0) -> None:
        """Let the loop run until ``predicate()`` holds (each turn, no fixed sleeps)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not predicate():
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.001)

    async def settled(self) -> None:
        """No operation in progress and no healing task with work left."""
        await self.until(lambda: self.herd.operation is None, "the operation to end")

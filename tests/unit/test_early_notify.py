"""READY=1 that arrives before the daemon knows the sender's pid is kept, not dropped.

The exec runs in an executor thread; a fast worker can bind and notify before the
Popen returns to the event loop and its pid is registered (seen with 512 workers
started at once: up to 110 READYs lost, and those starts timed out).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from sockherd.config import load_config
from sockherd.daemon.daemon import Daemon
from sockherd.daemon.reaper import process_start_time


def _early_ready(tmp_path: Path, start_time_seen: int | None) -> tuple[bool, bool]:
    """A READY=1 from a pid (this test's own) arrives before a worker with that pid exists."""
    (tmp_path / "sockherd.toml").write_text(f'command = ["x"]\ntmp_dir = "{tmp_path}/run"\n')

    async def scenario() -> tuple[bool, bool]:
        daemon = Daemon(load_config(tmp_path / "sockherd.toml"))
        herd = daemon.herd
        worker = herd.new_worker(herd.begin_generation(herd.desired), 0, suspended=False)
        pid = os.getpid()
        daemon.control.on_notify(pid, {"READY": "1", "STATUS": "warming up"})
        before = worker._online.done()
        # What spawn() records once the launch returns, then its on_spawned hook:
        worker.pid, worker.start_time = pid, start_time_seen
        herd._spawned(worker)
        return before, worker._online.done() and worker.status_text == "warming up"

    return asyncio.run(scenario())


def test_a_ready_from_a_pid_not_yet_registered_is_replayed(tmp_path: Path) -> None:
    assert _early_ready(tmp_path, process_start_time(os.getpid())) == (False, True)


def test_an_early_ready_never_reaches_a_later_process_that_reused_the_pid(tmp_path: Path) -> None:
    assert _early_ready(tmp_path, 12345) == (False, False)


def test_early_datagrams_are_bounded(tmp_path: Path) -> None:
    from sockherd.daemon.control import EARLY_NOTIFY_LIMIT

    (tmp_path / "sockherd.toml").write_text(f'command = ["x"]\ntmp_dir = "{tmp_path}/run"\n')

    async def scenario() -> int:
        daemon = Daemon(load_config(tmp_path / "sockherd.toml"))
        for pid in range(10_000, 10_000 + EARLY_NOTIFY_LIMIT + 500):
            daemon.control.on_notify(pid, {"READY": "1"})
        return len(daemon.control._early_notify)

    assert asyncio.run(scenario()) == EARLY_NOTIFY_LIMIT

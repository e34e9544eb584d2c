"""READY=1 that arrives before the daemon knows the sender's pid is kept, not dropped.

The exec runs in an executor thread; a fast worker can bind and notify before the
Popen returns to the event loop and its pid is registered (seen with 512 workers
started at once: up to 110 READYs lost, and those starts timed out).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from sockherd.config import load_config
from sockherd.daemon.daemon import Daemon


def test_a_ready_from_a_pid_not_yet_registered_is_replayed(tmp_path: Path) -> None:
    (tmp_path / "sockherd.toml").write_text(f'command = ["x"]\ntmp_dir = "{tmp_path}/run"\n')

    async def scenario() -> bool:
        daemon = Daemon(load_config(tmp_path / "sockherd.toml"))
        herd = daemon.herd
        worker = herd.new_worker(herd.new_generation(), 0, suspended=False)
        daemon.control.on_notify(424242, {"READY": "1", "STATUS": "warming up"})
        assert not worker._online.done()
        worker.pid = 424242  # what spawn() does once Popen returns, followed by:
        herd._spawned(worker)
        return worker._online.done() and worker.status_text == "warming up"

    assert asyncio.run(scenario())


def test_early_datagrams_are_bounded(tmp_path: Path) -> None:
    from sockherd.daemon.control import EARLY_NOTIFY_LIMIT

    (tmp_path / "sockherd.toml").write_text(f'command = ["x"]\ntmp_dir = "{tmp_path}/run"\n')

    async def scenario() -> int:
        daemon = Daemon(load_config(tmp_path / "sockherd.toml"))
        for pid in range(10_000, 10_000 + EARLY_NOTIFY_LIMIT + 500):
            daemon.control.on_notify(pid, {"READY": "1"})
        return len(daemon.control._early_notify)

    assert asyncio.run(scenario()) == EARLY_NOTIFY_LIMIT

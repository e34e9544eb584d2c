"""The herd's interleavings, on fake processes: every operation against every other.

Each test drives the real Herd, Operations, deploys and healing on a real event loop;
only the processes are fake (tests/support/fake_processes.py), so launches can be held
at a gate and exits, readiness and signals happen exactly when the test says.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from sockherd.daemon.coordinator import Busy, ShuttingDown
from sockherd.daemon.herd import DeployFailed
from support.fake_processes import FakeHerd, FakeProcess, quiet

Scenario = Callable[[FakeHerd], Awaitable[None]]


def run(tmp_dir: Path, scenario: Scenario, **settings: Any) -> FakeHerd:
    fh: list[FakeHerd] = []

    async def main() -> None:
        herd = FakeHerd(tmp_dir, **settings)
        fh.append(herd)
        await asyncio.wait_for(scenario(herd), 10)

    asyncio.run(main())
    return fh[0]


def state_pids(h: FakeHerd) -> set[int | None]:
    h.herd.flush_state()
    state = json.loads((h.tmp_dir / "state.json").read_text())
    return {w["pid"] for w in state["workers"]}


async def start(h: FakeHerd, workers: int | None = None) -> None:
    if workers is not None:
        h.herd.want(h.herd.desired.but(workers=workers))
    assert await h.ops.start(1, quiet)


def test_stop_during_spawn_cancels_every_launch_and_leaves_nothing(tmp_dir: Path) -> None:
    async def scenario(h: FakeHerd) -> None:
        h.fake.gate = asyncio.Event()
        starting = asyncio.ensure_future(h.ops.start(1, quiet))
        await h.until(lambda: h.fake.waiting == 3, "3 launches at the gate")
        await h.ops.stop()
        with pytest.raises(asyncio.CancelledError):
            await starting
        h.fake.gate.set()  # whatever was queued must not start now
        await asyncio.sleep(0)
        assert h.fake.cancelled_launches == 3
        assert h.fake.processes == []
        assert h.herd.workers == {} and not h.herd.running
        assert state_pids(h) == set()

    run(tmp_dir, scenario, workers=3)


def test_stop_while_workers_start_kills_the_ones_that_run(tmp_dir: Path) -> None:
    async def scenario(h: FakeHerd) -> None:
        h.ready_when = lambda proc: False
        starting = asyncio.ensure_future(h.ops.start(1, quiet))
        await h.until(lambda: len(h.fake.processes) == 3, "3 processes waiting to be ready")
        await h.ops.stop()
        with pytest.raises(asyncio.CancelledError):
            await starting
        assert h.fake.live() == []
        assert h.herd.workers == {}

    run(tmp_dir, scenario, workers=3)


def test_a_restart_during_a_stop_is_busy_and_nothing_runs_after(tmp_dir: Path) -> None:
    async def scenario(h: FakeHerd) -> None:
        await start(h)
        for proc in h.fake.live():
            proc.ignores.add(signal.SIGTERM)  # the stop takes its whole ladder
        stopping = asyncio.ensure_future(h.ops.stop())
        await h.until(lambda: h.herd.operation == "stop", "the stop to begin")
        with pytest.raises(Busy, match="a stop is in progress"):
            await h.ops.restart(1, quiet)
        with pytest.raises(Busy):
            await h.ops.start(1, quiet)
        await stopping
        assert h.fake.live() == [] and not h.herd.running and h.herd.slots == {}

    run(tmp_dir, scenario, workers=2)


def test_quit_during_a_restart_leaves_no_process_of_either_generation(tmp_dir: Path) -> None:
    async def scenario(h: FakeHerd) -> None:
        await start(h)
        h.ready_when = lambda proc: False  # the new generation never comes up by itself
        restarting = asyncio.ensure_future(h.ops.restart(1, quiet))
        await h.until(lambda: len(h.fake.processes) == 4, "the new generation to be launched")
        await h.ops.quit()
        with pytest.raises(asyncio.CancelledError):
            await restarting
        assert h.fake.live() == []
        assert h.herd.workers == {} and h.herd.slots == {}
        with pytest.raises(ShuttingDown):
            await h.ops.restart(1, quiet)

    run(tmp_dir, scenario, workers=2)


def test_a_command_after_the_quit_began_is_refused_before_it_starts_anything(tmp_dir: Path) -> None:
    async def scenario(h: FakeHerd) -> None:
        await start(h)
        h.herd.coordinator.begin_quit()  # what SIGTERM does, at once, in its handler
        launched = len(h.fake.processes)
        for command in (h.ops.restart(1, quiet), h.ops.start(1, quiet), h.ops.set_workers(3, 1, quiet)):
            with pytest.raises(ShuttingDown):
                await command
        assert len(h.fake.processes) == launched
        await h.ops.quit()
        assert h.fake.live() == []

    run(tmp_dir, scenario, workers=2)


def test_two_restarts_at_once_one_is_busy(tmp_dir: Path) -> None:
    async def scenario(h: FakeHerd) -> None:
        await start(h)
        first = asyncio.ensure_future(h.ops.restart(1, quiet))
        await asyncio.sleep(0)
        with pytest.raises(Busy, match="a restart is in progress"):
            await h.ops.restart(1, quiet)
        await first
        await h.until(lambda: len(h.fake.live()) == 2, "the old generation to exit")
        assert h.published_pids() == h.live_pids()

    run(tmp_dir, scenario, workers=2)


def test_set_standby_during_a_restart_is_busy_and_the_pool_is_exact_after(tmp_dir: Path) -> None:
    async def scenario(h: FakeHerd) -> None:
        await start(h)
        restarting = asyncio.ensure_future(h.ops.restart(1, quiet))
        await asyncio.sleep(0)
        with pytest.raises(Busy):
            await h.ops.set_standby(2, 1, quiet)
        await restarting
        await h.until(lambda: len(h.herd.standbys()) == 1 and len(h.fake.live()) == 3, "one standby")
        await h.ops.set_standby(3, 1, quiet)
        await h.until(lambda: len(h.fake.live()) == 5, "3 standbys")
        assert len(h.herd.standbys()) == 3

    run(tmp_dir, scenario, workers=2, standby=1)


def test_reload_while_stopped_keeps_the_counts_for_the_next_start(tmp_dir: Path) -> None:
    async def scenario(h: FakeHerd) -> None:
        await start(h)
        await h.ops.stop()
        h.rewrite(workers=3, standby=1, command=["app2", "{socket}"])
        await h.ops.reload(quiet)
        assert h.fake.live() == []  # nothing starts on a reload of a stopped herd
        await start(h)
        await h.until(lambda: len(h.fake.live()) == 4, "3 workers and a standby")
        assert len(h.herd.slots) == 3 and len(h.herd.standbys()) == 1
        assert {p.launch.argv[0] for p in h.fake.live()} == {"app2"}

    run(tmp_dir, scenario, workers=1)


def test_reloaded_timeouts_reach_scale_ups_and_crash_replacements(tmp_dir: Path) -> None:
    async def scenario(h: FakeHerd) -> None:
        await start(h)
        h.rewrite(online_timeout=7, shutdown_timeout=0.06)
        await h.ops.reload(quiet)
        await h.ops.set_workers(2, 1, quiet)
        assert h.herd.slots[1].timeouts.online == 7
        crashed = h.herd.slots[0]
        h.fake.by_worker(crashed.id).exit(1)
        await h.until(lambda: h.herd.slots[0] is not crashed and h.herd.slots[0].alive, "slot 0 replaced")
        assert h.herd.slots[0].timeouts.online == 7 and h.herd.slots[0].timeouts.shutdown == 0.06

    run(tmp_dir, scenario, workers=1)


def test_reload_then_set_workers_keeps_the_reloaded_config(tmp_dir: Path) -> None:
    async def scenario(h: FakeHerd) -> None:
        await start(h)
        h.rewrite(command=["app2", "{socket}"], max_age=3600)
        await h.ops.reload(quiet)
        await h.ops.set_workers(3, 1, quiet)
        assert h.herd.config.max_age == 3600
        assert {p.launch.argv[0] for p in h.fake.live()} == {"app2"}
        assert len(h.herd.slots) == 3

    run(tmp_dir, scenario, workers=1)


def test_a_crash_during_a_rolling_deploy_ends_with_one_generation(tmp_dir: Path) -> None:
    async def scenario(h: FakeHerd) -> None:
        await start(h)
        old = dict(h.herd.slots)
        h.ready_when = lambda proc: proc.launch.argv[0] == "app"  # the new release waits
        h.rewrite(command=["app2", "{socket}"])
        reloading = asyncio.ensure_future(h.ops.reload(quiet))
        await h.until(lambda: any(p.launch.argv[0] == "app2" for p in h.fake.processes), "slot 0 to roll")
        h.fake.by_worker(old[2].id).exit(1)  # an old worker crashes mid-deploy
        await h.until(lambda: h.herd.slots[2] is not old[2] and h.herd.slots[2].alive, "slot 2 respawned")
        h.ready_when = lambda proc: True
        for proc in h.fake.live():
            h.report(proc)
        await reloading
        await h.until(lambda: len(h.fake.live()) == 3, "the old generation to exit")
        assert {p.launch.argv[0] for p in h.fake.live()} == {"app2"}
        assert h.published_pids() == h.live_pids()
        assert state_pids(h) == h.live_pids()

    run(tmp_dir, scenario, workers=3, strategy="rolling")


def test_a_report_that_beats_the_pid_is_kept(tmp_dir: Path) -> None:
    async def scenario(h: FakeHerd) -> None:
        h.ready_when = lambda proc: False
        h.fake.gate = asyncio.Event()
        starting = asyncio.ensure_future(h.ops.start(1, quiet))
        await h.until(lambda: h.fake.waiting == 1, "the launch at the gate")
        (worker,) = h.herd.workers.values()
        assert worker.pid is None
        worker.report_online("ipc")  # the worker's hello and report arrived first
        h.fake.gate.set()
        assert await starting  # online_timeout is 0.3 s: a dropped report fails the start

    run(tmp_dir, scenario, workers=1, online_timeout=0.3)


def test_a_failed_deploy_stops_the_started_workers_together(tmp_dir: Path) -> None:
    async def scenario(h: FakeHerd) -> None:
        count = 0

        def ready(proc: FakeProcess) -> bool:
            nonlocal count
            count += 1
            proc.ignores.add(signal.SIGTERM)  # each one takes the whole ladder to stop
            return count != 3

        h.ready_when = ready
        with pytest.raises(DeployFailed, match="did not report ready"):
            await h.ops.start(1, quiet)
        first, second = (p.pid for p in h.fake.processes[:2])
        events = h.fake.events
        # Both got their first signal before either was killed: one ladder, not two in a row.
        assert max(events.index(f"signal {first} SIGTERM"), events.index(f"signal {second} SIGTERM")) < min(
            events.index(f"signal {first} SIGKILL"), events.index(f"signal {second} SIGKILL")
        )
        assert h.fake.live() == []

    run(tmp_dir, scenario, workers=3, online_timeout=0.2)


def test_the_state_file_names_every_live_worker_after_each_change(tmp_dir: Path) -> None:
    async def scenario(h: FakeHerd) -> None:
        await start(h)
        assert state_pids(h) == h.live_pids() and len(h.live_pids()) == 2
        await h.ops.set_standby(1, 1, quiet)
        assert state_pids(h) == h.live_pids() and len(h.live_pids()) == 3
        await h.ops.restart(1, quiet)
        await h.until(lambda: len(h.fake.live()) == 3, "the old generation to exit")
        await asyncio.sleep(0)
        assert state_pids(h) == h.live_pids()
        h.fake.by_worker(h.herd.slots[0].id).exit(-9)
        await h.until(lambda: h.herd.slots[0].alive and len(h.fake.live()) == 3, "failover and refill")
        assert state_pids(h) == h.live_pids()
        state = json.loads((h.tmp_dir / "state.json").read_text())
        assert state["desired"]["standby"] == 1 and state["generations"]["current"] == 2
        assert {int(i) for i in state["slots"]} == {0, 1}
        await h.ops.stop()
        assert state_pids(h) == set()

    run(tmp_dir, scenario, workers=2)


def test_stop_cancels_a_recycle_and_a_restart_preempts_it(tmp_dir: Path) -> None:
    async def scenario(h: FakeHerd) -> None:
        await start(h)
        h.ready_when = lambda proc: False  # the successor hangs in its start
        worker = h.herd.slots[0]
        h.herd.healer.replace_live(worker, "test")
        await h.until(lambda: h.herd.operation == "replace" and len(h.fake.processes) == 2, "the recycle")
        h.ready_when = lambda proc: True
        await h.ops.restart(1, quiet)  # not busy: a recycle yields
        await h.until(lambda: len(h.fake.live()) == 1, "the old worker and the recycle's successor to exit")
        assert h.published_pids() == h.live_pids()

    run(tmp_dir, scenario, workers=1)


def test_a_spare_is_wanted_only_while_the_herd_is_idle(tmp_dir: Path) -> None:
    """What the herd asks of the process layer about the preload spare (forkservers.py):
    keep one once a deploy has ended, leave it alone while a deploy runs (the deploy may
    take it, and a new one must not compete with it), none once the daemon quits."""

    async def scenario(h: FakeHerd) -> None:
        await start(h)
        assert h.fake.spare_requests[-1] is True
        h.ready_when = lambda proc: False  # the new generation waits until the test says
        before = len(h.fake.spare_requests)
        restarting = asyncio.ensure_future(h.ops.restart(1, quiet))
        await h.until(lambda: len(h.fake.processes) == 4, "the new generation to be launched")
        deploy = h.fake.spare_requests[before:]
        assert deploy and all(request is None for request in deploy), str(h.fake.spare_requests)
        for proc in h.fake.processes[2:]:
            h.report(proc)
        await restarting
        assert h.fake.spare_requests[-1] is True
        before = len(h.fake.spare_requests)
        await h.ops.stop()
        stopping = h.fake.spare_requests[before:]
        assert stopping and all(request is None for request in stopping), str(h.fake.spare_requests)
        # (none asked while the stop runs, and none after: the spare stays for the next start)
        await h.ops.quit()
        assert h.fake.spare_requests[-1] is False

    run(tmp_dir, scenario, workers=2)


def test_no_spare_is_wanted_with_preload_spare_false(tmp_dir: Path) -> None:
    async def scenario(h: FakeHerd) -> None:
        await start(h)
        await h.ops.restart(1, quiet)
        assert set(h.fake.spare_requests) == {False}

    run(tmp_dir, scenario, workers=2, preload_spare=False)

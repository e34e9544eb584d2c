"""Keep-previous, rollback, commit and canaries on fake processes, with the interleavings
that matter: a kept worker dying, a canary crashing while a promote runs, a deploy over a
kept generation."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from test_interleavings import run, start

from sockherd.daemon.herd import DeployFailed
from support.fake_processes import FakeHerd, quiet


def pids(workers: Any) -> set[int | None]:
    return {w.pid for w in workers}


def test_rollback_republishes_the_kept_workers_and_retires_the_new_ones(tmp_dir: Path) -> None:
    async def scenario(h: FakeHerd) -> None:
        await start(h)
        old = h.published_pids()
        await h.ops.restart(1, quiet, keep_previous=60)
        new = h.published_pids()
        assert not old & new
        assert h.herd.kept is not None and pids(h.herd.kept.workers.values()) == old
        assert all(w.parked for w in h.herd.kept.workers.values())
        result = await h.ops.rollback(quiet)
        assert result["generation"] == 1
        assert h.published_pids() == old
        assert h.herd.current is not None and h.herd.current.number == 1
        assert h.herd.kept is None
        assert not new & h.live_pids()  # the bad generation is gone
        assert not any(w.parked for w in h.herd.slots.values())

    run(tmp_dir, scenario, workers=2)


def test_a_kept_worker_that_dies_drops_the_kept_generation(tmp_dir: Path) -> None:
    async def scenario(h: FakeHerd) -> None:
        await start(h)
        old = h.published_pids()
        await h.ops.restart(1, quiet, keep_previous=60)
        victim = next(p for p in h.fake.live() if p.pid in old)
        victim.exit(-9)
        await h.until(lambda: h.herd.kept is None, "the kept generation to be dropped")
        await h.until(lambda: not old & h.live_pids(), "its other worker to be stopped")
        with pytest.raises(DeployFailed, match="nothing to roll back to"):
            await h.ops.rollback(quiet)

    run(tmp_dir, scenario, workers=2)


def test_a_new_deploy_retires_the_kept_generation_first(tmp_dir: Path) -> None:
    async def scenario(h: FakeHerd) -> None:
        await start(h)
        first = h.published_pids()
        await h.ops.restart(1, quiet, keep_previous=60)
        await h.ops.restart(1, quiet)
        assert h.herd.kept is None
        assert not first & h.live_pids()

    run(tmp_dir, scenario, workers=2)


def test_the_kept_generation_retires_when_its_time_is_up(tmp_dir: Path) -> None:
    async def scenario(h: FakeHerd) -> None:
        await start(h)
        first = h.published_pids()
        await h.ops.restart(1, quiet, keep_previous=0.05)
        await h.until(lambda: h.herd.kept is None and not first & h.live_pids(), "the expiry")

    run(tmp_dir, scenario, workers=2)


def test_canary_promote_and_rollback(tmp_dir: Path) -> None:
    async def scenario(h: FakeHerd) -> None:
        await start(h)
        old = dict(h.herd.slots)
        await h.ops.restart(1, quiet, canary=1)
        assert h.herd.canary is not None and h.herd.canary.slots == [0]
        assert h.herd.slots[0] is not old[0] and h.herd.slots[1] is old[1] and h.herd.slots[2] is old[2]
        await h.ops.rollback(quiet)
        assert h.herd.slots == old and h.herd.canary is None
        await h.ops.restart(1, quiet, canary=1)
        await h.ops.promote(1, quiet)
        assert not pids(old.values()) & h.published_pids()
        assert len(h.herd.slots) == 3 and h.herd.canary is None and h.herd.kept is None
        assert not pids(old.values()) & h.live_pids()

    run(tmp_dir, scenario, workers=3)


def test_a_canary_crash_asks_for_a_rollback_and_is_not_replaced(tmp_dir: Path) -> None:
    async def scenario(h: FakeHerd) -> None:
        failures: list[str] = []
        h.herd.on_canary_failed = failures.append
        await start(h)
        await h.ops.restart(1, quiet, canary=1)
        canary_pid = h.herd.slots[0].pid
        next(p for p in h.fake.live() if p.pid == canary_pid).exit(1)
        await h.until(lambda: failures, "the canary failure to be reported")
        assert "crashed" in failures[0]
        await asyncio.sleep(0.05)
        assert not h.herd.slots[0].alive  # left for the rollback, not respawned
        await h.ops.rollback(quiet, why=failures[0])
        assert h.herd.slots[0].alive and h.herd.rolled_back == failures[0]

    run(tmp_dir, scenario, workers=2)


def test_a_canary_that_dies_while_promote_starts_the_rest_is_refilled(tmp_dir: Path) -> None:
    async def scenario(h: FakeHerd) -> None:
        h.herd.on_canary_failed = lambda why: None  # the daemon would retry its rollback after the promote
        await start(h)
        await h.ops.restart(1, quiet, canary=1)
        h.fake.gate = asyncio.Event()
        promoting = asyncio.ensure_future(h.ops.promote(1, quiet))
        await h.until(lambda: h.fake.waiting == 1, "the promote's launch at the gate")
        canary_pid = h.herd.slots[0].pid
        next(p for p in h.fake.live() if p.pid == canary_pid).exit(1)
        h.fake.gate.set()
        await promoting
        await h.until(lambda: h.herd.slots[0].alive and h.herd.slots[0].pid != canary_pid, "slot 0 refilled")

    run(tmp_dir, scenario, workers=2)


def test_refused_combinations_say_why(tmp_dir: Path) -> None:
    async def scenario(h: FakeHerd) -> None:
        await start(h)
        with pytest.raises(DeployFailed, match="--canary must be from 1 to 1"):
            await h.ops.restart(1, quiet, canary=2)
        with pytest.raises(DeployFailed, match="nothing to promote"):
            await h.ops.promote(1, quiet)
        with pytest.raises(DeployFailed, match="nothing to commit"):
            await h.ops.commit()
        with pytest.raises(DeployFailed, match="cannot be --suspended"):
            await h.ops.restart(1, quiet, canary=1, suspended=True)

    run(tmp_dir, scenario, workers=2)

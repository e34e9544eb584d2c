"""Adoption on fake processes: what a successor daemon rebuilds from the state file."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from sockherd.daemon.adoption import Adoption, StateUnusable, adopt
from sockherd.daemon.herd import DeployFailed
from support.fake_processes import FakeHerd, quiet


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 10))


def died(first: FakeHerd) -> dict[str, Any]:
    """The first daemon is gone: its state file is all that is left of it."""
    first.herd.healer.refill_standbys = lambda: None  # type: ignore[method-assign]
    state: dict[str, Any] = json.loads(json.dumps(first.herd.snapshot()))
    first.herd.want(first.herd.desired.but(running=False))  # it reacts to nothing any more
    return state


async def successor(first: FakeHerd, state: dict[str, Any]) -> tuple[FakeHerd, Adoption]:
    settings = {k: v for k, v in first.settings.items() if k != "tmp_dir"}
    second = FakeHerd(first.tmp_dir, fake=first.fake, **settings)
    adoption = adopt(second.herd, state)
    second.herd.healer.after_adoption(adoption.broken)
    await second.herd.retire(adoption.retire)
    return second, adoption


def test_the_successor_manages_the_same_workers_slots_and_counts(tmp_dir: Path) -> None:
    async def scenario() -> None:
        first = FakeHerd(tmp_dir, workers=2, standby=1)
        assert await first.ops.start(1, quiet)
        await first.until(lambda: len(first.fake.live()) == 3, "the standby")
        await first.ops.set_workers(3, 1, quiet)  # a runtime override: it must survive
        before = {w.id: w.pid for w in first.herd.workers.values()}
        second, adoption = await successor(first, died(first))
        assert len(adoption.adopted) == 4 and not adoption.retire and not adoption.gone
        assert {w.id: w.pid for w in second.herd.workers.values()} == before
        assert sorted(second.herd.slots) == [0, 1, 2] and len(second.herd.standbys()) == 1
        assert second.herd.target_workers == 3 and second.herd.running
        await second.ops.restart(1, quiet)
        assert second.herd.current is not None and second.herd.current.number == 2
        await second.until(lambda: not set(before.values()) & second.live_pids(), "the adopted ones to go")

    run(scenario)


def test_a_half_started_generation_and_old_standbys_are_retired(tmp_dir: Path) -> None:
    async def scenario() -> None:
        first = FakeHerd(tmp_dir, workers=2, standby=1)
        assert await first.ops.start(1, quiet)
        await first.until(lambda: len(first.fake.live()) == 3, "the standby")
        published = first.published_pids()
        first.ready_when = lambda proc: False
        restarting = asyncio.ensure_future(first.ops.restart(1, quiet))
        await first.until(lambda: len(first.fake.live()) == 6, "generation 2 to be launched")
        second, adoption = await successor(first, died(first))
        assert len(adoption.retire) == 3  # generation 2, never published
        await second.until(lambda: len(second.fake.live()) == 3, "generation 2 to be gone")
        with pytest.raises(DeployFailed):  # (what the dead daemon would have said, had it lived)
            await restarting
        assert second.published_pids() == published
        assert {w.generation for w in second.herd.workers.values()} == {1}

    run(scenario)


def test_a_worker_gone_or_reused_is_not_adopted_and_its_slot_is_refilled(tmp_dir: Path) -> None:
    async def scenario() -> None:
        first = FakeHerd(tmp_dir, workers=2)
        assert await first.ops.start(1, quiet)
        state = died(first)
        state["workers"][0]["start_time"] += 1  # its pid now names another process
        second, adoption = await successor(first, state)
        assert len(adoption.adopted) == 1 and len(adoption.gone) == 1
        await second.until(
            lambda: len(second.herd.slots) == 2 and all(w.alive for w in second.herd.slots.values()),
            "the empty slot refilled",
        )
        reused = first.fake.processes[0]
        assert reused.alive and reused.signals == []  # never adopted, never signalled

    run(scenario)


def test_a_broken_worker_is_replaced_after_adoption(tmp_dir: Path) -> None:
    async def scenario() -> None:
        first = FakeHerd(tmp_dir, workers=1)
        assert await first.ops.start(1, quiet)
        first.herd.slots[0].report_broken("db pool poisoned")
        broken = first.herd.slots[0]
        second, adoption = await successor(first, died(first))
        assert [w.id for w in adoption.broken] == [broken.id]
        await second.until(lambda: second.herd.slots[0].id != broken.id, "its replacement")
        await second.until(lambda: broken.pid not in second.live_pids(), "the broken one to retire")

    run(scenario)


def test_an_unreadable_state_file_adopts_nothing(tmp_dir: Path) -> None:
    async def scenario() -> None:
        herd = FakeHerd(tmp_dir)
        with pytest.raises(StateUnusable, match="does not hold a herd"):
            adopt(herd.herd, {"format": 1, "workers": "nope"})
        assert herd.herd.workers == {}

    run(scenario)

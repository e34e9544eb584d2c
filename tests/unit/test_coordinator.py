"""The coordinator's rules, alone: who waits, who is refused, who is cancelled."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from sockherd.daemon.coordinator import Busy, Coordinator, ShuttingDown


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 5))


class Op:
    """An operation that runs until released, recording how it ended."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.ended = ""

    async def __call__(self) -> str:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.ended = "cancelled"
            raise
        self.ended = "done"
        return "result"


def test_a_second_exclusive_operation_is_busy_with_the_first_ones_name() -> None:
    async def scenario() -> None:
        c, first = Coordinator(), Op()
        task = asyncio.ensure_future(c.run("restart", first))
        await first.started.wait()
        assert c.operation == "restart"
        with pytest.raises(Busy, match="busy: a restart is in progress; try again when it is done"):
            await c.run("scale", Op())
        first.release.set()
        assert await task == "result"
        assert c.operation is None

    run(scenario)


def test_a_stop_cancels_the_running_operation_then_holds_the_coordinator() -> None:
    async def scenario() -> None:
        c, deploy, stop = Coordinator(), Op(), Op()
        deploying = asyncio.ensure_future(c.run("restart", deploy))
        await deploy.started.wait()
        stopping = asyncio.ensure_future(c.run("stop", stop, kind="preempting"))
        await stop.started.wait()
        assert deploy.ended == "cancelled" and c.operation == "stop"
        with pytest.raises(asyncio.CancelledError):
            await deploying
        with pytest.raises(Busy, match="a stop is in progress"):
            await c.run("start", Op())
        stop.release.set()
        await stopping

    run(scenario)


def test_a_stop_waits_for_another_stop_instead_of_cancelling_it() -> None:
    async def scenario() -> None:
        c, first, second = Coordinator(), Op(), Op()
        one = asyncio.ensure_future(c.run("stop", first, kind="preempting"))
        await first.started.wait()
        two = asyncio.ensure_future(c.run("terminate", second, kind="preempting"))
        await asyncio.sleep(0.01)
        assert not second.started.is_set() and first.ended == ""
        first.release.set()
        await one
        await second.started.wait()
        second.release.set()
        await two
        assert first.ended == second.ended == "done"

    run(scenario)


def test_a_yielding_operation_waits_and_gives_way_to_a_command() -> None:
    async def scenario() -> None:
        c, deploy, recycle, scale = Coordinator(), Op(), Op(), Op()
        deploying = asyncio.ensure_future(c.run("restart", deploy))
        await deploy.started.wait()
        recycling = asyncio.ensure_future(c.run("replace", recycle, kind="yielding"))
        await asyncio.sleep(0.01)
        assert not recycle.started.is_set()  # waits for the restart
        deploy.release.set()
        await deploying
        await recycle.started.wait()
        scaling = asyncio.ensure_future(c.run("scale", scale))  # not busy: the recycle yields
        await scale.started.wait()
        assert recycle.ended == "cancelled" and c.operation == "scale"
        with pytest.raises(asyncio.CancelledError):
            await recycling
        scale.release.set()
        await scaling

    run(scenario)


def test_once_quitting_only_preempting_operations_run() -> None:
    async def scenario() -> None:
        c = Coordinator()
        c.begin_quit()
        for kind in ("exclusive", "yielding"):
            with pytest.raises(ShuttingDown, match="shutting down"):
                await c.run("restart", Op(), kind=kind)
        quit_ = Op()
        quit_.release.set()
        assert await c.run("quit", quit_, kind="preempting") == "result"

    run(scenario)


def test_an_operation_outlives_a_caller_that_went_away() -> None:
    async def scenario() -> None:
        c, deploy = Coordinator(), Op()
        caller = asyncio.ensure_future(c.run("restart", deploy))
        await deploy.started.wait()
        caller.cancel()  # the client disconnected
        await asyncio.sleep(0)
        assert c.operation == "restart" and deploy.ended == ""
        deploy.release.set()
        await asyncio.sleep(0.01)
        assert deploy.ended == "done" and c.operation is None

    run(scenario)


def test_no_command_slips_in_while_a_stop_waits_for_the_cancelled_operation() -> None:
    async def scenario() -> None:
        c, deploy, stop = Coordinator(), Op(), Op()
        cancelling, cancelled = asyncio.Event(), asyncio.Event()

        async def slow_to_cancel() -> str:
            deploy.started.set()
            try:
                await deploy.release.wait()
            except asyncio.CancelledError:
                cancelling.set()
                await cancelled.wait()  # killing what it started takes a moment
                raise
            return "result"

        deploying = asyncio.ensure_future(c.run("restart", slow_to_cancel))
        await deploy.started.wait()
        stopping = asyncio.ensure_future(c.run("stop", stop, kind="preempting"))
        await cancelling.wait()  # the stop waits for the restart to finish cancelling
        with pytest.raises(Busy, match="a stop is in progress"):
            await c.run("start", Op())
        cancelled.set()
        await stop.started.wait()
        stop.release.set()
        await stopping
        with pytest.raises(asyncio.CancelledError):
            await deploying

    run(scenario)

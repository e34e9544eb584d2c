"""The real process layer: launches that cannot escape, groups that die with their leader.

Real fork+exec, real signals, a real SIGCHLD reaper; the executor is a one-thread pool
the test can block, so "cancelled while queued" and "cancelled after exec returned"
happen exactly when the test says.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import secrets
import signal
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import psutil
import pytest

from sockherd.daemon.processes import Launch, LaunchFailed, OsProcesses
from sockherd.daemon.reaper import Reaper, process_start_time
from support.daemon import wait_for


def marked(argv: list[str], marker: str) -> Launch:
    env = {"PATH": os.environ["PATH"], "TEST_MARKER": marker}
    return Launch(argv, env, Path("/"), None, None)


def processes_marked(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get("TEST_MARKER") == marker and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
    return found


def sigkill_pending(proc: psutil.Process) -> bool:
    """SIGKILL is pending for ``proc`` (sent, not yet finished), or it is gone already."""
    try:
        with open(f"/proc/{proc.pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except FileNotFoundError:
        return True
    pending = int(fields["ShdPnd"].strip(), 16) | int(fields["SigPnd"].strip(), 16)
    return bool(pending & (1 << (signal.SIGKILL - 1))) or fields["State"].strip().startswith(("Z", "X"))


def zombies_of_ours() -> list[psutil.Process]:
    return [p for p in psutil.Process().children() if p.status() == psutil.STATUS_ZOMBIE]


@contextlib.asynccontextmanager
async def layer(executor: concurrent.futures.Executor | None = None) -> AsyncIterator[tuple[OsProcesses, Reaper]]:
    reaper = Reaper(asyncio.get_running_loop())
    reaper.install()
    try:
        yield OsProcesses(reaper, executor), reaper
    finally:
        reaper.uninstall()


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_launch_cancelled_while_queued_starts_nothing() -> None:
    marker = secrets.token_hex(4)
    blocker = threading.Event()

    async def scenario() -> None:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(blocker.wait)  # the only thread is busy: our launch queues
            async with layer(pool) as (processes, _):
                launch = asyncio.ensure_future(processes.launch(marked(["sleep", "300"], marker), 2))
                await asyncio.sleep(0.05)
                launch.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await launch
                blocker.set()
        assert processes_marked(marker) == []

    run(scenario)


def test_a_launch_cancelled_after_exec_returned_kills_and_reaps_its_process() -> None:
    marker = secrets.token_hex(4)

    async def scenario() -> None:
        async with layer() as (processes, _):
            launch = asyncio.ensure_future(processes.launch(marked(["sleep", "300"], marker), 5))
            await asyncio.sleep(0)  # the thread picks the launch up
            # Block the loop until the process exists: exec has returned in the thread,
            # and the loop has not seen it yet. Then cancel.
            wait_for(lambda: processes_marked(marker), 5, "the process to exist")
            launch.cancel()
            with pytest.raises(asyncio.CancelledError):
                await launch
            assert processes_marked(marker) == []
            assert zombies_of_ours() == []  # reaped before the cancellation completed

    run(scenario)


def test_spawn_timeout_counts_the_exec_not_the_time_queued() -> None:
    marker = secrets.token_hex(4)
    blocker = threading.Event()

    async def scenario() -> None:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(blocker.wait)
            async with layer(pool) as (processes, _):
                launch = asyncio.ensure_future(processes.launch(marked(["sleep", "300"], marker), 0.2))
                await asyncio.sleep(0.5)  # queued for longer than spawn_timeout
                blocker.set()
                handle = await launch
                assert handle.start_time == process_start_time(handle.pid)
                handle.signal(signal.SIGKILL)
                assert await handle.exited == -signal.SIGKILL

    run(scenario)


def test_a_program_that_cannot_be_executed_is_a_clear_failure() -> None:
    async def scenario() -> None:
        async with layer() as (processes, _):
            with pytest.raises(LaunchFailed, match=r"could not execute '/nonexistent/app': No such file"):
                await processes.launch(marked(["/nonexistent/app"], "x"), 2)

    run(scenario)


def test_when_a_leader_dies_its_whole_process_group_dies_before_it_is_reaped() -> None:
    marker = secrets.token_hex(4)

    async def scenario() -> None:
        async with layer() as (processes, _):
            # A wrapper: the shell backgrounds a child, then becomes the server.
            handle = await processes.launch(marked(["sh", "-c", "sleep 300 & exec sleep 301"], marker), 2)
            wait_for(lambda: len(processes_marked(marker)) == 2, 5, "the wrapper's child")
            handle.signal(signal.SIGKILL)  # the leader only, as the OOM killer would
            await handle.exited
            # Killed before the exit was reported: a SIGKILL to another process returns
            # before that process has finished dying, so what is still listed now must
            # have it pending; and then every one is gone.
            assert all(sigkill_pending(p) for p in processes_marked(marker))
            wait_for(lambda: processes_marked(marker) == [], 5, "the group's members to finish dying")

    run(scenario)


def test_children_we_do_not_know_wait_while_a_launch_is_in_flight() -> None:
    async def scenario() -> None:
        async with layer() as (_, reaper):
            hold = reaper.hold_unknown()
            stranger = os.posix_spawn("/bin/true", ["true"], {})  # noqa: ASYNC221 - a child the reaper never saw
            wait_for(zombies_of_ours, 5, "the stranger to exit")
            reaper.reap()
            assert [p.pid for p in zombies_of_ours()] == [stranger]  # kept: it could be a launch's child
            hold.release()
            assert zombies_of_ours() == []

    run(scenario)


def test_process_start_time_names_one_process() -> None:
    own = process_start_time(os.getpid())
    assert isinstance(own, int) and own > 0 and process_start_time(os.getpid()) == own
    child = psutil.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert process_start_time(child.pid) is None  # reaped: no such process any more

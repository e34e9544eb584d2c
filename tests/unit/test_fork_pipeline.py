"""A deploy's fork requests are pipelined on the channel (forkserver.ForkServer.fork).

The fork server is the far end of a socket pair, answered by the test: it sees every
request of a deploy before it answers the first (the daemon does not wait for an answer
before it sends the next request), and each answer goes to the fork that asked, in order,
whatever the answers before it were.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from sockherd.daemon.forkserver import ForkFailed, ForkServer, ServerKey

KEY = ServerKey(1, ("python", "-m", "app"), (), Path("/srv/app"), None, None)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 10))


def fork_server() -> tuple[ForkServer, socket.socket, asyncio.Future[int]]:
    """A ForkServer on one end of a socket pair (the test answers on the other) and the
    future its process's exit would resolve; inside a running loop."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    theirs.setblocking(False)
    exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    return ForkServer(KEY, 1, exited, ours), theirs, exited


def test_a_deploys_forks_go_out_together_and_each_gets_its_own_answer() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        server, theirs, _ = fork_server()
        turns = [loop.create_future() for _ in range(3)]
        forks = [
            asyncio.ensure_future(server.fork({"SOCKHERD_WORKER_ID": f"w{i}"}, [], [], turns[i])) for i in range(3)
        ]
        # Every request arrives before any answer is sent.
        requests = [json.loads(await asyncio.wait_for(loop.sock_recv(theirs, 65536), 1)) for _ in range(3)]
        assert [r["env"]["SOCKHERD_WORKER_ID"] for r in requests] == ["w0", "w1", "w2"]
        # The second fork's turn (its spawn_timeout) begins once the first is answered.
        assert turns[0].done() and not turns[1].done()
        theirs.send(json.dumps({"pid": 101}).encode())
        assert await forks[0] == 101
        await asyncio.wait_for(asyncio.shield(turns[1]), 1)
        theirs.send(json.dumps({"error": "Cannot allocate memory"}).encode())
        with pytest.raises(ForkFailed, match="Cannot allocate memory"):
            await forks[1]
        theirs.send(json.dumps({"pid": 103}).encode())
        assert await forks[2] == 103  # a failed fork before it does not put the channel out of step
        server._close()
        theirs.close()

    run(scenario)


def test_a_fork_server_retired_with_forks_in_flight_keeps_its_channel_until_the_last_answer() -> None:
    """Closed under a fork in flight, the answer (a worker's pid) would be lost with the
    worker running: the channel closes once every answer is in."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        server, theirs, exited = fork_server()
        forks = [asyncio.ensure_future(server.fork({}, [], [])) for _ in range(2)]
        for _ in range(2):
            await asyncio.wait_for(loop.sock_recv(theirs, 65536), 1)
        server.retire()
        with pytest.raises(ForkFailed, match="gone"):
            await server.fork({}, [], [])  # no new request once retired
        theirs.send(json.dumps({"pid": 101}).encode())
        assert await forks[0] == 101
        assert server._channel.fileno() >= 0  # one answer still to come
        theirs.send(json.dumps({"pid": 102}).encode())
        assert await forks[1] == 102
        assert server._channel.fileno() < 0
        exited.set_result(0)  # the fork server exits (its channel closed): no kill is due
        theirs.close()

    run(scenario)


def test_a_fork_given_up_unanswered_does_not_hand_its_answer_to_the_next() -> None:
    """Forks are not to be cancelled; if one is anyway, the answer it leaves unread must
    not become the next fork's pid (that would register one worker twice and lose one)."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        server, theirs, exited = fork_server()
        given_up, queued = (asyncio.ensure_future(server.fork({}, [], [])) for _ in range(2))
        for _ in range(2):
            await asyncio.wait_for(loop.sock_recv(theirs, 65536), 1)
        given_up.cancel()
        with pytest.raises(asyncio.CancelledError):
            await given_up
        theirs.send(json.dumps({"pid": 111}).encode())  # the given-up fork's worker
        theirs.send(json.dumps({"pid": 222}).encode())
        with pytest.raises(ForkFailed, match="given up"):
            await queued
        assert server._channel.fileno() < 0  # closed: the fork server kills what it could not report
        exited.set_result(0)
        theirs.close()

    run(scenario)

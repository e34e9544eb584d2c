"""When the daemon keeps a spare fork server, and which deploy may take it (forkserver.ForkServers).

Pure policy: the "processes" are socket pairs whose far end a fake start function
answers for (warm, as sockherd.preload.warm_point would), so no interpreter runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
from pathlib import Path

from sockherd.daemon.forkserver import SPARE_VAR, ForkServer, ServerKey
from sockherd.daemon.forkservers import ForkServers, StartServer


def key(generation: int, *, env: tuple[tuple[str, str], ...] = (("A", "1"),)) -> ServerKey:
    return ServerKey(generation, ("python", "-m", "app"), env, Path("/srv/app"), None, None)


class FakeStarts:
    """Records what was started; each start answers warm at once."""

    def __init__(self) -> None:
        self.started: list[ServerKey] = []
        self.ends: list[socket.socket] = []
        self.exits: list[asyncio.Future[int]] = []

    async def __call__(
        self, started: ServerKey, channel: socket.socket, spawn_timeout: float
    ) -> tuple[int, asyncio.Future[int]]:
        self.started.append(started)
        end = channel.dup()
        end.send(json.dumps({"warm": True}).encode())
        self.ends.append(end)  # kept open: the "process" lives
        exited: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.exits.append(exited)
        return 1000 + len(self.started), exited

    def close(self, servers: ForkServers) -> None:
        """Every fake process "exits" first: a retired fork server that has not is killed by pid."""
        for exited in self.exits:
            if not exited.done():
                exited.set_result(0)
        for task in servers._servers.values():
            exited = task.result().exited
            if not exited.done():
                exited.set_result(0)
        servers.retain(())
        servers.drop_spare()
        for end in self.ends:
            end.close()


def fork_servers(start: StartServer) -> ForkServers:
    servers = ForkServers(start, lambda _: [])
    # A real first start makes the daemon a child subreaper; here that would be the test
    # runner, which would then collect (and never reap) every orphan of later tests.
    servers._subreaper = True
    return servers


def served(servers: ForkServers, server_key: ServerKey, *, spares: bool) -> ForkServer:
    """Register a ready fork server for ``server_key`` as if a deploy had started it."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    theirs.close()
    server = ForkServer(server_key, 1, asyncio.get_running_loop().create_future(), ours)
    server.supports_spares = spares
    task: asyncio.Future[ForkServer] = asyncio.get_running_loop().create_future()
    task.set_result(server)
    servers._servers[server_key] = task  # type: ignore[assignment]
    return server


async def settle(servers: ForkServers) -> None:
    """Until the spare being started (if any) is warm, or failed."""
    await asyncio.sleep(0)
    if servers._spare is not None:
        await asyncio.wait({servers._spare[1]})


def run(test: object) -> None:
    asyncio.run(test())  # type: ignore[operator]


def test_no_spare_for_a_program_without_a_warm_point() -> None:
    async def scenario() -> None:
        starts = FakeStarts()
        servers = fork_servers(starts)
        served(servers, key(1), spares=False)
        servers.keep_spare({1})
        await settle(servers)
        assert starts.started == []
        assert servers.spare_pid() is None
        starts.close(servers)

    run(scenario)


def test_a_spare_is_started_once_for_the_newest_generation_with_its_settings() -> None:
    async def scenario() -> None:
        starts = FakeStarts()
        servers = fork_servers(starts)
        served(servers, key(1, env=(("A", "old"),)), spares=True)
        served(servers, key(2), spares=True)
        servers.keep_spare({1, 2})
        await settle(servers)
        servers.keep_spare({1, 2})  # the herd changes often: one spare, not one per change
        await settle(servers)
        assert len(starts.started) == 1
        assert starts.started[0] == dataclasses.replace(key(2), generation=0, env=(("A", "1"), (SPARE_VAR, "1")))
        assert servers.spare_pid() == 1001
        starts.close(servers)

    run(scenario)


def test_no_spare_when_the_newest_preloaded_generation_is_gone() -> None:
    """The current generation has no fork server (deployed after a reload turned preload
    off): the old generation's settings are no longer what a deploy would use, so no spare."""

    async def scenario() -> None:
        starts = FakeStarts()
        servers = fork_servers(starts)
        served(servers, key(1), spares=True)
        servers.keep_spare({2})
        await settle(servers)
        assert starts.started == []
        starts.close(servers)

    run(scenario)


def test_a_spare_for_settings_no_longer_newest_is_retired_for_one_of_the_new_settings() -> None:
    async def scenario() -> None:
        starts = FakeStarts()
        servers = fork_servers(starts)
        served(servers, key(1), spares=True)
        servers.keep_spare({1})
        await settle(servers)
        first = servers._spare
        assert first is not None
        served(servers, key(2, env=(("A", "2"),)), spares=True)  # a deploy with another environment
        servers.keep_spare({1, 2})
        await settle(servers)
        assert not first[1].result().usable  # the old settings' spare is retired
        assert len(starts.started) == 2
        assert starts.started[1] == dataclasses.replace(key(2), generation=0, env=(("A", "2"), (SPARE_VAR, "1")))
        starts.close(servers)

    run(scenario)


def test_a_deploy_with_the_same_settings_takes_the_spare_and_another_retires_it() -> None:
    async def scenario() -> None:
        starts = FakeStarts()
        servers = fork_servers(starts)
        served(servers, key(1), spares=True)
        servers.keep_spare({1})
        await settle(servers)
        spare = servers._spare
        assert spare is not None
        assert servers._claim_spare(key(2)) is spare[1]  # same command, env, cwd, logs: taken
        assert servers._spare is None
        spare[1].result().retire()  # (what its deploy would have done with it, here: nothing)

        servers.keep_spare({1})
        await settle(servers)
        second = servers._spare
        assert second is not None
        assert servers._claim_spare(key(3, env=(("A", "2"),))) is None  # another environment: retired
        assert not second[1].result().usable
        starts.close(servers)

    run(scenario)


def test_a_spec_whose_spare_failed_to_start_is_not_tried_again() -> None:
    async def scenario() -> None:
        async def failing(
            started: ServerKey, channel: socket.socket, spawn_timeout: float
        ) -> tuple[int, asyncio.Future[int]]:
            raise OSError("no such file")

        servers = fork_servers(failing)
        served(servers, key(1), spares=True)
        servers.keep_spare({1})
        await settle(servers)
        assert servers.spare_pid() is None
        assert servers._spare_failed == dataclasses.replace(key(1), generation=0)
        servers._spare = None
        servers.keep_spare({1})
        assert servers._spare is None  # not started again for the same settings
        FakeStarts().close(servers)

    run(scenario)

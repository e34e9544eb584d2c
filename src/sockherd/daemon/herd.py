"""The herd: desired state, generations, and the primitives every operation is made of.

A *generation* is one version of the worker spec (command, environment, timeouts). The
current generation is the one published; a deploy starts the next one beside it, and
it becomes current only when it is published. Until then the old generation stays
current and fully managed: its crashes are replaced, it is stopped on terminate.

Slots (``app.N.sock``) are derived state: ``slots[N]`` is the worker the symlink
points at. A worker leaves its slot only after its successor is published there.
Standbys are workers of the current generation with no index: started suspended,
never published until promoted into a slot.

Deploys and scaling live in deploy.py, crash replacement and recycling in healing.py;
this module holds the state they share and the steps they are made of.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import psutil

from sockherd.config import Config
from sockherd.daemon.healing import Healer
from sockherd.daemon.process import Generation, StartError, Worker, WorkerState
from sockherd.daemon.publish import publish_symlink, unpublish_symlink
from sockherd.daemon.reaper import Reaper

log = logging.getLogger("sockherd")

Progress = Callable[[str], None]


class DeployFailed(Exception):
    def __init__(self, reason: str, output: list[str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.output = output or []


class Busy(Exception):
    pass


class Herd:
    def __init__(self, config: Config, reaper: Reaper) -> None:
        self.config = config
        self._reaper = reaper
        self.workers: dict[str, Worker] = {}  # every live worker, any generation
        self.slots: dict[int, Worker] = {}  # published: index -> worker
        self.current: Generation | None = None
        self.pending: Generation | None = None
        self.running = False
        self.suspended = False  # deployed with --suspended and not resumed yet
        self.target_workers = config.workers  # runtime overrides (set-workers) until a reload
        self.target_standby = config.standby
        self._numbers = 0
        self._operation: asyncio.Task[Any] | None = None
        self._operation_name = ""
        self.healer = Healer(self)
        # Called once a worker's pid is known: what it said before that is replayed.
        self.on_spawned: Callable[[Worker], None] | None = None

    # -- queries -----------------------------------------------------------------------

    def worker_for_pid(self, pid: int) -> Worker | None:
        """The worker that is ``pid`` or one of its ancestors (a wrapper's child)."""
        by_pid = {w.pid: w for w in self.workers.values()}
        if pid in by_pid:
            return by_pid[pid]
        with contextlib.suppress(psutil.Error):
            for parent in psutil.Process(pid).parents():
                if parent.pid in by_pid:
                    return by_pid[parent.pid]
        return None

    def standbys(self, generation: int | None = None) -> list[Worker]:
        """Standbys of a generation (default: the current one), starting or ready."""
        number = generation if generation is not None else (self.current.number if self.current else None)
        return [
            w
            for w in self.workers.values()
            if w.index is None and w.generation == number and w.alive and not w.stopping
        ]

    @property
    def operation(self) -> str | None:
        return self._operation_name if self._operation and not self._operation.done() else None

    def status(self) -> list[dict[str, Any]]:
        published = {w.id: i for i, w in self.slots.items()}
        rows = []
        for w in sorted(
            self.workers.values(), key=lambda w: (w.generation, w.index if w.index is not None else 1 << 30)
        ):
            row = w.status()
            index = published.get(w.id)
            row["symlink"] = str(self.config.symlink_path(index)) if index is not None else None
            row["published"] = index is not None
            rows.append(row)
        return rows

    # -- primitives --------------------------------------------------------------------

    def new_generation(self) -> Generation:
        self._numbers += 1
        return Generation(self._numbers, self.config.worker, self.config.timeouts)

    def new_worker(self, gen: Generation, index: int | None, *, suspended: bool) -> Worker:
        worker = Worker(
            config=self.config,
            spec=gen.spec,
            timeouts=gen.timeouts,
            index=index,
            generation=gen.number,
            reaper=self._reaper,
            on_exit=self.healer.on_exit,
            on_spawned=self._spawned,
            restarts=self.healer.restarts(index),
            suspended=suspended or index is None,  # standbys always start suspended
        )
        self.workers[worker.id] = worker
        return worker

    def _spawned(self, worker: Worker) -> None:
        if self.on_spawned is not None:
            self.on_spawned(worker)

    async def start_worker(
        self, gen: Generation, index: int | None, *, suspended: bool, attempts: int, progress: Progress
    ) -> Worker:
        """Spawn until one is online (or suspended and ready), up to ``attempts`` tries."""
        last: StartError | None = None
        for attempt in range(1, attempts + 1):
            worker = self.new_worker(gen, index, suspended=suspended)
            try:
                await worker.spawn()
                await worker.wait_online()
            except StartError as exc:
                last = exc
                progress(f"{worker.label} failed to start (attempt {attempt}/{attempts}): {exc.reason}")
                await worker.kill()
                if worker.pid is None:  # never ran: no exit will be reaped to remove it
                    self.workers.pop(worker.id, None)
                continue
            except BaseException:
                await asyncio.shield(worker.kill())
                raise
            return worker
        assert last is not None
        raise last

    def publish(self, index: int, worker: Worker) -> None:
        publish_symlink(
            self.config.symlink_path(index), worker.socket_path, relative=self.config.symlinks == "relative"
        )
        worker.index = index
        self.slots[index] = worker
        self.healer.published(index, worker)
        log.info("published %s as %s", worker.label, self.config.symlink_path(index).name)

    def unpublish(self, index: int) -> Worker | None:
        unpublish_symlink(self.config.symlink_path(index))
        self.healer.cancel_replacement(index)
        return self.slots.pop(index, None)

    def republish(self) -> None:
        """Rewrite every published symlink (the ``symlinks`` style changed)."""
        for index, worker in self.slots.items():
            publish_symlink(
                self.config.symlink_path(index), worker.socket_path, relative=self.config.symlinks == "relative"
            )

    async def retire(self, workers: list[Worker]) -> None:
        """Stop workers that no symlink points at any more, after the linger.

        nginx may have connected to the old socket just before the rename; those
        connections sit in the old worker's backlog, and the linger lets it accept them
        before its shutdown begins.
        """
        workers = [w for w in workers if w.alive]
        if not workers:
            return
        await asyncio.sleep(self.config.timeouts.linger)
        await asyncio.gather(*(w.stop() for w in workers))

    async def stop_generation(self, number: int) -> None:
        await asyncio.gather(*(w.stop() for w in list(self.workers.values()) if w.generation == number))

    # -- operations: one at a time; stop preempts --------------------------------------

    async def exclusive(self, name: str, work: Callable[[], Awaitable[Any]]) -> Any:
        if self.operation is not None:
            raise Busy(f"busy: a {self._operation_name} is in progress; try again when it is done")
        self._operation_name = name
        self._operation = asyncio.ensure_future(work())
        return await asyncio.shield(self._operation)

    async def _preempt(self) -> None:
        if self._operation is not None and not self._operation.done():
            log.info("%s interrupted", self._operation_name)
            self._operation.cancel()
            with contextlib.suppress(BaseException):
                await self._operation

    async def start(self, attempts: int, progress: Progress, *, suspended: bool = False) -> bool:
        """Bring workers up if they are not. False when they already were."""
        from sockherd.daemon.deploy import deploy

        if self.running:
            return False
        await self.exclusive("start", lambda: deploy(self, attempts, progress, suspended=suspended))
        return True

    async def restart(
        self, attempts: int, progress: Progress, config: Config | None = None, *, suspended: bool = False
    ) -> None:
        """Deploy a new generation; with ``config``, of that config, kept only on success."""
        from sockherd.daemon.deploy import deploy

        previous = self.config
        if config is not None and self.operation is None:
            self.config = config
        try:
            await self.exclusive("restart", lambda: deploy(self, attempts, progress, suspended=suspended))
        except BaseException:
            self.config = previous
            raise

    def resume(self) -> int:
        """Release the published workers' held requests. Standbys stay suspended."""
        self.suspended = False
        resumed = [w for w in self.slots.values() if w.suspended and w.alive]
        for worker in resumed:
            worker.resume()
        if resumed:
            log.info("resumed %d worker(s)", len(resumed))
        return len(resumed)

    async def stop(self) -> None:
        """Unpublish, linger, then shut every worker down staged. Preempts a deploy."""
        self.running = False
        await self._preempt()
        await self.healer.stop()
        was_published = bool(self.slots)
        for index in list(self.slots):
            self.unpublish(index)
        self.current = None
        self.suspended = False
        if was_published:
            await asyncio.sleep(self.config.timeouts.linger)
        await asyncio.gather(*(w.stop() for w in list(self.workers.values())))

    async def kill_all(self) -> None:
        """The impatient path (a second SIGINT): SIGKILL everything now."""
        self.running = False
        await asyncio.gather(*(w.kill() for w in list(self.workers.values())))


__all__ = ["Busy", "DeployFailed", "Generation", "Herd", "Progress", "WorkerState"]

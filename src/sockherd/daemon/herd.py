"""The herd: desired state, generations, deploys and crash replacement.

A *generation* is one version of the worker spec (command, environment, timeouts). The
current generation is the one published; a deploy starts the next one beside it, and
it becomes current only when it is published. Until then the old generation stays
current and fully managed: its crashes are replaced, it is stopped on terminate.

Slots (``app.N.sock``) are derived state: ``slots[N]`` is the worker the symlink
points at. A worker leaves its slot only after its successor is published there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import psutil

from sockherd.config import Config, Timeouts, WorkerSpec
from sockherd.daemon.process import StartError, Worker, WorkerState, describe_exit, output_tail
from sockherd.daemon.publish import publish_symlink, unpublish_symlink
from sockherd.daemon.reaper import Reaper

log = logging.getLogger("sockherd")

Progress = Callable[[str], None]

BACKOFF_FIRST = 0.1
BACKOFF_CAP = 30.0
# A worker that served this long before it crashed is not a crash loop: its successor
# starts at once. Killed every few seconds (OOM killer, chaos tests), a slot must not
# drift into long backoffs; dying right after ready, over and over, is a loop.
BACKOFF_RESET_AFTER = 1.0


def crash_backoff(consecutive: int) -> float:
    """Delay before respawning after the n-th consecutive crash: 0, 0.1, 0.2 … 30 s.

    The first replacement is immediate (a lone crash should cost milliseconds); a crash
    loop backs off exponentially but never gives up and never forks in a tight loop.
    """
    if consecutive <= 1:
        return 0.0
    return min(BACKOFF_FIRST * 2.0 ** (consecutive - 2), BACKOFF_CAP)


class DeployFailed(Exception):
    def __init__(self, reason: str, output: list[str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.output = output or []


class Busy(Exception):
    pass


@dataclass(frozen=True, slots=True)
class Generation:
    number: int
    spec: WorkerSpec
    timeouts: Timeouts


@dataclass(slots=True)
class SlotHealth:
    """Crash bookkeeping for one index: survives the workers that fill it."""

    restarts: int = 0
    consecutive: int = 0
    next_attempt_at: float | None = None
    replacement: asyncio.Task[None] | None = field(default=None, repr=False)


class Herd:
    def __init__(self, config: Config, reaper: Reaper) -> None:
        self.config = config
        self._reaper = reaper
        self.workers: dict[str, Worker] = {}  # every live worker, any generation
        self.slots: dict[int, Worker] = {}  # published: index -> worker
        self.health: dict[int, SlotHealth] = {}
        self.current: Generation | None = None
        self.pending: Generation | None = None
        self.running = False
        self._numbers = 0
        self._operation: asyncio.Task[Any] | None = None
        self._operation_name = ""

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

    def slot_status(self) -> list[dict[str, Any]]:
        return [
            {"index": i, "restarts": h.restarts, "crash_loop": h.consecutive, "next_attempt_at": h.next_attempt_at}
            for i, h in sorted(self.health.items())
        ]

    # -- operations: one at a time; stop preempts --------------------------------------

    async def _exclusive(self, name: str, work: Callable[[], Awaitable[Any]]) -> Any:
        if self.operation is not None:
            raise Busy(f"busy: a {self._operation_name} is in progress; try again when it is done")
        self._operation_name = name
        self._operation = asyncio.create_task(work(), name=name)  # type: ignore[arg-type]
        return await asyncio.shield(self._operation)

    async def _preempt(self) -> None:
        if self._operation is not None and not self._operation.done():
            log.info("%s interrupted", self._operation_name)
            self._operation.cancel()
            with contextlib.suppress(BaseException):
                await self._operation

    async def start(self, max_attempts: int, progress: Progress) -> bool:
        """Bring workers up if they are not. False when they already were."""
        if self.running:
            return False
        await self._exclusive("start", lambda: self._deploy(max_attempts, progress))
        return True

    async def restart(self, max_attempts: int, progress: Progress, config: Config | None = None) -> None:
        """Deploy a new generation; with ``config``, of that config, kept only on success."""
        previous = self.config
        if config is not None and self.operation is None:
            self.config = config
        try:
            await self._exclusive("restart", lambda: self._deploy(max_attempts, progress))
        except BaseException:
            self.config = previous
            raise

    async def stop(self) -> None:
        """Unpublish, linger, then shut every worker down staged. Preempts a deploy."""
        self.running = False
        await self._preempt()
        for health in self.health.values():
            if health.replacement is not None:
                health.replacement.cancel()
        replacements = [h.replacement for h in self.health.values() if h.replacement is not None]
        await asyncio.gather(*replacements, return_exceptions=True)
        was_published = bool(self.slots)
        for index in list(self.slots):
            unpublish_symlink(self.config.symlink_path(index))
        self.slots.clear()
        self.current = None
        if was_published:
            await asyncio.sleep(self.config.timeouts.linger)
        await asyncio.gather(*(w.stop() for w in list(self.workers.values())))

    async def kill_all(self) -> None:
        """The impatient path (a second SIGINT): SIGKILL everything now."""
        await asyncio.gather(*(w.kill() for w in list(self.workers.values())))

    # -- deploys ------------------------------------------------------------------------

    def _new_generation(self) -> Generation:
        self._numbers += 1
        return Generation(self._numbers, self.config.worker, self.config.timeouts)

    def _new_worker(self, spec: WorkerSpec, timeouts: Timeouts, generation: int, index: int | None) -> Worker:
        restarts = self.health[index].restarts if index is not None and index in self.health else 0
        worker = Worker(
            config=self.config,
            spec=spec,
            timeouts=timeouts,
            index=index,
            generation=generation,
            reaper=self._reaper,
            on_exit=self._on_exit,
            restarts=restarts,
        )
        self.workers[worker.id] = worker
        return worker

    async def _deploy(self, max_attempts: int, progress: Progress) -> None:
        if self.config.strategy == "rolling" and self.slots:
            await self._deploy_rolling(max_attempts, progress)
        else:
            await self._deploy_atomic(max_attempts, progress)
        self.running = True

    async def _deploy_atomic(self, max_attempts: int, progress: Progress) -> None:
        gen = self.pending = self._new_generation()
        count = self.config.workers
        progress(f"starting generation {gen.number}: {count} worker(s)")
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._start_slot(gen, i, max_attempts, progress)) for i in range(count)]
        except BaseException as exc:
            self.pending = None
            await self._stop_generation(gen.number)
            failures = [e for e in _leaves(exc) if isinstance(e, StartError)]
            if failures:
                first = failures[0]
                raise DeployFailed(f"{first.worker.label} {first.reason}", output_tail(gen.spec)) from None
            raise
        started = [t.result() for t in tasks]
        if dead := [w for w in started if not w.alive]:
            self.pending = None
            await self._stop_generation(gen.number)
            raise DeployFailed(f"{dead[0].label} exited after it was ready, before it was published")
        old = [w for w in self.workers.values() if w.generation != gen.number]
        for worker in started:
            assert worker.index is not None
            self._publish(worker.index, worker)
        for index in [i for i in self.slots if i >= count]:  # fewer workers than before
            unpublish_symlink(self.config.symlink_path(index))
            del self.slots[index]
        self.current, self.pending = gen, None
        progress(f"generation {gen.number} published; stopping {len(old)} old worker(s)")
        await self._retire(old)
        progress(f"generation {gen.number} is serving")

    async def _deploy_rolling(self, max_attempts: int, progress: Progress) -> None:
        """One index at a time (memory-tight hosts); a failure rolls the done ones back."""
        old_gen, gen = self.current, self._new_generation()
        progress(f"rolling generation {gen.number} over {self.config.workers} slot(s)")
        done: list[int] = []
        for index in range(self.config.workers):
            try:
                worker = await self._start_slot(gen, index, max_attempts, progress)
            except StartError as exc:
                if old_gen is not None:
                    await self._roll_back(old_gen, done, progress)
                raise DeployFailed(f"{exc.worker.label} {exc.reason}", output_tail(gen.spec)) from None
            previous = self.slots.get(index)
            self._publish(index, worker)
            self.current = gen
            if previous is not None:
                await self._retire([previous])
            done.append(index)
            progress(f"slot {index} now serves generation {gen.number}")

    async def _roll_back(self, gen: Generation, indexes: list[int], progress: Progress) -> None:
        for index in indexes:
            try:
                worker = await self._start_slot(gen, index, 1, progress)
            except StartError as exc:
                log.error("rollback of slot %d failed (%s); it keeps the new version", index, exc.reason)
                continue
            previous = self.slots.get(index)
            self._publish(index, worker)
            progress(f"rolled slot {index} back to generation {gen.number}")
            if previous is not None:
                await self._retire([previous])
        self.current = gen

    async def _start_slot(self, gen: Generation, index: int, attempts: int, progress: Progress) -> Worker:
        last: StartError | None = None
        for attempt in range(1, attempts + 1):
            worker = self._new_worker(gen.spec, gen.timeouts, gen.number, index)
            try:
                await worker.spawn()
                await worker.wait_online()
            except StartError as exc:
                last = exc
                progress(f"{worker.label} failed to start (attempt {attempt}/{attempts}): {exc.reason}")
                await worker.kill()
                continue
            except BaseException:
                await asyncio.shield(worker.kill())
                raise
            return worker
        assert last is not None
        raise last

    def _publish(self, index: int, worker: Worker) -> None:
        publish_symlink(
            self.config.symlink_path(index), worker.socket_path, relative=self.config.symlinks == "relative"
        )
        self.slots[index] = worker
        health = self.health.setdefault(index, SlotHealth())
        if health.replacement is not None and health.replacement is not asyncio.current_task():
            health.replacement.cancel()  # a newer worker took the slot first
        log.info("published %s as %s", worker.label, self.config.symlink_path(index).name)

    async def _retire(self, workers: Iterable[Worker]) -> None:
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

    async def _stop_generation(self, number: int) -> None:
        await asyncio.gather(*(w.stop() for w in list(self.workers.values()) if w.generation == number))

    # -- crashes ------------------------------------------------------------------------

    def _on_exit(self, worker: Worker, code: int) -> None:
        self.workers.pop(worker.id, None)
        index = worker.index
        if worker.stopping:
            log.info("%s exited (%s)", worker.label, describe_exit(code))
            return
        if index is None or self.slots.get(index) is not worker:
            log.warning("%s exited (%s) before it was published", worker.label, describe_exit(code))
            return
        health = self.health.setdefault(index, SlotHealth())
        if worker.online_at is not None and time.time() - worker.online_at > BACKOFF_RESET_AFTER:
            health.consecutive = 0
        health.consecutive += 1
        health.restarts += 1
        log.warning("%s crashed (%s); replacing it", worker.label, describe_exit(code))
        if self.running and health.replacement is None:
            health.replacement = asyncio.create_task(self._replace(index, worker), name=f"replace slot {index}")

    async def _replace(self, index: int, dead: Worker) -> None:
        """Respawn a crashed slot with the dead worker's own spec, backing off on loops."""
        health = self.health[index]
        try:
            while self.slots.get(index) is dead:
                delay = crash_backoff(health.consecutive)
                if delay:
                    health.next_attempt_at = time.time() + delay
                    log.info(
                        "slot %d: crash loop (%d in a row); next attempt in %.1fs", index, health.consecutive, delay
                    )
                    await asyncio.sleep(delay)
                    health.next_attempt_at = None
                worker = self._new_worker(dead.spec, dead.timeouts, dead.generation, index)
                try:
                    await worker.spawn()
                    await worker.wait_online()
                except StartError as exc:
                    log.warning("slot %d: replacement %s", index, exc.reason)
                    health.consecutive += 1
                    health.restarts += 1
                    continue
                except BaseException:
                    await asyncio.shield(worker.kill())
                    raise
                if self.slots.get(index) is dead and self.running:
                    health.replacement = None
                    self._publish(index, worker)
                else:
                    await worker.stop()
        finally:
            if health.replacement is asyncio.current_task():
                health.replacement = None
            health.next_attempt_at = None


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]


__all__ = ["Busy", "DeployFailed", "Herd", "WorkerState", "crash_backoff"]

"""The herd: the desired state, the workers, and the primitives operations are made of.

A *generation* is one version of the worker spec; the current generation is the one
published. A deploy starts the next one beside it (``pending``), and it becomes current
only when it is published; until then the old generation stays current and fully
managed: its crashes are replaced, it is stopped on terminate.

Slots (``app.N.sock``) are derived state: ``slots[N]`` is the worker the symlink
points at. A worker leaves its slot only after its successor is published there.
Standbys are workers of the current generation with no index: started suspended,
never published until promoted into a slot.

Who may change what (docs/architecture.md has the whole picture): operations
(operations.py) run one at a time through ``coordinator`` and are the only writers of
``desired``; healing (healing.py) reacts to exits and reports, and its tasks belong to
the healer, which the stop operation cancels and awaits. Every change is persisted
through ``changed()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from sockherd import __version__
from sockherd.config import Config, Timeouts, WorkerSpec
from sockherd.daemon.coordinator import Coordinator
from sockherd.daemon.desired import Desired
from sockherd.daemon.environment import output_tail
from sockherd.daemon.guard import TmpDir
from sockherd.daemon.healing import Healer
from sockherd.daemon.listeners import Listeners
from sockherd.daemon.logformat import worker_event
from sockherd.daemon.metrics import Sampler, listener_queue, queues_by_path_and_inode
from sockherd.daemon.process import Generation, StartError, Worker, WorkerState
from sockherd.daemon.processes import ProcessLayer
from sockherd.daemon.publish import publish_symlink, unpublish_symlink
from sockherd.daemon.reaper import process_start_time
from sockherd.daemon.sockdiag import linger
from sockherd.daemon.state_file import FORMAT, StateFile, spec_to_dict
from sockherd.daemon.takeback import Canary, Kept

log = logging.getLogger("sockherd")

METRICS_TTL = 0.5  # seconds a status reuses the figures it read

Progress = Callable[[str], None]


class DeployFailed(Exception):
    def __init__(self, reason: str, output: list[str] | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.output = output or []


class Herd:
    def __init__(self, config: Config, processes: ProcessLayer, *, state_path: Path | None = None) -> None:
        self.desired = Desired.from_config(config)
        self.processes = processes
        self.coordinator = Coordinator()
        self.workers: dict[str, Worker] = {}  # every live worker, any generation
        self.slots: dict[int, Worker] = {}  # published: index -> worker
        self.current: Generation | None = None
        self.pending: Generation | None = None
        self._pending_desired: Desired | None = None
        self._numbers = 0
        self.healer = Healer(self)
        # Called once a worker's pid is known: what it said before that is replayed.
        self.on_spawned: Callable[[Worker], None] | None = None
        self.started_at = time.time()
        self._own_start_time = process_start_time(os.getpid())
        self._state = StateFile(state_path, self.snapshot) if state_path is not None else None
        self.tmp_dir: TmpDir | None = None  # held by the daemon once checked (guard.py)
        self.sampler = Sampler()  # CPU between two status requests
        self._figures_cache: dict[str, dict[str, Any]] = {}
        self._figures_at = -METRICS_TTL
        # Shared listeners (``listen``), opened by the daemon for its whole life; empty:
        # every worker binds its own socket and slots are published as symlinks.
        self.listeners = Listeners()
        # Deploys you can take back (takeback.py): a kept previous generation, a canary.
        self.kept: Kept | None = None
        self.canary: Canary | None = None
        self.rolled_back: str | None = None  # why the last canary rolled back by itself
        # Set by the daemon: runs an automatic rollback (a canary worker crashed or broke).
        self.on_canary_failed: Callable[[str], None] | None = None

    # -- the desired state (read here; written by operations) ---------------------------

    @property
    def config(self) -> Config:
        return self.desired.config

    @property
    def running(self) -> bool:
        return self.desired.running

    @property
    def suspended(self) -> bool:
        return self.desired.suspended

    @property
    def target_workers(self) -> int:
        return self.desired.workers

    @property
    def target_standby(self) -> int:
        return self.desired.standby

    def want(self, desired: Desired) -> None:
        """Install a new desired state, whole."""
        self.desired = desired
        self.changed()

    def timeouts_for(self, number: int) -> Timeouts:
        """A deploy's new generation starts with the timeouts of the config it deploys."""
        if self.pending is not None and number == self.pending.number and self._pending_desired is not None:
            return self._pending_desired.timeouts
        return self.desired.timeouts

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
            if w.index is None and w.generation == number and not w.exited.done() and not w.stopping
        ]

    @property
    def operation(self) -> str | None:
        return self.coordinator.operation

    def status(self) -> list[dict[str, Any]]:
        published = {w.id: i for i, w in self.slots.items()}
        figures = self._figures()
        rows = []
        for w in sorted(
            self.workers.values(), key=lambda w: (w.generation, w.index if w.index is not None else 1 << 30)
        ):
            row = w.status()
            index = published.get(w.id)
            shown = index is not None and not self.listeners
            row["symlink"] = str(self.config.symlink_path(index)) if shown and index is not None else None
            row["published"] = index is not None
            row["kept"] = self.kept is not None and w in self.kept.workers.values()
            row.update(figures.get(w.id) or {"rss": 0, "cpu": 0.0, "queued": None, "backlog": None})
            row["uptime"] = round(time.time() - w.started_at, 3)
            row["warning"] = w.warning
            rows.append(row)
        return rows

    def rss_of(self, worker: Worker) -> int:
        """A worker's memory as the last status read it (cached like the other figures)."""
        return int((self._figures().get(worker.id) or {}).get("rss", 0))

    def _figures(self) -> dict[str, dict[str, Any]]:
        """Each worker's rss, cpu and listen queue, read at most every METRICS_TTL seconds:
        status is answered to anyone on the IPC socket, and a flood of requests must not
        become a flood of /proc reads and netlink dumps."""
        now = time.monotonic()
        if now - self._figures_at < METRICS_TTL and self._figures_cache.keys() >= self.workers.keys():
            return self._figures_cache
        by_path, by_inode = queues_by_path_and_inode()
        shared = listener_queue(self.listeners.items[0].sock, by_inode) if self.listeners else None
        figures: dict[str, dict[str, Any]] = {}
        for w in self.workers.values():
            rss, cpu = self.sampler.usage(w.pid)
            own = by_path.get(str(w.socket_path)) if not self.listeners else None
            queue = (own.queued, own.backlog) if own is not None else shared
            queued, backlog = queue if queue is not None else (None, None)
            figures[w.id] = {"rss": rss, "cpu": cpu, "queued": queued, "backlog": backlog}
        self.sampler.forget_unseen()
        self._figures_cache, self._figures_at = figures, now
        return figures

    def snapshot(self) -> dict[str, Any]:
        """What the state file holds: enough to tell, later, what this daemon managed."""
        return {
            "format": FORMAT,
            "daemon": {
                "pid": os.getpid(),
                "start_time": self._own_start_time,
                "version": __version__,
                "started_at": self.started_at,
                "config": str(self.config.path),
                "quitting": self.coordinator.quitting,
            },
            "desired": self.desired.as_dict(),
            "generations": {
                "current": self.current.number if self.current else None,
                "pending": self.pending.number if self.pending else None,
                "last": self._numbers,
                # What each generation still running runs: an adopting daemon respawns
                # its crashed workers with exactly this.
                "specs": {str(number): spec_to_dict(spec) for number, spec in self._live_specs().items()},
            },
            "workers": [
                {
                    "id": w.id,
                    "pid": w.pid,
                    "start_time": w.start_time,
                    "index": w.index,
                    "standby": w.index is None,
                    "socket": str(w.socket_path),
                    "state": str(w.state),
                    "generation": w.generation,
                    "suspended": w.suspended,
                    "started_at": w.started_at,
                    "online_at": w.online_at,
                    "broken_reason": w.broken_reason,
                    "restarts": w.restarts,
                }
                for w in self.workers.values()
            ],
            "slots": {str(i): w.id for i, w in sorted(self.slots.items())},
            "listeners": self.listeners.record(),
        }

    def _live_specs(self) -> dict[int, WorkerSpec]:
        specs = {w.generation: w.spec for w in self.workers.values()}
        for gen in (self.current, self.pending):
            if gen is not None:
                specs[gen.number] = gen.spec
        return specs

    def _preloading(self) -> set[int]:
        """Generations that may still start workers (preload keeps a fork server for each):
        those with live workers, the deploy's pending one, the current one unless stopped."""
        generations = {w.generation for w in self.workers.values()}
        if self.pending is not None:
            generations.add(self.pending.number)
        if self.current is not None and self.running:
            generations.add(self.current.number)
        return generations

    def _spare_wanted(self) -> bool | None:
        """The preload spare (forkservers.py): kept while the herd is idle (running, no
        deploy in flight), so that preparing the next deploy never competes with one; left
        as it is otherwise (a deploy may take it); none when turned off or quitting."""
        if not self.config.preload_spare or self.coordinator.quitting:
            return False
        if self.running and self.pending is None and self.current is not None:
            return True
        return None

    def changed(self) -> None:
        self._figures_at = -METRICS_TTL  # the herd changed: the next status reads afresh
        # A generation gone: its fork server too; and the spare for the next deploy.
        self.processes.retain_preloaded(self._preloading(), spare=self._spare_wanted())
        if self._state is not None:
            self._state.changed()

    def flush_state(self) -> bool:
        return self._state.flush() if self._state is not None else False

    def close_state(self) -> None:
        """The daemon leaves: with no worker left there is nothing to tell anyone, so no file."""
        if self._state is None:
            return
        if self.workers:
            self._state.flush()
        else:
            self._state.remove()

    # -- primitives --------------------------------------------------------------------

    def restore_generations(self, last: int, current: Generation | None) -> None:
        """Adoption: carry on numbering generations where the earlier daemon stopped."""
        self._numbers = max(self._numbers, last)
        self.current = current
        self.changed()

    def begin_generation(self, target: Desired) -> Generation:
        """The next generation, pending until it is published."""
        self._numbers += 1
        self.pending = Generation(self._numbers, target.config.worker)
        self._pending_desired = target
        self.changed()
        return self.pending

    def end_pending(self) -> None:
        self.pending = None
        self._pending_desired = None
        self.changed()

    def make_current(self, gen: Generation | None) -> None:
        self.current = gen
        self.changed()

    def new_worker(
        self, gen: Generation, index: int | None, *, suspended: bool, worker_id: str | None = None
    ) -> Worker:
        worker = Worker(
            config=self.config,
            spec=gen.spec,
            timeouts=self.timeouts_for(gen.number),
            index=index,
            generation=gen.number,
            processes=self.processes,
            on_exit=self.healer.on_exit,
            on_spawned=self._spawned,
            on_change=self.changed,
            restarts=self.healer.restarts(index),
            suspended=suspended or index is None,  # standbys always start suspended
            worker_id=worker_id,
            socket_gid=gen.spec.socket_group if gen.spec.socket_group is not None else self._tmp_dir_gid(),
            listeners=self.listeners,
        )
        self.workers[worker.id] = worker
        self.changed()
        return worker

    def _tmp_dir_gid(self) -> int | None:
        return os.fstat(self.tmp_dir.fd).st_gid if self.tmp_dir is not None else None

    def _spawned(self, worker: Worker) -> None:
        if self.on_spawned is not None:
            self.on_spawned(worker)

    def forget(self, worker: Worker) -> None:
        """A worker that has exited (or never ran) leaves the herd."""
        if self.workers.get(worker.id) is worker:
            del self.workers[worker.id]
            self.changed()

    async def start_worker(
        self, gen: Generation, index: int | None, *, suspended: bool, attempts: int, progress: Progress
    ) -> Worker:
        """Spawn until one is online (or suspended and ready), up to ``attempts`` tries.

        Cancelled, it kills what it started before the cancellation completes.
        """
        last: StartError | None = None
        for attempt in range(1, attempts + 1):
            worker = self.new_worker(gen, index, suspended=suspended)
            try:
                await worker.spawn()
                await worker.wait_online()
            except StartError as exc:
                exc.output = output_tail(worker.spec)  # now, before anything else of this deploy is killed
                last = exc
                progress(f"{worker.label} failed to start (attempt {attempt}/{attempts}): {exc.reason}")
                await worker.kill()
                if worker.pid is None:  # never ran: no exit will be reaped to remove it
                    self.forget(worker)
                continue
            except BaseException:
                await asyncio.shield(worker.kill())
                if worker.pid is None:
                    self.forget(worker)
                raise
            return worker
        assert last is not None
        raise last

    def check_tmp_dir(self) -> None:
        """Before starting anything: tmp_dir must still be the directory checked at start."""
        if self.tmp_dir is not None:
            try:
                self.tmp_dir.verify()
            except OSError as exc:
                raise DeployFailed(exc.strerror or str(exc)) from None

    def publish(self, index: int, worker: Worker) -> None:
        """Point slot ``index`` at ``worker``. OSError (TmpDirReplaced too) if it cannot.

        With shared listeners the worker already accepts on them: the slot is only
        the daemon's record of which worker serves which index.
        """
        if not self.listeners:
            if self.tmp_dir is not None:
                self.tmp_dir.verify()
            self._link(index, worker)
        worker.index = index
        self.slots[index] = worker
        self.healer.published(index, worker)
        self.changed()
        if self.listeners:
            log.info(
                "%s serves slot %d on the shared listener(s)",
                worker.label,
                index,
                extra=worker_event("published", worker),
            )
        else:
            log.info(
                "published %s as %s",
                worker.label,
                self.config.symlink_path(index).name,
                extra=worker_event("published", worker),
            )

    def _link(self, index: int, worker: Worker) -> None:
        publish_symlink(
            self.config.symlink_path(index),
            worker.socket_path,
            relative=self.config.symlinks == "relative",
            dir_fd=self.tmp_dir.fd if self.tmp_dir is not None else None,
        )

    def unpublish(self, index: int) -> Worker | None:
        if not self.listeners:
            unpublish_symlink(self.config.symlink_path(index), dir_fd=self.tmp_dir.fd if self.tmp_dir else None)
        self.healer.cancel_replacement(index)
        worker = self.slots.pop(index, None)
        self.changed()
        return worker

    def republish(self) -> None:
        """Rewrite every published symlink (the ``symlinks`` style changed)."""
        if self.listeners:
            return
        for index, worker in self.slots.items():
            self._link(index, worker)

    def check_link(self, name: str) -> None:
        """A change in tmp_dir (inotify): put back a published symlink someone redirected.

        ``name`` empty: events were lost, check them all.
        """
        if self.listeners:
            return
        for index, worker in list(self.slots.items()):
            link = self.config.symlink_path(index)
            if name and link.name != name:
                continue
            pointee = worker.socket_path.name if self.config.symlinks == "relative" else str(worker.socket_path)
            try:
                actual: str | None = os.readlink(link.name, dir_fd=self.tmp_dir.fd) if self.tmp_dir else None
            except OSError:
                actual = None
            if actual != pointee and worker.alive:
                log.warning(
                    "%s points at %r, not at %s: something else changed it; putting it back",
                    link.name,
                    actual,
                    worker.label,
                )
                with contextlib.suppress(OSError):
                    self._link(index, worker)

    async def retire(self, workers: list[Worker]) -> None:
        """Stop workers that no symlink points at any more, after the linger.

        nginx may have connected to the old socket just before the rename; those
        connections sit in the old worker's backlog, and the linger lets it accept them
        before its shutdown begins. It ends as soon as those queues have stayed empty
        for a moment (sockdiag.linger), ``linger`` being the most it waits. With shared
        listeners there is no backlog of its own to empty: the queue belongs to every
        worker, and the stop begins at once.
        """
        workers = [w for w in workers if w.alive]
        if not workers:
            return
        await self.linger(workers)
        await asyncio.gather(*(w.stop() for w in workers))

    async def linger(self, workers: list[Worker]) -> None:
        """Between unpublishing ``workers`` and stopping them: until their sockets' queues
        stay empty, ``linger`` at most (sockdiag.linger). Nothing with shared listeners."""
        if not self.listeners and workers:
            waited, drained = await linger([str(w.socket_path) for w in workers], self.config.timeouts.linger)
            log.debug("lingered %.3fs before stopping %d worker(s)", waited, len(workers))
            for w in workers:
                w.backlog_drained = drained

    async def stop_all(self) -> None:
        """Every worker's staged shutdown, all at once; returns when all are reaped."""
        await asyncio.gather(*(w.stop() for w in list(self.workers.values())))

    async def kill_all(self) -> None:
        await asyncio.gather(*(w.kill() for w in list(self.workers.values())))


__all__ = ["DeployFailed", "Generation", "Herd", "Progress", "WorkerState"]

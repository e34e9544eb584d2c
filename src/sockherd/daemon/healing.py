"""Keeping the slots full: crashes, standby failover, broken workers, recycling.

- A published worker that dies is replaced by a ready standby at once (resume +
  rename: milliseconds), else by a fresh worker; a crash loop backs off exponentially
  and never gives up.
- A worker that reports itself broken, outgrows ``max_memory`` or outlives ``max_age``
  keeps serving until its successor is published (a standby, or a fresh worker started
  first), then drains. Such live replacements are *yielding* operations of the
  coordinator: one at a time, never beside a command, and a command that arrives
  meanwhile cancels them (they try again once it is done). So the herd never has fewer
  than ``workers`` workers serving and never recycles two slots at once.

Crash replacement and standby refill cannot wait for a command to end (a deploy's old
generation must stay whole), so they run beside operations; every step that changes
the herd is synchronous and re-checks the slot it acts on. All their tasks belong to the
healer, and the stop operation cancels and awaits them (a cancelled start kills what it
started), so nothing they began can outlive a stop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sockherd.daemon import takeback
from sockherd.daemon.coordinator import ShuttingDown
from sockherd.daemon.logformat import worker_event
from sockherd.daemon.process import Generation, StartError, Worker, describe_exit

if TYPE_CHECKING:
    from sockherd.daemon.herd import Herd

log = logging.getLogger("sockherd")

BACKOFF_FIRST = 0.1
BACKOFF_CAP = 30.0
# A worker that served this long before it crashed is not a crash loop: its successor
# starts at once. Killed every few seconds (OOM killer, chaos tests), a slot must not
# drift into long backoffs; dying right after ready, over and over, is a loop.
BACKOFF_RESET_AFTER = 1.0
MEMORY_CHECK_INTERVAL = 2.0  # RSS has no event to wait on; this is the one timer
MAX_AGE_JITTER = 0.1  # up to 10 % later, so a generation started together does not recycle together


def crash_backoff(consecutive: int) -> float:
    """Delay before respawning after the n-th consecutive crash: 0, 0.1, 0.2 … 30 s."""
    if consecutive <= 1:
        return 0.0
    return min(BACKOFF_FIRST * 2.0 ** (consecutive - 2), BACKOFF_CAP)


@dataclass(slots=True)
class SlotHealth:
    """Crash bookkeeping for one index (or the standby pool): outlives its workers."""

    restarts: int = 0
    consecutive: int = 0
    next_attempt_at: float | None = None
    replacement: asyncio.Task[None] | None = field(default=None, repr=False)


class Healer:
    def __init__(self, herd: Herd) -> None:
        self.herd = herd
        self.health: dict[int, SlotHealth] = {}
        self._standby_health = SlotHealth()
        self._refill: asyncio.Task[None] | None = None
        self._live_replacements: dict[str, asyncio.Task[None]] = {}  # worker id -> task
        self._age_timers: dict[str, asyncio.TimerHandle] = {}
        self._memory_watch: asyncio.Task[None] | None = None
        self._kept_expiry: asyncio.Task[None] | None = None

    def restarts(self, index: int | None) -> int:
        return self.health[index].restarts if index is not None and index in self.health else 0

    def slot_status(self) -> list[dict[str, object]]:
        return [
            {"index": i, "restarts": h.restarts, "crash_loop": h.consecutive, "next_attempt_at": h.next_attempt_at}
            for i, h in sorted(self.health.items())
        ]

    # -- hooks from the herd -----------------------------------------------------------

    def published(self, index: int, worker: Worker) -> None:
        health = self.health.setdefault(index, SlotHealth())
        if health.replacement is not None and health.replacement is not asyncio.current_task():
            health.replacement.cancel()  # a newer worker took the slot first
        self._schedule_max_age(worker)
        self._watch_memory()

    def after_deploy(self) -> None:
        """The herd runs (again): a fresh generation starts with no crash loop behind it."""
        for health in self.health.values():
            health.consecutive = 0
        self.refill_standbys()
        self._watch_memory()

    def cancel_replacement(self, index: int) -> None:
        health = self.health.get(index)
        if health is not None and health.replacement is not None:
            health.replacement.cancel()

    async def stop(self) -> None:
        tasks = [h.replacement for h in self.health.values() if h.replacement is not None]
        tasks += [t for t in (self._refill, self._memory_watch, self._kept_expiry) if t is not None]
        tasks += list(self._live_replacements.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for timer in self._age_timers.values():
            timer.cancel()
        self._age_timers.clear()

    def resume(self) -> None:
        """Healing was stopped for an upgrade whose exec failed: take up the work again."""
        herd = self.herd
        for index, worker in list(herd.slots.items()):
            if not worker.alive:
                self._start_replacement(index, worker, Generation.of(worker))
            else:
                self._schedule_max_age(worker)
        if herd.current is not None:
            self.after_adoption([])

    async def stop_refill(self) -> None:
        """Cancel a standby refill in progress (set-standby takes over the pool)."""
        if self._refill is not None:
            self._refill.cancel()
            await asyncio.gather(self._refill, return_exceptions=True)
            self._refill = None

    # -- exits -------------------------------------------------------------------------

    def on_exit(self, worker: Worker, code: int) -> None:
        herd = self.herd
        herd.forget(worker)
        if (timer := self._age_timers.pop(worker.id, None)) is not None:
            timer.cancel()
        index = worker.index
        if worker.stopping:
            log.info(
                "%s exited (%s)", worker.label, describe_exit(code), extra=worker_event("exited", worker, code=code)
            )
            return
        if index is None:
            log.warning(
                "%s exited (%s)", worker.label, describe_exit(code), extra=worker_event("crashed", worker, code=code)
            )
            short_lived = worker.online_at is None or time.time() - worker.online_at < BACKOFF_RESET_AFTER
            if code != -signal.SIGKILL and short_lived:
                self._standby_health.consecutive += 1  # a standby crash loop backs off too
            else:
                self._standby_health.consecutive = 0
            self.refill_standbys()
            return
        if herd.slots.get(index) is not worker:
            if herd.kept is not None and worker in herd.kept.workers.values():
                self._lose_kept(worker, code)
                return
            log.warning(
                "%s exited (%s) before it was published",
                worker.label,
                describe_exit(code),
                extra=worker_event("exited", worker, code=code),
            )
            return
        if herd.canary is not None and worker.generation == herd.canary.generation.number:
            self._canary_failed(f"{worker.label} crashed ({describe_exit(code)})")
            return
        health = self.health.setdefault(index, SlotHealth())
        if worker.online_at is not None and time.time() - worker.online_at > BACKOFF_RESET_AFTER:
            health.consecutive = 0
        if code != -signal.SIGKILL:
            # An app cannot SIGKILL itself by mistake (bugs end in an exit status,
            # SIGSEGV or SIGABRT): SIGKILL is the OOM killer or an operator, and the
            # answer to that is a replacement now, however often it happens.
            health.consecutive += 1
        health.restarts += 1
        if not herd.running:
            return
        standby = self._ready_standby(worker.generation)
        if standby is not None:
            promoted = standby.label  # "worker standby (…)": the promotion gives it the slot's number
            if self._promote(standby, index):  # first: nginx waits for the rename, not for the log line
                log.warning(
                    "%s crashed (%s); promoted %s",
                    worker.label,
                    describe_exit(code),
                    promoted,
                    extra=worker_event("crashed", worker, code=code, successor=standby.id),
                )
                self.refill_standbys()
                return
        log.warning(
            "%s crashed (%s); replacing it",
            worker.label,
            describe_exit(code),
            extra=worker_event("crashed", worker, code=code),
        )
        self._start_replacement(index, worker, Generation.of(worker))

    def expire_kept(self, kept: takeback.Kept) -> None:
        """Retire a kept generation when its time is up (a yielding operation, like recycling)."""
        if self._kept_expiry is not None:
            self._kept_expiry.cancel()
        self._kept_expiry = asyncio.create_task(self._expire(kept), name=f"expire kept generation {kept.generation}")

    async def _expire(self, kept: takeback.Kept) -> None:
        assert kept.until is not None
        await asyncio.sleep(max(0.0, kept.until - time.time()))
        await self._yielding("commit", lambda: self._retire_expired(kept), lambda: self.herd.kept is kept)

    async def _retire_expired(self, kept: takeback.Kept) -> None:
        if self.herd.kept is kept:
            workers = takeback.drop_kept(self.herd, "its keep-previous time is up")
            await asyncio.shield(self.herd.retire(workers))

    def _lose_kept(self, worker: Worker, code: int) -> None:
        """A kept worker died: a partial generation cannot be rolled back to, so none is kept."""
        for other in takeback.drop_kept(self.herd, f"{worker.label} exited ({describe_exit(code)})"):
            asyncio.ensure_future(other.stop())  # noqa: RUF006 - tracked by the worker's own stop task

    def _canary_failed(self, why: str) -> None:
        log.error("canary failed: %s; rolling back", why)
        if self.herd.on_canary_failed is not None:
            self.herd.on_canary_failed(why)

    def _ready_standby(self, generation: int) -> Worker | None:
        ready = [w for w in self.herd.standbys(generation) if w.online_at is not None and w.broken_reason is None]
        return ready[0] if ready else None

    def _promote(self, standby: Worker, index: int) -> bool:
        """Give ``standby`` slot ``index``; False (it is stopped) if it cannot be published."""
        self._standby_health.consecutive = 0  # it came up and waited: the pool is healthy
        standby.restarts = self.restarts(index)
        standby.index = index
        # The rename first: until it, nginx's connects to this slot fail; a request that
        # reaches the standby before its resume is held, not lost, and the resume follows.
        if not self._publish(index, standby):
            asyncio.ensure_future(standby.stop())  # noqa: RUF006 - tracked by the worker's own stop task
            return False
        if not self.herd.suspended:
            standby.resume()
        return True

    def _publish(self, index: int, worker: Worker) -> bool:
        """Publish, or log why not (tmp_dir replaced, a planted obstacle): healing must not raise."""
        try:
            self.herd.publish(index, worker)
        except OSError as exc:
            log.error("cannot publish %s as slot %d: %s", worker.label, index, exc.strerror or exc)
            return False
        return True

    def after_adoption(self, broken: list[Worker]) -> None:
        """An adopted herd: fill the slots whose workers died with the daemon away,
        refill the standbys, replace broken workers, arm the recycling timers."""
        herd = self.herd
        if not herd.running or herd.current is None:
            return
        for index in range(herd.target_workers):
            if index not in herd.slots:
                log.warning("slot %d has no live worker after adoption; starting one", index)
                self._start_replacement(index, None, herd.current)
        for index, worker in herd.slots.items():
            self.health.setdefault(index, SlotHealth())
            self._schedule_max_age(worker)
        for worker in broken:
            self.replace_live(worker, f"reported broken: {worker.broken_reason}")
        self.refill_standbys()
        self._watch_memory()

    def _start_replacement(self, index: int, dead: Worker | None, gen: Generation) -> None:
        health = self.health.setdefault(index, SlotHealth())
        if health.replacement is None:
            health.replacement = asyncio.create_task(self._respawn(index, dead, gen), name=f"replace slot {index}")

    async def _respawn(self, index: int, dead: Worker | None, gen: Generation) -> None:
        """Respawn a crashed (or, after adoption, empty) slot with ``gen``'s spec, backing off on loops."""
        herd, health = self.herd, self.health[index]
        try:
            while herd.slots.get(index) is dead and herd.running:
                delay = crash_backoff(health.consecutive)
                if delay:
                    health.next_attempt_at = time.time() + delay
                    log.info(
                        "slot %d: crash loop (%d in a row); next attempt in %.1fs", index, health.consecutive, delay
                    )
                    await asyncio.sleep(delay)
                    health.next_attempt_at = None
                try:
                    worker = await herd.start_worker(
                        gen, index, suspended=herd.suspended, attempts=1, progress=log.warning
                    )
                except StartError:
                    health.consecutive += 1
                    health.restarts += 1
                    continue
                if herd.slots.get(index) is dead and herd.running:
                    health.replacement = None
                    if not self._publish(index, worker):
                        await worker.stop()
                        return
                elif not self._fill_vacancy(worker):  # a standby filled our slot first
                    await worker.stop()
        finally:
            if health.replacement is asyncio.current_task():
                health.replacement = None
            health.next_attempt_at = None

    # -- standbys ----------------------------------------------------------------------

    def refill_standbys(self) -> None:
        if self.herd.running and (self._refill is None or self._refill.done()):
            self._refill = asyncio.create_task(self._refill_standbys(), name="refill standbys")

    async def _refill_standbys(self) -> None:
        herd, health = self.herd, self._standby_health
        while herd.running and herd.current is not None and len(herd.standbys()) < herd.target_standby:
            if delay := crash_backoff(health.consecutive):
                await asyncio.sleep(delay)
            gen = herd.current
            try:
                worker = await herd.start_worker(gen, None, suspended=True, attempts=1, progress=log.warning)
            except StartError:
                health.consecutive += 1
                continue
            if herd.current is not gen:
                await worker.stop()  # a deploy overtook us
            elif self._fill_vacancy(worker):
                continue  # a slot died while this one started: it serves there; start another
            elif len(herd.standbys()) > herd.target_standby:
                await worker.stop()  # a scale-down overtook us

    def _fill_vacancy(self, worker: Worker) -> bool:
        """Promote a newly ready worker into a slot whose worker died, if there is one.

        Whatever becomes ready first (a refilled standby, any slot's respawn) serves the
        first vacant slot; that slot's own respawn is cancelled by the publish, so under
        a burst of deaths no slot waits for a start that another one already finished.
        """
        herd = self.herd
        vacant = sorted(i for i, w in herd.slots.items() if not w.alive and w.generation == worker.generation)
        if herd.current is not None and worker.generation == herd.current.number:  # empty after adoption
            vacant += [i for i in range(herd.target_workers) if i not in herd.slots]
        if not vacant or not herd.running or not worker.alive:
            return False
        log.info(
            "%s fills vacant slot %d", worker.label, vacant[0], extra=worker_event("promoted", worker, slot=vacant[0])
        )
        self._promote(worker, vacant[0])
        return True

    # -- live replacement: broken, too big, too old ------------------------------------

    def on_broken(self, worker: Worker, reason: str) -> None:
        worker.report_broken(reason)
        log.warning(
            "%s reports itself broken: %s", worker.label, reason, extra=worker_event("broken", worker, reason=reason)
        )
        canary = self.herd.canary
        if canary is not None and worker.generation == canary.generation.number and worker.index is not None:
            self._canary_failed(f"{worker.label} reported itself broken: {reason}")
            return
        if worker.index is None and worker.generation == (self.herd.current.number if self.herd.current else None):
            asyncio.ensure_future(worker.stop())  # noqa: RUF006 - tracked by the worker's own stop task
            self.refill_standbys()
        elif worker.index is not None and self.herd.slots.get(worker.index) is worker:
            self.replace_live(worker, f"reported broken: {reason}")

    def replace_live(self, worker: Worker, why: str) -> None:
        if worker.id in self._live_replacements or not self.herd.running:
            return
        task = asyncio.create_task(self._replace_live_when_idle(worker, why), name=f"replace {worker.id}")
        self._live_replacements[worker.id] = task
        task.add_done_callback(lambda _: self._live_replacements.pop(worker.id, None))

    def _still_serving(self, worker: Worker) -> bool:
        herd = self.herd
        return herd.running and worker.alive and worker.index is not None and herd.slots.get(worker.index) is worker

    async def _replace_live_when_idle(self, worker: Worker, why: str) -> None:
        """Replace ``worker`` as a yielding operation, again after any command preempts it."""
        await self._yielding("replace", lambda: self._replace_live(worker, why), lambda: self._still_serving(worker))

    async def _yielding(self, name: str, work: Callable[[], Awaitable[None]], still_wanted: Callable[[], bool]) -> None:
        """Run ``work`` as a yielding operation while ``still_wanted()``: a command that
        preempts it (cancelling what it started) is let through, then it tries again."""
        while still_wanted():
            try:
                await self.herd.coordinator.run(name, work, kind="yielding")
                return
            except ShuttingDown:
                return
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise

    async def _replace_live(self, worker: Worker, why: str) -> None:
        herd = self.herd
        attempt = 0
        while self._still_serving(worker):
            assert worker.index is not None
            index = worker.index
            standby = self._ready_standby(worker.generation)
            if standby is not None:
                log.info(
                    "replacing %s (%s) with %s",
                    worker.label,
                    why,
                    standby.label,
                    extra=worker_event("replacing", worker, reason=why, successor=standby.id),
                )
                self._promote(standby, index)
                self.refill_standbys()
            else:
                log.info(
                    "replacing %s (%s): starting its successor first",
                    worker.label,
                    why,
                    extra=worker_event("replacing", worker, reason=why),
                )
                try:
                    successor = await herd.start_worker(
                        Generation.of(worker), index, suspended=herd.suspended, attempts=1, progress=log.warning
                    )
                except StartError:
                    attempt += 1
                    await asyncio.sleep(crash_backoff(attempt + 1))
                    continue  # the old one keeps serving meanwhile
                if herd.slots.get(index) is not worker or not self._publish(index, successor):
                    await successor.stop()
                    return
            # Past the swap a preempting command must not cancel the retirement: the
            # old worker, unpublished, would be left running outside any slot.
            await asyncio.shield(herd.retire([worker]))
            return

    def _schedule_max_age(self, worker: Worker) -> None:
        max_age = self.herd.config.max_age
        if max_age is None or worker.id in self._age_timers:
            return
        # Counted from the first publish: a standby's wait in the pool is not age.
        due = max_age * (1 + random.uniform(0, MAX_AGE_JITTER))
        loop = asyncio.get_running_loop()
        self._age_timers[worker.id] = loop.call_later(
            max(0.0, due), self.replace_live, worker, f"older than max_age ({max_age:g}s)"
        )

    def _watch_memory(self) -> None:
        if not self.herd.running or self.herd.config.max_memory is None:
            return
        if self._memory_watch is None or self._memory_watch.done():
            self._memory_watch = asyncio.create_task(self._check_memory(), name="max_memory")

    async def _check_memory(self) -> None:
        herd = self.herd
        while herd.running and (limit := herd.config.max_memory) is not None:
            for worker in list(herd.slots.values()):
                rss = worker.rss()
                if rss > limit and worker.id not in self._live_replacements:
                    self.replace_live(worker, f"RSS {rss >> 20} MiB over max_memory ({limit >> 20} MiB)")
            await asyncio.sleep(MEMORY_CHECK_INTERVAL)

    def config_changed(self) -> None:
        """max_age or max_memory changed on reload: re-arm the timers and the watch."""
        for timer in self._age_timers.values():
            timer.cancel()
        self._age_timers.clear()
        for worker in self.herd.slots.values():
            self._schedule_max_age(worker)
        if self._memory_watch is not None:
            self._memory_watch.cancel()
            self._memory_watch = None
        self._watch_memory()

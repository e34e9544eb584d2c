"""Deploys and scaling: bring a generation (or more of one) online, then publish.

Atomic (the default): the whole new generation, standbys included, comes online beside
the old one before any symlink moves; any failure tears it down and the old generation
keeps serving. Rolling: one slot at a time, for hosts without memory for two
generations; a failure rolls the replaced slots back to the old version.
"""

from __future__ import annotations

import asyncio
import logging

from sockherd.daemon import takeback
from sockherd.daemon.desired import Desired
from sockherd.daemon.environment import output_tail
from sockherd.daemon.herd import DeployFailed, Herd, Progress
from sockherd.daemon.process import Generation, StartError, Worker
from sockherd.daemon.publish import slot_obstacle

log = logging.getLogger("sockherd")


async def deploy(
    herd: Herd, target: Desired, attempts: int, progress: Progress, *, keep_previous: float | None = None
) -> None:
    """Bring ``target`` up as a new generation; on success it becomes the desired state.

    ``keep_previous``: seconds to keep the replaced workers for a rollback (takeback.py).
    """
    herd.check_tmp_dir()
    if herd.canary is not None:
        raise DeployFailed("a canary deploy is in progress: `sockherd promote` or `sockherd rollback` first")
    await _retire_kept_first(herd, progress)
    before = herd.desired
    gen = herd.begin_generation(target)
    try:
        if target.config.strategy == "rolling" and herd.slots:
            await _deploy_rolling(herd, gen, target, attempts, progress)
        else:
            await _deploy_atomic(herd, gen, target, attempts, progress, keep_from=before, keep_seconds=keep_previous)
    finally:
        herd.end_pending()
    herd.want(target.but(running=True))
    herd.healer.after_deploy()
    if target.suspended:
        progress("the new generation is suspended: it holds requests until `sockherd resume`")


async def _start_together(
    herd: Herd, gen: Generation, indexes: list[int | None], attempts: int, progress: Progress, *, suspended: bool
) -> list[Worker]:
    """Start workers concurrently; the first failure stops them all and raises DeployFailed."""
    tasks: list[asyncio.Task[Worker]] = []
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(herd.start_worker(gen, i, suspended=suspended, attempts=attempts, progress=progress))
                for i in indexes
            ]
    except BaseException as exc:
        started = [t.result() for t in tasks if t.done() and not t.cancelled() and t.exception() is None]
        await asyncio.gather(*(w.stop() for w in started))  # all at once: one ladder's time, not N
        failures = [e for e in _leaves(exc) if isinstance(e, StartError)]
        if failures:
            raise _failed(f"{failures[0].worker.label} {failures[0].reason}", gen, failures[0].output) from None
        raise
    started = [t.result() for t in tasks]
    if bad := [w for w in started if not w.alive or w.broken_reason is not None]:
        await asyncio.gather(*(w.stop() for w in started))
        what = "exited" if not bad[0].alive else f"reported itself broken ({bad[0].broken_reason})"
        raise DeployFailed(f"{bad[0].label} {what} before it was published")
    return started


def _check_slots(herd: Herd, indexes: range) -> None:
    """Refuse before anything starts if a slot's name cannot take a symlink."""
    if herd.listeners:
        return  # no symlinks: the workers share the daemon's listeners
    for index in indexes:
        if (obstacle := slot_obstacle(herd.config.symlink_path(index))) is not None:
            raise DeployFailed(obstacle)


async def _publish_all(herd: Herd, started: list[Worker]) -> None:
    """Publish the started workers; if one cannot be (an obstacle planted since the check,
    tmp_dir gone), stop those not published and raise DeployFailed, never OSError."""
    try:
        for worker in started:
            if worker.index is not None:
                herd.publish(worker.index, worker)
    except OSError as exc:
        await asyncio.gather(*(w.stop() for w in started if w not in herd.slots.values()))
        raise DeployFailed(f"cannot publish: {exc.strerror or exc} ({exc.filename})") from None


async def _deploy_atomic(
    herd: Herd,
    gen: Generation,
    target: Desired,
    attempts: int,
    progress: Progress,
    *,
    keep_from: Desired | None = None,
    keep_seconds: float | None = None,
) -> None:
    count, standby = target.workers, target.standby
    _check_slots(herd, range(count))
    progress(f"starting generation {gen.number}: {count} worker(s)" + (f" + {standby} standby" if standby else ""))
    indexes: list[int | None] = [*range(count), *([None] * standby)]
    started = await _start_together(herd, gen, indexes, attempts, progress, suspended=target.suspended)
    replaced = dict(herd.slots)
    await _publish_all(herd, started)
    herd.flush_state()  # the swap is the moment a successor must know about
    for index in [i for i in herd.slots if i >= count]:  # fewer workers than before
        herd.unpublish(index)
    herd.make_current(gen)
    if keep_seconds is not None and keep_from is not None:
        takeback.keep(herd, replaced, keep_from, seconds=keep_seconds, reason="keep-previous")
    kept = set(herd.kept.workers.values()) if herd.kept is not None else set()
    old = [w for w in herd.workers.values() if w.generation != gen.number and w not in kept]
    progress(f"generation {gen.number} published; stopping {len(old)} old worker(s)")
    if kept:
        progress(f"keeping generation {next(iter(kept)).generation} ({len(kept)} worker(s)) for a rollback")
    await herd.retire(old)
    progress(f"generation {gen.number} is " + ("published, holding requests" if target.suspended else "serving"))


async def _deploy_rolling(herd: Herd, gen: Generation, target: Desired, attempts: int, progress: Progress) -> None:
    old_gen = herd.current
    _check_slots(herd, range(target.workers))
    progress(f"rolling generation {gen.number} over {target.workers} slot(s)")
    done: list[int] = []
    for index in range(target.workers):
        try:
            worker = await herd.start_worker(
                gen, index, suspended=target.suspended, attempts=attempts, progress=progress
            )
        except StartError as exc:
            if old_gen is not None:
                await _roll_back(herd, old_gen, done, progress)
            raise _failed(f"{exc.worker.label} {exc.reason}", gen, exc.output) from None
        previous = herd.slots.get(index)
        herd.publish(index, worker)
        herd.make_current(gen)
        if previous is not None:
            await herd.retire([previous])
        done.append(index)
        progress(f"slot {index} now serves generation {gen.number}")
    for index in [i for i in herd.slots if i >= target.workers]:
        if (previous := herd.unpublish(index)) is not None:
            await herd.retire([previous])
    # Whatever of older generations is left (standbys, a crashed slot's late respawn).
    await herd.retire([w for w in herd.workers.values() if w.generation != gen.number])


async def _roll_back(herd: Herd, gen: Generation, indexes: list[int], progress: Progress) -> None:
    for index in indexes:
        try:
            worker = await herd.start_worker(gen, index, suspended=herd.suspended, attempts=1, progress=progress)
        except StartError as exc:
            log.error("rollback of slot %d failed (%s); it keeps the new version", index, exc.reason)
            continue
        previous = herd.slots.get(index)
        herd.publish(index, worker)
        progress(f"rolled slot {index} back to generation {gen.number}")
        if previous is not None:
            await herd.retire([previous])
    herd.make_current(gen)


async def deploy_canary(herd: Herd, target: Desired, count: int, attempts: int, progress: Progress) -> None:
    """Publish ``count`` workers of a new generation on slots 0..count-1; keep the ones they replace."""
    herd.check_tmp_dir()
    try:
        takeback.check_canary(herd, count, target)
    except takeback.NothingToTakeBack as exc:
        raise DeployFailed(str(exc)) from None
    await _retire_kept_first(herd, progress)
    before = herd.desired
    gen = herd.begin_generation(target)
    try:
        slots = list(range(count))
        _check_slots(herd, range(count))
        progress(f"starting generation {gen.number} as a canary on slot(s) {_slots(slots)}")
        indexes: list[int | None] = list(slots)
        started = await _start_together(herd, gen, indexes, attempts, progress, suspended=False)
        replaced = {i: w for i, w in herd.slots.items() if i in slots}
        await _publish_all(herd, started)
        herd.canary = takeback.Canary(gen, target, slots)
        takeback.keep(herd, replaced, before, seconds=None, reason="canary")
        herd.flush_state()
    finally:
        herd.end_pending()
    progress(
        f"generation {gen.number} serves slot(s) {_slots(slots)} of {len(herd.slots)}; "
        "`sockherd promote` completes the deploy, `sockherd rollback` undoes it"
    )


async def promote(herd: Herd, attempts: int, progress: Progress) -> None:
    """Complete a canary deploy: start the rest of its generation, switch every other slot at once."""
    canary = herd.canary
    if canary is None:
        raise DeployFailed("nothing to promote: no canary deploy is in progress (`sockherd restart --canary N`)")
    herd.check_tmp_dir()
    target, gen = canary.target, canary.generation
    rest: list[int | None] = [i for i in range(target.workers) if i not in canary.slots]
    _check_slots(herd, range(target.workers))
    progress(
        f"promoting generation {gen.number}: starting {len(rest)} worker(s)"
        + (f" + {target.standby} standby" if target.standby else "")
    )
    started = await _start_together(
        herd, gen, [*rest, *([None] * target.standby)], attempts, progress, suspended=target.suspended
    )
    await _publish_all(herd, started)
    for index in [i for i in herd.slots if i >= target.workers]:
        herd.unpublish(index)
    herd.flush_state()
    progress(f"generation {gen.number} serves every slot; stopping the old generation")
    await takeback.retire_after_promote(herd, canary, started)


async def _retire_kept_first(herd: Herd, progress: Progress) -> None:
    """A new deploy replaces a kept generation: retire it before anything starts."""
    if herd.kept is not None:
        progress(f"retiring the kept generation {herd.kept.generation.number} first (a new deploy replaces it)")
        await takeback.commit(herd, "a new deploy")


def _slots(indexes: list[int]) -> str:
    return ", ".join(str(i) for i in indexes)


async def scale_workers(herd: Herd, count: int, attempts: int, progress: Progress) -> None:
    """Scale the published workers of the current generation (the caller installs the count).

    Scaling down unpublishes before it stops anything.
    """
    gen, before = herd.current, len(herd.slots)
    if gen is None:
        return
    herd.check_tmp_dir()
    if count > before:
        new = [i for i in range(count) if i not in herd.slots]
        _check_slots(herd, range(before, count))
        progress(f"starting worker(s) {before}..{count - 1}")
        started = await _start_together(herd, gen, list(new), attempts, progress, suspended=herd.suspended)
        await _publish_all(herd, started)
    elif count < before:
        victims = [w for i in sorted(herd.slots, reverse=True) if i >= count and (w := herd.unpublish(i))]
        progress(f"unpublished {len(victims)} slot(s); stopping their workers")
        await herd.retire(victims)


async def scale_standby(herd: Herd, count: int, attempts: int, progress: Progress) -> None:
    """Start or stop standbys of the current generation until there are ``count``."""
    gen = herd.current
    if gen is None:
        return
    herd.check_tmp_dir()
    await herd.healer.stop_refill()  # one author of standbys at a time
    standbys = herd.standbys()
    if count > len(standbys):
        missing: list[int | None] = [None] * (count - len(standbys))
        progress(f"starting {len(missing)} standby worker(s)")
        await _start_together(herd, gen, missing, attempts, progress, suspended=True)
    elif count < len(standbys):
        extra = standbys[count:]
        progress(f"stopping {len(extra)} standby worker(s)")
        await asyncio.gather(*(w.stop() for w in extra))


def _failed(reason: str, gen: Generation, output: list[str] | None = None) -> DeployFailed:
    """A failed start, with the worker's last output lines (as they were when it failed), or where to find them."""
    if gen.spec.stdout is None and gen.spec.stderr is None:
        reason += " (its output went to the daemon's own stdout/stderr: see the daemon's log or journal)"
    return DeployFailed(reason, output if output is not None else output_tail(gen.spec))


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in _leaves(sub)]
    return [exc]

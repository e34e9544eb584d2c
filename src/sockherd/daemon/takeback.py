"""Deploys you can take back: a kept previous generation, rollback, commit, canaries.

``restart --keep-previous 60`` publishes the new generation as usual, but the workers it
replaced are *kept* rather than retired: unpublished (no symlink points at them), told
to ``suspend`` (the library closes their keep-alive connections gracefully and runs the
app's ``on_suspend`` hooks), still watched. ``rollback`` points every slot back at them,
one rename per slot, resumes them and retires the bad generation: no process starts,
so going back takes milliseconds. ``commit``, the next deploy, or the end of the
duration retires them instead. A kept worker that dies drops the kept generation (a
partial one could not be rolled back to atomically); the log says so.

``restart --canary N`` starts only N workers of the new generation and publishes them on
slots 0..N-1; the old workers of those slots are kept as above, the other slots keep
serving the old generation. ``promote`` starts the rest of the new generation and
switches every remaining slot at once; ``rollback`` puts the old workers back on the
canary slots. A canary worker that crashes or reports itself broken is rolled back
automatically (``status`` says why).

Every function here runs inside an operation (one at a time, through the coordinator);
the state lives in ``Herd.kept`` and ``Herd.canary``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from sockherd.daemon.desired import Desired
from sockherd.daemon.process import Generation, Worker

if TYPE_CHECKING:
    from sockherd.daemon.herd import Herd, Progress

log = logging.getLogger("sockherd")


class NothingToTakeBack(Exception):
    """rollback, commit or promote with nothing to act on; the message says why."""


@dataclass(eq=False)
class Kept:
    """A previous generation kept warm and out of traffic, for a rollback."""

    generation: Generation
    desired: Desired  # what ran with it: a rollback restores it
    workers: dict[int, Worker]  # slot -> the worker that served it
    reason: str  # "keep-previous" or "canary"
    until: float | None  # time.time() when it is retired; None: until promote/rollback
    since: float = field(default_factory=time.time)

    def as_dict(self, rss: Callable[[Worker], int]) -> dict[str, object]:
        alive = [w for w in self.workers.values() if w.alive]
        return {
            "generation": self.generation.number,
            "reason": self.reason,
            "slots": sorted(self.workers),
            "pids": [w.pid for w in alive],
            "since": self.since,
            "until": self.until,
            "rss": sum(rss(w) for w in alive),
        }


@dataclass(eq=False)
class Canary:
    """A new generation published on some slots only."""

    generation: Generation
    target: Desired  # what promote installs
    slots: list[int]

    def as_dict(self) -> dict[str, object]:
        return {"generation": self.generation.number, "slots": self.slots}


def keep(herd: Herd, replaced: dict[int, Worker], desired: Desired, *, seconds: float | None, reason: str) -> None:
    """Keep the workers a deploy just unpublished (slot -> worker), instead of retiring them."""
    alive = {i: w for i, w in replaced.items() if w.alive}
    if not alive:
        return
    gen = Generation.of(next(iter(alive.values())))
    herd.kept = Kept(gen, desired, alive, reason, None if seconds is None else time.time() + seconds)
    if seconds is not None:
        herd.healer.expire_kept(herd.kept)
    for worker in alive.values():
        worker.park()
    unintegrated = [w.label for w in alive.values() if w.link is None or not w.link.is_open]
    if unintegrated:
        log.warning(
            "kept %s without an IPC connection: they cannot close their keep-alive connections, so nginx may "
            "still reuse those until they close (use the runner or the library, or no upstream keepalive)",
            ", ".join(unintegrated),
        )
    herd.changed()


def drop_kept(herd: Herd, why: str) -> list[Worker]:
    """Forget the kept generation; returns its live workers, for the caller to retire."""
    kept, herd.kept = herd.kept, None
    if kept is None:
        return []
    log.info("kept generation %d retired: %s", kept.generation.number, why)
    herd.changed()
    return [w for w in kept.workers.values() if w.alive]


async def commit(herd: Herd, why: str) -> int:
    """Retire the kept generation now (``sockherd commit``, its time is up, a new deploy)."""
    if herd.canary is not None:
        raise NothingToTakeBack("a canary deploy is in progress: `sockherd promote` or `sockherd rollback` ends it")
    workers = drop_kept(herd, why)
    await herd.retire(workers)
    return len(workers)


async def rollback(herd: Herd, progress: Progress, *, since: float | None = None) -> dict[str, object]:
    """Point every kept slot back at its kept worker (renames only), then retire the other generation.

    ``since``: when the command arrived (``time.perf_counter()``); the time reported is
    from then to the last rename.
    """
    kept = herd.kept
    if kept is None:
        raise NothingToTakeBack(
            "nothing to roll back to: no generation is kept (restart with --keep-previous or --canary)"
        )
    if dead := [w.label for w in kept.workers.values() if not w.alive]:
        drop_kept(herd, f"{', '.join(dead)} died")
        raise NothingToTakeBack(f"cannot roll back: {', '.join(dead)} of the kept generation died")
    canary, bad = herd.canary, herd.current
    bad_number = canary.generation.number if canary is not None else (bad.number if bad is not None else None)
    started = since if since is not None else time.perf_counter()
    replaced: list[Worker] = []
    for index, worker in sorted(kept.workers.items()):
        if not kept.desired.suspended:
            worker.resume()  # before the rename, as for a standby: nothing waits on a held request
        previous = herd.slots.get(index)
        herd.publish(index, worker)
        if previous is not None and previous is not worker:
            replaced.append(previous)
    moved_ms = (time.perf_counter() - started) * 1000
    if canary is None:  # the bad generation may have had more slots
        for index in [i for i, w in herd.slots.items() if w.generation == bad_number]:
            if (extra := herd.unpublish(index)) is not None:
                replaced.append(extra)
    herd.kept, herd.canary = None, None
    herd.make_current(kept.generation)
    herd.want(kept.desired.but(running=True))
    leftovers = [w for w in herd.workers.values() if w.generation == bad_number and w not in replaced]
    progress(
        f"rolled back to generation {kept.generation.number}: {len(kept.workers)} slot(s) moved in "
        f"{moved_ms:.1f} ms; stopping {len(replaced) + len(leftovers)} worker(s) of generation {bad_number}"
    )
    herd.healer.after_deploy()
    await herd.retire([*replaced, *leftovers])
    return {"generation": kept.generation.number, "moved_ms": round(moved_ms, 3), "slots": sorted(kept.workers)}


def check_canary(herd: Herd, count: int, target: Desired) -> None:
    if herd.canary is not None:
        raise NothingToTakeBack("a canary deploy is in progress: `sockherd promote` or `sockherd rollback` first")
    if not herd.slots or herd.current is None:
        raise NothingToTakeBack("a canary needs a generation serving to compare with: `sockherd start` first")
    if not 1 <= count < target.workers:
        raise NothingToTakeBack(f"--canary must be from 1 to {target.workers - 1} (fewer than the workers)")


async def retire_after_promote(herd: Herd, canary: Canary, started: list[Worker]) -> None:
    """The whole new generation serves: install it, retire every older worker."""
    herd.kept, herd.canary = None, None
    herd.make_current(canary.generation)
    herd.want(canary.target.but(running=True))
    old = [w for w in herd.workers.values() if w.generation != canary.generation.number]
    herd.healer.after_deploy()
    herd.healer.resume()  # a canary slot whose worker died meanwhile was left for the rollback: refill it
    await herd.retire(old)

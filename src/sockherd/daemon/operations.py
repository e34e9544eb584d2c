"""Every command that changes the herd, each one operation through the coordinator.

start, restart, resume, scale and reload are exclusive (a concurrent one is told
"busy"); stop, terminate and quit preempt whatever runs and hold the coordinator until
the herd is down. Each decides a new desired state and installs it whole, and only once
it serves: a failed restart or scale-up leaves the old one (config, counts, generation)
in charge.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from sockherd.config import Config, load_config
from sockherd.daemon import takeback
from sockherd.daemon.deploy import deploy, deploy_canary, promote, scale_standby, scale_workers
from sockherd.daemon.desired import Desired
from sockherd.daemon.herd import DeployFailed, Herd, Progress
from sockherd.daemon.reload import ReloadPlan, plan_reload

log = logging.getLogger("sockherd")


class Operations:
    def __init__(self, herd: Herd, *, load: Callable[[Path], Config] = load_config) -> None:
        self.herd = herd
        self._coordinator = herd.coordinator
        self._load = load

    async def start(self, attempts: int, progress: Progress, *, suspended: bool = False) -> bool:
        """Bring the workers up if they are not. False when they already were."""

        async def work() -> bool:
            herd = self.herd
            if herd.running:
                return False
            await deploy(herd, self._fresh_target(progress).but(suspended=suspended), attempts, progress)
            return True

        return await self._coordinator.run("start", work)

    def _fresh_target(self, progress: Progress) -> Desired:
        """What a start deploys: "fix the app's config, then `sockherd start`" must work,
        so a stopped herd starts with the config file as it is now (ConfigError if it is
        broken; the running config stays)."""
        desired = self.herd.desired
        new = self._load(desired.config.path)
        if new.as_dict() == desired.config.as_dict():
            return desired
        plan = plan_reload(desired.config, new, workers=desired.workers, standby=desired.standby)
        progress(f"the config file changed since it was loaded ({', '.join(plan.changed)}): starting with it")
        return desired.but(config=new, workers=new.workers, standby=new.standby)

    async def restart(
        self,
        attempts: int,
        progress: Progress,
        *,
        suspended: bool = False,
        keep_previous: float | None = None,
        canary: int | None = None,
    ) -> None:
        """A new generation of the desired state; the old one retires once it is published
        (or is kept for a rollback; or, as a canary, the new one serves some slots only)."""
        self._check_takeback(keep_previous, canary, suspended)

        async def work() -> None:
            target = self.herd.desired.but(suspended=suspended)
            if canary is not None:
                await deploy_canary(self.herd, target, canary, attempts, progress)
            else:
                await deploy(self.herd, target, attempts, progress, keep_previous=keep_previous)

        await self._coordinator.run("restart", work)

    def _check_takeback(self, keep_previous: float | None, canary: int | None, suspended: bool) -> None:
        """Refuse the combinations that cannot hold, with the reason (docs/deploying.md)."""
        herd = self.herd
        if keep_previous is None and canary is None:
            return
        what = "--canary" if canary is not None else "--keep-previous"
        if herd.listeners:
            raise DeployFailed(
                f"{what} needs per-worker sockets: with `listen` every worker accepts from the shared socket, "
                "so a kept or old generation would still take connections"
            )
        if herd.config.strategy == "rolling":
            raise DeployFailed(f'{what} needs strategy = "atomic": a rolling deploy retires each slot as it goes')
        if canary is not None and (keep_previous is not None or suspended):
            raise DeployFailed("--canary keeps the old workers of its slots by itself, and cannot be --suspended")

    async def rollback(
        self, progress: Progress, *, why: str | None = None, received_at: float | None = None
    ) -> dict[str, object]:
        """Back to the kept generation: renames only, then the other generation retires."""

        async def work() -> dict[str, object]:
            try:
                result = await takeback.rollback(self.herd, progress, since=received_at)
            except takeback.NothingToTakeBack as exc:
                raise DeployFailed(str(exc)) from None
            if why is not None:
                self.herd.rolled_back = why
            return result

        return await self._coordinator.run("rollback", work)

    async def commit(self) -> int:
        """Retire the kept generation now: the deploy is final."""

        async def work() -> int:
            if self.herd.kept is None:
                raise DeployFailed("nothing to commit: no generation is kept")
            try:
                return await takeback.commit(self.herd, "committed")
            except takeback.NothingToTakeBack as exc:
                raise DeployFailed(str(exc)) from None

        return await self._coordinator.run("commit", work)

    async def promote(self, attempts: int, progress: Progress) -> None:
        """Complete a canary deploy."""

        async def work() -> None:
            await promote(self.herd, attempts, progress)

        await self._coordinator.run("promote", work)

    async def resume(self) -> int:
        """Release the published workers' held requests. Standbys stay suspended."""

        async def work() -> int:
            herd = self.herd
            herd.want(herd.desired.but(suspended=False))
            resumed = [w for w in herd.slots.values() if w.suspended and w.alive]
            for worker in resumed:
                worker.resume()
            if resumed:
                log.info("resumed %d worker(s)", len(resumed))
            return len(resumed)

        return await self._coordinator.run("resume", work)

    async def set_workers(self, count: int, attempts: int, progress: Progress) -> None:
        async def work() -> None:
            herd = self.herd
            if herd.running:
                await scale_workers(herd, count, attempts, progress)
            herd.want(herd.desired.but(workers=count))

        await self._coordinator.run("scale", work)

    async def set_standby(self, count: int, attempts: int, progress: Progress) -> None:
        if count and self.herd.listeners:
            raise DeployFailed(
                "standby workers need per-worker sockets: with `listen` a standby would take connections "
                "before it is promoted (and a dead worker's connections wait in the shared queue for the others)"
            )

        async def work() -> None:
            herd = self.herd
            if herd.running:
                await scale_standby(herd, count, attempts, progress)
            herd.want(herd.desired.but(standby=count))
            herd.healer.refill_standbys()

        await self._coordinator.run("scale", work)

    async def reload(self, progress: Progress) -> ReloadPlan:
        """Apply a changed config file with the smallest set of actions (see reload.py)."""
        return await self._coordinator.run("reload", lambda: self._reload(progress))

    async def _reload(self, progress: Progress) -> ReloadPlan:
        herd = self.herd
        old = herd.desired
        new = self._load(old.config.path)
        plan = plan_reload(old.config, new, workers=old.workers, standby=old.standby)
        target = old.but(config=new, workers=new.workers, standby=new.standby)
        if not old.running:
            herd.want(target)  # nothing runs: the next start deploys all of it
        elif plan.restart:
            progress(f"{plan.describe()}: restarting the workers")
            await deploy(herd, target, new.max_start_attempts, progress)
        else:
            if plan.workers is not None:
                await scale_workers(herd, plan.workers, new.max_start_attempts, progress)
            if plan.standby is not None:
                await scale_standby(herd, plan.standby, new.max_start_attempts, progress)
            herd.want(target)
            herd.healer.refill_standbys()
        if plan.timeouts:
            for worker in herd.workers.values():
                worker.timeouts = new.timeouts
        if plan.republish:
            herd.republish()
        if plan.recycling:
            herd.healer.config_changed()
        return plan

    async def adopted(self, finish: Callable[[], Awaitable[None]]) -> None:
        """Finish an adoption (refill, retire leftovers) as one operation: nothing races it."""
        await self._coordinator.run("adopt", finish)

    async def stop(self) -> None:
        """Unpublish, linger, then shut every worker down staged. Preempts any operation."""
        await self._coordinator.run("stop", self._stop, kind="preempting")

    async def quit(self, name: str = "quit") -> None:
        """The daemon is leaving (quit, terminate): refuse every command from now on, stop the herd."""
        self._coordinator.begin_quit()
        self.herd.changed()
        await self._coordinator.run(name, self._stop, kind="preempting")

    async def _stop(self) -> None:
        herd = self.herd
        herd.want(herd.desired.but(running=False, suspended=False))
        herd.kept, herd.canary = None, None  # their workers stop with the rest
        await herd.healer.stop()
        published = len(herd.slots)
        for index in list(herd.slots):
            herd.unpublish(index)
        herd.make_current(None)
        if published:
            log.info("unpublished %d slot(s); stopping %d worker(s)", published, len(herd.workers))
            await herd.linger(list(herd.workers.values()))
        await herd.stop_all()

    async def kill_all(self) -> None:
        """The impatient path (a second SIGINT): SIGKILL everything now, whatever runs."""
        self._coordinator.begin_quit()
        herd = self.herd
        herd.want(herd.desired.but(running=False))
        await herd.kill_all()

"""What the herd should be: one value, replaced whole, read by every later spawn.

Operations decide a new desired state and install it only once it serves (a failed
restart or scale-up leaves the old one in charge); healing reads it and never writes
it. Everything else about the herd (slots, generations) is derived from the workers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sockherd.config import Config, Timeouts


@dataclass(frozen=True, slots=True)
class Desired:
    config: Config  # spec, timeouts, strategy, recycling … of the next generation
    workers: int  # published workers (set-workers overrides the file until a reload)
    standby: int
    suspended: bool = False  # deployed with --suspended and not resumed yet
    running: bool = False  # started, and not stopped since

    @classmethod
    def from_config(cls, config: Config) -> Desired:
        return cls(config=config, workers=config.workers, standby=config.standby)

    @property
    def timeouts(self) -> Timeouts:
        return self.config.timeouts

    def but(self, **changes: object) -> Desired:
        """A copy with some fields changed (the desired state is never edited in place)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def as_dict(self) -> dict[str, object]:
        return {
            "workers": self.workers,
            "standby": self.standby,
            "suspended": self.suspended,
            "running": self.running,
            "config": self.config.as_dict(),
        }

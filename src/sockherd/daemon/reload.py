"""What a reload must do: the smallest set of actions that applies a changed config.

A pure function of the old and the new config, so every case is unit-tested without
processes. Changing what a worker *is* (command, environment, readiness …) needs a new
generation (a zero-downtime restart); changing how many there are only scales;
everything else applies in place.
"""

from __future__ import annotations

from dataclasses import dataclass

from sockherd.config import Config, ConfigError

# Where the daemon's own sockets live, and the shared listeners it bound for its whole
# life: they cannot move under a running daemon.
FIXED = frozenset({"tmp_dir", "ipc_file", "socket_file", "listen", "pidfile"})
# What a worker runs and how it is judged ready: only a new generation can change these.
NEEDS_RESTART = frozenset(
    {
        "command",
        "env",
        "environment",
        "cwd",
        "ready",
        "stdout",
        "stderr",
        "stop_signal",
        "socket_mode",
        "socket_group",
        "backlog",
    }
)
# Applied to the running workers and to every later spawn.
TIMEOUTS = frozenset({"spawn_timeout", "online_timeout", "shutdown_timeout", "kill_timeout", "linger"})


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    changed: tuple[str, ...]
    restart: bool = False
    workers: int | None = None  # scale the published workers to this
    standby: int | None = None  # scale the standbys to this
    retitle: bool = False
    republish: bool = False  # symlinks switched between relative and absolute
    timeouts: bool = False
    recycling: bool = False  # max_age / max_memory
    dev_server: bool = False

    def describe(self, *, applied: bool = True) -> str:
        """What changed and what was done about it (``applied=False``: nothing runs)."""
        actions = []
        if self.restart:
            actions.append("restart")
        if self.workers is not None:
            actions.append(f"scale to {self.workers} worker(s)")
        if self.standby is not None:
            actions.append(f"scale to {self.standby} standby")
        what = f"changed: {', '.join(self.changed)}" if self.changed else "no change in the file"
        return what + (f" ({'; '.join(actions)})" if actions and applied else "")


def plan_reload(old: Config, new: Config, *, workers: int, standby: int) -> ReloadPlan:
    """``workers``/``standby``: what runs now (a set-workers override counts as running).

    A reload ends runtime overrides: the counts go back to what the file says.
    """
    before, after = old.as_dict(), new.as_dict()
    changed = tuple(sorted(key for key in after if before.get(key) != after.get(key)))
    if fixed := [key for key in changed if key in FIXED]:
        raise ConfigError(
            f"{new.path}: key {fixed[0]!r} cannot change while the daemon runs; restart the daemon to apply it"
        )
    keys = set(changed)
    restart = bool(keys & NEEDS_RESTART)
    return ReloadPlan(
        changed=changed,
        restart=restart,
        # a restart deploys the new counts anyway
        workers=new.workers if not restart and new.workers != workers else None,
        standby=new.standby if not restart and new.standby != standby else None,
        retitle="name" in keys,
        republish="symlinks" in keys and not restart,
        timeouts=bool(keys & TIMEOUTS),
        recycling=bool(keys & {"max_age", "max_memory"}),
        dev_server="dev_server" in keys,
    )

"""A daemon taking over from the one before it: after a crash, or across an upgrade's exec.

The mechanics are in adoption.py (rebuilding the herd from the state file) and
upgrade.py (the exec and what crosses it); this module is the daemon's side of both:
when to adopt, what to finish afterwards, and how ``restart --upgrade`` runs as one
operation and is answered by the new image.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sockherd import __version__
from sockherd.daemon.adoption import Adoption, StateUnusable, adopt
from sockherd.daemon.coordinator import Busy, ShuttingDown
from sockherd.daemon.herd import DeployFailed
from sockherd.daemon.ipc import Connection
from sockherd.daemon.lifecycle import HANDLED_SIGNALS, DaemonError, sd_notify
from sockherd.daemon.state_file import daemon_alive, live_workers, read_state
from sockherd.daemon.upgrade import Inherited, exec_in_place, installed_version

if TYPE_CHECKING:
    from sockherd.daemon.daemon import Daemon

log = logging.getLogger("sockherd")


def previous_state(daemon: Daemon) -> dict[str, Any] | None:
    """What the daemon before this one left (DaemonError if it still runs: one owner)."""
    cfg = daemon.config
    state = read_state(cfg.state_path)
    if state is None:
        return None
    earlier = _earlier(state)
    if daemon_alive(state) and earlier.get("pid") != os.getpid():
        raise DaemonError(
            f"the daemon that started these workers (pid {earlier.get('pid')}) is still running but does "
            f"not answer on {cfg.ipc_path}; stop it (kill {earlier.get('pid')}) before starting another"
        )
    return state


def _earlier(state: dict[str, Any]) -> dict[str, Any]:
    recorded_daemon = state.get("daemon")
    return recorded_daemon if isinstance(recorded_daemon, dict) else {}


def recorded_listeners(state: dict[str, Any] | None) -> tuple[dict[str, int], list[int]]:
    """The listeners a dead daemon recorded (address -> inode), and the pids of its workers
    still alive that may hold them."""
    if state is None:
        return {}, []
    recorded = state.get("listeners")
    inodes = {
        item["address"]: item["inode"]
        for item in (recorded if isinstance(recorded, list) else [])
        if isinstance(item, dict) and isinstance(item.get("address"), str) and isinstance(item.get("inode"), int)
    }
    return inodes, [w["pid"] for w in live_workers(state)] if inodes else []


def adopt_previous(daemon: Daemon, state: dict[str, Any] | None) -> Adoption | None:
    """Take over the workers the state file names, if any still run (see adoption.py)."""
    cfg = daemon.config
    if state is None:
        return None
    earlier = _earlier(state)
    try:
        adoption = adopt(daemon.herd, state)
    except StateUnusable as exc:
        log.error("%s: %s; starting afresh", cfg.state_path, exc)
        return None
    if adoption.adopted or adoption.gone:
        version = earlier.get("version", "?")
        log.info(
            "%s from daemon %s (pid %s): %s",
            "upgraded" if daemon.inherited else "adopting",
            version,
            earlier.get("pid"),
            adoption.describe(),
        )
    desired = state.get("desired")
    recorded = desired.get("config") if isinstance(desired, dict) else None
    if adoption.adopted and isinstance(recorded, dict) and _differs(recorded, cfg.as_dict()):
        log.warning("the config file changed since these workers started: `sockherd reload` applies it")
    return adoption


async def finish_adoption(daemon: Daemon, adoption: Adoption) -> None:
    """Finish what the earlier daemon left: refill slots and standbys, retire leftovers."""

    async def work() -> None:
        daemon.herd.healer.after_adoption(adoption.broken)
        if adoption.retire:
            log.info("retiring %d adopted worker(s) no slot needs", len(adoption.retire))
            await daemon.herd.retire(adoption.retire)

    try:
        await daemon.ops.adopted(work)
    except (Busy, ShuttingDown) as exc:
        log.info("after adoption: %s", exc)
    finally:
        sd_notify("READY=1")


async def upgrade_in_place(
    daemon: Daemon,
    attempts: int,
    progress: Callable[[str], None],
    *,
    suspended: bool,
    conn: Connection,
    request_id: int | str,
) -> bool:
    """``restart --upgrade``. False: the same version runs (the caller reloads and
    restarts instead). Otherwise this never returns: the new image answers."""
    installed = installed_version()
    if installed == __version__:
        return False

    async def work() -> None:
        healer = daemon.herd.healer
        await healer.stop()  # nothing half-started may cross the exec
        if not daemon.herd.flush_state():  # the new image would not know its workers
            healer.resume()
            raise DeployFailed(f"upgrade refused: cannot write {daemon.config.state_path} (see the log)")
        progress(f"upgrading the daemon in place: sockherd {__version__} -> {installed} (pid {os.getpid()})")
        await conn.drained(2.0)
        listener, notify = daemon.ipc.listening_socket, daemon.notify.datagram_socket
        assert listener is not None and notify is not None
        try:
            exec_in_place(
                ipc_fd=listener.fileno(),
                notify_fd=notify.fileno(),
                client_fd=conn.fileno(),
                request_id=request_id,
                listeners=daemon.herd.listeners.handoff(),
                attempts=attempts,
                suspended=suspended,
                handled=HANDLED_SIGNALS,
            )
        except OSError as exc:
            healer.resume()
            raise DeployFailed(
                f"upgrade failed: cannot execute {sys.executable}: {exc.strerror or exc}; "
                f"the daemon carries on as sockherd {__version__}"
            ) from None

    await daemon.herd.coordinator.run("upgrade", work)
    return True


async def finish_upgrade(daemon: Daemon, inherited: Inherited, adoption: Adoption | None) -> None:
    """The new image's half of ``restart --upgrade``: take the herd back, then restart it."""
    conn = await daemon.ipc.resume_connection(inherited.client) if inherited.client is not None else None
    if adoption is not None:
        await finish_adoption(daemon, adoption)
    else:
        sd_notify("READY=1")
    log.info("upgraded in place from sockherd %s to %s", inherited.previous_version, __version__)
    upgraded = {"from": inherited.previous_version, "to": __version__, "pid": os.getpid()}
    if conn is None or inherited.request_id is None:
        await daemon.restart_logged()
        return
    await daemon.control.answer_deploy(
        conn,
        inherited.request_id,
        "restart",
        lambda progress: daemon.ops.restart(inherited.attempts, progress, suspended=inherited.suspended),
        extra={"upgraded": upgraded},
    )


def _differs(recorded: dict[str, Any], loaded: dict[str, Any]) -> bool:
    """Whether the loaded config differs from the one recorded (``path`` aside)."""
    return any(recorded.get(key) != value for key, value in loaded.items())

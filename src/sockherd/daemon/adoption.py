"""Taking over the workers an earlier daemon left running: after it died, or across exec.

The state file names every worker by pid and process start time. A worker is adopted
only when both still match (a pid reused by another program is neither adopted nor
signalled), and from then on it is managed exactly as if this daemon had spawned it:
status, crash replacement, failover, restart, stop. What the earlier daemon left half
done is finished: workers of a generation that was never published (a deploy the crash
interrupted) and standbys of an older generation are retired; symlinks that do not
point where the state says are put back; slots whose workers died meanwhile are
refilled, with the spec their generation ran.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sockherd.config import WorkerSpec
from sockherd.daemon.herd import Herd
from sockherd.daemon.process import Generation, Worker, WorkerState
from sockherd.daemon.publish import publish_symlink, published_target
from sockherd.daemon.reaper import kill_process_group
from sockherd.daemon.state_file import spec_from_dict

log = logging.getLogger("sockherd")

READY_STATES = (WorkerState.ONLINE, WorkerState.SUSPENDED, WorkerState.BROKEN)


class StateUnusable(Exception):
    """The state file cannot be followed; the message says why."""


@dataclass
class Adoption:
    adopted: list[Worker] = field(default_factory=list)
    gone: list[str] = field(default_factory=list)  # "id (pid N)" no longer running as recorded
    retire: list[Worker] = field(default_factory=list)  # adopted, but no longer part of the herd
    broken: list[Worker] = field(default_factory=list)
    relinked: list[int] = field(default_factory=list)
    strays: list[int] = field(default_factory=list)  # process groups killed: started, never recorded

    def describe(self) -> str:
        parts = [f"adopted {len(self.adopted)} worker(s)"]
        if self.gone:
            parts.append(f"{len(self.gone)} gone meanwhile ({', '.join(self.gone[:5])})")
        if self.retire:
            parts.append(f"{len(self.retire)} to retire (unpublished generation or old standbys)")
        if self.relinked:
            parts.append(f"symlink(s) {', '.join(map(str, self.relinked))} put back")
        if self.strays:
            parts.append(f"killed {len(self.strays)} stray process group(s) of an interrupted start")
        return "; ".join(parts)


def adopt(herd: Herd, state: dict[str, Any]) -> Adoption:
    """Rebuild ``herd`` from ``state``; raises StateUnusable (nothing adopted) on a bad file."""
    try:
        desired, generations = state["desired"], state["generations"]
        specs = {int(number): spec_from_dict(spec) for number, spec in generations["specs"].items()}
        current = generations["current"]
        records = [r for r in state["workers"] if isinstance(r, dict)]
        slots = {int(index): str(worker_id) for index, worker_id in state["slots"].items()}
        counts = (int(desired["workers"]), int(desired["standby"]))
        flags = (bool(desired["suspended"]), bool(desired["running"]))
        last = int(generations["last"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StateUnusable(f"the state file does not hold a herd this daemon can read: {exc}") from None

    result = Adoption()
    herd.restore_generations(last, Generation(current, specs[current]) if current in specs else None)
    by_id: dict[str, Worker] = {}
    for record in records:
        worker = _adopt_worker(herd, record, specs, result)
        if worker is not None:
            by_id[worker.id] = worker
    result.strays = kill_strays(herd.config.ipc_path, {w.pid for w in result.adopted if w.pid is not None})
    if not result.adopted:  # nothing left to take over: a fresh start, from the config file
        herd.restore_generations(last, None)
        return result
    for index, worker_id in sorted(slots.items()):
        worker = by_id.get(worker_id)
        if worker is None or worker.state not in READY_STATES:
            continue
        worker.index = index
        herd.slots[index] = worker
        link = herd.config.symlink_path(index)
        if published_target(link) != worker.socket_path and worker.socket_path.exists():
            publish_symlink(link, worker.socket_path, relative=herd.config.symlinks == "relative")
            result.relinked.append(index)
    published = set(map(id, herd.slots.values()))
    current_number = herd.current.number if herd.current else None
    for worker in result.adopted:
        a_standby = worker.index is None and worker.generation == current_number and worker.state in READY_STATES
        if id(worker) in published:
            if worker.state is WorkerState.BROKEN:
                result.broken.append(worker)
        elif not a_standby:
            result.retire.append(worker)
    (workers, standby), (suspended, running) = counts, flags
    herd.want(herd.desired.but(workers=workers, standby=standby, suspended=suspended, running=running))
    return result


def _adopt_worker(herd: Herd, record: dict[str, Any], specs: dict[int, WorkerSpec], result: Adoption) -> Worker | None:
    worker_id, pid, start_time = record.get("id"), record.get("pid"), record.get("start_time")
    if not isinstance(worker_id, str) or not isinstance(pid, int) or not isinstance(start_time, int):
        return None  # never spawned (pid unknown), or not a record of ours
    process = herd.processes.adopt(pid, start_time)
    if process is None:
        result.gone.append(f"{worker_id} (pid {pid})")
        return None
    try:
        generation = int(record["generation"])
        spec = specs[generation]
        state = WorkerState(record["state"])
        index = record["index"] if isinstance(record["index"], int) else None
        suspended = bool(record["suspended"])
        started_at = float(record.get("started_at") or 0.0)
        online_at = float(record["online_at"]) if record.get("online_at") is not None else None
    except (KeyError, TypeError, ValueError):
        # Alive, but we cannot say what it is: it is stopped rather than left unmanaged.
        log.warning("adopting pid %d: its record is unreadable; it will be stopped", pid)
        generation, spec, state, index, suspended = 0, herd.config.worker, WorkerState.RUNNING, None, True
        started_at, online_at = 0.0, None
    worker = herd.new_worker(Generation(generation, spec), index, suspended=suspended, worker_id=worker_id)
    worker.broken_reason = record.get("broken_reason") if isinstance(record.get("broken_reason"), str) else None
    if state is WorkerState.TERMINATING:
        state = WorkerState.RUNNING  # its shutdown was under way: it is retired again
    worker.adopt(process, state, started_at, online_at)
    result.adopted.append(worker)
    return worker


def kill_strays(ipc_path: Path, adopted: set[int]) -> list[int]:
    """SIGKILL the process groups of workers an earlier daemon started but never recorded.

    A daemon killed between a fork and the next state write leaves a worker that no
    state file names. It carries this daemon's ``SOCKHERD_IPC`` in its environment and
    leads its own process group; it never served (a worker is recorded long before it
    is published). Processes in an adopted worker's group (a wrapper's server, a
    pre-fork server's children) are that worker's, and are left alone.
    """
    marker = b"SOCKHERD_IPC=" + os.fsencode(ipc_path) + b"\0"
    groups: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if marker not in f.read() + b"\0":
                    continue
            pgid = os.getpgid(int(entry.name))
        except (OSError, ValueError):
            continue
        if pgid not in adopted and pgid != os.getpgid(0):
            groups.add(pgid)
    for pgid in groups:
        log.warning("killing process group %d: started by an earlier daemon that died before recording it", pgid)
        kill_process_group(pgid)
    return sorted(groups)

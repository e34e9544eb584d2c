"""The herd, persisted: a JSON file in tmp_dir rewritten atomically after every change.

It names every worker the daemon manages by pid *and* process start time, so a later
reader (``sockherd status`` when the daemon is gone; adoption by a new daemon) can tell
a live worker from a pid that was reused by something else. Writes are coalesced to one
per turn of the event loop: a deploy of 64 workers changes the herd hundreds of times.
The file is written to a fresh temporary name (``O_EXCL | O_NOFOLLOW``, mode 0600)
and renamed over the old one, so a reader never sees half a file and a planted symlink
is replaced, never followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import secrets
import signal
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sockherd.config import WorkerSpec
from sockherd.daemon.reaper import process_is_zombie, process_start_time

log = logging.getLogger("sockherd")

FORMAT = 1
_TEMP = re.compile(r"\.(?P<name>.+)\.[0-9a-f]{8}")


def write_atomically(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def is_temp_of(name: str, state_name: str) -> bool:
    """A temporary file left by a write that a crash interrupted."""
    match = _TEMP.fullmatch(name)
    return match is not None and match["name"] == state_name


class StateFile:
    """Rewrites ``path`` from ``snapshot()`` once per loop turn after any change."""

    def __init__(self, path: Path, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.path = path
        self._snapshot = snapshot
        self._scheduled = False
        self._failed = False

    def changed(self) -> None:
        if self._scheduled:
            return
        try:
            asyncio.get_running_loop().call_soon(self.flush)
        except RuntimeError:  # no loop (a unit test driving the herd by hand): write now
            self.flush()
            return
        self._scheduled = True

    def flush(self) -> bool:
        """Write now; False (logged once) when the file cannot be written."""
        self._scheduled = False
        try:
            write_atomically(self.path, json.dumps(self._snapshot(), indent=1).encode())
        except OSError as exc:
            if not self._failed:  # once, not on every change
                log.error("cannot write the state file %s: %s", self.path, exc.strerror or exc)
            self._failed = True
            return False
        self._failed = False
        return True

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


def read_state(path: Path) -> dict[str, Any] | None:
    """The state a daemon left, or None when there is none (or it is not ours to read)."""
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in (os.getuid(), 0):
            return None
        state = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        return None
    return state


def is_same_process(pid: object, start_time: object) -> bool:
    """True when ``pid`` still runs and is the process that started at ``start_time``."""
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0 or not isinstance(start_time, int):
        return False
    return process_start_time(pid) == start_time


def live_workers(state: dict[str, Any]) -> list[dict[str, Any]]:
    """The workers a state file names that still run (pid and start time verified)."""
    workers = state.get("workers")
    if not isinstance(workers, list):
        return []
    return [w for w in workers if isinstance(w, dict) and is_same_process(w.get("pid"), w.get("start_time"))]


def daemon_alive(state: dict[str, Any]) -> bool:
    """The recorded daemon still runs (a zombie, dead but not yet reaped by a pid 1 that
    does not reap, as in some containers, is not running)."""
    daemon = state.get("daemon")
    return (
        isinstance(daemon, dict)
        and is_same_process(daemon.get("pid"), daemon.get("start_time"))
        and not process_is_zombie(daemon["pid"])
    )


def spec_to_dict(spec: WorkerSpec) -> dict[str, Any]:
    """A generation's spec, so an adopting daemon respawns its workers exactly as they were."""
    return {
        "command": list(spec.command),
        "cwd": str(spec.cwd),
        "env": list(spec.env),
        "environment": [list(pair) for pair in spec.environment],
        "ready": spec.ready,
        "stdout": str(spec.stdout) if spec.stdout else None,
        "stderr": str(spec.stderr) if spec.stderr else None,
        "stop_signal": spec.stop_signal.name,
        "socket_mode": spec.socket_mode,
        "backlog": spec.backlog,
        "socket_group": spec.socket_group,
        "preload": spec.preload,
        "preload_teardown": spec.preload_teardown,
    }


def spec_from_dict(data: Any) -> WorkerSpec:
    """The inverse of :func:`spec_to_dict`; ValueError when the file does not hold one."""
    try:
        ready = data["ready"]
        if ready not in ("notify", "socket"):
            raise ValueError(f"ready {ready!r}")
        return WorkerSpec(
            command=tuple(str(a) for a in data["command"]),
            cwd=Path(data["cwd"]),
            env=tuple(str(n) for n in data["env"]),
            environment=tuple((str(k), str(v)) for k, v in data["environment"]),
            ready=ready,
            stdout=Path(data["stdout"]) if data["stdout"] else None,
            stderr=Path(data["stderr"]) if data["stderr"] else None,
            stop_signal=signal.Signals[data["stop_signal"]],
            socket_mode=int(data["socket_mode"]),
            backlog=int(data["backlog"]),
            socket_group=int(data["socket_group"]) if data.get("socket_group") is not None else None,
            preload=data.get("preload") is True,  # absent from the files of daemons before preload
            preload_teardown=data.get("preload_teardown") is True,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a worker spec: {exc}") from None

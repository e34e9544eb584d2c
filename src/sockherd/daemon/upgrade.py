"""``restart --upgrade``: the daemon re-executes itself in place, and keeps its herd.

Same pid, so the service manager notices nothing and the workers stay its children.
Across ``execve`` the new image inherits, by descriptor number (named in
``SOCKHERD_UPGRADE``): the IPC listening socket (clients and workers reconnect to the
very same socket, and connections that arrive meanwhile wait in its backlog), the
sd_notify socket, and the connection of the client that asked, which gets its answer
from the new image. Everything else closes on exec: workers' IPC connections (the
library reconnects with backoff and says hello again), the dev server.

The state file carries the herd; the signals the daemon handles are blocked across the
exec (a mask survives exec; dispositions do not), so a SIGTERM that arrives meanwhile
waits for the new image's handler instead of killing the daemon with its default
action. If the exec itself fails, nothing was lost: the old image carries on. If the new
image fails to start, the daemon exits and its workers keep serving: a daemon started
again (systemd's ``Restart=on-failure``) adopts them from the state file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata

from sockherd import __version__

log = logging.getLogger("sockherd")

ENV = "SOCKHERD_UPGRADE"


def installed_version() -> str:
    """The version installed now (on disk), which may differ from the one running."""
    try:
        return metadata.version("sockherd")
    except metadata.PackageNotFoundError:
        return "0.0.0"


@dataclass(frozen=True, slots=True)
class Inherited:
    """What an upgraded image was handed by the one before it."""

    ipc: socket.socket
    notify: socket.socket
    client: socket.socket | None
    request_id: int | str | None
    attempts: int
    suspended: bool
    previous_version: str
    # address -> (fd, whether the daemon created its socket file): the shared listeners
    listeners: dict[str, tuple[int, bool]]


def take_inherited() -> Inherited | None:
    """The descriptors and the pending request an upgrade left us, if this image is one."""
    raw = os.environ.pop(ENV, None)
    if raw is None:
        return None
    data = json.loads(raw)
    client = data.get("client_fd")
    return Inherited(
        ipc=socket.socket(fileno=int(data["ipc_fd"])),
        notify=socket.socket(fileno=int(data["notify_fd"])),
        client=socket.socket(fileno=int(client)) if client is not None else None,
        request_id=data.get("request_id"),
        attempts=int(data.get("attempts", 1)),
        suspended=bool(data.get("suspended", False)),
        previous_version=str(data.get("previous_version", "?")),
        listeners={
            str(address): (int(fd), bool(owned)) for address, (fd, owned) in dict(data.get("listeners", {})).items()
        },
    )


def exec_in_place(
    *,
    ipc_fd: int,
    notify_fd: int,
    client_fd: int | None,
    request_id: int | str | None,
    attempts: int,
    suspended: bool,
    handled: Iterable[signal.Signals],
    listeners: dict[str, tuple[int, bool]] | None = None,
) -> None:
    """Replace this process's image with the installed sockherd. Returns only on failure
    (raises OSError), having put back what it changed. ``handled``: the signals the
    daemon handles, blocked from just before the exec until the new image handles them."""
    listeners = listeners or {}
    kept = [ipc_fd, notify_fd, *([client_fd] if client_fd is not None else []), *(fd for fd, _ in listeners.values())]
    handoff = {
        "ipc_fd": ipc_fd,
        "notify_fd": notify_fd,
        "client_fd": client_fd,
        "request_id": request_id,
        "attempts": attempts,
        "suspended": suspended,
        "previous_version": __version__,
        "listeners": listeners,
    }
    argv = [sys.executable, "-m", "sockherd", *sys.argv[1:]]
    env = {**os.environ, ENV: json.dumps(handoff)}
    for handler in logging.getLogger().handlers:
        handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    previous_mask = signal.pthread_sigmask(signal.SIG_BLOCK, {*handled, signal.SIGCHLD})
    try:
        for fd in kept:
            os.set_inheritable(fd, True)
        os.execve(sys.executable, argv, env)  # noqa: S606 - this very program, with its own argv
    except OSError:
        for fd in kept:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)
        signal.pthread_sigmask(signal.SIG_SETMASK, previous_mask)
        raise

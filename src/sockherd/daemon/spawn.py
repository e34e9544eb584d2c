"""Executing a worker's command: Popen, or posix_spawn when the shared listeners must
sit at fds 3.. (the systemd convention). Runs in the process layer's executor thread
(processes.py), which owns the launch's ticket and its timeouts."""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import signal
import subprocess

from sockherd.daemon.listeners import SD_LISTEN_FDS_START

TYPE_CHECKING = False
if TYPE_CHECKING:
    from sockherd.daemon.processes import Launch

__all__ = ["spawn"]


def spawn(launch: Launch, outputs: list[int | None]) -> int:
    """Start ``launch`` in its own session and process group, stdin on /dev/null and
    stdout/stderr on ``outputs`` (None: the daemon's own); its pid. Not waited for: the
    daemon's reaper reaps it."""
    return _spawn_with_listeners(launch, outputs) if launch.listen_fds else _spawn(launch, outputs)


def _spawn(launch: Launch, outputs: list[int | None]) -> int:
    proc = subprocess.Popen(
        launch.argv,
        cwd=launch.cwd,
        env=launch.env,
        stdin=subprocess.DEVNULL,
        stdout=outputs[0],
        stderr=outputs[1],
        start_new_session=True,  # own session and group: a terminal's ^C reaches the daemon only
        restore_signals=True,
        close_fds=True,
        pass_fds=launch.pass_fds,
    )
    proc.returncode = 0  # the Reaper reaps it: Popen must never waitpid a reused pid
    return proc.pid


# ``sh -c`` between the spawn and the command: it sets LISTEN_PID to its own pid, which
# the exec keeps (systemd does the same in C after its fork). $1 is the working directory.
_LISTEN_SHIM = 'cd -- "$1" || exit 126; shift; LISTEN_PID=$$; export LISTEN_PID; exec "$@"'
_SIGNALS_TO_DEFAULT = frozenset({signal.SIGPIPE, signal.SIGXFSZ})  # what Popen's restore_signals resets


def _spawn_with_listeners(launch: Launch, outputs: list[int | None]) -> int:
    """Start a worker with the shared listeners at fds 3.., as systemd hands them on.

    Popen keeps passed descriptors at their own numbers, so this is posix_spawn, whose
    file actions can move them: each listener is first duplicated above the target
    range (no move then overwrites a source still to be moved), then dup2'ed to 3+i
    (which clears close-on-exec on the target only); ``pass_fds`` (a fork server's
    channel) follow the listeners. Everything else the daemon holds is
    close-on-exec (Python opens all descriptors so; start-up marks inherited strays).
    """
    _check_executable(launch)
    count = len(launch.listen_fds) + len(launch.pass_fds)
    sources = [
        fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, SD_LISTEN_FDS_START + count)
        for fd in (*launch.listen_fds, *launch.pass_fds)
    ]
    try:
        actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0)
        ]
        for target, fd in ((1, outputs[0]), (2, outputs[1])):
            if fd is not None:
                actions.append((os.POSIX_SPAWN_DUP2, fd, target))
        actions += [(os.POSIX_SPAWN_DUP2, fd, SD_LISTEN_FDS_START + i) for i, fd in enumerate(sources)]
        argv = ["/bin/sh", "-c", _LISTEN_SHIM, "sockherd-worker", str(launch.cwd), *launch.argv]
        return os.posix_spawn(
            "/bin/sh",
            argv,
            launch.env,
            file_actions=actions,
            setsid=True,
            setsigmask=(),
            setsigdef=_SIGNALS_TO_DEFAULT,
        )
    finally:
        for fd in sources:
            os.close(fd)


def _check_executable(launch: Launch) -> None:
    """What Popen would report as "could not execute", before the shim hides it as status 127."""
    program = launch.argv[0]
    if os.sep in program:
        found = os.access(launch.cwd / program, os.X_OK)
    else:
        found = shutil.which(program, path=launch.env.get("PATH", os.defpath)) is not None
    if not found:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", program)
    if not launch.cwd.is_dir():
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(launch.cwd))

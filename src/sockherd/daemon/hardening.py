"""What the daemon does to itself so that its own workers cannot read it.

Workers usually run as the daemon's user. A process of the same uid may read another's
memory and environment through /proc or ptrace, unless that other process is not
*dumpable*: ``prctl(PR_SET_DUMPABLE, 0)`` closes /proc/PID/mem, /proc/PID/environ and
ptrace to anyone without CAP_SYS_PTRACE, and keeps core dumps (which would hold the
daemon's secrets) from being written. It is reset by execve, so an upgraded image
calls it again; the workers, started with execve, stay dumpable for their own tools.
"""

from __future__ import annotations

import ctypes
import logging
import resource

log = logging.getLogger("sockherd")

PR_GET_DUMPABLE = 3  # <linux/prctl.h>
PR_SET_DUMPABLE = 4


def prctl(option: int, arg: int = 0) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    result: int = libc.prctl(option, arg, 0, 0, 0)
    if result < 0:
        raise OSError(ctypes.get_errno(), "prctl failed")
    return result


def make_undumpable() -> None:
    try:
        prctl(PR_SET_DUMPABLE, 0)
    except (OSError, AttributeError) as exc:
        log.warning("cannot make the daemon non-dumpable (%s): its workers can read its memory", exc)


def is_dumpable() -> bool | None:
    try:
        return prctl(PR_GET_DUMPABLE) != 0
    except (OSError, AttributeError):
        return None


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: the IPC server keeps up to 1,024
    connections besides the workers' descriptors, and 1,024 is a common soft default."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 65536 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit above %d: %s", soft, exc)

"""What a worker starts with: its environment and its output files.

The environment is built from an allow-list, never copied from the daemon's: a daemon
started from a deploy shell or a CI job carries credentials its workers must not see.
Output goes to the daemon's own stdout/stderr or to files opened O_APPEND and handed to
the worker directly, so a dead daemon never breaks a worker's writes.
"""

from __future__ import annotations

import errno
import os
import stat
import sys
from collections.abc import Mapping
from pathlib import Path

from sockherd.config import WorkerSpec

# Variables a worker inherits from the daemon without being named in `env`: what any
# program needs to find its tools, its home and its locale, and nothing that could
# carry the daemon's secrets.
BASE_ENV_ALLOWLIST = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "VIRTUAL_ENV",
    "JOURNAL_STREAM",
    "INVOCATION_ID",
)


def worker_environment(spec: WorkerSpec, environ: Mapping[str, str], contract: Mapping[str, str]) -> dict[str, str]:
    """Build a worker's environment from an allow-list, never by copying the daemon's."""
    allowed = set(BASE_ENV_ALLOWLIST) | set(spec.env)
    env = {k: v for k, v in environ.items() if k in allowed or k.startswith("LC_")}
    _prefer_own_virtualenv(env)
    env.update(spec.environment)
    env.update(contract)
    return env


def _prefer_own_virtualenv(env: dict[str, str]) -> None:
    """Workers find the virtualenv the daemon runs from first on PATH.

    The daemon is installed into the application's virtualenv; ``command = ["python",
    ...]`` must mean that environment's python even when nobody activated it (a
    systemd unit calling .venv/bin/sockherd, say).
    """
    if sys.prefix == sys.base_prefix:
        return
    bin_dir = os.path.dirname(sys.executable)
    path = env.get("PATH", os.defpath).split(os.pathsep)
    if not path or path[0] != bin_dir:
        env["PATH"] = os.pathsep.join([bin_dir, *(p for p in path if p != bin_dir)])
    env.setdefault("VIRTUAL_ENV", sys.prefix)


def output_tail(spec: WorkerSpec, lines: int = 10) -> list[str]:
    """The last lines of the worker's log file, for a failed start's error message."""
    path = spec.stderr or spec.stdout
    if path is None:
        return []
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            tail = f.read().decode(errors="replace")
    except OSError:
        return []
    return tail.splitlines()[-lines:]


def open_output(path: Path | None) -> int | None:
    """A worker's log file, opened O_APPEND and handed straight to the worker (a dead
    daemon never breaks its writes). Never through a symlink, and only a regular file:
    a daemon running as root must not append where a planted link points."""
    if path is None:
        return None
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd

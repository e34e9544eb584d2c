"""Atomic symlink publishing and the start-up sweep of tmp_dir.

nginx's upstream lists stable names (``app.0.sock``); each is a symlink to the unique
socket of the worker currently serving that slot. A symlink is only ever switched with
``symlink(tmp) + rename(tmp, final)``: rename(2) replaces the old link atomically, so a
connect() by nginx resolves either the old worker or the new one, never nothing.

The temporary name carries a random suffix: a fixed name left behind by a crash would
make every later ``symlink()`` fail with EEXIST and block that slot forever.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import secrets
import socket
import stat
from dataclasses import dataclass
from pathlib import Path

from sockherd.daemon.state_file import is_temp_of

log = logging.getLogger("sockherd")


def publish_symlink(link: Path, target: Path, *, relative: bool = True) -> None:
    """Point ``link`` at ``target`` atomically. Both live in the same directory."""
    pointee = target.name if relative and target.parent == link.parent else str(target)
    while True:
        tmp = link.with_name(f".{link.name}.{secrets.token_hex(4)}")
        try:
            os.symlink(pointee, tmp)
            break
        except FileExistsError:  # a 1 in 4 billion collision with a leftover: draw again
            continue
    try:
        os.rename(tmp, link)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def unpublish_symlink(link: Path) -> None:
    """Remove a published symlink (scale-down, stop, quit). Never follows it."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISLNK(os.lstat(link).st_mode):
            os.unlink(link)


def published_target(link: Path) -> Path | None:
    """The socket a published symlink points at, or None."""
    try:
        pointee = os.readlink(link)
    except OSError:
        return None
    return link.parent / pointee


def socket_is_live(path: Path, timeout: float = 0.5) -> bool:
    """True when something accepts connections on the UNIX socket at ``path``.

    A refused connect means a socket file whose server is gone: safe to remove. EAGAIN
    means a full backlog, which is a live (if busy) server.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect(str(path))
        except (BlockingIOError, TimeoutError):
            return True
        except OSError as exc:
            return exc.errno in (errno.EAGAIN,)
        return True


@dataclass(frozen=True, slots=True)
class SocketNames:
    """Recognises the names sockherd creates in tmp_dir from the ``socket_file`` pattern."""

    prefix: str
    suffix: str

    @classmethod
    def from_pattern(cls, socket_file: str) -> SocketNames:
        prefix, _, suffix = socket_file.partition("{worker}")
        return cls(prefix, suffix)

    def _match(self, name: str, middle: str) -> bool:
        return re.fullmatch(re.escape(self.prefix) + middle + re.escape(self.suffix), name) is not None

    def is_symlink_name(self, name: str) -> bool:
        return self._match(name, r"[0-9]+")

    def is_worker_socket_name(self, name: str) -> bool:
        return self._match(name, r"(?:[0-9]+|s)-[0-9a-f]{6}")

    def is_temp_name(self, name: str) -> bool:
        return (
            name.startswith(".")
            and re.fullmatch(r"\.(.+)\.[0-9a-f]{8}", name) is not None
            and (self.is_symlink_name(name[1:-9]))
        )


def sweep_tmp_dir(
    tmp_dir: Path, names: SocketNames, extra: tuple[str, ...] = (), *, state_file: str | None = None
) -> list[str]:
    """Remove what a previous run left behind in ``tmp_dir``; return the names removed.

    Only names sockherd itself creates are considered, only inside tmp_dir, and nothing
    is followed: temporary swap links always go; a published symlink goes only when
    it dangles or points at a dead socket (a live one keeps the site serving until this
    daemon publishes over it); a worker socket goes only when nobody accepts on it.
    ``extra`` names the daemon's own sockets (IPC, notify), removed when dead; a
    temporary copy of ``state_file`` that a crash left mid-write always goes.
    """
    removed: list[str] = []
    for entry in os.scandir(tmp_dir):
        name = entry.name
        try:
            mode = entry.stat(follow_symlinks=False).st_mode
        except FileNotFoundError:
            continue
        path = tmp_dir / name
        if stat.S_ISLNK(mode) and names.is_temp_name(name):
            dead = True
        elif stat.S_ISLNK(mode) and names.is_symlink_name(name):
            target = published_target(path)
            dead = target is None or target.parent != tmp_dir or not socket_is_live(target)
        elif stat.S_ISSOCK(mode) and (names.is_worker_socket_name(name) or name in extra):
            dead = not socket_is_live(path)
        elif stat.S_ISREG(mode) and state_file is not None and is_temp_of(name, state_file):
            dead = True
        else:
            continue
        if dead:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            removed.append(name)
    if removed:
        log.info("swept %d stale entries from %s: %s", len(removed), tmp_dir, ", ".join(sorted(removed)))
    return removed


class TmpDirError(Exception):
    """tmp_dir cannot be used safely; the message says why and what to do."""


def prepare_tmp_dir(tmp_dir: Path) -> None:
    """Create tmp_dir if needed and refuse one that others could tamper with.

    The IPC socket and the worker sockets live here; a directory writable by other
    users would let them plant symlinks where sockets go. Group-writable is allowed
    (the documented setup gives nginx's group access with a setgid directory).
    """
    try:
        tmp_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as exc:
        raise TmpDirError(f"tmp_dir {tmp_dir}: cannot create it: {exc.strerror}") from None
    st = os.lstat(tmp_dir)
    if stat.S_ISLNK(st.st_mode):
        st = os.stat(tmp_dir)
    if not stat.S_ISDIR(st.st_mode):
        raise TmpDirError(f"tmp_dir {tmp_dir}: not a directory")
    uid = os.getuid()
    if st.st_uid not in (uid, 0):
        raise TmpDirError(f"tmp_dir {tmp_dir}: owned by uid {st.st_uid}, not by this user (uid {uid}) or root")
    if st.st_mode & stat.S_IWOTH:
        raise TmpDirError(f"tmp_dir {tmp_dir}: writable by every user (mode {stat.S_IMODE(st.st_mode):o}); use 0750")
    if not os.access(tmp_dir, os.W_OK | os.X_OK):
        raise TmpDirError(f"tmp_dir {tmp_dir}: not writable by this user (uid {uid})")

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
import grp
import logging
import os
import pwd
import re
import secrets
import shutil
import socket
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sockherd.daemon.state_file import is_temp_of

log = logging.getLogger("sockherd")


def publish_symlink(link: Path, target: Path, *, relative: bool = True, dir_fd: int | None = None) -> None:
    """Point ``link`` at ``target`` atomically. Both live in the same directory.

    With ``dir_fd`` (the held tmp_dir), the names are resolved relative to it, never
    through the path, which another process could have redirected.
    """
    pointee = target.name if relative and target.parent == link.parent else str(target)
    name = link.name if dir_fd is not None else str(link)
    while True:
        tmp = f".{link.name}.{secrets.token_hex(4)}"
        tmp_path = tmp if dir_fd is not None else str(link.with_name(tmp))
        try:
            os.symlink(pointee, tmp_path, dir_fd=dir_fd)
            break
        except FileExistsError:  # a 1 in 4 billion collision with a leftover: draw again
            continue
    try:
        os.rename(tmp_path, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_path, dir_fd=dir_fd)
        raise


def slot_obstacle(link: Path) -> str | None:
    """What stands at a slot's name that is not a symlink (so no rename can replace it)."""
    try:
        mode = os.lstat(link).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        return None
    kind = "a directory" if stat.S_ISDIR(mode) else "a socket" if stat.S_ISSOCK(mode) else "a file"
    return f"{link} is {kind}, not a symlink sockherd made; remove it to publish slot {link.name}"


def unpublish_symlink(link: Path, *, dir_fd: int | None = None) -> None:
    """Remove a published symlink (scale-down, stop, quit). Never follows it."""
    name = link.name if dir_fd is not None else str(link)
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISLNK(os.lstat(name, dir_fd=dir_fd).st_mode):
            os.unlink(name, dir_fd=dir_fd)


def published_target(link: Path) -> Path | None:
    """The socket a published symlink points at, or None."""
    try:
        pointee = os.readlink(link)
    except OSError:
        return None
    return link.parent / pointee


def _is_socket(path: Path) -> bool:
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except OSError:
        return False


def socket_is_live(path: Path, timeout: float = 0.5) -> bool:
    """True when something accepts connections on the UNIX socket at ``path``.

    A refused connect means a socket file whose server is gone: safe to remove. EAGAIN
    means a full backlog, which is a live (if busy) server. (A socket this user may not
    connect to counts as dead here: the daemon's own sockets are its to connect to.)
    """
    return socket_state(path, timeout) is True


def socket_state(path: Path, timeout: float = 0.5) -> bool | None:
    """Whether something accepts on the UNIX socket at ``path``: True, False (refused,
    or no socket), or None when this user may not connect to it (EACCES, EPERM), which
    says nothing about the server (``sockherd doctor`` run by another user)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect(str(path))
        except (BlockingIOError, TimeoutError):
            return True  # a full backlog: live, if busy
        except OSError as exc:
            return None if exc.errno in (errno.EACCES, errno.EPERM) else exc.errno == errno.EAGAIN
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
            # Only one hop, to a socket of ours: a chain (app.5.sock -> app.5-c0ffee.sock
            # -> /elsewhere) is not something sockherd made, whatever accepts at its end.
            dead = target is None or target.parent != tmp_dir or not _is_socket(target) or not socket_is_live(target)
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


def prepare_tmp_dir(tmp_dir: Path, group: int | None = None) -> bool:
    """Create tmp_dir if needed and refuse one that others could tamper with.

    The IPC socket, the worker sockets and the published symlinks live here, and the
    daemon often runs as root. Whoever can write to tmp_dir, or to any directory above
    it, can swap a socket for a symlink, or the whole directory for one of their own,
    and receive nginx's requests. So, as OpenSSH's ``StrictModes`` does: tmp_dir itself
    must not be a symlink (it could be repointed later), must belong to this user or
    root and be writable by no one else (nginx's group needs only ``r-x``: mode 2750);
    every directory above it must belong to root or this user and be writable by no one
    else unless sticky (as /tmp is).
    """
    uid = os.getuid()
    created = not os.path.lexists(tmp_dir)
    try:
        tmp_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        if created and group is not None:  # nginx's group may traverse it; what is created inherits it
            os.chown(tmp_dir, -1, group, follow_symlinks=False)
            os.chmod(tmp_dir, 0o2750, follow_symlinks=False)  # noqa: S103 - group r-x, setgid: nginx reads
    except OSError as exc:
        raise TmpDirError(f"tmp_dir {tmp_dir}: cannot create it: {exc.strerror}") from None
    problems = tmp_dir_problems(tmp_dir, uid)
    if problems:
        raise TmpDirError(problems[0].message)
    return created


TmpDirProblemKind = Literal[
    "symlink",
    "not_a_directory",
    "owner",
    "writable_by_others",
    "writable_by_group",
    "parent_owner",
    "parent_writable",
    "not_writable",
]


@dataclass(frozen=True, slots=True)
class TmpDirProblem:
    """One reason the daemon refuses tmp_dir (``sockherd doctor`` reports each)."""

    kind: TmpDirProblemKind
    path: Path  # what to change: tmp_dir, or the directory above it
    message: str  # what the daemon says when it refuses tmp_dir for this


def tmp_dir_problems(tmp_dir: Path, uid: int) -> list[TmpDirProblem]:
    """Why a daemon running as ``uid`` refuses the existing ``tmp_dir`` (see prepare_tmp_dir),
    the reason it reports first, first; [] when it accepts it. Reads only, changes nothing."""
    st = os.lstat(tmp_dir)
    if stat.S_ISLNK(st.st_mode):
        return [
            TmpDirProblem(
                "symlink",
                tmp_dir,
                f"tmp_dir {tmp_dir}: is a symlink, which whoever owns it could repoint; "
                f"configure the real directory ({os.path.realpath(tmp_dir)}) instead",
            )
        ]
    if not stat.S_ISDIR(st.st_mode):
        return [TmpDirProblem("not_a_directory", tmp_dir, f"tmp_dir {tmp_dir}: not a directory")]
    problems: list[TmpDirProblem] = []
    if st.st_uid not in (uid, 0):
        problems.append(
            TmpDirProblem(
                "owner",
                tmp_dir,
                f"tmp_dir {tmp_dir}: owned by uid {st.st_uid}, not by this user (uid {uid}) or root; use a directory "
                f"of the daemon's own (e.g. `install -d -m 2750 -o {uid} -g <nginx group> {tmp_dir}`)",
            )
        )
    mode = stat.S_IMODE(st.st_mode)
    if st.st_mode & stat.S_IWOTH:
        problems.append(
            TmpDirProblem(
                "writable_by_others",
                tmp_dir,
                f"tmp_dir {tmp_dir}: writable by every user (mode {mode:o}); use a directory of its own with mode 2750",
            )
        )
    elif st.st_mode & stat.S_IWGRP:
        problems.append(
            TmpDirProblem(
                "writable_by_group",
                tmp_dir,
                f"tmp_dir {tmp_dir}: writable by its group (mode {mode:o}), whose members could swap sockets for "
                "symlinks; nginx's group needs only to read it: `chmod 2750` it",
            )
        )
    for parent in Path(os.path.realpath(tmp_dir)).parents:
        pst = os.stat(parent)
        if pst.st_uid not in (uid, 0):
            problems.append(
                TmpDirProblem(
                    "parent_owner",
                    parent,
                    f"tmp_dir {tmp_dir}: {parent} above it belongs to uid {pst.st_uid}, who could replace tmp_dir "
                    "with a directory of their own; put tmp_dir under a directory of root's or the daemon's user",
                )
            )
        elif pst.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not pst.st_mode & stat.S_ISVTX:
            problems.append(
                TmpDirProblem(
                    "parent_writable",
                    parent,
                    f"tmp_dir {tmp_dir}: {parent} above it is writable by others (mode {stat.S_IMODE(pst.st_mode):o}, "
                    "not sticky), who could rename tmp_dir away; put tmp_dir elsewhere, such as /run/<app>",
                )
            )
    if not _may_write(tmp_dir, st, uid):
        problems.append(
            TmpDirProblem("not_writable", tmp_dir, f"tmp_dir {tmp_dir}: not writable by this user (uid {uid})")
        )
    return problems


def _may_write(tmp_dir: Path, st: os.stat_result, uid: int) -> bool:
    """Whether ``uid`` may create entries in tmp_dir: os.access for this process (ACLs and
    all), else the mode bits as that user (its groups: owner bits, group bits, other bits)."""
    if uid == os.getuid():
        return os.access(tmp_dir, os.W_OK | os.X_OK)
    if uid == 0:
        return True
    try:
        entry = pwd.getpwuid(uid)
        groups = {entry.pw_gid, *(g.gr_gid for g in grp.getgrall() if entry.pw_name in g.gr_mem)}
    except KeyError:
        groups = set()
    shift = 6 if st.st_uid == uid else 3 if st.st_gid in groups else 0
    return st.st_mode >> shift & 0o3 == 0o3


NGINX_USERS = ("www-data", "nginx", "http")  # Debian/Ubuntu, RHEL/Alpine, Arch


def nginx_access_problem(tmp_dir: Path, group: int | None) -> str | None:
    """Why nginx's usual user (where one exists) could not reach the sockets, or None.

    nginx needs to traverse tmp_dir (x) and write to the sockets (their group gets
    ``socket_mode``): as tmp_dir's owner, in its group, or through its "other" bits.
    """
    user = next((u for u in NGINX_USERS if _exists_user(u)), None)
    if user is None or not (shutil.which("nginx") or os.path.exists("/usr/sbin/nginx")):
        return None
    entry = pwd.getpwnam(user)
    groups = {entry.pw_gid, *(g.gr_gid for g in grp.getgrall() if user in g.gr_mem)}
    st = os.stat(tmp_dir)
    if entry.pw_uid in (st.st_uid, 0):
        return None
    socket_gid = group if group is not None else st.st_gid
    traverse = (st.st_gid in groups and st.st_mode & stat.S_IXGRP) or st.st_mode & stat.S_IXOTH
    if traverse and socket_gid in groups:
        return None
    group_name = grp.getgrgid(entry.pw_gid).gr_name
    return (
        f"nginx's user {user} cannot reach the sockets in {tmp_dir} (mode {stat.S_IMODE(st.st_mode):o}, group "
        f'{_group_name(st.st_gid)}): set socket_group = "{group_name}" and let the daemon create tmp_dir, or run '
        f"`chgrp {group_name} {tmp_dir} && chmod 2750 {tmp_dir}`"
    )


def _exists_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)

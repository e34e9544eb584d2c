"""Shared listeners: sockets the daemon binds once, keeps for its whole life, and hands
to every worker the way systemd does (``LISTEN_FDS``, fds from 3).

Because the daemon holds every listener open, its kernel queue outlives any worker: a
worker that dies or is replaced leaves its pending connections to the others, nothing
is refused or reset, and nginx needs one ``server`` line (it ignores ``max_fails`` for
a single server, so its defaults are harmless).

Where a listener comes from, in order of preference:

1. **An upgrade's exec** (same pid): the descriptors cross ``execve``, named in
   ``SOCKHERD_UPGRADE``.
2. **systemd socket activation**: ``LISTEN_FDS`` given to the daemon itself; matched to
   the ``listen`` entries by address (with ``listen`` empty, every activated socket is
   a listener).
3. **A live worker of a daemon that died**: the very socket is copied out of the
   worker with ``pidfd_getfd(2)`` (found by the inode the state file recorded), so the
   queue and every connection waiting in it survive the crash. That needs ptrace
   rights over the worker (root, or the same user with Yama's ptrace_scope 0).
4. **A fresh bind**: TCP with ``SO_REUSEADDR``; a UNIX socket is created with the
   configured mode and group, replacing only a *stale* socket at that path (never a
   file or a symlink, never a socket something still accepts on).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import re
import socket
import stat
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from pathlib import Path

from sockherd._nofollow import chmod_socket

log = logging.getLogger("sockherd")

SD_LISTEN_FDS_START = 3
_SYS_PIDFD_GETFD = 438  # the same number on every Linux architecture (the generic table)
_TCP = re.compile(r"tcp://(?:\[(?P<v6>[^\]]+)\]|(?P<host>[^:/]+)):(?P<port>[0-9]+)")


class ListenerError(Exception):
    """A listener cannot be opened; the message names the address and what to do."""


@dataclass(frozen=True, slots=True)
class Listener:
    address: str  # as the config spells it: "tcp://127.0.0.1:8000", "unix:///run/app/app.sock"
    sock: socket.socket
    origin: str  # "bound", "systemd", "upgrade" or "recovered"
    file_inode: int | None = None  # a UNIX socket's file, as this daemon created it (removed at exit)

    @property
    def name(self) -> str:
        """Its ``LISTEN_FDNAMES`` entry: the address without the characters systemd forbids."""
        return re.sub(r"[^A-Za-z0-9_.\[\]/-]", "-", self.address.replace("://", "-"))[:255]

    @property
    def inode(self) -> int:
        """The socket's own inode (sockfs), as ``/proc/PID/fd`` shows it: ``socket:[N]``."""
        return os.fstat(self.sock.fileno()).st_ino

    @property
    def unix_path(self) -> Path | None:
        return Path(self.address.removeprefix("unix://")) if self.address.startswith("unix://") else None


class Listeners:
    """The daemon's shared listeners; empty when workers bind sockets of their own."""

    def __init__(self, items: Iterable[Listener] = ()) -> None:
        self.items = list(items)

    def __bool__(self) -> bool:
        return bool(self.items)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def fds(self) -> tuple[int, ...]:
        return tuple(item.sock.fileno() for item in self.items)

    @property
    def inodes(self) -> frozenset[int]:
        return frozenset(item.inode for item in self.items)

    def environment(self) -> dict[str, str]:
        """A worker's share of systemd's protocol (``LISTEN_PID`` is set at its exec)."""
        if not self.items:
            return {}
        return {"LISTEN_FDS": str(len(self.items)), "LISTEN_FDNAMES": ":".join(i.name for i in self.items)}

    def handoff(self) -> dict[str, tuple[int, bool]]:
        """For an upgrade's exec: address -> (fd, whether the daemon created the socket file,
        which it removes at exit; a systemd socket's file is systemd's)."""
        return {i.address: (i.sock.fileno(), i.file_inode is not None) for i in self.items}

    def record(self) -> list[dict[str, object]]:
        """For the state file: a daemon started after a crash finds the sockets by inode."""
        return [{"address": i.address, "inode": i.inode} for i in self.items]

    def close(self) -> None:
        """The daemon leaves: close them, and remove the UNIX socket files it created, if
        they are still the very files it created (an upgrade or a crash keeps them)."""
        for item in self.items:
            path = item.unix_path
            if path is not None and item.file_inode is not None:
                with contextlib.suppress(OSError):
                    st = os.lstat(path)
                    if stat.S_ISSOCK(st.st_mode) and st.st_ino == item.file_inode:
                        os.unlink(path)
            item.sock.close()
        self.items = []


def canonical_address(sock: socket.socket) -> str | None:
    """The ``listen`` spelling of a socket's own address; None if it is not a stream listener."""
    try:
        if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return None
        name = sock.getsockname()
    except OSError:
        return None
    if sock.family == socket.AF_UNIX:
        return f"unix://{name}" if isinstance(name, str) and name and not name.startswith("\0") else None
    if sock.family == socket.AF_INET:
        return f"tcp://{name[0]}:{name[1]}"
    if sock.family == socket.AF_INET6:
        return f"tcp://[{name[0]}]:{name[1]}"
    return None


def _resolved(address: str) -> set[str]:
    """Every canonical spelling a configured address may bind to (a host name resolves)."""
    match = _TCP.fullmatch(address)
    if match is None:
        return {address}
    host, port = match["v6"] or match["host"], int(match["port"])
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return {address}
    out = {address}
    for family, _, _, _, sockaddr in infos:
        out.add(f"tcp://[{sockaddr[0]}]:{port}" if family == socket.AF_INET6 else f"tcp://{sockaddr[0]}:{port}")
    return out


def take_activated(environ: MutableMapping[str, str]) -> list[socket.socket]:
    """The sockets systemd (or ``systemd-socket-activate``) passed to this process.

    As ``sd_listen_fds(1)``: only when ``LISTEN_PID`` is this process; the variables are
    removed (workers get their own), the descriptors made close-on-exec.
    """
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
        pid = int(environ.get("LISTEN_PID", "0"))
    except ValueError:
        return []
    for name in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
        environ.pop(name, None)
    if pid != os.getpid() or count <= 0:
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + count):
        try:
            os.set_inheritable(fd, False)
            sockets.append(socket.socket(fileno=fd))
        except OSError as exc:
            log.warning("socket activation: descriptor %d is unusable (%s); ignored", fd, exc.strerror)
    return sockets


def close_on_exec_strays() -> None:
    """Mark every descriptor above stderr close-on-exec.

    Workers with shared listeners are started with posix_spawn, which (unlike Popen's
    ``close_fds``) closes only close-on-exec descriptors. Python opens everything so;
    what is left is what this process inherited (a leaky parent's, an upgrade's, socket
    activation's), so one sweep at start-up keeps all of it out of the workers.
    """
    for entry in os.listdir("/proc/self/fd"):
        fd = int(entry)
        if fd > 2:
            with contextlib.suppress(OSError):
                os.set_inheritable(fd, False)


def open_listeners(
    addresses: Iterable[str],
    *,
    backlog: int,
    mode: int,
    gid: int | None,
    inherited: Mapping[str, tuple[int, bool]] | None = None,
    activated: Iterable[socket.socket] = (),
    recorded: Mapping[str, int] | None = None,
    holders: Iterable[int] = (),
) -> Listeners:
    """Open every configured listener, preferring a socket that already exists (see above).

    ``inherited``: address -> (fd, owns its file) from an upgrade's exec. ``recorded``: address -> inode
    from a dead daemon's state file, and ``holders`` the pids of its workers still alive.
    """
    wanted = list(addresses)
    spare = list(activated)
    items: list[Listener] = []
    try:
        if not wanted:  # socket activation decides: every activated socket is a listener
            for address, (fd, owned) in (inherited or {}).items():  # ... as it did before an upgrade
                items.append(Listener(address, socket.socket(fileno=fd), "upgrade", _socket_file(address, owned)))
            for sock in spare:
                found = canonical_address(sock)
                if found is None:
                    log.warning("socket activation: fd %d is not a listening stream socket; ignored", sock.fileno())
                    sock.close()
                    continue
                items.append(Listener(found, sock, "systemd"))
            return Listeners(items)
        for address in wanted:
            found_or_bound = _open_one(
                address,
                backlog=backlog,
                mode=mode,
                gid=gid,
                inherited=inherited or {},
                activated=spare,
                recorded=recorded or {},
                holders=list(holders),
            )
            items.append(found_or_bound)
        for sock in spare:
            log.warning(
                "socket activation: %s matches no `listen` entry; closed", canonical_address(sock) or sock.fileno()
            )
            sock.close()
        return Listeners(items)
    except BaseException:
        for item in items:
            item.sock.close()
        raise


def _open_one(
    address: str,
    *,
    backlog: int,
    mode: int,
    gid: int | None,
    inherited: Mapping[str, tuple[int, bool]],
    activated: list[socket.socket],
    recorded: Mapping[str, int],
    holders: list[int],
) -> Listener:
    if address in inherited:
        fd, owned = inherited[address]
        return Listener(address, socket.socket(fileno=fd), "upgrade", _socket_file(address, owned))
    spellings = _resolved(address)
    for sock in activated:
        if canonical_address(sock) in spellings:
            activated.remove(sock)
            return Listener(address, sock, "systemd")
    inode = recorded.get(address)
    if inode is not None and holders:
        recovered = recover_from_workers(inode, holders)
        if recovered is not None:
            return Listener(address, recovered, "recovered", _socket_file(address))
    sock = bind(address, backlog, mode, gid)
    return Listener(address, sock, "bound", _socket_file(address))


def _socket_file(address: str, owned: bool = True) -> int | None:
    """The inode of a UNIX listener's file, which a daemon (this one, or the one it took
    over from) created; removed at exit only if it is still that file."""
    if not owned or not address.startswith("unix://"):
        return None
    try:
        st = os.lstat(address.removeprefix("unix://"))
    except OSError:
        return None
    return st.st_ino if stat.S_ISSOCK(st.st_mode) else None


def bind(address: str, backlog: int, mode: int, gid: int | None) -> socket.socket:
    """A fresh listening socket at ``address`` (ListenerError naming the fix if it cannot be)."""
    if address.startswith("unix://"):
        return _bind_unix(Path(address.removeprefix("unix://")), backlog, mode, gid)
    match = _TCP.fullmatch(address)
    if match is None:
        raise ListenerError(f"listen: {address!r} is not an address this daemon can bind")
    host, port = match["v6"] or match["host"], int(match["port"])
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except OSError as exc:
        raise ListenerError(f"listen: cannot resolve {address}: {exc}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # [::] is v6; 0.0.0.0 is its own entry
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        hint = ""
        if exc.errno == errno.EADDRINUSE:
            hint = " (another process holds it: `ss -ltnp` names it)"
        elif exc.errno == errno.EACCES:
            hint = " (ports below 1024 need root or CAP_NET_BIND_SERVICE; or use socket activation)"
        raise ListenerError(f"listen: cannot bind {address}: {exc.strerror}{hint}") from None
    return sock


def _bind_unix(path: Path, backlog: int, mode: int, gid: int | None) -> socket.socket:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ListenerError(f"listen: cannot use unix://{path}: {exc.strerror}") from None
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenerError(
                f"listen: unix://{path} exists and is not a socket; refusing to touch it (remove it if it is yours)"
            )
        if _accepts(path):
            raise ListenerError(
                f"listen: something already accepts connections on unix://{path} "
                "(another daemon? `ss -xlp` names it); refusing to take its address"
            )
        os.unlink(path)  # a stale socket: nobody accepts on it
        log.info("removed the stale socket unix://%s", path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # owner-only until the mode and group below: never wider than asked
    try:
        sock.bind(str(path))
        chmod_socket(path, mode, gid)
        sock.listen(backlog)
    except PermissionError as exc:
        sock.close()
        why = "the daemon's user must be a member of socket_group" if exc.errno == errno.EPERM else exc.strerror
        raise ListenerError(f"listen: cannot create unix://{path}: {why}") from None
    except OSError as exc:
        sock.close()
        raise ListenerError(f"listen: cannot create unix://{path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    return sock


def _accepts(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def recover_from_workers(inode: int, pids: Iterable[int]) -> socket.socket | None:
    """Copy the listening socket with ``inode`` out of the first worker that holds it."""
    for pid in pids:
        fd = _fd_with_inode(pid, inode)
        if fd is None:
            continue
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            mine = pidfd_getfd(pidfd, fd)
        except OSError as exc:
            log.warning(
                "cannot take the listener back from worker pid %d (pidfd_getfd: %s)%s",
                pid,
                exc.strerror,
                ": it needs ptrace rights over the worker (root, or Yama ptrace_scope 0)"
                if exc.errno == errno.EPERM
                else "",
            )
            continue
        finally:
            os.close(pidfd)
        if os.fstat(mine).st_ino != inode:  # the worker closed and reused that number meanwhile
            os.close(mine)
            continue
        return socket.socket(fileno=mine)
    return None


def _fd_with_inode(pid: int, inode: int) -> int | None:
    target = f"socket:[{inode}]"
    try:
        entries = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return None
    for entry in entries:
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/{pid}/fd/{entry}") == target:
                return int(entry)
    return None


def pidfd_getfd(pidfd: int, fd: int) -> int:
    """``pidfd_getfd(2)`` (Linux 5.6): a duplicate of another process's descriptor, close-on-exec."""
    libc = ctypes.CDLL(None, use_errno=True)
    result = int(libc.syscall(_SYS_PIDFD_GETFD, pidfd, fd, 0))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


__all__ = [
    "Listener",
    "ListenerError",
    "Listeners",
    "bind",
    "canonical_address",
    "close_on_exec_strays",
    "open_listeners",
    "pidfd_getfd",
    "recover_from_workers",
    "take_activated",
]

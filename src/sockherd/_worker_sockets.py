"""The sockets a worker serves on: its own (``SOCKHERD_SOCKET``), or the daemon's shared
listeners (``LISTEN_FDS``). Behind :func:`sockherd.worker.bind_socket` and
:func:`sockherd.worker.listeners`, which document them."""

from __future__ import annotations

import os
import socket
import threading

from sockherd._nofollow import chmod_socket
from sockherd._worker_state import Environment

_umask_lock = threading.Lock()


_listeners: list[socket.socket] | None = None
_listeners_lock = threading.Lock()


def listeners(env: Environment) -> list[socket.socket]:
    """The inherited ``LISTEN_FDS`` sockets, created once (see ``worker.listeners``)."""
    global _listeners
    with _listeners_lock:
        if _listeners is None:
            found = []
            for fd in range(3, 3 + env.listen_fds):
                os.set_inheritable(fd, False)
                found.append(socket.socket(fileno=fd))
            _listeners = found
        return list(_listeners)


def listener_names(env: Environment) -> list[str]:
    """``LISTEN_FDNAMES``, one per listener."""
    return list(env.listen_names)


def bind_socket(env: Environment) -> socket.socket:
    """Bind ``SOCKHERD_SOCKET`` with its mode and backlog (see ``worker.bind_socket``)."""
    path = env.socket_path
    if path is None and env.listen_fds:
        raise RuntimeError(
            "sockherd.worker.bind_socket(): this worker serves on the daemon's shared listeners (`listen`), "
            "not a socket of its own: serve on sockherd.worker.listeners()"
        )
    if path is None:
        raise RuntimeError(
            "sockherd.worker.bind_socket(): SOCKHERD_SOCKET is not set, so this process is not a sockherd "
            "worker; bind your own socket (or check worker.socket_path first)"
        )
    mode = env.socket_mode
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            os.fchmod(sock.fileno(), mode)
        except OSError:
            with _umask_lock:
                old = os.umask(0o777 & ~mode)
                try:
                    _bind(sock, path)
                finally:
                    os.umask(old)
        else:
            _bind(sock, path)
        chmod_socket(path, mode)  # never through a symlink swapped in since the bind
        sock.listen(env.backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind(sock: socket.socket, path: str) -> None:
    try:
        sock.bind(path)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot bind the worker socket {path}: {exc.strerror}") from exc

"""The library inside a worker: ``from sockherd import worker``.

The module is the singleton. At import it reads the environment the daemon set
(``SOCKHERD_*``); the values are exposed as module attributes (``socket_path``, ``id``,
``index``, ``ipc_path``, ``suspended``, ``socket_mode``, ``backlog``) and the functions
below report to the daemon and react to it.

Without sockherd (no ``SOCKHERD_*`` variables) ``socket_path`` is None and the reporting
functions are no-ops, so the same app also runs standalone; ``report_online()`` still
sends ``READY=1`` to systemd when ``NOTIFY_SOCKET`` is set, and shutdown hooks still run
at exit, because an app's clean-up should not depend on who started it.

Threads and asyncio are both first-class: every function is a plain call that records
state and hands frames to one background thread (see :mod:`sockherd._worker_ipc`), so
it is safe from any thread and never blocks an event loop. That thread starts at import
when ``SOCKHERD_IPC`` is set, not on first use: the daemon must be able to send
``shutdown`` to a worker that never reports anything (``ready = "socket"``), and the
early hello tells it this worker speaks the protocol. Standalone, no thread starts.
"""

from __future__ import annotations

import asyncio
import atexit
import inspect
import logging
import os
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from sockherd._worker_ipc import IpcLink

__all__ = [
    "Environment",
    "backlog",
    "bind_socket",
    "id",
    "index",
    "ipc_path",
    "on_shutdown",
    "read_environment",
    "report_broken",
    "report_online",
    "run_shutdown_hooks",
    "run_shutdown_hooks_async",
    "set_shutdown_handler",
    "socket_mode",
    "socket_path",
    "suspended",
]

log = logging.getLogger("sockherd.worker")

DEFAULT_SOCKET_MODE = 0o660
EXIT_FLUSH_TIMEOUT = 1.0  # seconds at exit to deliver what was reported just before

HookT = TypeVar("HookT", bound=Callable[[], object])


def _kernel_somaxconn() -> int:
    try:
        with open("/proc/sys/net/core/somaxconn", encoding="ascii") as f:
            return int(f.read())
    except (OSError, ValueError):
        return socket.SOMAXCONN


@dataclass(frozen=True, slots=True)
class Environment:
    """What the daemon told this worker. All None/defaults when running standalone."""

    socket_path: str | None = None
    worker_id: str | None = None
    index: int | None = None  # None for a standby (and standalone)
    ipc_path: str | None = None
    suspended: bool = False
    socket_mode: int = DEFAULT_SOCKET_MODE
    backlog: int = socket.SOMAXCONN
    notify_socket: str | None = None


def read_environment(environ: Mapping[str, str]) -> Environment:
    """Parse the worker environment. A malformed value raises ValueError naming the variable.

    Failing loudly is deliberate: the daemon always sets valid values, so a bad one is a
    hand-made mistake, and guessing (say, a wider socket mode) would hide it.
    """

    def get(name: str) -> str | None:
        return environ.get(name) or None  # empty means unset

    index_text = get("SOCKHERD_INDEX")
    index: int | None = None
    if index_text is not None and index_text != "standby":
        index = _parse(index_text, "SOCKHERD_INDEX", "an integer or 'standby'", int)
        if index < 0:
            raise ValueError(f"SOCKHERD_INDEX must not be negative, got {index_text!r}")
    mode_text = get("SOCKHERD_SOCKET_MODE")
    mode = DEFAULT_SOCKET_MODE
    if mode_text is not None:
        mode = _parse(mode_text, "SOCKHERD_SOCKET_MODE", "an octal mode such as 660", lambda s: int(s, 8))
        if not 0 <= mode <= 0o777:
            raise ValueError(f"SOCKHERD_SOCKET_MODE must be between 000 and 777, got {mode_text!r}")
    backlog_text = get("SOCKHERD_BACKLOG")
    backlog = _kernel_somaxconn()
    if backlog_text is not None:
        backlog = _parse(backlog_text, "SOCKHERD_BACKLOG", "a positive integer", int)
        if backlog < 1:
            raise ValueError(f"SOCKHERD_BACKLOG must be a positive integer, got {backlog_text!r}")
    suspended_text = get("SOCKHERD_SUSPENDED") or "0"
    if suspended_text not in ("0", "1"):
        raise ValueError(f"SOCKHERD_SUSPENDED must be 0 or 1, got {suspended_text!r}")
    env = Environment(
        socket_path=get("SOCKHERD_SOCKET"),
        worker_id=get("SOCKHERD_WORKER_ID"),
        index=index,
        ipc_path=get("SOCKHERD_IPC"),
        suspended=suspended_text == "1",
        socket_mode=mode,
        backlog=backlog,
        notify_socket=get("NOTIFY_SOCKET"),
    )
    if env.ipc_path is not None and env.worker_id is None:
        raise ValueError("SOCKHERD_IPC is set but SOCKHERD_WORKER_ID is not: the daemon could not tell who is calling")
    return env


def _parse(text: str, name: str, expected: str, convert: Callable[[str], int]) -> int:
    try:
        return convert(text)
    except ValueError:
        raise ValueError(f"{name} must be {expected}, got {text!r}") from None


def _default_shutdown_handler() -> None:
    # Every server already drains on SIGTERM, so this works without any integration.
    os.kill(os.getpid(), signal.SIGTERM)


def _sd_notify(address: str, state: bytes) -> None:
    if address.startswith("@"):  # abstract namespace, as systemd spells it
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.setblocking(False)  # a full receiver must not stall the caller
            sock.sendto(state, address)
    except OSError as exc:
        log.warning("sockherd: sd_notify to %s failed: %s", address, exc)


class _Worker:
    """The state behind the module-level API."""

    def __init__(self, env: Environment) -> None:
        self.env = env
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._hooks: list[Callable[[], object]] = []
        self._shutdown_handler: Callable[[], None] | None = None
        self._shutdown_requested = False
        self._ready_notified = False
        self.ipc: IpcLink | None = None
        if env.ipc_path is not None and env.worker_id is not None:
            self.ipc = IpcLink(env.ipc_path, env.worker_id, self.handle_shutdown_message)

    def report_online(self) -> None:
        if self.ipc is not None:
            self.ipc.report_online()
            return
        if self.env.notify_socket is None:
            return
        with self._lock:
            if self._ready_notified:
                return
            self._ready_notified = True
        _sd_notify(self.env.notify_socket, b"READY=1")

    def handle_shutdown_message(self) -> None:
        """Called by the IPC thread on ``shutdown``; the handler runs once however often it comes."""
        with self._lock:
            if self._shutdown_requested:
                return
            self._shutdown_requested = True
            handler = self._shutdown_handler or _default_shutdown_handler
        handler()

    def set_shutdown_handler(self, fn: Callable[[], None] | None) -> None:
        with self._lock:
            self._shutdown_handler = fn

    def add_hook(self, fn: Callable[[], object]) -> None:
        with self._lock:
            self._hooks.append(fn)

    def next_hook(self) -> Callable[[], object] | None:
        # One at a time, so that hooks left behind by a cancelled run still run at exit.
        with self._lock:
            return self._hooks.pop(0) if self._hooks else None

    def at_exit(self) -> None:
        if os.getpid() != self._pid:  # a forked child exiting: not this worker's shutdown
            return
        run_shutdown_hooks()
        if self.ipc is not None:
            self.ipc.flush(EXIT_FLUSH_TIMEOUT)

    def after_fork_in_child(self) -> None:
        self._lock = threading.Lock()
        if self.ipc is not None:
            self.ipc.after_fork_in_child()


# -- the module's state, read once at import ----------------------------------------

_env = read_environment(os.environ)
_worker = _Worker(_env)

socket_path: str | None = _env.socket_path
"""Path this worker must bind (``SOCKHERD_SOCKET``); None when running standalone."""
id: str | None = _env.worker_id  # shadows the builtin here only; it is the documented name
"""This worker's id (``SOCKHERD_WORKER_ID``)."""
index: int | None = _env.index
"""The slot this worker serves (``SOCKHERD_INDEX``); None for a standby or standalone."""
ipc_path: str | None = _env.ipc_path
"""The daemon's IPC socket (``SOCKHERD_IPC``)."""
suspended: bool = _env.suspended
"""Started suspended (``SOCKHERD_SUSPENDED=1``): ready, but holding work until resumed."""
socket_mode: int = _env.socket_mode
"""Permission bits for the worker socket (``SOCKHERD_SOCKET_MODE``, octal)."""
backlog: int = _env.backlog
"""``listen()`` backlog for the worker socket (``SOCKHERD_BACKLOG``; default: somaxconn)."""

atexit.register(_worker.at_exit)
os.register_at_fork(after_in_child=_worker.after_fork_in_child)
if _worker.ipc is not None:
    _worker.ipc.start()


# -- the API -------------------------------------------------------------------------


def report_online() -> None:
    """Tell the daemon this worker is ready to serve. Idempotent; never blocks for long.

    Under sockherd the frame goes through the IPC thread (and again after every
    reconnect, since a re-executed daemon needs it). Without ``SOCKHERD_IPC`` but with
    ``NOTIFY_SOCKET`` (plain systemd), it sends ``READY=1`` instead.
    """
    _worker.report_online()


def report_broken(reason: str) -> None:
    """Ask to be replaced. The worker keeps serving until its replacement is published."""
    if _worker.ipc is not None:
        _worker.ipc.report_broken(str(reason))


def on_shutdown(fn: HookT) -> HookT:
    """Register a shutdown hook (sync or async); usable as a decorator.

    Hooks run once each, in registration order, after the server has drained: the
    uvicorn runner runs them itself; otherwise they run at interpreter exit.
    """
    _worker.add_hook(fn)
    return fn


async def run_shutdown_hooks_async() -> None:
    """Run the hooks not yet run. Exceptions are logged; the remaining hooks still run."""
    while (hook := _worker.next_hook()) is not None:
        try:
            result = hook()
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("sockherd: shutdown hook %s failed", _name(hook))


def run_shutdown_hooks() -> None:
    """Synchronous :func:`run_shutdown_hooks_async`: async hooks run in ``asyncio.run``.

    Called from a thread that runs an event loop, async hooks run on a short-lived
    thread of their own, since that loop cannot be re-entered.
    """
    while (hook := _worker.next_hook()) is not None:
        try:
            result = hook()
            if inspect.isawaitable(result):
                _await_blocking(result)
        except Exception:
            log.exception("sockherd: shutdown hook %s failed", _name(hook))


def set_shutdown_handler(fn: Callable[[], None] | None) -> None:
    """Choose what a ``shutdown`` message from the daemon does (None: the default).

    The default sends this process SIGTERM, on which every server already drains. The
    handler runs on the IPC thread, once; it must only trigger the shutdown (set a flag,
    ``loop.call_soon_threadsafe``), not perform it.
    """
    _worker.set_shutdown_handler(fn)


_umask_lock = threading.Lock()


def bind_socket() -> socket.socket:
    """Create the listening socket at :data:`socket_path`, with :data:`socket_mode` and :data:`backlog`.

    The mode holds from the first instant: on Linux the socket inode's mode is set with
    ``fchmod`` before ``bind`` (the file is created with it, masked by the umask), then
    the file is chmod-ed to the exact mode. That avoids changing the process-wide umask,
    which would race with other threads creating files; elsewhere the umask is used.
    The backlog is explicit because a full UNIX backlog makes nginx fail at once (EAGAIN).
    """
    path = _env.socket_path
    if path is None:
        raise RuntimeError(
            "sockherd.worker.bind_socket(): SOCKHERD_SOCKET is not set, so this process is not a sockherd "
            "worker; bind your own socket (or check worker.socket_path first)"
        )
    mode = _env.socket_mode
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
        os.chmod(path, mode)
        sock.listen(_env.backlog)
    except BaseException:
        sock.close()
        raise
    return sock


def _bind(sock: socket.socket, path: str) -> None:
    try:
        sock.bind(path)
    except OSError as exc:
        raise OSError(exc.errno, f"cannot bind the worker socket {path}: {exc.strerror}") from exc


def _name(fn: Callable[..., object]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _await_blocking(awaitable: Awaitable[Any]) -> None:
    async def wait() -> None:
        await awaitable

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(wait())
        return
    failure: list[BaseException] = []

    def target() -> None:
        try:
            asyncio.run(wait())
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, name="sockherd-hook")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]

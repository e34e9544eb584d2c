"""The library inside a worker: ``from sockherd import worker``.

The module is the singleton. At import it reads the environment the daemon set
(``SOCKHERD_*``); the values are exposed as module attributes (``socket_path``, ``id``,
``index``, ``ipc_path``, ``suspended``, ``socket_mode``, ``backlog``) and the functions
below report to the daemon and react to it. Two of them are live: ``suspended`` and
``index`` change when the daemon resumes the worker (see :func:`wait_resumed`).

Without sockherd (no ``SOCKHERD_*`` variables) ``socket_path`` is None and the reporting
functions are no-ops, so the same app also runs standalone; ``report_online()`` still
sends ``READY=1`` to systemd when ``NOTIFY_SOCKET`` is set, and shutdown hooks still run
at exit, because an app's clean-up should not depend on who started it. A standalone
app is never suspended.

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
from collections.abc import AsyncIterator, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from sockherd import _worker_sockets as _sockets
from sockherd._worker_ipc import IpcLink
from sockherd._worker_messages import Dispatcher, Reply, RequestFailed, replies_of, wait_replies
from sockherd._worker_state import DEFAULT_SOCKET_MODE as _DEFAULT_SOCKET_MODE
from sockherd._worker_state import (
    Environment,
    Resumed,
    ResumeState,
    hook_name,
    read_environment,
    run_blocking,
    run_resume_hook,
)

__all__ = [
    "Environment",
    "Reply",
    "RequestFailed",
    "backlog",
    "backlog_drained",
    "bind_socket",
    "id",
    "index",
    "ipc_path",
    "listener_names",
    "listeners",
    "on_fork",
    "on_message",
    "on_resume",
    "on_shutdown",
    "on_suspend",
    "read_environment",
    "report_broken",
    "report_online",
    "request",
    "request_async",
    "request_handler",
    "resumed",
    "run_shutdown_hooks",
    "run_shutdown_hooks_async",
    "send_message",
    "set_shutdown_handler",
    "set_suspend_handler",
    "socket_mode",
    "socket_path",
    "suspended",
    "wait_resumed",
    "wait_resumed_async",
]

log = logging.getLogger("sockherd.worker")

DEFAULT_SOCKET_MODE = _DEFAULT_SOCKET_MODE  # the mode without SOCKHERD_SOCKET_MODE
EXIT_FLUSH_TIMEOUT = 1.0  # seconds at exit to deliver what was reported just before

HookT = TypeVar("HookT", bound=Callable[[], object])
MessageHandlerT = TypeVar("MessageHandlerT", bound=Callable[[str, Any], object])
RequestHandlerT = TypeVar("RequestHandlerT", bound=Callable[[Any], object])


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

    def __init__(self, env: Environment, *, preloading: bool = False) -> None:
        self.env = env
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._hooks: list[Callable[[], object]] = []
        self._shutdown_handler: Callable[[], None] | None = None
        self._suspend_handler: Callable[[bool], None] | None = None
        self._suspend_hooks: list[tuple[Callable[[], object], asyncio.AbstractEventLoop | None]] = []
        self._shutdown_requested = False
        self.backlog_drained = False
        self._ready_notified = False
        self._fork_hooks: list[Callable[[], object]] = []
        self._fork_hooks_ran = (0, 0)  # (pid, how many of the hooks ran in it)
        self.messages = Dispatcher(self._send_frame)
        self.ipc = self._link_for(env)
        if preloading:
            # The fork server of a preloaded generation (sockherd.preload): resume hooks
            # registered at import belong to the workers, which run them when they start.
            self.resume_state = ResumeState(suspended=True, index=None)
        else:
            self.resume_state = ResumeState(suspended=env.suspended and self.ipc is not None, index=env.index)

    def _link_for(self, env: Environment) -> IpcLink | None:
        if env.ipc_path is not None and env.worker_id is not None:
            return IpcLink(
                env.ipc_path,
                env.worker_id,
                self.handle_shutdown_message,
                self.handle_resume_message,
                on_message=self.messages.on_message,
                on_request=self.messages.on_request,
                on_suspend=self.handle_suspend_message,
            )
        if env.suspended:
            # Only the daemon's resume ends a suspension: without a link to it, holding
            # every request would be holding them forever.
            log.warning("sockherd: SOCKHERD_SUSPENDED=1 without SOCKHERD_IPC: nothing could resume this worker")
        return None

    def become(self, env: Environment) -> None:
        """In a worker forked from the fork server: take this worker's environment. What the
        app registered at import (hooks, handlers) stays; the resume hooks run now unless
        the worker starts suspended."""
        self.env = env
        self._pid = os.getpid()
        self.ipc = self._link_for(env)
        self.resume_state.begin(suspended=env.suspended and self.ipc is not None, index=env.index)

    def add_fork_hook(self, fn: Callable[[], object]) -> None:
        with self._lock:
            self._fork_hooks.append(fn)

    def run_fork_hooks(self) -> None:
        """Each hook once per process: the fork point runs those registered before it, a
        server that loads the app later (the uvicorn runner) the ones the app added."""
        with self._lock:
            pid, done = self._fork_hooks_ran
            start = done if pid == os.getpid() else 0
            hooks = self._fork_hooks[start:]
            self._fork_hooks_ran = (os.getpid(), len(self._fork_hooks))
        for hook in hooks:
            hook()

    def _send_frame(self, frame: bytes) -> None:
        if self.ipc is not None:
            self.ipc.send_frame(frame)

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

    def handle_shutdown_message(self, backlog_drained: bool = False) -> None:
        """Called by the IPC thread on ``shutdown``; the handler runs once however often it comes.

        A suspended worker is resumed first (its resume hooks run too). Its held
        requests are requests nginx already sent to it, and a staged shutdown finishes
        accepted work: a rollback, for one, retires a generation that was started
        suspended and never resumed, and dropping what it holds would fail every one
        of those requests. Resumed, the held requests become in-flight ones, which the
        drain then waits for.
        """
        with self._lock:
            if self._shutdown_requested:
                return
            self._shutdown_requested = True
            self.backlog_drained = backlog_drained
            handler = self._shutdown_handler or _default_shutdown_handler
        release = self.resume_state.resume_deferred()
        if release is not None:
            log.info("sockherd: shutdown while suspended: resumed first, so that held requests are served")
        handler()
        if release is not None:
            release()  # after the handler: the server knows it is shutting down before it answers them

    def handle_suspend_message(self) -> None:
        """Called by the IPC thread on ``suspend``: the daemon keeps this worker for a
        rollback, out of traffic. Requests still arriving (on keep-alive connections nginx
        opened before) are served, not held; the server is asked to close those
        connections gracefully, and the on_suspend hooks pause background work."""
        if not self.resume_state.park():
            return
        log.info("sockherd: kept out of traffic for a rollback (suspend)")
        with self._lock:
            handler, hooks = self._suspend_handler, list(self._suspend_hooks)
        if handler is not None:
            try:
                handler(True)
            except Exception:
                log.exception("sockherd: the suspend handler failed")
        for hook, loop in hooks:
            run_resume_hook(hook, loop)

    def handle_resume_message(self, index: int | None) -> None:
        """Called by the IPC thread on ``resume``; ``index`` is set when a standby is promoted."""
        was_parked = self.resume_state.parked
        if self.resume_state.resume(index):
            log.info("sockherd: resumed (index %s)", self.resume_state.index)
        if was_parked:
            with self._lock:
                handler = self._suspend_handler
            if handler is not None:
                try:
                    handler(False)  # back in service (a rollback)
                except Exception:
                    log.exception("sockherd: the suspend handler failed")

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
        self.messages.after_fork_in_child()
        self.resume_state.after_fork_in_child()
        if self.ipc is not None:
            self.ipc.after_fork_in_child()


# -- the module's state: read once at import, but for index and suspended -------------

_env = read_environment(os.environ)
_worker = _Worker(_env, preloading=bool(os.environ.get("SOCKHERD_PRELOAD_FD")))

socket_path: str | None = _env.socket_path
"""Path this worker must bind (``SOCKHERD_SOCKET``); None when running standalone."""
id: str | None = _env.worker_id  # shadows the builtin here only; it is the documented name
"""This worker's id (``SOCKHERD_WORKER_ID``)."""
ipc_path: str | None = _env.ipc_path
"""The daemon's IPC socket (``SOCKHERD_IPC``)."""
# `index` and `suspended` are live (a resume changes them), so they are not module
# globals but answers of __getattr__ below; the bare annotations give type checkers
# their types. Read them as `worker.index`: `from sockherd.worker import index` copies
# the value of the moment, as any from-import does.
index: int | None
"""The slot this worker serves (``SOCKHERD_INDEX``, or the ``resume`` that promoted it); None for a standby."""
suspended: bool
"""True until the daemon resumes a worker started with ``SOCKHERD_SUSPENDED=1``; always False standalone."""
resumed: Resumed = Resumed(_worker.resume_state)
"""``await worker.resumed`` returns once the worker is resumed (at once if it is not suspended), in any event loop."""
socket_mode: int = _env.socket_mode
"""Permission bits for the worker socket (``SOCKHERD_SOCKET_MODE``, octal)."""
backlog: int = _env.backlog
"""``listen()`` backlog for the worker socket (``SOCKHERD_BACKLOG``; default: somaxconn)."""

if not TYPE_CHECKING:  # hidden from type checkers, which would type every misspelt attribute as its result

    def __getattr__(name: str) -> object:
        if name == "index":
            return _worker.resume_state.index
        if name == "suspended":
            return _worker.resume_state.suspended
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

    def __dir__() -> list[str]:
        return sorted([*globals(), "index", "suspended"])


atexit.register(_worker.at_exit)
os.register_at_fork(after_in_child=_worker.after_fork_in_child)
if _worker.ipc is not None:
    _worker.ipc.start()


def _become_forked_worker() -> None:
    """Called by :mod:`sockherd.preload` in a worker forked from a preloaded generation's
    fork server, once its environment is a worker's: re-read it, start the link to the
    daemon, run the resume hooks (unless suspended), then the ``on_fork`` hooks."""
    global _env, socket_path, id, ipc_path, socket_mode, backlog
    _env = read_environment(os.environ)
    _worker.become(_env)
    socket_path, id, ipc_path = _env.socket_path, _env.worker_id, _env.ipc_path
    socket_mode, backlog = _env.socket_mode, _env.backlog
    if _worker.ipc is not None:
        _worker.ipc.start()
    _worker.run_fork_hooks()


def _run_fork_hooks() -> None:
    """Without preload, where a fork would have been: :func:`sockherd.preload.fork_point`
    (for the app imported before it) and the uvicorn runner once it has loaded the app
    (uvicorn imports it inside its loop). Once per process, so that the same app works
    both ways."""
    _worker.run_fork_hooks()


# -- the API -------------------------------------------------------------------------


def report_online() -> None:
    """Tell the daemon this worker is ready to serve. Idempotent; never blocks for long.

    Under sockherd the frame goes through the IPC thread (and again after every
    reconnect, since a re-executed daemon needs it). Without ``SOCKHERD_IPC`` but with
    ``NOTIFY_SOCKET`` (plain systemd), it sends ``READY=1`` instead.
    """
    _worker.report_online()


def on_fork(fn: HookT) -> HookT:
    """Register a hook (sync or async) run in each worker as it starts: right after the
    fork under ``preload = true``, at :func:`sockherd.preload.fork_point` otherwise (the
    uvicorn runner calls it), before the server starts. The place for what must not be
    shared between processes: open database pools and client connections here, start
    threads here (a thread started while importing does not exist in a forked worker).
    A hook that raises stops the worker (it exits with the traceback in its log).

    Plain functions only: under preload they run before the server's event loop exists,
    so an async client (an asyncpg or redis.asyncio pool) made here would belong to no
    loop that serves; create those in the app's startup (ASGI lifespan) instead."""
    if inspect.iscoroutinefunction(fn):
        raise TypeError(
            f"worker.on_fork({hook_name(fn)}): an async function; on_fork hooks run before the server's event "
            "loop exists: open async clients in the app's startup (lifespan) instead"
        )
    _worker.add_fork_hook(fn)
    return fn


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
            log.exception("sockherd: shutdown hook %s failed", hook_name(hook))


def run_shutdown_hooks() -> None:
    """Synchronous :func:`run_shutdown_hooks_async`: async hooks run in ``asyncio.run``.

    Called from a thread that runs an event loop, async hooks run on a short-lived
    thread of their own, since that loop cannot be re-entered.
    """
    while (hook := _worker.next_hook()) is not None:
        try:
            result = hook()
            if inspect.isawaitable(result):
                run_blocking(result)
        except Exception:
            log.exception("sockherd: shutdown hook %s failed", hook_name(hook))


def wait_resumed(timeout: float | None = None) -> bool:
    """Block until the worker is resumed; False if ``timeout`` seconds passed first.

    For threads (a WSGI request, a job runner). Returns True at once when the worker is
    not suspended, standalone included. In a coroutine use :data:`resumed` or
    :func:`wait_resumed_async` instead, which do not block the loop.
    """
    return _worker.resume_state.wait(timeout)


# A `timeout` argument rather than asyncio.timeout(): running out is an answer (False), not an error.
async def wait_resumed_async(timeout: float | None = None) -> bool:  # noqa: ASYNC109
    """:func:`wait_resumed` for coroutines: ``await worker.resumed`` with a timeout."""
    return await _worker.resume_state.wait_async(timeout)


def on_resume(fn: HookT) -> HookT:
    """Register a resume hook (sync or async), run once, when the worker is resumed; a decorator.

    The place to start background work that must not run before the daemon says so
    (say, jobs that need the migrated database schema). On a worker that is not
    suspended (standalone included) the hook runs at once, so the same code works
    everywhere.

    Where it runs: registered while an event loop runs (in a lifespan startup, or at
    import by a server that imports the app inside its loop, as uvicorn does with
    "module:app"), on that loop, an async hook as a task there: that is where an app's
    background tasks must live. Registered outside any loop, a plain function is called
    directly, at resume on the library's IPC thread, so it must return promptly (start
    work, do not do it); an async one runs in ``asyncio.run`` on a thread of its own.
    Exceptions are logged. A ``shutdown`` that comes while suspended resumes the worker
    first, so these hooks are started before the shutdown handler runs.
    """
    _worker.resume_state.add_hook(fn)
    return fn


def on_suspend(fn: HookT) -> HookT:
    """Register a hook (sync or async) run each time the daemon keeps this worker out of
    traffic for a rollback (``restart --keep-previous``, the old workers of a canary's
    slots): the place to pause background work. The twin of :func:`on_resume`, whose
    hooks run again when a rollback takes the worker back into service. Runs where an
    ``on_resume`` hook would."""
    loop: asyncio.AbstractEventLoop | None
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        loop = None
    with _worker._lock:
        _worker._suspend_hooks.append((fn, loop))
    return fn


def set_suspend_handler(fn: Callable[[bool], None] | None) -> None:
    """What a ``suspend`` does to the server: ``fn(True)`` when the daemon keeps this worker
    out of traffic (the uvicorn runner closes its keep-alive connections gracefully),
    ``fn(False)`` when a rollback's ``resume`` takes it back. Runs on the library's
    thread: trigger, do not perform."""
    with _worker._lock:
        _worker._suspend_handler = fn


def backlog_drained() -> bool:
    """True once the daemon's ``shutdown`` said that no connection can reach this worker's
    socket any more: the symlink moved and the listen queue has since been seen empty
    (the daemon's linger). A server may then close its listener at once instead of
    waiting for its backlog to stay quiet (the uvicorn runner and sockherd.server do)."""
    return _worker.backlog_drained


def set_shutdown_handler(fn: Callable[[], None] | None) -> None:
    """Choose what a ``shutdown`` message from the daemon does (None: the default).

    The default sends this process SIGTERM, on which every server already drains. The
    handler runs on the IPC thread, once; it must only trigger the shutdown (set a flag,
    ``loop.call_soon_threadsafe``), not perform it.
    """
    _worker.set_shutdown_handler(fn)


# -- messages and requests ------------------------------------------------------------


def on_message(fn: MessageHandlerT) -> MessageHandlerT:
    """Register a message handler, called as ``fn(message, data)`` for every ``send-msg``
    that reaches this worker (sync or async; a decorator). It runs off the IPC thread: a
    plain function in the library's small thread pool, a coroutine function on the loop
    that was running where it was registered. What it raises is logged."""
    _worker.messages.add_message_handler(fn)
    return fn


def request_handler(name: str) -> Callable[[RequestHandlerT], RequestHandlerT]:
    """Register the handler of request ``name`` (``sockherd send-req NAME``); a decorator.

    It gets the request's data and returns a JSON value (one reply), or is a generator or
    async generator whose every item is one reply of a stream. Where it runs is as for
    :func:`on_message`. If it raises, or answers with something that is not JSON, the
    asker gets an error reply for this worker; the worker carries on.
    """

    def register(fn: RequestHandlerT) -> RequestHandlerT:
        _worker.messages.add_request_handler(name, fn)
        return fn

    return register


def _link() -> IpcLink:
    if _worker.ipc is None:
        raise ConnectionError("not a sockherd worker (no SOCKHERD_IPC): there is no daemon to send through")
    return _worker.ipc


def send_message(
    name: str, data: object = None, *, workers: str | None = None, timeout: float = 10.0
) -> list[dict[str, object]]:
    """Send message ``name`` to other workers through the daemon (``workers``: a selector,
    as ``-w``: ``"!self"``, ``"0"``, ``"$1234"``; default every published worker). Returns
    the workers it was delivered to. Blocks until the daemon confirms: call it from a
    thread, not from an event loop."""
    frames = wait_replies(_link().ask("send-msg", {"workers": workers, "name": name, "data": data}), timeout)
    for msg in frames:
        if msg.errors and not (isinstance(msg.data, dict) and "sent" in msg.data):
            raise RequestFailed("; ".join(msg.errors))
        sent = msg.data.get("sent", []) if isinstance(msg.data, dict) else []
        return [w for w in sent if isinstance(w, dict)]
    return []


def request(name: str, data: object = None, *, workers: str | None = None, timeout: float = 30.0) -> Iterator[Reply]:
    """Ask other workers (or this one: ``"self"``) through the daemon and iterate their
    replies as they stream in: :class:`Reply` items with ``worker`` and ``data`` or
    ``error``. Raises RequestFailed for a bad selector. Blocking: from a thread; in a
    coroutine use :func:`request_async`."""
    replies = _link().ask("send-req", {"workers": workers, "name": name, "data": data, "timeout": timeout})
    return replies_of(wait_replies(replies, timeout + 5.0))


async def request_async(
    name: str,
    data: object = None,
    *,
    workers: str | None = None,
    timeout: float = 30.0,  # noqa: ASYNC109 - the workers' deadline, enforced by the daemon per worker
) -> AsyncIterator[Reply]:
    """:func:`request` for coroutines: the replies are awaited on a thread, never on the loop."""
    items = request(name, data, workers=workers, timeout=timeout)
    done = object()
    while (item := await asyncio.to_thread(next, items, done)) is not done:
        assert isinstance(item, Reply)
        yield item


def listeners() -> list[socket.socket]:
    """The shared listeners the daemon handed over (``listen`` in sockherd.toml), or [].

    systemd's protocol, so this also takes sockets from systemd socket activation:
    ``LISTEN_FDS`` descriptors from fd 3, meant for this process only when ``LISTEN_PID``
    is its pid. Every call returns the same socket objects (made close-on-exec, as
    ``sd_listen_fds`` does); their names (``LISTEN_FDNAMES``) are in :func:`listener_names`.
    With shared listeners there is no :data:`socket_path`: serve on these instead.
    """
    return _sockets.listeners(_env)


def listener_names() -> list[str]:
    """``LISTEN_FDNAMES``, one per :func:`listeners` entry (the daemon names each by its address)."""
    return _sockets.listener_names(_env)


def bind_socket() -> socket.socket:
    """Create the listening socket at :data:`socket_path`, with :data:`socket_mode` and :data:`backlog`.

    The mode holds from the first instant: on Linux the socket inode's mode is set with
    ``fchmod`` before ``bind`` (the file is created with it, masked by the umask), then
    the file is chmod-ed to the exact mode. That avoids changing the process-wide umask,
    which would race with other threads creating files; elsewhere the umask is used.
    The backlog is explicit because a full UNIX backlog makes nginx fail at once (EAGAIN).
    """
    return _sockets.bind_socket(_env)

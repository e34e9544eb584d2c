"""What a worker knows about itself: what the daemon said at spawn, and what it said since.

Two halves, both behind the module-level API of :mod:`sockherd.worker`:

* :class:`Environment` and :func:`read_environment`: the ``SOCKHERD_*`` variables, parsed
  once at import (the daemon's word at spawn time).
* :class:`ResumeState`: whether the worker is still suspended and which slot it serves,
  both of which a ``resume`` from the daemon changes later (a deploy waiting on a
  database migration, a standby promoted into a slot). It is written by the IPC thread
  and waited on from anywhere: threads block on a :class:`threading.Event`; coroutines
  park a future on their own loop, which the resuming thread completes with
  ``call_soon_threadsafe``. So any number of threads and event loops can wait, and no
  one polls.

Also the small machinery that runs hooks (sync or async) for both the resume and the
shutdown hooks, so the two follow the same rules.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import socket
import threading
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("sockherd.worker")

DEFAULT_SOCKET_MODE = 0o660

Hook = Callable[[], object]


# -- the environment ------------------------------------------------------------------


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
    # Shared listeners handed over systemd-style: this many fds from 3, with their names.
    listen_fds: int = 0
    listen_names: tuple[str, ...] = ()


def read_environment(environ: Mapping[str, str], pid: int | None = None) -> Environment:
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
    listen_fds, listen_names = _listen_fds(environ, os.getpid() if pid is None else pid)
    env = Environment(
        socket_path=get("SOCKHERD_SOCKET"),
        worker_id=get("SOCKHERD_WORKER_ID"),
        index=index,
        ipc_path=get("SOCKHERD_IPC"),
        suspended=suspended_text == "1",
        socket_mode=mode,
        backlog=backlog,
        notify_socket=get("NOTIFY_SOCKET"),
        listen_fds=listen_fds,
        listen_names=listen_names,
    )
    if env.ipc_path is not None and env.worker_id is None:
        raise ValueError("SOCKHERD_IPC is set but SOCKHERD_WORKER_ID is not: the daemon could not tell who is calling")
    return env


def _listen_fds(environ: Mapping[str, str], pid: int) -> tuple[int, tuple[str, ...]]:
    """systemd's ``sd_listen_fds``: meant for this process only if ``LISTEN_PID`` names it
    (a child that inherited the variables must not take descriptors that are not its own)."""
    count_text, pid_text = environ.get("LISTEN_FDS"), environ.get("LISTEN_PID")
    if not count_text or not pid_text:
        return 0, ()
    count = _parse(count_text, "LISTEN_FDS", "a positive integer", int)
    if _parse(pid_text, "LISTEN_PID", "a process id", int) != pid or count <= 0:
        return 0, ()
    names = tuple((environ.get("LISTEN_FDNAMES") or "").split(":"))
    if len(names) != count:
        names = tuple("unknown" for _ in range(count))  # as systemd fills in missing names
    return count, names


def _parse(text: str, name: str, expected: str, convert: Callable[[str], int]) -> int:
    try:
        return convert(text)
    except ValueError:
        raise ValueError(f"{name} must be {expected}, got {text!r}") from None


# -- suspended, resumed ---------------------------------------------------------------


class ResumeState:
    """Whether this worker is still suspended, its slot, and everything waiting for a resume.

    The suspension ends once and for good: later resumes only update the index (a
    resume to a running worker is harmless by contract). Everything that waits is
    registered under the lock and released after the flag is set, so a waiter that
    arrives during a resume is either released by it or sees the flag: none is lost.
    """

    def __init__(self, *, suspended: bool, index: int | None) -> None:
        self._lock = threading.Lock()
        self._resumed = threading.Event()
        if not suspended:
            self._resumed.set()
        self._index = index
        self._waiters: dict[asyncio.Future[None], asyncio.AbstractEventLoop] = {}
        self._hooks: list[tuple[Hook, asyncio.AbstractEventLoop | None]] = []
        # Every resume hook, to run again when a parked worker (kept for a rollback,
        # its background work paused by on_suspend) is taken back into service.
        self._all_hooks: list[tuple[Hook, asyncio.AbstractEventLoop | None]] = []
        self._parked = False

    @property
    def suspended(self) -> bool:
        return not self._resumed.is_set()

    @property
    def index(self) -> int | None:
        return self._index

    def resume(self, index: int | None = None) -> bool:
        """Record the daemon's ``resume``; True if it ended the suspension (hooks ran)."""
        release = self.resume_deferred(index)
        if release is None:
            return False
        release()
        return True

    def begin(self, *, suspended: bool, index: int | None) -> None:
        """A worker forked from a preloaded generation starts: its fork server recorded the
        resume hooks without running them (it is no worker); they run now unless this
        worker starts suspended."""
        with self._lock:
            self._index = index
        if not suspended:
            self.resume(index)

    def resume_deferred(self, index: int | None = None) -> Callable[[], None] | None:
        """:meth:`resume`, but the held waiters are released only when the caller calls the
        returned function (None: the suspension had already ended). A shutdown while
        suspended uses it: the server hears of the shutdown (``Connection: close``) before
        any held request can be answered."""
        with self._lock:
            if index is not None:
                self._index = index
            if self._resumed.is_set():
                if not self._parked:
                    return None
                self._parked = False  # back from a park: the on_resume hooks start their work again
                hooks = list(self._all_hooks)
                waiters: dict[asyncio.Future[None], asyncio.AbstractEventLoop] = {}
            else:
                self._resumed.set()
                waiters, self._waiters = self._waiters, {}
                hooks, self._hooks = self._hooks, []
        for hook, hook_loop in hooks:
            run_resume_hook(hook, hook_loop)

        def release() -> None:
            for future, waiter_loop in waiters.items():
                with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits there any more
                    waiter_loop.call_soon_threadsafe(_release, future)

        return release

    def park(self) -> bool:
        """The daemon keeps this worker out of traffic (for a rollback); False if it already was."""
        with self._lock:
            if self._parked:
                return False
            self._parked = True
            return True

    @property
    def parked(self) -> bool:
        return self._parked

    def wait(self, timeout: float | None) -> bool:
        return self._resumed.wait(timeout)

    def future(self) -> asyncio.Future[None] | None:
        """A future of the running loop, done on resume; None when already resumed."""
        if self._resumed.is_set():  # the common case, and no future to create
            return None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self._resumed.is_set():
                return None
            self._waiters[future] = loop
        future.add_done_callback(self._forget)  # a cancelled wait must not pile up until the resume
        return future

    async def wait_async(self, timeout: float | None) -> bool:  # noqa: ASYNC109 (running out is an answer)
        future = self.future()
        if future is None:
            return True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await future
        return self._resumed.is_set()

    def add_hook(self, hook: Hook) -> None:
        """Run ``hook`` on resume, or now if not suspended (see :func:`run_resume_hook`)."""
        loop = _running_loop()
        with self._lock:
            self._all_hooks.append((hook, loop))
            if not self._resumed.is_set():
                self._hooks.append((hook, loop))
                return
        run_resume_hook(hook, loop)

    def after_fork_in_child(self) -> None:
        # The parent's loops and waiters do not exist in the child; the child's own do not yet.
        self._lock = threading.Lock()
        self._waiters = {}

    def _forget(self, future: asyncio.Future[None]) -> None:
        with self._lock:
            self._waiters.pop(future, None)


def _release(future: asyncio.Future[None]) -> None:
    if not future.done():  # it may have been cancelled (a request that timed out) meanwhile
        future.set_result(None)


class Resumed:
    """``await worker.resumed``: completes when the worker is resumed, at once if it is not suspended.

    An object rather than a coroutine so that it can be awaited any number of times,
    from any event loop in the process, and costs nothing once resumed.
    """

    __slots__ = ("_state",)

    def __init__(self, state: ResumeState) -> None:
        self._state = state

    def __await__(self) -> Generator[Any, None, None]:
        future = self._state.future()
        if future is not None:
            yield from future.__await__()

    def __repr__(self) -> str:
        return f"<sockherd.worker.resumed: {'pending' if self._state.suspended else 'done'}>"


# -- hooks ----------------------------------------------------------------------------

_hook_tasks: set[asyncio.Future[Any]] = set()  # strong references: the loop keeps only weak ones


def run_resume_hook(hook: Hook, loop: asyncio.AbstractEventLoop | None) -> None:
    """Run a resume hook where it belongs, without blocking the caller (the IPC thread).

    A hook registered while an event loop was running runs on that loop, an async one
    as a task there: that is where an app's background jobs must live. A plain function
    registered outside any loop is called right here; an async one gets ``asyncio.run``
    on a thread of its own, since the IPC thread must stay free for ``shutdown``.
    Failures are logged; they never stop the other hooks or the resume.
    """
    if loop is not None:
        if loop is _running_loop():
            _start_on_loop(hook)
            return
        try:
            loop.call_soon_threadsafe(_start_on_loop, hook)
            return
        except RuntimeError:  # that loop is closed: run the hook here rather than never
            pass
    result = _call_hook(hook)
    if result is not None:
        name = hook_name(hook)
        thread = threading.Thread(target=_run_detached, args=(result, name), name="sockherd-resume-hook", daemon=True)
        thread.start()


def _call_hook(hook: Hook) -> Awaitable[Any] | None:
    """Call a hook; a failure is logged, never raised. Returns what is left to await."""
    try:
        result = hook()
    except Exception:
        log.exception("sockherd: resume hook %s failed", hook_name(hook))
        return None
    return result if inspect.isawaitable(result) else None


def _start_on_loop(hook: Hook) -> None:
    result = _call_hook(hook)
    if result is not None:
        task = asyncio.ensure_future(result)
        _hook_tasks.add(task)
        task.add_done_callback(lambda done: _hook_task_done(done, hook_name(hook)))


def _hook_task_done(task: asyncio.Future[Any], name: str) -> None:
    _hook_tasks.discard(task)
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("sockherd: resume hook %s failed", name, exc_info=exc)


def _run_detached(awaitable: Awaitable[Any], name: str) -> None:
    try:
        run_blocking(awaitable)
    except Exception:
        log.exception("sockherd: resume hook %s failed", name)


def run_blocking(awaitable: Awaitable[Any]) -> None:
    """Await ``awaitable`` from synchronous code, in ``asyncio.run``.

    Called from a thread that runs an event loop, it runs on a short-lived thread of
    its own, since that loop cannot be re-entered.
    """

    async def wait() -> None:
        await awaitable

    if _running_loop() is None:
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


def hook_name(fn: Callable[..., object]) -> str:
    return getattr(fn, "__qualname__", None) or repr(fn)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None

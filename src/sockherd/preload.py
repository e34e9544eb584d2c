"""Preloaded generations, the worker's side: import the app once, fork every worker from it.

    app = import_the_app()      # everything imported before the fork point is shared
    preload.fork_point()        # under ``preload = true``: returns in each forked worker
    serve(app)

With ``preload = true`` the daemon starts the worker command once per generation with
``SOCKHERD_PRELOAD_FD`` set instead of a worker's environment. That process (the *fork
server*) imports the app, then :func:`fork_point` tells the daemon it is ready and
waits for fork requests on the inherited socket; each request carries a worker's
environment (``SOCKHERD_WORKER_ID``, its socket, …) and, as descriptors, its log files
and the shared listeners. Without ``SOCKHERD_PRELOAD_FD`` (no preload, or standalone),
:func:`fork_point` returns at once and the program serves as it always did: the same
program works both ways.

Why the worker is a grandchild (fork, fork again, the middle one exits): the daemon
must stay each worker's parent (it reaps them, reads their exit status and kills their
process group, exactly as for workers it executes itself). The daemon is a child
subreaper (``PR_SET_CHILD_SUBREAPER``), so an orphaned grandchild is reparented to it,
and that has happened by the time the fork server has reaped the middle process and
answers with the worker's pid.

Requests that arrive together (a deploy's, a scale-up's: the daemon sends them without
waiting for answers) are forked together: every middle process is started before the
first pid is read, so the workers start side by side, and the answers go out in the
order asked. Each worker closes what it inherited of its neighbours' requests (their
log files and listeners, their pipes).

What a forked worker starts with: its own session and process group; its log files on
stdout and stderr; the listeners at fds 3.. with ``LISTEN_PID`` its own pid; the
environment of a worker; :mod:`random` re-seeded; the :mod:`sockherd.worker` module
re-reading that environment (hooks and handlers registered at import are kept) and its
link to the daemon started; then the :func:`sockherd.worker.on_fork` hooks. Not in the
worker: the fork server's other threads (a thread started at import does not exist
after ``fork()``: start threads in ``on_fork`` or later), and nothing is done about
connections opened at import (a database pool opened at import would be shared by every
worker: open it in ``on_fork``).

How a forked worker ends (:func:`exit_forked_worker`, which the uvicorn runner calls once
it has served): its threads joined, its atexit hooks run, stdout and stderr flushed, then
``os._exit``, as :mod:`multiprocessing` ends the children it forks (which skip even the
atexit hooks). The interpreter's teardown that this skips frees every object one by one:
it writes to every page the worker still shares with its fork server, copying memory
about to be freed, at the moment a deploy has two generations alive, and takes tens of
milliseconds of CPU per worker while the new generation serves (measured: 20 ms idle,
60-80 ms under load for the small app of benchmarks/restart_time.py). What the teardown
would have done and no longer does: call ``__del__`` on objects still alive (CPython
does not promise that at exit either) and so flush files the app left open without
closing them. ``preload_teardown = true`` keeps it.
"""

from __future__ import annotations

import array
import contextlib
import gc
import importlib
import json
import logging
import os
import random
import socket
import sys
import threading
import traceback
from typing import Any, NoReturn

from sockherd import worker

__all__ = ["PRELOAD_FD_VAR", "SPARE_VAR", "exit_forked_worker", "fork_point", "preloading", "warm_point"]

PRELOAD_FD_VAR = "SOCKHERD_PRELOAD_FD"
SPARE_VAR = "SOCKHERD_PRELOAD_SPARE"  # set for a spare: wait at warm_point for the next deploy
MAX_REQUEST = 64 * 1024
MAX_FDS = 64
_SD_LISTEN_FDS_START = 3

log = logging.getLogger("sockherd.preload")


def preloading() -> bool:
    """True in the fork server (the daemon asked this process to preload the app)."""
    return bool(os.environ.get(PRELOAD_FD_VAR))


_warm_point_reached = False  # the program calls warm_point: the daemon may keep spares of it


def warm_point() -> None:
    """Where a *spare* fork server waits for the next deploy: after the server's own
    imports, before the app's. Call it just before importing the app (the uvicorn runner
    does); without a spare to be, it returns at once.

    Between deploys the daemon keeps one spare per preloaded command: the interpreter
    started and the server imported ahead of time. A deploy hands it the workers' log
    files and the config's ``cwd``; the spare checks that nothing it loaded has changed
    on disk since (:mod:`sockherd._import_snapshot`: a ``pip install -U`` of uvicorn,
    another interpreter, a ``current`` symlink flipped to another release) and returns,
    so the caller imports the app from the disk as it is now, and reaches
    :func:`fork_point`. If anything changed it tells the daemon, which starts the fork
    server afresh, and exits. Programs that never call this get no spares.
    """
    global _warm_point_reached
    _warm_point_reached = True
    if not os.environ.pop(SPARE_VAR, None):
        return
    from sockherd._import_snapshot import ImportSnapshot

    fd_text = os.environ.get(PRELOAD_FD_VAR)
    if not fd_text:
        return
    channel = socket.socket(fileno=int(fd_text))
    try:
        snapshot = ImportSnapshot.take()
        try:
            _send(channel, {"warm": True, "pid": os.getpid()})
        except OSError:
            _exit_quietly()  # dropped while it started (the daemon quit, or needs no spare now)
        request, fds = _receive(channel)
        if request is None:
            _exit_quietly()  # retired before any deploy came
        _take_outputs(request.get("outputs", []), fds)
        try:
            os.chdir(str(request.get("cwd", ".")))
            stale = snapshot.changed()
        except OSError as exc:
            stale = f"its working directory is gone ({exc.strerror})"
        if stale is not None:
            with contextlib.suppress(OSError):
                _send(channel, {"stale": stale})
            _exit_quietly()
        importlib.invalidate_caches()  # what the finders remember of directories is as old as this process
    finally:
        channel.detach()  # the descriptor stays: fork_point uses it


def _take_outputs(names: list[str], fds: list[int]) -> None:
    """The deploy's own log files on stdout/stderr: the files named in the config may have
    been rotated since the spare started."""
    _flush_stdio()
    for name, fd in zip(names, fds, strict=False):
        os.dup2(fd, 1 if name == "stdout" else 2)
    _close_all(fds)


def fork_point() -> None:
    """Become the generation's fork server if the daemon asked for one; return in each worker.

    In the fork server this returns only in forked workers: the fork server itself exits
    when the daemon closes the channel (its generation retired, or the daemon gone).
    Without preload it runs the :func:`sockherd.worker.on_fork` hooks and returns.
    """
    fd_text = os.environ.pop(PRELOAD_FD_VAR, None)
    if not fd_text:
        worker._run_fork_hooks()
        return
    channel = socket.socket(fileno=int(fd_text))
    channel.set_inheritable(False)
    if threading.active_count() > 1:
        names = ", ".join(t.name for t in threading.enumerate() if t is not threading.current_thread())
        log.warning(
            "sockherd preload: threads started while importing the app (%s) do not exist in forked "
            "workers: start them in a worker.on_fork hook",
            names,
        )
    # What the import made is never collected here, and the collector in a worker does not
    # write to it (a collection touches every tracked object's header): its pages stay
    # shared copy-on-write. Python's gc docs recommend exactly this before forking.
    gc.freeze()
    _send(channel, {"ready": True, "pid": os.getpid(), "spares": _warm_point_reached})
    while True:
        batch = _receive_batch(channel)
        if not batch:
            _exit_quietly()  # the daemon closed the channel: this generation is retired
        try:
            forks = _start_forks(channel, batch)
        except _InWorker:
            return  # this is the worker (its set-up closed the received fds): serve
        _answer(channel, batch, forks)


def _receive_batch(channel: socket.socket) -> list[tuple[dict[str, Any], list[int]]]:
    """The next request (waiting for it), and every request queued behind it: a deploy's
    forks arrive together, and starting them all before waiting for the first to answer
    lets the workers start side by side. Empty once the daemon closed the channel."""
    batch = []
    request, fds = _receive(channel)
    while request is not None:
        batch.append((request, fds))
        try:
            request, fds = _receive(channel, wait=False)
        except BlockingIOError:
            return batch
    if batch:  # the daemon closed the channel with requests unanswered: it is gone
        _close_all([fd for _, received in batch for fd in received])
        return []
    return batch


_Fork = tuple[int, int] | OSError  # (the pipe the worker's pid comes on, the middle process), or why not


def _start_forks(channel: socket.socket, batch: list[tuple[dict[str, Any], list[int]]]) -> list[_Fork]:
    """Start a fork for each request; raises :class:`_InWorker` in each worker."""
    forks: list[_Fork] = []
    for index, (request, fds) in enumerate(batch):
        # What the worker must not keep: the other requests' descriptors, the other pipes.
        others = [fd for other, (_, received) in enumerate(batch) if other != index for fd in received]
        others += [fork[0] for fork in forks if not isinstance(fork, OSError)]
        try:
            forks.append(_start_fork(channel, request, fds, others))
        except OSError as exc:
            forks.append(exc)
    return forks


def _answer(channel: socket.socket, batch: list[tuple[dict[str, Any], list[int]]], forks: list[_Fork]) -> None:
    """Each worker's pid, or why there is none, in the order asked."""
    for fds in (received for _, received in batch):
        _close_all(fds)
    for index, fork in enumerate(forks):
        pid = None if isinstance(fork, OSError) else _finish_fork(*fork)
        if isinstance(fork, OSError):
            answer: dict[str, Any] = {"error": f"fork failed: {fork.strerror or fork}"}
        elif pid is None:
            answer = {"error": "fork failed: the worker could not be forked (see the output above)"}
        else:
            answer = {"pid": pid}
        try:
            _send(channel, answer)
        except OSError:  # the daemon is gone (or gave up on us): nobody would manage these workers
            unanswered = [pid] + [_finish_fork(*f) for f in forks[index + 1 :] if not isinstance(f, OSError)]
            for orphan in unanswered:
                if orphan is not None:
                    with contextlib.suppress(OSError):
                        os.killpg(orphan, 9)
            _exit_quietly()


_skip_teardown = False  # a forked worker, and the daemon did not ask for the teardown (preload_teardown)


def exit_forked_worker(status: int = 0) -> None:
    """Exit now if this is a worker forked by a fork server, else return at once.

    For the end of a preloading program, once it has served (its server stopped, its
    shutdown hooks run). In a forked worker this does what the interpreter does at exit
    up to its teardown: wait for the threads that are not daemon threads (and let
    :mod:`concurrent.futures` stop its pools), run the :mod:`atexit` hooks (among them
    :func:`logging.shutdown`), flush stdout and stderr; then it ends the process with
    ``status``, skipping the teardown (see the module's docstring for why). It returns
    without doing anything in a process that was not forked by a fork server (no
    preload, standalone), and when ``preload_teardown = true``: the caller then returns
    and the interpreter exits as usual. Call it from the main thread.
    """
    if not _skip_teardown:
        return
    import atexit

    wait_for_threads = getattr(threading, "_shutdown", None)  # what Py_Finalize calls first
    if wait_for_threads is None:
        return  # an interpreter without it: its own exit, teardown included
    wait_for_threads()
    atexit._run_exitfuncs()
    _flush_stdio()
    os._exit(status)


class _InWorker(Exception):
    """Raised in the forked worker, after it set itself up, to unwind into :func:`fork_point`'s caller."""


def _start_fork(channel: socket.socket, request: dict[str, Any], fds: list[int], others: list[int]) -> tuple[int, int]:
    """Fork, and in the child fork again and exit: the worker is the grandchild, set up
    and raising :class:`_InWorker`. In the fork server: (the read end of the pipe the
    worker's pid comes on, the middle process's pid), for :func:`_finish_fork`.

    Anything that goes wrong in the middle process or in the worker's set-up ends that
    process with status 70 (EX_SOFTWARE) after printing why: it must never fall back
    into the fork server's loop. ``others``: descriptors the worker closes.
    """
    _flush_stdio()  # what the app printed at import: not once per worker
    read_end, write_end = os.pipe()
    try:
        middle = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        raise
    if middle == 0:
        try:
            os.close(read_end)
            if os.fork() == 0:
                # The pid goes out only once the worker leads its own process group: the
                # daemon may kill that group the moment it has the pid (a launch given up).
                os.setsid()
                os.write(write_end, str(os.getpid()).encode())
                os.close(write_end)
                _close_all(others)
                _set_up_worker(channel, request, fds)
                raise _InWorker
        except _InWorker:
            raise
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(70)
        os._exit(0)  # the middle process: nothing of its own to flush
    os.close(write_end)
    return read_end, middle


def _finish_fork(read_end: int, middle: int) -> int | None:
    """The worker's pid once it leads its group, and the middle process reaped; None if
    there is no worker (the middle process or its set-up failed: its output says why)."""
    try:
        data = _read_all(read_end)
    finally:
        os.close(read_end)
    os.waitpid(middle, 0)
    return int(data) if data else None


def _set_up_worker(channel: socket.socket, request: dict[str, Any], fds: list[int]) -> None:
    """In the forked worker (already its own session): become what the daemon would have executed."""
    channel.close()
    outputs: list[str] = request.get("outputs", [])
    listen_count = int(request.get("listen", 0))
    received = list(fds)
    # Outputs first (they name stdout/stderr), then the listeners to 3..: each source is
    # first duplicated above every target, so no dup2 overwrites a source still to come.
    high = _SD_LISTEN_FDS_START + listen_count
    moved = [_dup_above(fd, high) for fd in received]  # a plain dup could land on a target
    for fd in received:
        _close(fd)
    position = 0
    for name in outputs:
        os.dup2(moved[position], 1 if name == "stdout" else 2)
        position += 1
    for i in range(listen_count):
        os.dup2(moved[position + i], _SD_LISTEN_FDS_START + i)
    for fd in moved:
        _close(fd)
    environment: dict[str, str] = request.get("env", {})
    os.environ.update(environment)
    if listen_count:
        os.environ["LISTEN_PID"] = str(os.getpid())
    random.seed()
    global _skip_teardown
    _skip_teardown = not request.get("teardown", False)
    sys.stdout.flush()
    worker._become_forked_worker()


def _dup_above(fd: int, minimum: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, minimum)


def _read_all(fd: int) -> bytes:
    chunks = []
    while chunk := os.read(fd, 64):
        chunks.append(chunk)
    return b"".join(chunks)


def _send(channel: socket.socket, message: dict[str, Any]) -> None:
    channel.sendall(json.dumps(message).encode())


def _receive(channel: socket.socket, *, wait: bool = True) -> tuple[dict[str, Any] | None, list[int]]:
    """The next message and its descriptors; (None, []) at EOF. Without ``wait``, raises
    BlockingIOError when nothing is queued. (``socket.recv_fds`` would do, but it drops
    its ``flags`` argument, up to Python 3.13 at least: MSG_DONTWAIT would block.)"""
    fds = array.array("i")
    try:
        data, ancillary, _flags, _addr = channel.recvmsg(
            MAX_REQUEST, socket.CMSG_LEN(MAX_FDS * fds.itemsize), 0 if wait else socket.MSG_DONTWAIT
        )
    except ConnectionResetError:
        return None, []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
    if not data:
        _close_all(list(fds))
        return None, []
    return json.loads(data), list(fds)


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        _close(fd)


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _exit_quietly(status: int = 0) -> NoReturn:
    """Without atexit: the app's shutdown hooks belong to its workers, not to the fork server."""
    _flush_stdio()
    os._exit(status)


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()

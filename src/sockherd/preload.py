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

import contextlib
import gc
import importlib
import logging
import os
import random
import socket
import sys
import threading
from typing import Any

from sockherd import _fork_requests, worker

__all__ = ["PRELOAD_FD_VAR", "SPARE_VAR", "exit_forked_worker", "fork_point", "preloading", "warm_point"]

PRELOAD_FD_VAR = "SOCKHERD_PRELOAD_FD"
SPARE_VAR = "SOCKHERD_PRELOAD_SPARE"  # set for a spare: wait at warm_point for the next deploy

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
            _fork_requests.send(channel, {"warm": True, "pid": os.getpid()})
        except OSError:
            _fork_requests.exit_quietly()  # dropped while it started (the daemon quit, or needs no spare now)
        request, fds = _fork_requests.receive(channel)
        if request is None:
            _fork_requests.exit_quietly()  # retired before any deploy came
        _take_outputs(request.get("outputs", []), fds)
        try:
            os.chdir(str(request.get("cwd", ".")))
            stale = snapshot.changed()
        except OSError as exc:
            stale = f"its working directory is gone ({exc.strerror})"
        if stale is not None:
            with contextlib.suppress(OSError):
                _fork_requests.send(channel, {"stale": stale})
            _fork_requests.exit_quietly()
        importlib.invalidate_caches()  # what the finders remember of directories is as old as this process
    finally:
        channel.detach()  # the descriptor stays: fork_point uses it


def _take_outputs(names: list[str], fds: list[int]) -> None:
    """The deploy's own log files on stdout/stderr: the files named in the config may have
    been rotated since the spare started."""
    _fork_requests.flush_stdio()
    for name, fd in zip(names, fds, strict=False):
        os.dup2(fd, 1 if name == "stdout" else 2)
    _fork_requests.close_all(fds)


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
    _fork_requests.send(channel, {"ready": True, "pid": os.getpid(), "spares": _warm_point_reached})
    _fork_requests.serve(channel, _become_worker)  # returns in each forked worker, set up


_skip_teardown = False  # a forked worker, and the daemon did not ask for the teardown (preload_teardown)


def _become_worker(request: dict[str, Any]) -> None:
    """In a forked worker, its descriptors in place: become what the daemon would have executed."""
    os.environ.update(request.get("env", {}))
    if request.get("listen", 0):
        os.environ["LISTEN_PID"] = str(os.getpid())
    random.seed()
    global _skip_teardown
    _skip_teardown = not request.get("teardown", False)
    sys.stdout.flush()
    worker._become_forked_worker()


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
    _fork_requests.flush_stdio()
    os._exit(status)
